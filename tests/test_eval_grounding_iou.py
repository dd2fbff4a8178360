"""Grounding mIoU: hand-made maps and masks, multi-resolution layer averaging against a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tcscale.eval.grounding_iou import (
    binarize_maps,
    grounding_iou,
    grounding_miou,
    mask_iou,
    phrase_heatmaps,
)


def _np_bilinear(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Half-pixel-centre bilinear resize (align_corners=False) of one (h, w) map, written out in numpy."""

    def axis(n_in: int, n_out: int):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    (y0, y1, wy), (x0, x1, wx) = axis(img.shape[0], size[0]), axis(img.shape[1], size[1])
    rows = img[y0] * (1 - wy)[:, None] + img[y1] * wy[:, None]
    return rows[:, x0] * (1 - wx) + rows[:, x1] * wx


def _np_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def square(size, y0, y1, x0, x1):
    m = np.zeros((size, size), dtype=np.float64)
    m[y0:y1, x0:x1] = 1
    return m


def test_perfect_disjoint_and_partial_overlap_at_full_resolution():
    masks = np.stack([square(20, 5, 15, 0, 10), square(20, 5, 15, 0, 10), square(20, 5, 15, 0, 10)])
    maps = np.stack(
        [
            0.3 * square(20, 5, 15, 0, 10),  # perfect (min–max makes the scale irrelevant)
            square(20, 0, 5, 12, 20),  # disjoint
            square(20, 0, 10, 0, 10),  # rows 0-9 vs 5-14: 50 common of 150
        ]
    )
    out = grounding_iou([maps], masks)
    np.testing.assert_allclose(out["iou"], [1.0, 0.0, 1 / 3])
    assert out["miou"] == pytest.approx((1 + 0 + 1 / 3) / 3)


def test_layers_of_different_resolutions_are_averaged_after_upsampling():
    rng = np.random.default_rng(0)
    layer8 = rng.random((4, 2, 8, 8))  # (heads, P, h, w)
    layer16 = rng.random((2, 16, 16))  # already head-averaged
    masks = (rng.random((2, 64, 64)) > 0.5).astype(np.uint8)
    ref = np.stack(
        [(_np_bilinear(layer8.mean(0)[p], (64, 64)) + _np_bilinear(layer16[p], (64, 64))) / 2 for p in range(2)]
    )
    np.testing.assert_allclose(phrase_heatmaps({"mid": layer8, "up": layer16}, (64, 64)).numpy(), ref, atol=1e-12)
    out = grounding_iou({"mid": layer8, "up": layer16}, masks)
    lo, hi = ref.min(axis=(1, 2), keepdims=True), ref.max(axis=(1, 2), keepdims=True)
    pred = (ref - lo) / (hi - lo + 1e-8) > 0.4
    np.testing.assert_allclose(out["iou"], [_np_iou(pred[p], masks[p] > 0) for p in range(2)], atol=1e-12)
    up8 = np.stack([_np_bilinear(layer8.mean(0)[p], (64, 64)) for p in range(2)])
    lo8, hi8 = up8.min(axis=(1, 2), keepdims=True), up8.max(axis=(1, 2), keepdims=True)
    pred8 = (up8 - lo8) / (hi8 - lo8 + 1e-8) > 0.4
    np.testing.assert_allclose(out["per_layer"]["mid"], [_np_iou(pred8[p], masks[p] > 0) for p in range(2)])


def test_low_resolution_stripe_maps_onto_its_image_rows():
    # an 8x8 map lit on rows 2-3: bilinear to 64x64 gives 1 on rows 20..27, ramps to 0 over 8 px on each side;
    # row i (centre i + 0.5) on the upper ramp has value (i + 0.5 - 12) / 8: row 15 -> 0.4375, row 14 -> 0.3125
    lat = np.zeros((1, 8, 8))
    lat[0, 2:4, :] = 1.0
    mask = square(64, 16, 32, 0, 64)[None]  # the stripe's own rows 16..31
    assert grounding_iou([lat], mask, threshold=0.5)["iou"][0] == pytest.approx(1.0)  # 0.5 is the stripe's edge
    assert grounding_iou([lat], mask)["iou"][0] == pytest.approx(16 / 18)  # τ = 0.4 adds rows 15 and 32
    bicubic = phrase_heatmaps([lat], (64, 64), mode="bicubic")
    assert bicubic.min() == 0.0 and bicubic.max() > 1.0  # DAAM's bicubic: overshoot kept, undershoot clamped at 0


def test_normalisation_and_threshold_options():
    mask = square(16, 4, 12, 4, 12)[None]
    faint = 0.2 * mask  # absolute values below τ
    assert grounding_iou([faint], mask)["iou"][0] == 1.0
    assert grounding_iou([faint], mask, normalize="max")["iou"][0] == 1.0
    assert grounding_iou([faint], mask, normalize="none")["iou"][0] == 0.0  # nothing above 0.4
    assert grounding_iou([faint], mask, normalize="none", threshold=0.1)["iou"][0] == 1.0
    with pytest.raises(ValueError, match="normalize"):
        binarize_maps(torch.zeros(1, 2, 2), normalize="softmax")


def test_miou_is_the_mean_over_every_phrase():
    mask = square(8, 0, 4, 0, 4)
    one = ([mask[None]], mask[None])  # IoU 1
    three = ([np.stack([1 - mask] * 3)], np.stack([mask] * 3))  # IoU 0 each
    out = grounding_miou([one, three])
    assert out["phrases"] == 4
    assert out["miou"] == pytest.approx(0.25)  # not the mean of per-sample means (0.5)
    assert out["per_layer"] == {"0": pytest.approx(0.25)}


def test_empty_prediction_and_mask_and_bad_shapes():
    np.testing.assert_allclose(mask_iou(np.zeros((2, 3, 3), bool), np.zeros((2, 3, 3))), [1.0, 1.0])
    with pytest.raises(ValueError, match="phrase maps but"):
        grounding_iou([np.zeros((2, 4, 4))], np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="disagree"):
        grounding_iou([np.zeros((2, 4, 4)), np.zeros((3, 4, 4))], np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match=r"\(P, h, w\)"):
        grounding_iou([np.zeros((4, 4))], np.zeros((1, 8, 8)))
