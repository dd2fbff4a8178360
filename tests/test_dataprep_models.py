"""The model stages through their real loading code, on tiny random-init models saved locally and real photos.

Random weights: the assertions are about shapes, bookkeeping and thresholds, not about what is detected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataprep.stages.caption_choice import ClipCaptionScorer, choose_captions
from dataprep.stages.common import StageError
from dataprep.stages.grounding import GroundingDinoDetector, SamHqSegmenter, ground_items, load_masks
from dataprep.stages.noun_phrases import FlairPosTagger, TaggerNounPhraseExtractor
from tests.helpers.dataprep_models import PHOTOS, TinyModels


@pytest.fixture(scope="session")
def tiny(tiny_dataprep_models) -> TinyModels:
    return tiny_dataprep_models


@pytest.fixture(scope="module")
def photos(tmp_path_factory, write_photos) -> dict[str, Path]:
    paths = write_photos(tmp_path_factory.mktemp("photos"))
    return {p.stem: p for p in paths}


def test_flair_tagger_real_path(tiny: TinyModels) -> None:
    extractor = TaggerNounPhraseExtractor(FlairPosTagger(str(tiny.flair_tagger), device="cpu"))
    captions = [caps[0] for _, caps in PHOTOS.values()] + ["", "a cat on a rocket with a cat"]
    phrases = extractor.extract(captions)
    assert len(phrases) == len(captions)
    assert phrases[3] == []
    for caption, ps in zip(captions, phrases):
        assert all(isinstance(p, str) and p and p == p.strip() and p in caption for p in ps)
        norm = [" ".join(p.lower().split()) for p in ps]
        assert len(set(norm)) == len(norm)  # deduplicated
        assert [caption.find(p) for p in ps] == sorted(caption.find(p) for p in ps)  # caption order
    assert any(phrases)  # the fitted tiny head does tag nouns


def test_flair_missing_model_names_config_key(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="noun_phrases.model"):
        FlairPosTagger(str(tmp_path / "nope.pt"), device="cpu")


def test_clip_caption_choice_real_path(tiny: TinyModels, photos: dict[str, Path]) -> None:
    scorer = ClipCaptionScorer(str(tiny.clip_dir), device="cpu", dtype="float16")
    assert scorer.dtype == torch.float32  # CPU runs in fp32 whatever the config says
    items = [{"id": name, "image": str(photos[name]), "captions": PHOTOS[name][1]} for name in PHOTOS]
    out = choose_captions(items, scorer, batch_size=2, progress=False)
    for it, src in zip(out, items):
        if len(src["captions"]) == 1:
            assert it["caption_scores"] is None and it["caption"] == src["captions"][0]
            continue
        scores = it["caption_scores"]
        assert len(scores) == len(src["captions"]) and all(-1.0 <= s <= 1.0 for s in scores)
        assert it["caption"] == src["captions"][int(np.argmax(scores))]
    # the batched scores equal one image at a time (caption flattening keeps each image with its own captions)
    img = Image.open(photos["coffee"]).convert("RGB")
    alone = scorer.score([img], [PHOTOS["coffee"][1]])[0]
    np.testing.assert_allclose(alone, out[2]["caption_scores"], atol=1e-5)


def test_clip_missing_model_names_config_key(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="caption_choice.model"):
        ClipCaptionScorer(str(tmp_path / "nope"), device="cpu")


@pytest.fixture(scope="module")
def grounding_models(tiny: TinyModels) -> tuple[GroundingDinoDetector, SamHqSegmenter]:
    detector = GroundingDinoDetector(
        str(tiny.gdino_checkpoint),
        config_path=None,  # the package's own GroundingDINO_SwinT_OGC.py
        text_encoder=str(tiny.bert_dir),
        device="cpu",
        box_threshold=0.25,
        text_threshold=0.25,
        image_size=224,
        max_size=400,
        max_detections=3,
    )
    segmenter = SamHqSegmenter(tiny.sam_model_type, str(tiny.sam_checkpoint), device="cpu", max_boxes_per_call=2)
    return detector, segmenter


def test_grounding_real_path(grounding_models, photos: dict[str, Path], tmp_path: Path) -> None:
    detector, segmenter = grounding_models
    img = np.asarray(Image.open(photos["chelsea"]).convert("RGB"))
    items = [
        {"id": "chelsea", "key": "chelsea", "image": str(photos["chelsea"]), "phrases": ["cat", "blanket"]},
        {"id": "empty", "key": "empty", "image": str(photos["coffee"]), "phrases": []},  # nothing to ground
    ]

    # a text threshold nothing exceeds gives empty detector phrases -> every box unmatched -> every mask null
    detector.text_threshold = 1.0
    try:
        out = ground_items(items[:1], detector, segmenter, tmp_path / "nulls", progress=False)
    finally:
        detector.text_threshold = 0.25
    g = out[0]["grounding"]
    assert g["mask_index"] == [None, None] and g["num_unmatched"] == g["num_detections"] > 0

    # the real path: box threshold and cap honoured, per-phrase masks at image size, count = non-null phrases
    out = ground_items(items, detector, segmenter, tmp_path / "g", batch_size=2, progress=False)
    g = out[0]["grounding"]
    assert 0 < g["num_detections"] <= 3
    for *box, score, phrase in g["boxes"]:
        x0, y0, x1, y1 = box
        assert score > 0.25 and 0 <= phrase < 2
        assert 0 <= x0 <= x1 <= img.shape[1] and 0 <= y0 <= y1 <= img.shape[0]
    masks = load_masks(out[0])
    non_null = [m for m in masks if m is not None]
    assert len(masks) == 2 and [i for i in g["mask_index"] if i is not None] == list(range(len(non_null)))
    for m in non_null:
        assert m.shape == img.shape[:2] and m.dtype == np.uint8 and m.any()
    with np.load(g["masks"]) as z:
        assert z["masks"].shape == (len(non_null), *img.shape[:2])
    assert out[1]["grounding"]["mask_index"] == [] and load_masks(out[1]) == []


def test_segmenter_matches_sam_predictor(grounding_models, photos: dict[str, Path]) -> None:
    """The batched, box-chunked glue gives the same masks as segment_anything_hq's own SamPredictor."""
    from segment_anything_hq import SamPredictor

    _, segmenter = grounding_models  # max_boxes_per_call=2: three boxes take two decoder calls
    img = np.asarray(Image.open(photos["chelsea"]).convert("RGB"))
    boxes = torch.tensor([[10.0, 10, 100, 100], [50, 40, 300, 250], [0, 0, 451, 300]])
    masks, none = segmenter.segment([img, img], [boxes, torch.zeros((0, 4))])
    assert masks.shape == (3, 300, 451) and masks.dtype == torch.bool
    assert none.shape == (0, 300, 451)
    predictor = SamPredictor(segmenter.model)
    predictor.set_image(img)
    expected, _, _ = predictor.predict_torch(
        point_coords=None,
        point_labels=None,
        boxes=predictor.transform.apply_boxes_torch(boxes, img.shape[:2]),
        multimask_output=False,
    )
    assert torch.equal(masks, expected[:, 0])


def test_grounding_missing_checkpoints_name_config_keys(tiny: TinyModels, tmp_path: Path) -> None:
    with pytest.raises(StageError, match="grounding.detector_checkpoint"):
        GroundingDinoDetector(str(tmp_path / "none.pth"), text_encoder=str(tiny.bert_dir), device="cpu")
    with pytest.raises(StageError, match="grounding.segmenter_checkpoint"):
        SamHqSegmenter("vit_tiny", str(tmp_path / "none.pth"), device="cpu")
    with pytest.raises(StageError, match="grounding.segmenter_type"):
        SamHqSegmenter("vit_q", str(tiny.sam_checkpoint), device="cpu")
