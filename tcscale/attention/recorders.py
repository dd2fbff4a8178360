"""What a grounded cross-attention layer does with its attention during one U-Net call: the recorders.

A recorder travels into the U-Net as ``cross_attention_kwargs={"grounding": recorder}`` (``recorder.kwargs``) and
each grounding processor hands it its layer's q, k, v; the recorder returns the attention output and keeps what it
is for:

* `LossRecorder`  — each layer's TokenCompose token / pixel losses (training);
* `GroupedLossRecorder` — the same losses per (place, resolution) group of layers, for the official code's pixel
  loss on the group-averaged map (``pixel_loss_reduction="per_resolution"``; keeps each layer's probabilities);
* `ProbsRecorder` — each layer's probabilities, kept in the graph (SepEn's losses read them);
* `MapCapture`    — detached head-averaged maps summed per layer over calls (heatmaps, grounding mIoU).

Every recorder is a context manager and records only while its ``with`` block is open:

    with LossRecorder(...) as rec:
        pred = unet(x, t, text, cross_attention_kwargs=rec.kwargs).sample
    token = rec.total("token")

Why the state travels as a forward argument and closes on exit: a non-reentrant activation checkpoint re-runs the
checkpointed blocks during backward with the same arguments, so the recompute takes the same branch and saves the
same tensors (a recorder that vanished after the forward made the recompute take the SDPA branch: torch's
CheckpointError, docs/LOG.md 2026-11-23); closed by then, the recorder computes the same values but records nothing
twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tcscale.attention.plan import MaskRule, layer_size
from tcscale.attention.reference import attention_probs, cross_attention_with_grounding_reference
from tcscale.losses.grounding import check_token_phrase, grounding_losses, grounding_losses_grouped


class Recorder:
    """Base: the context-manager protocol and the ``attend`` hook a grounding processor calls."""

    def __init__(self, latent_size: tuple[int, int]):
        self.latent_size = (int(latent_size[0]), int(latent_size[1]))  # (h, w) of the U-Net's input latent
        self._open = False

    def __enter__(self):
        self._open = True
        return self

    def __exit__(self, *exc) -> None:
        self._open = False

    @property
    def recording(self) -> bool:
        return self._open

    @property
    def kwargs(self) -> dict[str, Recorder]:
        """The U-Net's ``cross_attention_kwargs``."""
        return {"grounding": self}

    def held(self) -> tuple[torch.Tensor, ...]:
        """Tensors the recorder keeps outside autograd until its results are read (none by default)."""
        return ()

    def attend(self, layer: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str):
        """(B, H, Lq, d) attention output of one grounded layer; q: (B, H, Lq, d), k, v: (B, H, Lk, d)."""
        raise NotImplementedError

    def ground(self, layer: str, attn_map: torch.Tensor) -> None:
        """Take the (B, H, Lq, Lk) grounding map of a layer whose processor computes its attention itself (an
        MMDiT's joint attention: the image-query x text-key block, tcscale.attention.joint), float32, in the graph."""
        raise NotImplementedError(f"{type(self).__name__} takes no processor-computed grounding maps")


@dataclass
class LayerLoss:
    name: str
    size: tuple[int, int]
    token: torch.Tensor  # scalar
    pixel: torch.Tensor  # scalar


