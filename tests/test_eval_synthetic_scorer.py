"""Synthetic-world scorer: full content recognised, missing objects rejected, at 32 and 64 px, clean and perturbed.

Measured on SyntheticWorld(max_objects=3) (the demo world), 500 images per seed and size, seeds 2024 (used
here) and 99, 32 / 64 px: full content 100 % / 100 % (nothing extra detected either), an object painted over
rejected in 100 %, σ = 8 noise 100 %, 0.6 px Gaussian blur ≥ 99.4 %, σ = 8 noise + 0.5 px blur 100 %.
In a crowded world (max_objects=6) 98.4 % / 98.6 %: the misses are occluded or touching same-colour objects.
The asserted bounds are the issue's (≥ 99 % clean) and a little below the measured rates when perturbed.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tcscale.data.synthetic import COLOURS, SyntheticWorld
from tcscale.eval import multigen_scores
from tcscale.eval.synthetic_scorer import (
    all_objects_present,
    all_objects_present_rate,
    detect_shapes,
    pixel_noise,
    score_synthetic,
)

N_CLEAN, N_REJECT, N_PERTURBED = 200, 150, 120


def _world(n: int) -> SyntheticWorld:
    return SyntheticWorld(num_samples=n, max_objects=3, seed=2024)


def _labels(sample) -> list[str]:
    return [f"{o.colour} {o.shape}" for o in sample.objects]


def paint_over(sample, p: int) -> np.ndarray:
    """The image with object p replaced by the background (a plane per channel fitted to the grey pixels)."""
    im = sample.image.astype(np.float64)
    bg = sample.masks.sum(0) == 0
    yy, xx = np.mgrid[0 : im.shape[0], 0 : im.shape[1]]
    design = np.stack([np.ones(bg.sum()), xx[bg], yy[bg]], axis=1)
    m = sample.masks[p].astype(bool)
    for c in range(3):
        coef, *_ = np.linalg.lstsq(design, im[..., c][bg], rcond=None)
        im[..., c][m] = coef[0] + coef[1] * xx[m] + coef[2] * yy[m]
    return np.clip(np.rint(im), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [32, 64])
def test_full_content_is_recognised(size):
    world = _world(N_CLEAN)
    complete = exact = 0
    for i in range(N_CLEAN):
        s = world.render(i, size)
        found = {d["label"] for d in detect_shapes(s.image)}
        complete += set(_labels(s)) <= found
        exact += set(_labels(s)) == found  # and nothing that is not there
    assert complete / N_CLEAN >= 0.99
    assert exact / N_CLEAN >= 0.99


@pytest.mark.parametrize("size", [32, 64])
def test_an_object_painted_over_is_missed(size):
    world = _world(N_REJECT)
    rng = np.random.default_rng(size)
    rejected = 0
    for i in range(N_REJECT):
        s = world.render(i, size)
        p = int(rng.integers(len(s.objects)))
        image = paint_over(s, p)
        assert not (image[s.masks[p] > 0] == COLOURS[s.objects[p].colour]).all(axis=-1).any()
        rejected += not all_objects_present(image, _labels(s))
    assert rejected / N_REJECT >= 0.99


@pytest.mark.parametrize("size", [32, 64])
def test_robust_to_mild_noise_and_slight_blur(size):
    world = _world(N_PERTURBED)
    rng = np.random.default_rng(7)
    images, objects = [], []
    for i in range(N_PERTURBED):
        s = world.render(i, size)
        blurred = np.asarray(Image.fromarray(s.image).filter(ImageFilter.GaussianBlur(0.5)), dtype=np.float64)
        images.append(np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).astype(np.uint8))
        objects.append(_labels(s))
    assert all_objects_present_rate(images, objects) >= 0.97
    assert all_objects_present_rate(images[:3], objects[:3]) == np.mean(
        [all_objects_present(im, o) for im, o in zip(images[:3], objects[:3])]
    )


def test_a_recoloured_object_is_not_the_asked_one():
    s = _world(1).render(0, 64)
    image = s.image.copy()
    other = next(c for c in COLOURS if c != s.objects[0].colour)
    image[s.masks[0] > 0] = COLOURS[other]
    assert all_objects_present(s.image, _labels(s), exact=True)
    assert not all_objects_present(image, _labels(s))
    assert f"{other} {s.objects[0].shape}" in {d["label"] for d in detect_shapes(image)}


def test_detections_carry_score_and_box():
    s = _world(8).render(5, 64)
    dets = detect_shapes(s.image)
    assert {d["label"] for d in dets} == set(_labels(s))
    for d in dets:
        p = _labels(s).index(d["label"])
        ys, xs = np.nonzero(s.masks[p])
        assert d["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert d["score"] >= 0.95  # an exact render fits its own shape (1.0 when the search hits its parameters)
        assert all(v <= d["score"] for v in d["shape_scores"].values())
    assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)


def test_background_only_gives_no_detection():
    ramp = np.linspace(100, 160, 64, dtype=np.float64)[None, :].repeat(64, 0)
    image = ramp[..., None].repeat(3, axis=2).astype(np.uint8)
    assert detect_shapes(image) == []
    noisy = np.clip(image + np.random.default_rng(0).normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    assert detect_shapes(noisy) == []
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        detect_shapes(np.zeros((8, 8)))


def test_score_synthetic_feeds_multigen():
    world = _world(40)
    samples = []
    for i in range(40):
        s = world.render(i, 64)
        image = paint_over(s, 0) if i % 4 == 0 else s.image  # every fourth image loses its first object
        samples.append({"prompt_id": i // 2, "round": i % 2, "objects": _labels(s), "image": image})
    records = score_synthetic(samples)
    assert all(set(r["labels"]) <= set(r["objects"]) for r in records)
    expected_counts = np.array([len(s["objects"]) - (i % 4 == 0) for i, s in enumerate(samples)])
    out = multigen_scores(records, num_objects=3)
    for k in (1, 2, 3):
        assert out[f"MG{k}"]["mean"] == pytest.approx(100 * np.mean(expected_counts >= k))


def median3x3_by_hand(x: np.ndarray) -> np.ndarray:
    """Each channel's 3x3 median with reflected borders (d c b | a b c d | c b a ...: the edge pixel itself is not
    repeated, scipy's "reflect" repeats it: a b | a b c), written with numpy windows, apart from scipy."""
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="symmetric")  # numpy "symmetric" = scipy "reflect"
    h, w = x.shape[:2]
    windows = np.stack([padded[i : i + h, j : j + w] for i in range(3) for j in range(3)])
    return np.median(windows, axis=0)


