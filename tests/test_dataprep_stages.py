"""Dataprep stage logic, exactly, with fake models: noun-run merge/dedupe, detector-phrase mapping, mask union,
per-item grounding bookkeeping and cache, config / input / shard-range handling. No model is built here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dataprep.pipeline import (
    DataprepConfigError,
    load_config,
    load_input,
    parse_shard_spec,
    sample_key,
    shards_for_run,
)
from dataprep.stages.common import StageError
from dataprep.stages.grounding import (
    Detection,
    detector_caption,
    ground_items,
    load_masks,
    map_detection_to_phrase,
    union_masks_by_phrase,
)
from dataprep.stages.noun_phrases import (
    TaggedToken,
    TaggerNounPhraseExtractor,
    extract_noun_phrases,
    merge_noun_runs,
)


class FakeTagger:
    """Whitespace/punctuation tokens with a fixed word -> tag table (default DT)."""

    def __init__(self, tags: dict[str, str]) -> None:
        self.tags = tags
        self.calls: list[list[str]] = []

    def tag(self, captions: list[str]) -> list[list[TaggedToken]]:
        self.calls.append(list(captions))
        out = []
        for c in captions:
            toks = [m for m in re.finditer(r"[\w'-]+|[^\w\s]", c)]
            out.append(
                [TaggedToken(m.group(), self.tags.get(m.group().lower(), "DT"), m.start(), m.end()) for m in toks]
            )
        return out


TAGS = {
    "man": "NN",
    "woman": "NN",
    "women": "NNS",
    "hot": "NN",
    "dog": "NN",
    "stand": "NN",
    "new": "NNP",
    "york": "NNP",
    "taxis": "NNS",
    "t-shirt": "NN",
    "coffee": "NN",
    "cup": "NN",
    "red": "JJ",
    "sells": "VBZ",
    "in": "IN",
    "near": "IN",
    ".": ".",
}


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a man sells hot dog stand food", ["man", "hot dog stand"]),  # a noun run is one phrase
        ("New York taxis near a man", ["New York taxis", "man"]),  # NNP NNP NNS merge
        ("a Dog near a dog and a DOG", ["Dog"]),  # case-insensitive dedupe keeps the first surface form
        ("a man in a red t-shirt near a woman .", ["man", "t-shirt", "woman"]),  # caption order, punctuation
        ("a coffee  cup", ["coffee  cup"]),  # text is the caption substring (spacing kept)
        ("women near a woman near women", ["women", "woman"]),  # dedupe by text, not lemma
        ("a red near in", []),  # no noun
        ("man", ["man"]),  # run at the very end is flushed
        ("coffee cup . coffee cup", ["coffee cup"]),
    ],
)
def test_merge_and_dedupe_exact(caption: str, expected: list[str]) -> None:
    tagger = FakeTagger({**TAGS, "dog": "NN"})
    assert TaggerNounPhraseExtractor(tagger).extract([caption]) == [expected]


def test_merge_noun_runs_all_noun_tags() -> None:
    caption = "A B C D e"
    toks = [
        TaggedToken(t, tag, i * 2, i * 2 + 1)
        for i, (t, tag) in enumerate(zip("ABCDe", ["NN", "NNS", "NNP", "NNPS", "DT"]))
    ]
    assert merge_noun_runs(caption, toks) == ["A B C D"]


def test_extract_noun_phrases_batches_in_order() -> None:
    tagger = FakeTagger(TAGS)
    items = [{"id": f"i{k}", "caption": c} for k, c in enumerate(["a man", "a woman", "a dog", "hot dog"])]
    out = extract_noun_phrases(items, TaggerNounPhraseExtractor(tagger), batch_size=3, progress=False)
    assert [it["phrases"] for it in out] == [["man"], ["woman"], ["dog"], ["hot dog"]]
    assert tagger.calls == [["a man", "a woman", "a dog"], ["hot dog"]]
    assert "phrases" not in items[0]  # inputs are not mutated
    with pytest.raises(StageError, match="item x: stage 'noun_phrases' needs field 'caption'"):
        extract_noun_phrases([{"id": "x"}], TaggerNounPhraseExtractor(tagger), progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Grounding bookkeeping
# ---------------------------------------------------------------------------------------------------------------


def test_detector_caption() -> None:
    assert detector_caption(["Cat", "hot dog", "T-shirt"]) == "cat . hot dog . t shirt ."


@pytest.mark.parametrize(
    ("detected", "expected"),
    [
        ("cat", 1),  # exact
        ("hot dog", 2),  # exact multi-word beats the overlap with "dog"
        ("t - shirt", 3),  # BERT decode spacing normalised: exact match of "t-shirt"
        ("dog", 0),  # exact "dog" (index 0) even though "hot dog" also contains it
        ("hot", 2),  # overlap 1 with "hot dog" only
        ("cat dog", 0),  # overlap 1 with dog, cat, hot dog: tie -> earliest in caption order
        ("hot dog cat", 2),  # overlap 2 with "hot dog" beats 1
        ("dog dog", 0),  # multiset overlap: 1 with "dog", 1 with "hot dog" -> earliest
        ("zebra", None),  # no shared word
        ("", None),  # nothing scored above the text threshold
        ("##s", None),  # a lone word piece shares nothing
    ],
)
def test_map_detection_to_phrase(detected: str, expected: int | None) -> None:
    assert map_detection_to_phrase(detected, ["dog", "Cat", "hot dog", "T-shirt"]) == expected


def test_union_masks_exact() -> None:
    h, w = 4, 5
    m = torch.zeros((3, h, w), dtype=torch.bool)
    m[0, 0, :2] = True
    m[1, 3, 4] = True
    m[2, 0, 1:3] = True
    per_phrase, stacked = union_masks_by_phrase(m, [2, 0, 2], num_phrases=4, image_hw=(h, w))
    expect_p2 = np.zeros((h, w), bool)
    expect_p2[0, :3] = True
    assert per_phrase[1] is None and per_phrase[3] is None
    np.testing.assert_array_equal(per_phrase[0], m[1].numpy())
    np.testing.assert_array_equal(per_phrase[2], expect_p2)
    assert stacked.dtype == np.uint8 and stacked.shape == (2, h, w)
    np.testing.assert_array_equal(stacked[0], m[1].numpy().astype(np.uint8))
    np.testing.assert_array_equal(stacked[1], expect_p2.astype(np.uint8))
    # an all-zero union is null; no boxes at all -> every phrase null
    per_phrase, stacked = union_masks_by_phrase(torch.zeros((1, h, w), dtype=torch.bool), [0], 2, (h, w))
    assert per_phrase == [None, None] and stacked.shape == (0, h, w)
    per_phrase, stacked = union_masks_by_phrase(torch.zeros((0, h, w), dtype=torch.bool), [], 2, (h, w))
    assert per_phrase == [None, None] and stacked.shape == (0, h, w)


class FakeDetector:
    name = "fake-detector"

    def __init__(self, dets: dict[tuple[str, ...], list[Detection]]) -> None:
        self.dets = dets
        self.calls = 0

    def detect(self, images, phrase_lists):
        self.calls += 1
        return [list(self.dets.get(tuple(ps), [])) for ps in phrase_lists]


class FakeSegmenter:
    """The box itself as the mask."""

    name = "fake-segmenter"

    def segment(self, images, boxes):
        out = []
        for img, bx in zip(images, boxes):
            h, w = img.shape[:2]
            m = torch.zeros((len(bx), h, w), dtype=torch.bool)
            for k, (x0, y0, x1, y1) in enumerate(bx.round().long().tolist()):
                m[k, y0:y1, x0:x1] = True
            out.append(m)
        return out


def test_ground_items_with_fakes(tmp_path: Path, write_photos) -> None:
    astronaut, chelsea = write_photos(tmp_path / "img", ("astronaut", "chelsea"))
    items = [
        {"id": "a.1", "key": "a_1", "image": str(astronaut), "phrases": ["astronaut", "space suit", "flag"]},
        {"id": "c", "key": "c", "image": str(chelsea), "phrases": ["cat", "blanket"]},
        {"id": "n", "key": "n", "image": str(chelsea), "phrases": []},
    ]
    det = FakeDetector(
        {
            ("astronaut", "space suit", "flag"): [
                Detection((10, 10, 50, 60), 0.9, "space suit"),
                Detection((40, 50, 100, 120), 0.8, "suit"),  # overlap -> "space suit": union with the first
                Detection((0, 0, 5, 5), 0.7, "astronaut"),
                Detection((0, 0, 9, 9), 0.6, "moon"),  # unmatched: dropped
            ],
            ("cat", "blanket"): [Detection((100, 100, 100, 140), 0.5, "blanket")],  # zero-area box -> empty -> null
        }
    )
    out = ground_items(items, det, FakeSegmenter(), tmp_path / "g", batch_size=2, progress=False)
    a, c, n = (it["grounding"] for it in out)
    assert a["mask_index"] == [0, 1, None]
    assert (a["num_detections"], a["num_unmatched"]) == (4, 1)
    assert [b[-1] for b in a["boxes"]] == [1, 1, 0]
    masks = load_masks(out[0])
    expect_suit = np.zeros((512, 512), np.uint8)
    expect_suit[10:60, 10:50] = 1
    expect_suit[50:120, 40:100] = 1
    expect_astronaut = np.zeros((512, 512), np.uint8)
    expect_astronaut[0:5, 0:5] = 1
    np.testing.assert_array_equal(masks[1], expect_suit)
    np.testing.assert_array_equal(masks[0], expect_astronaut)
    assert masks[2] is None
    assert c["mask_index"] == [None, None] and load_masks(out[1]) == [None, None]
    assert (c["height"], c["width"]) == (300, 451)
    assert n["mask_index"] == [] and n["num_detections"] == 0
    assert Path(a["masks"]).name == "a_1.npz"  # per-item file named by the sample key
    # cached: a rerun needs no models; changed phrases are recomputed
    again = ground_items(items, None, None, tmp_path / "g", progress=False)
    assert [it["grounding"] for it in again] == [a, c, n]
    changed = [dict(items[1], phrases=["cat"])]
    with pytest.raises(StageError, match="item c: not grounded yet"):
        ground_items(changed, None, None, tmp_path / "g", progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Config, input, shard ranges
# ---------------------------------------------------------------------------------------------------------------


def test_config_strict_and_validated(tmp_path: Path) -> None:
    base = ["input=x.jsonl", "work_dir=w", "out_dir=o"]
    cfg = load_config(None, base + ["grounding.box_threshold=0.3", "stages=[grounding,shards]"])
    assert cfg.grounding.box_threshold == 0.3 and cfg.grounding.text_threshold == 0.25
    assert cfg.stages == ["grounding", "shards"]
    with pytest.raises(DataprepConfigError, match="grounding.box_thresh"):
        load_config(None, base + ["grounding.box_thresh=0.3"])
    with pytest.raises(DataprepConfigError, match="'out_dir' is required"):
        load_config(None, base[:2])
    with pytest.raises(DataprepConfigError, match="'stages'"):
        load_config(None, base + ["stages=[detect]"])
    with pytest.raises(DataprepConfigError, match="grounding.text_threshold"):
        load_config(None, base + ["grounding.text_threshold=1.5"])
    shipped = Path(__file__).resolve().parents[1] / "configs" / "dataprep_grounded_sam.yaml"
    cfg = load_config(shipped, base)
    assert (cfg.grounding.box_threshold, cfg.grounding.text_threshold) == (0.25, 0.25)
    assert cfg.grounding.segmenter_type == "vit_h" and cfg.caption_choice.model.endswith("patch14-336")


def test_shard_ranges() -> None:
    assert parse_shard_spec("0-3,7, 9-10,3") == [0, 1, 2, 3, 7, 9, 10]
    with pytest.raises(DataprepConfigError, match="'shards'"):
        parse_shard_spec("3-1")
    cfg = load_config(None, ["input=x", "work_dir=w", "out_dir=o", "shards_per_task=3"])
    assert shards_for_run(cfg, 8, env={}) == list(range(8))
    assert shards_for_run(cfg, 8, env={"SLURM_ARRAY_TASK_ID": "1"}) == [3, 4, 5]
    assert shards_for_run(cfg, 8, env={"SLURM_ARRAY_TASK_ID": "2"}) == [6, 7]  # last task is short
    assert shards_for_run(cfg, 8, env={"SLURM_ARRAY_TASK_ID": "3"}) == []
    cfg.shards = "2,5"
    assert shards_for_run(cfg, 8, env={"SLURM_ARRAY_TASK_ID": "0"}) == [2, 5]  # explicit shards win
    cfg.shards = "9"
    with pytest.raises(DataprepConfigError, match="out of range"):
        shards_for_run(cfg, 8, env={})


def test_load_input_formats(tmp_path: Path, write_photos) -> None:
    (p,) = write_photos(tmp_path / "imgs", ("chelsea",))
    lines = [
        {"id": "cat.1", "image": "chelsea.jpg", "captions": ["a cat", "a tabby cat"], "coco_id": 7},
        {"file_name": "chelsea.jpg", "caption": "one caption"},
    ]
    (tmp_path / "imgs" / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    items = load_input(tmp_path / "imgs")  # folder of images + captions.jsonl
    assert [it["id"] for it in items] == ["cat.1", "chelsea"]
    assert [it["key"] for it in items] == ["cat_1", "chelsea"]
    assert items[0]["image"] == str(p) and items[0]["source"] == {"coco_id": 7}
    assert items[1]["captions"] == ["one caption"]
    other = tmp_path / "list.jsonl"  # a jsonl elsewhere, absolute image path
    other.write_text(json.dumps({"id": "x", "image": str(p), "captions": ["c"]}) + "\n")
    assert load_input(other)[0]["image"] == str(p)
    other.write_text(
        json.dumps({"id": "a.b", "image": str(p), "caption": "c"})
        + "\n"
        + json.dumps({"id": "a_b", "image": str(p), "caption": "c"})
        + "\n"
    )
    with pytest.raises(StageError, match="line 2: id 'a_b' gives sample key 'a_b', already used by id 'a.b'"):
        load_input(other)
    other.write_text(json.dumps({"id": "x", "image": str(p), "captions": []}) + "\n")
    with pytest.raises(StageError, match="line 1: 'captions' must be a non-empty list"):
        load_input(other)
    assert sample_key("COCO/0001.jpg") == "COCO_0001_jpg"
