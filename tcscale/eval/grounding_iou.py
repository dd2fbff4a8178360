"""Grounding mIoU: how well a phrase's cross-attention map segments the phrase's object.

Per phrase p (docs/DESIGN.md §8, TokenCompose Table 4 with DAAM's protocol):

1. Each layer's map is averaged over heads — a layer is given as (P, h, w) (already head-averaged)
   or (H, P, h, w) — and upsampled to the mask size (H_img, W_img) (bilinear, ``align_corners=False``,
   by default; "bicubic" is DAAM's choice); the layers are then averaged, so layers of different
   resolutions (8², 16², 32², 64² on SD1.4) mix at full resolution.
2. The phrase map is normalised on its own: DAAM's default is min–max, ``(m − min) / (max − min + 1e-8)``
   (``normalize="minmax"``); "max" divides by the maximum, "none" keeps absolute values.
3. It is binarised with ``> threshold``; DAAM's τ = 0.4 is the default.
4. IoU = |pred ∩ mask| / |pred ∪ mask|; when both are empty the IoU is 1 (nothing to find, nothing
   found) — masks of real phrases are never empty.

Source for the DAAM choices (castorini/daam): ``daam/utils.py::expand_image`` and
``WordHeatMap.expand_as`` (bicubic upsampling, min–max normalisation with 1e-8, ``im > threshold``)
and ``daam/run/daam_to_mask.py`` / ``compute_mask.py`` (``--threshold`` default 0.4); DAAM clamps the
undershoot of bicubic upsampling at 0 (``daam/trace.py``), and so does ``mode="bicubic"`` here
(bilinear interpolation cannot undershoot).

Scores: per phrase the IoU of the layer-averaged map, and per layer the IoU of that layer's map
alone (same normalisation and threshold); ``grounding_miou`` averages over every phrase of every
sample (the mean over phrases, as DAAM's ``MeanEvaluator``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

NORMALIZATIONS = ("minmax", "max", "none")
DAAM_THRESHOLD = 0.4

LayerMaps = Mapping[str, "torch.Tensor | np.ndarray"] | Sequence["torch.Tensor | np.ndarray"]


def _named_layers(layer_maps: LayerMaps) -> list[tuple[str, torch.Tensor]]:
    items = list(layer_maps.items()) if isinstance(layer_maps, Mapping) else list(enumerate(layer_maps))
    if not items:
        raise ValueError("grounding IoU needs at least one layer's attention maps")
    out = []
    for name, m in items:
        t = torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m).detach().to(torch.float64)
        if t.ndim == 4:  # (H, P, h, w): average the heads
            t = t.mean(dim=0)
        if t.ndim != 3:
            raise ValueError(f"layer {name!r}: maps must be (P, h, w) or (heads, P, h, w), got {tuple(t.shape)}")
        out.append((str(name), t))
    phrases = {t.shape[0] for _, t in out}
    if len(phrases) != 1:
        raise ValueError(f"layers disagree on the number of phrases: {sorted(phrases)}")
    return out


def upsample_maps(maps: torch.Tensor | np.ndarray, size: tuple[int, int], *, mode: str = "bilinear") -> torch.Tensor:
    """(P, h, w) -> (P, H, W) float64 by ``mode`` interpolation ("bilinear", or "bicubic" clamped at 0 as DAAM
    does; align_corners=False). Maps are attention probabilities, so non-negative."""
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"mode must be 'bilinear' or 'bicubic', got {mode!r}")
    t = torch.as_tensor(maps, dtype=torch.float64)
    if tuple(t.shape[-2:]) == tuple(size):
        return t.clone()
    up = F.interpolate(t[None], size=tuple(size), mode=mode, align_corners=False)[0]
    return up.clamp(min=0) if mode == "bicubic" else up  # bicubic undershoots below 0; DAAM clamps it


def phrase_heatmaps(layer_maps: LayerMaps, size: tuple[int, int], *, mode: str = "bilinear") -> torch.Tensor:
    """Head- and layer-averaged phrase maps (P, H, W): every layer upsampled to ``size`` first."""
    layers = _named_layers(layer_maps)
    return torch.stack([upsample_maps(t, size, mode=mode) for _, t in layers]).mean(dim=0)


def normalize_maps(maps: torch.Tensor, normalize: str = "minmax") -> torch.Tensor:
    """Per-phrase normalisation of (P, H, W) maps: "minmax" (DAAM), "max" or "none"."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {list(NORMALIZATIONS)}, got {normalize!r}")
    if normalize == "none":
        return maps
    flat = maps.reshape(maps.shape[0], -1)
    hi = flat.max(dim=1).values[:, None, None]
    if normalize == "max":
        return maps / (hi + 1e-8)
    lo = flat.min(dim=1).values[:, None, None]
    return (maps - lo) / (hi - lo + 1e-8)