def test_pixel_noise_is_the_mean_distance_to_the_3x3_median():
    flat = np.full((32, 32, 3), 120, dtype=np.uint8)
    assert pixel_noise(flat) == 0.0
    speck = flat.copy()
    speck[10, 20, 1] = 200  # one isolated pixel off by 80 in one channel: its window's median is still 120
    assert pixel_noise(speck) == pytest.approx(80 / (32 * 32 * 3))
    rng = np.random.default_rng(3)
    noisy = rng.integers(0, 256, (24, 40, 3)).astype(np.uint8)
    expected = np.abs(noisy.astype(np.float64) - median3x3_by_hand(noisy.astype(np.float64))).mean()
    assert pixel_noise(Image.fromarray(noisy)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="pixel_noise needs an"):
        pixel_noise(noisy[..., 0])


def test_pixel_noise_tells_speckle_from_the_worlds_clean_renders():
    """The world's renders score their edges only; σ = 8 pixel noise (the level the detector still reads) raises
    the score by several grey levels, as a speckled generation does."""
    world, rng = _world(40), np.random.default_rng(5)
    clean = [world.render(i, 32).image for i in range(40)]
    noisy = [np.clip(im + rng.normal(0, 8, im.shape), 0, 255).astype(np.uint8) for im in clean]
    clean_mean = np.mean([pixel_noise(im) for im in clean])
    noisy_mean = np.mean([pixel_noise(im) for im in noisy])
    assert clean_mean < 1.0  # 0.56 when written
    assert noisy_mean > clean_mean + 4  # 6.26
