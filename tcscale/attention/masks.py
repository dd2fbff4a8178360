"""Phrase masks brought to a cross-attention layer's resolution (docs/DESIGN.md §3 rule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

MaskInterpolation = Literal["bilinear", "nearest", "bicubic", "area"]
MaskFullRes = Literal["binary", "soft"]
"""The full-resolution (training-image) mask the layer masks are made from: ``binary`` — the resampled mask
binarised at 0.5 (tcscale); ``soft`` — the resampled mask kept soft, normalised to max 1 (the official TokenCompose
loader). Either way the layer rule binarises after the resize."""
MASK_FULL_RES: tuple[str, ...] = get_args(MaskFullRes)


def masks_to_layer(
    phrase_masks: torch.Tensor,
    size: tuple[int, int],
    *,
    mode: str = "bilinear",
    threshold: float = 0.0,
) -> torch.Tensor:
    """Resize full-resolution phrase masks to a layer's (h, w) and binarise.

    Args:
        phrase_masks: (..., H, W) masks of the (cropped) image, any numeric dtype.
        size: (h, w) of the layer's latent grid.
        mode: F.interpolate mode; bilinear without antialias as in the official code.
        threshold: binarise with `> threshold` (official: > 0).

    Returns:
        (..., h * w) float32 masks in {0, 1}, flattened row-major like the attention's query positions.
    """
    lead = phrase_masks.shape[:-2]
    H, W = phrase_masks.shape[-2:]
    x = phrase_masks.reshape(-1, 1, H, W).float()
    if (H, W) != tuple(size):
        kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        x = F.interpolate(x, size=tuple(size), mode=mode, **kwargs)
    return (x > threshold).float().reshape(*lead, size[0] * size[1])


@dataclass(frozen=True)
class MaskRule:
    """How a full-resolution phrase mask becomes a layer mask (docs/DESIGN.md §3): resize with `interpolation`
    (no antialias), binarise with `> threshold`. `full_res` tells the loader which full-resolution mask to resize
    (``binary`` | ``soft``, see `MaskFullRes`); the full-resolution masks a batch carries (``phrase_masks``, also
    what evaluation IoU reads) stay binary either way."""

    interpolation: MaskInterpolation = "bilinear"
    threshold: float = 0.0
    full_res: MaskFullRes = "binary"

    def __post_init__(self):
        if self.full_res not in MASK_FULL_RES:
            raise ValueError(f"mask full_res must be one of {MASK_FULL_RES}, got {self.full_res!r}")

    def apply(self, phrase_masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(..., H, W) masks -> (..., h*w) float32 {0, 1} masks at `size`."""
        return masks_to_layer(phrase_masks, size, mode=self.interpolation, threshold=self.threshold)
