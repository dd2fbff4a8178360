"""One geometric transform for an image and its phrase masks together.

As the paper (and diffusers' text-to-image script): resize the shorter side to R, then crop R x R
(center, or random along the longer side), then an optional horizontal flip. Implemented as
crop-then-resize of the equivalent S x S window of the original (S = shorter side), so only the
kept pixels are resampled; image and masks go through the same `F.interpolate` call, so a mask can
never move against its image. Masks are resampled as floats (bilinear, antialiased, like the image)
and binarised at 0.5 at the output resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MASK_BINARIZE = 0.5  # a resized mask pixel is 1 when at least half of it is covered


@dataclass
class CropParams:
    top: int  # crop window in the original image, pixels
    left: int
    size: int  # side of the square window (= shorter side)
    flip: bool  # horizontal flip after the crop


def crop_params(
    height: int,
    width: int,
    *,
    center_crop: bool = True,
    random_flip: bool = False,
    rng: np.random.Generator | None = None,
) -> CropParams:
    """The square window (shorter side) to keep, and whether to flip."""
    size = min(height, width)
    if center_crop:
        top, left = (height - size) // 2, (width - size) // 2
    else:
        if rng is None:
            raise ValueError("random crop needs an rng")
        top = int(rng.integers(0, height - size + 1))
        left = int(rng.integers(0, width - size + 1))
    flip = bool(random_flip and rng is not None and rng.random() < 0.5)
    return CropParams(top, left, size, flip)


def transform_image_and_masks(
    image: np.ndarray, masks: np.ndarray, resolution: int, params: CropParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop, resize to resolution x resolution, flip.

    Args:
        image: H x W x 3 uint8.
        masks: P x H x W (any numeric dtype, nonzero = object); P may be 0.
        resolution: output side R.
        params: from `crop_params`.

    Returns:
        pixel_values (3, R, R) float32 in [-1, 1]; masks (P, R, R) float32 in {0, 1}.
    """
    h, w = image.shape[:2]
    if masks.shape[1:] != (h, w):
        raise ValueError(f"masks are {tuple(masks.shape[1:])}, image is {(h, w)}")
    t, left, s = params.top, params.left, params.size
    img = torch.from_numpy(np.array(image[t : t + s, left : left + s])).permute(2, 0, 1)  # 3,S,S uint8
    msk = torch.from_numpy(np.array(masks[:, t : t + s, left : left + s]))  # P,S,S
    p = msk.shape[0]
    x = torch.cat([img.float(), msk.float() * 255.0], dim=0)  # (3 + P), S, S in one tensor: one resampling
    if s != resolution:
        x = F.interpolate(x[None], size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)[
            0
        ]
    if params.flip:
        x = torch.flip(x, dims=[-1])
    pixel_values = (x[:3] / 127.5 - 1.0).clamp_(-1.0, 1.0)
    out_masks = (x[3 : 3 + p] >= MASK_BINARIZE * 255.0).float()
    return pixel_values, out_masks