class LossRecorder(Recorder):
    """TokenCompose: each grounded layer's token and pixel losses (docs/DESIGN.md §3) against the batch's phrase masks.

    Args:
        latent_size: (h, w) of the U-Net input latent.
        token_phrase: (B, Lk) int64 phrase slot of each token, or -1.
        layer_masks: {(h, w): (B, P, h*w)} masks per layer grid (the loader makes them from the grounding plan);
        phrase_masks: (B, P, H, W) full-resolution masks, resized on first use with `mask_rule` for any grid that
            `layer_masks` lacks. At least one of the two.
        token_loss_heads: "mean_map" (paper Eq. 5) | "per_head" (official code).
        validate: check token_phrase against the phrase slots here, once (one host sync); the layers then never
            synchronise. With False each layer checks it (tests of the per-layer check).
    """

    def __init__(
        self,
        latent_size: tuple[int, int],
        token_phrase: torch.Tensor,
        *,
        layer_masks: dict[tuple[int, int], torch.Tensor] | None = None,
        phrase_masks: torch.Tensor | None = None,
        mask_rule: MaskRule | None = None,
        token_loss_heads: str = "mean_map",
        validate: bool = True,
    ):
        super().__init__(latent_size)
        self.layer_masks = {tuple(k): v for k, v in (layer_masks or {}).items()}
        self.phrase_masks = phrase_masks
        if not self.layer_masks and phrase_masks is None:
            raise ValueError("LossRecorder needs phrase masks: layer_masks (per layer grid) or full-resolution ones")
        self.token_phrase = token_phrase
        self.mask_rule = mask_rule or MaskRule()
        self.token_loss_heads = token_loss_heads
        self.validated = False
        if validate:
            masks = phrase_masks if phrase_masks is not None else next(iter(self.layer_masks.values()))
            check_token_phrase(token_phrase, masks.shape[1])
            self.validated = True
        self.records: list[LayerLoss] = []

    def masks_for(self, size: tuple[int, int], device: torch.device) -> torch.Tensor:
        masks = self.layer_masks.get(size)
        if masks is None:
            if self.phrase_masks is None:
                raise KeyError(f"no phrase masks for layer grid {size[0]}x{size[1]} and no full-resolution masks")
            masks = self.mask_rule.apply(self.phrase_masks, size)
            self.layer_masks[size] = masks
        return masks.to(device)

    def attend(self, layer, q, k, v, scale, backend):
        size = layer_size(q.shape[2], self.latent_size)
        masks = self.masks_for(size, q.device)  # (B, P, Lq)
        token_phrase = self.token_phrase.to(q.device)
        if backend == "fused":
            from kernels import cross_attention_with_grounding

            out, token, pixel = cross_attention_with_grounding(
                q, k, v, masks, token_phrase, scale=scale, validate_values=not self.validated,
                token_loss_heads=self.token_loss_heads,
            )  # fmt: skip
        else:
            out, token, pixel = cross_attention_with_grounding_reference(
                q, k, v, masks, token_phrase, scale, probs_dtype=torch.float32, validate_values=not self.validated,
                token_loss_heads=self.token_loss_heads,
            )  # fmt: skip
        if self.recording:
            self.records.append(LayerLoss(layer, size, token, pixel))
        return out

    def ground(self, layer, attn_map):
        size = layer_size(attn_map.shape[2], self.latent_size)
        masks = self.masks_for(size, attn_map.device)
        losses = grounding_losses(
            attn_map, masks, self.token_phrase.to(attn_map.device), token_loss_heads=self.token_loss_heads,
            validate_values=not self.validated,
        )  # fmt: skip
        if self.recording:
            self.records.append(LayerLoss(layer, size, losses["token"], losses["pixel"]))

    def total(self, term: str) -> torch.Tensor:
        """Σ over the recorded layers of one term ("token" or "pixel"); raises when nothing was recorded."""
        if not self.records:
            raise RuntimeError("no grounded layer recorded a loss (are the grounding processors installed?)")
        return torch.stack([getattr(r, term) for r in self.records]).sum()


@dataclass
class LayerProbs:
    name: str
    size: tuple[int, int]
    probs: torch.Tensor  # (B, H, Lq, Lk) float32, in the graph