def binarize_maps(maps: torch.Tensor, *, threshold: float = DAAM_THRESHOLD, normalize: str = "minmax") -> torch.Tensor:
    """(P, H, W) bool: normalised map > ``threshold`` (DAAM: min–max, τ = 0.4)."""
    return normalize_maps(maps, normalize) > threshold


def mask_iou(pred: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-phrase IoU of two (P, H, W) binary stacks (1.0 where both are empty)."""
    p = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).bool()
    m = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks) > 0
    if p.shape != m.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and masks {tuple(m.shape)} differ in shape")
    inter = (p & m).flatten(1).sum(dim=1).double()
    union = (p | m).flatten(1).sum(dim=1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).numpy()


def grounding_iou(
    layer_maps: LayerMaps,
    masks: torch.Tensor | np.ndarray,
    *,
    threshold: float = DAAM_THRESHOLD,
    normalize: str = "minmax",
    mode: str = "bilinear",
) -> dict:
    """IoUs of one sample's phrases.

    Args:
        layer_maps: per layer (a mapping name -> maps, or a list) the cross-attention maps of the P
            phrases, (P, h, w) or (heads, P, h, w); resolutions may differ between layers.
        masks: (P, H, W) binary masks, the phrases in the same order.
        threshold / normalize / mode: see the module docstring (defaults: DAAM's τ = 0.4, min–max,
            bilinear upsampling).

    Returns:
        ``{"iou": (P,) IoU of the layer-averaged map, "miou": their mean,
        "per_layer": {layer: (P,) IoU of that layer alone}}``.
    """
    m = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks)
    if m.ndim != 3:
        raise ValueError(f"masks must be (P, H, W), got {tuple(m.shape)}")
    layers = _named_layers(layer_maps)
    if layers[0][1].shape[0] != m.shape[0]:
        raise ValueError(f"{layers[0][1].shape[0]} phrase maps but {m.shape[0]} masks")
    size = (int(m.shape[1]), int(m.shape[2]))
    up = {name: upsample_maps(t, size, mode=mode) for name, t in layers}
    mean_map = torch.stack(list(up.values())).mean(dim=0)
    iou = mask_iou(binarize_maps(mean_map, threshold=threshold, normalize=normalize), m)
    per_layer = {
        name: mask_iou(binarize_maps(t, threshold=threshold, normalize=normalize), m) for name, t in up.items()
    }
    return {"iou": iou, "miou": float(iou.mean()) if len(iou) else float("nan"), "per_layer": per_layer}


def grounding_miou(
    samples: Iterable[tuple[LayerMaps, torch.Tensor | np.ndarray]],
    *,
    threshold: float = DAAM_THRESHOLD,
    normalize: str = "minmax",
    mode: str = "bilinear",
) -> dict:
    """Mean IoU over every phrase of every (layer_maps, masks) sample: ``{"miou", "per_layer": {layer:
    mIoU}, "phrases": count}``. Layers are matched by name (list positions when given as lists)."""
    ious: list[np.ndarray] = []
    per_layer: dict[str, list[np.ndarray]] = {}
    for layer_maps, masks in samples:
        out = grounding_iou(layer_maps, masks, threshold=threshold, normalize=normalize, mode=mode)
        ious.append(out["iou"])
        for name, v in out["per_layer"].items():
            per_layer.setdefault(name, []).append(v)
    if not ious or not sum(len(v) for v in ious):
        raise ValueError("no phrases to score")
    return {
        "miou": float(np.concatenate(ious).mean()),
        "per_layer": {name: float(np.concatenate(v).mean()) for name, v in per_layer.items()},
        "phrases": int(sum(len(v) for v in ious)),
    }


__all__ = [
    "DAAM_THRESHOLD",
    "NORMALIZATIONS",
    "upsample_maps",
    "phrase_heatmaps",
    "normalize_maps",
    "binarize_maps",
    "mask_iou",
    "grounding_iou",
    "grounding_miou",
]
