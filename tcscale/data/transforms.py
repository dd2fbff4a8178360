"""One geometric transform for an image and its phrase masks together.

As the paper (and diffusers' text-to-image script): resize the shorter side to R, then crop R x R
(center, or random along the longer side), then an optional horizontal flip. Implemented as
crop-then-resize of the equivalent S x S window of the original (S = shorter side), so only the
kept pixels are resampled. With aspect-ratio buckets (tcscale/data/buckets.py) the target is a bucket's (h, w)
and the window the largest one of the bucket's aspect ratio (`window_for`); image and masks go through the same
`F.interpolate` call, so a mask can
never move against its image. Masks are resampled as 0/255 channels beside the image's (bilinear,
antialiased; uint8 channels-last, torch's vectorised path, ~10x faster than float on CPU) and
binarised at 0.5 at the output resolution. `transform_with_soft_masks` also returns the resampled masks kept soft,
each divided by its maximum (the official TokenCompose loader's full-resolution mask; `MaskRule.full_res`).
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
    size: int  # height of the window (the square window's side: the shorter side)
    flip: bool  # horizontal flip after the crop
    width: int = 0  # width of the window when it is not square (aspect-ratio buckets); 0: `size`

    @property
    def window(self) -> tuple[int, int]:
        """(height, width) of the crop window in the original image."""
        return self.size, self.width or self.size


def window_for(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The largest (h, w) window of a height x width image with the aspect ratio of `target` (h, w)."""
    th, tw = target
    if height * tw >= width * th:  # the image is taller than the target: full width
        return min(height, max(1, round(width * th / tw))), width
    return height, min(width, max(1, round(height * tw / th)))


def crop_params(
    height: int,
    width: int,
    *,
    center_crop: bool = True,
    random_flip: bool = False,
    rng: np.random.Generator | None = None,
    target: tuple[int, int] | None = None,
) -> CropParams:
    """The window to keep (the square of the shorter side, or with `target` (h, w) the largest window of the
    target's aspect ratio: an aspect-ratio bucket), and whether to flip."""
    wh, ww = window_for(height, width, target) if target is not None else (min(height, width),) * 2
    if center_crop:
        top, left = (height - wh) // 2, (width - ww) // 2
    else:
        if rng is None:
            raise ValueError("random crop needs an rng")
        top = int(rng.integers(0, height - wh + 1))
        left = int(rng.integers(0, width - ww + 1))
    flip = bool(random_flip and rng is not None and rng.random() < 0.5)
    return CropParams(top, left, wh, flip, 0 if wh == ww else ww)


def _hw(resolution: int | tuple[int, int]) -> tuple[int, int]:
    return (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """Tensor view of an array (copied when read-only, e.g. an image decoded by PIL)."""
    return torch.from_numpy(a if a.flags.writeable else np.array(a))


def transform_image_and_masks(
    image: np.ndarray, masks: np.ndarray, resolution: int | tuple[int, int], params: CropParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop, resize to resolution x resolution (or to (h, w): a bucket's size), flip.

    Args:
        image: H x W x 3 uint8.
        masks: P x H x W (any numeric dtype, nonzero = object); P may be 0.
        resolution: output side R.
        params: from `crop_params`.

    Returns:
        pixel_values (3, R, R) float32 in [-1, 1]; masks (P, R, R) float32 in {0, 1}.
    """
    pixel_values, resampled = _crop_resize_flip(image, masks, resolution, params)
    return pixel_values, _binarize(resampled, resolution)


def transform_with_soft_masks(
    image: np.ndarray, masks: np.ndarray, resolution: int | tuple[int, int], params: CropParams
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`transform_image_and_masks` plus the soft masks: (pixel_values, masks in {0, 1}, soft masks in [0, 1]).

    Soft mask = the resampled mask (the same antialiased bilinear resampling as the binary one) divided by its
    maximum, so each non-empty mask peaks at 1 (the official TokenCompose loader: ``attn_gt / attn_gt.max()``).
    """
    pixel_values, resampled = _crop_resize_flip(image, masks, resolution, params)
    soft = torch.empty(len(resampled), *_hw(resolution))
    for k, channel in enumerate(resampled):
        soft[k].copy_(channel).div_(max(int(channel.max()), 1))  # uint8 0..255: a non-empty mask's max is >= 1
    return pixel_values, _binarize(resampled, resolution), soft


def _binarize(resampled: list[torch.Tensor], resolution: int | tuple[int, int]) -> torch.Tensor:
    """P resampled (h, w) uint8 mask channels (0..255) -> (P, h, w) float32 {0, 1}: at least half covered."""
    thr = round(MASK_BINARIZE * 255)
    out = torch.empty(len(resampled), *_hw(resolution))
    for k, channel in enumerate(resampled):
        torch.ge(channel, thr, out=out[k])
    return out


def _crop_resize_flip(
    image: np.ndarray, masks: np.ndarray, resolution: int | tuple[int, int], params: CropParams
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """pixel_values (3, h, w) float32 in [-1, 1] and the P resampled mask channels, each (h, w) uint8 0..255."""
    h, w = image.shape[:2]
    if masks.shape[1:] != (h, w):
        raise ValueError(f"masks are {tuple(masks.shape[1:])}, image is {(h, w)}")
    t, left = params.top, params.left
    sh, sw = params.window
    out_hw = _hw(resolution)
    p = masks.shape[0]
    # 1. image and masks (0/255) as the uint8 channels of one crop, in groups of 4 laid out channels-last:
    #    group 0 = [R G B M0], group 1 = [M1 M2 M3 M4], ... (torch's vectorised 4-channel resampling path)
    groups = (3 + p + 3) // 4
    hwc = torch.zeros(groups, sh, sw, 4, dtype=torch.uint8)
    hwc[0, :, :, :3].copy_(_as_tensor(image[t : t + sh, left : left + sw]))
    for k in range(p):
        c = 3 + k
        hwc[c // 4, :, :, c % 4].copy_(_as_tensor(masks[k, t : t + sh, left : left + sw] != 0))
    hwc[0, :, :, 3].mul_(255)  # mask channels 0/1 -> 0/255
    hwc[1:].mul_(255)
    x = hwc.permute(0, 3, 1, 2)  # (G, 4, sh, sw) view with channels-last strides, no copy
    # 2. one resampling for all of them: bilinear + antialias
    if (sh, sw) != out_hw:
        x = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False, antialias=True)
    # 3. the same flip for all
    if params.flip:
        x = torch.flip(x, dims=[-1])
    pixel_values = x[0, :3].to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)
    return pixel_values, [x[(3 + k) // 4, (3 + k) % 4] for k in range(p)]