class GroupedLossRecorder(LossRecorder):
    """TokenCompose losses per (place, resolution) group of grounded layers (``losses.grounding_losses_grouped``):
    token = Σ of the layers' token losses; pixel = Σ of the layers' pixel losses (``per_layer``) or the pixel loss of
    the map averaged over the group's layers and heads (``per_resolution``, the official code). Reference backend
    only: the group needs every layer's probabilities, which it keeps (in the graph) until `total` is read.

    Args:
        groups: {group name: [layer names]} (``GroundingPlan.groups()``: mid_8, up_16, ...); a recorded layer that is
            in no group is an error.
        pixel_loss_reduction: "per_layer" | "per_resolution".
        Other arguments as `LossRecorder`.
    """

    def __init__(
        self,
        latent_size: tuple[int, int],
        token_phrase: torch.Tensor,
        *,
        groups: dict[str, list[str]],
        pixel_loss_reduction: str = "per_resolution",
        **kwargs,
    ):
        super().__init__(latent_size, token_phrase, **kwargs)
        self.group_of = {layer: name for name, layers in groups.items() for layer in layers}
        self.pixel_loss_reduction = pixel_loss_reduction
        self.layer_probs: list[LayerProbs] = []
        self._totals: dict[str, torch.Tensor] | None = None

    def attend(self, layer, q, k, v, scale, backend):
        if backend != "reference":
            raise ValueError(
                f"{layer}: per-group grounding losses need the attention probabilities: attention.backend must be "
                f"'reference', got {backend!r}"
            )
        probs = attention_probs(q, k, scale, torch.float32)  # (B, H, Lq, Lk)
        self.ground(layer, probs)
        return torch.matmul(probs.to(v.dtype), v)

    def ground(self, layer, attn_map):
        if self.recording:
            if layer not in self.group_of:
                raise KeyError(f"{layer} is in no grounding group {sorted(set(self.group_of.values()))}")
            self.layer_probs.append(LayerProbs(layer, layer_size(attn_map.shape[2], self.latent_size), attn_map))
            self._totals = None

    def held(self) -> tuple[torch.Tensor, ...]:
        return tuple(lp.probs for lp in self.layer_probs)

    def group_losses(self) -> dict[str, dict[str, torch.Tensor]]:
        """{group: {"token", "pixel"}} over the layers recorded so far."""
        by_group: dict[str, list[LayerProbs]] = {}
        for rec in self.layer_probs:
            by_group.setdefault(self.group_of[rec.name], []).append(rec)
        out = {}
        for name, recs in by_group.items():
            size = recs[0].size
            out[name] = grounding_losses_grouped(
                [r.probs for r in recs], self.masks_for(size, recs[0].probs.device),
                self.token_phrase.to(recs[0].probs.device), token_loss_heads=self.token_loss_heads,
                pixel_loss_reduction=self.pixel_loss_reduction, validate_values=not self.validated,
            )  # fmt: skip
        return out

    def total(self, term: str) -> torch.Tensor:
        """Σ over the groups of one term ("token" or "pixel"); raises when nothing was recorded."""
        if not self.layer_probs:
            raise RuntimeError("no grounded layer recorded its attention (are the grounding processors installed?)")
        if self._totals is None:
            groups = self.group_losses().values()
            self._totals = {t: torch.stack([g[t] for g in groups]).sum() for t in ("token", "pixel")}
        return self._totals[term]


class ProbsRecorder(Recorder):
    """Each grounded layer's per-head probabilities (float32), kept in the autograd graph (SepEn)."""

    def __init__(self, latent_size: tuple[int, int]):
        super().__init__(latent_size)
        self.records: list[LayerProbs] = []

    def attend(self, layer, q, k, v, scale, backend):
        probs = attention_probs(q, k, scale, torch.float32)  # (B, H, Lq, Lk)
        self.ground(layer, probs)
        return torch.matmul(probs.to(v.dtype), v)

    def ground(self, layer, attn_map):
        if self.recording:
            self.records.append(LayerProbs(layer, layer_size(attn_map.shape[2], self.latent_size), attn_map))


class MapCapture(Recorder):
    """Detached head-averaged maps Ā (B, Lq, Lk) of each grounded layer, summed over the calls made while open
    (e.g. the sampler steps of one generation). ``maps[layer]`` is the sum, ``calls[layer]`` how many were added."""

    def __init__(self, latent_size: tuple[int, int]):
        super().__init__(latent_size)
        self.maps: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}

    def attend(self, layer, q, k, v, scale, backend):
        probs = attention_probs(q, k, scale, torch.float32)
        self.ground(layer, probs)
        return torch.matmul(probs.to(v.dtype), v)

    def ground(self, layer, attn_map):
        if self.recording:
            mean_map = attn_map.mean(dim=1).detach()  # (B, Lq, Lk)
            prev = self.maps.get(layer)
            self.maps[layer] = mean_map if prev is None else prev + mean_map
            self.calls[layer] = self.calls.get(layer, 0) + 1
