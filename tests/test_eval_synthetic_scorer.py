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
