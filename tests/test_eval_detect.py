"""OWLv2 / OWL-ViT wrappers on tiny random models saved locally and loaded through the real loading code."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from tcscale.eval.detect import OpenVocabDetector, load_owlv2, load_owlvit, resolve_pretrained
from tests.helpers.eval_models import build_tiny_owlv2, build_tiny_owlvit


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("owl")
    return {"owlv2": build_tiny_owlv2(root / "owlv2"), "owlvit": build_tiny_owlvit(root / "owlvit")}


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)),  # non-square PIL image
        rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8),  # uint8 array
    ]


CATEGORIES = [["cat", "dog", "wine glass"], ["traffic light"]]


@pytest.mark.parametrize("kind, loader", [("owlv2", load_owlv2), ("owlvit", load_owlvit)])
def test_detections_are_plain_lists_of_the_asked_categories(model_dirs, images, kind, loader):
    detector = loader(model_dirs[kind], threshold=0.0, clip_boxes=True)
    assert detector.kind == kind
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated post-processing
        out = detector(images, CATEGORIES)
    assert len(out) == 2
    for det, cats, (h, w) in zip(out, CATEGORIES, [(40, 56), (32, 32)]):
        assert set(det) == {"labels", "scores", "boxes"}
        assert len(det["labels"]) == len(det["scores"]) == len(det["boxes"]) > 0  # threshold 0 keeps every box
        assert set(det["labels"]) <= set(cats)  # padded queries never win a box
        assert all(isinstance(s, float) and 0.0 < s <= 1.0 for s in det["scores"])
        assert det["scores"] == sorted(det["scores"], reverse=True)
        for x0, y0, x1, y1 in det["boxes"]:
            assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
    assert set(out[1]["labels"]) == {"traffic light"}


@pytest.mark.parametrize("kind", ["owlv2", "owlvit"])
def test_boxes_are_the_processors_unclipped_unless_asked(model_dirs, images, kind):
    """VISOR's code uses the post-processed boxes as they are; clipping them (an option) moves a box's centre."""
    import torch

    raw = OpenVocabDetector.from_pretrained(model_dirs[kind], threshold=0.0)
    clipped = OpenVocabDetector.from_pretrained(model_dirs[kind], threshold=0.0, clip_boxes=True)
    image, cats = images[0], CATEGORIES[0]
    out = raw([image], [cats])[0]
    inputs = raw.processor(text=[[f"a photo of a {c}" for c in cats]], images=[image], return_tensors="pt")
    with torch.no_grad():
        outputs = raw.model(**inputs)
    (ref,) = raw.processor.post_process_grounded_object_detection(
        outputs=outputs, threshold=0.0, target_sizes=[(image.height, image.width)], text_labels=[cats]
    )
    order = np.argsort(-ref["scores"].numpy(), kind="stable")
    np.testing.assert_allclose(out["boxes"], ref["boxes"].numpy()[order], rtol=1e-5, atol=1e-4)
    outside = np.asarray(out["boxes"]) - np.clip(out["boxes"], 0, [56, 40, 56, 40])
    assert np.abs(outside).max() > 0  # random weights: some box reaches past the 56x40 image
    np.testing.assert_allclose(clipped([image], [cats])[0]["boxes"], np.clip(out["boxes"], 0, [56, 40, 56, 40]),
                               rtol=1e-5, atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("kind", ["owlv2", "owlvit"])
def test_batching_and_query_padding_match_single_image_runs(model_dirs, images, kind):
    detector = OpenVocabDetector.from_pretrained(model_dirs[kind], threshold=0.3)  # kind read from the config
    batched = detector(images, CATEGORIES)
    for i in range(2):
        single = detector([images[i]], [CATEGORIES[i]])[0]  # no padded queries at all
        assert batched[i]["labels"] == single["labels"]
        np.testing.assert_allclose(batched[i]["scores"], single["scores"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batched[i]["boxes"], single["boxes"], rtol=1e-4, atol=1e-4)


def test_scores_are_the_sigmoid_of_the_best_query_logit(model_dirs, images):
    import torch

    detector = load_owlv2(model_dirs["owlv2"], threshold=0.2)
    queries = [f"a photo of a {c}" for c in CATEGORIES[0]]
    inputs = detector.processor(text=[queries], images=[images[0]], return_tensors="pt")
    with torch.no_grad():
        logits = detector.model(**inputs).logits[0]  # (boxes, queries)
    best = torch.sigmoid(logits.max(dim=-1).values)
    expected = sorted((float(s) for s in best if s > 0.2), reverse=True)
    got = detector([images[0]], [CATEGORIES[0]])[0]
    np.testing.assert_allclose(got["scores"], expected, rtol=1e-5)
    order = torch.argsort(-best)[: len(expected)]
    assert got["labels"] == [CATEGORIES[0][int(k)] for k in logits[order].argmax(dim=-1)]


@pytest.mark.parametrize("kind", ["owlv2", "owlvit"])
def test_nothing_detected_is_an_empty_result(model_dirs, images, kind):
    detector = OpenVocabDetector.from_pretrained(model_dirs[kind], threshold=1.0)
    out = detector(images, CATEGORIES)
    assert out == [{"labels": [], "scores": [], "boxes": []}] * 2
    assert detector(images, [[], []]) == [{"labels": [], "scores": [], "boxes": []}] * 2  # no categories to look for
    mixed = OpenVocabDetector.from_pretrained(model_dirs[kind], threshold=0.0)(images, [["cat"], []])
    assert mixed[1] == {"labels": [], "scores": [], "boxes": []} and mixed[0]["labels"]


def test_missing_models_and_bad_calls_are_one_clear_error(tmp_path, model_dirs):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "no_such_model")):
        load_owlv2(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        resolve_pretrained("runs/models/owl")  # not "org/name": a local path
    assert resolve_pretrained("google/owlv2-large-patch14-ensemble") == "google/owlv2-large-patch14-ensemble"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no config.json in model directory {tmp_path / 'empty'}"):
        OpenVocabDetector.from_pretrained(tmp_path / "empty")
    with pytest.raises(OSError, match="could not load the owlv2 detector from"):
        load_owlv2(tmp_path / "empty")  # kind given: the model class reports the empty directory
    detector = load_owlvit(model_dirs["owlvit"])
    with pytest.raises(ValueError, match="2 images but 1 category lists"):
        detector([None, None], [["a"]])
    with pytest.raises(ValueError, match="image 0 must be a PIL image or uint8"):
        detector([np.zeros((8, 8), np.float32)], [["a"]])
