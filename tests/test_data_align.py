"""Phrase -> token alignment with the real SD1.x CLIP vocabulary (open_clip's BPE)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tcscale.data.align import PhraseAligner
from tcscale.data.align_report import alignment_report, metadata_rows
from tcscale.models.tokenizer import sd_clip_tokenizer

# ../shared beside the checkout (CI's layout); TCSCALE_SHARED_DIR points elsewhere. CI sets it, so there a
# missing file fails instead of skipping.
SHARED = Path(os.environ.get("TCSCALE_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
METADATA = SHARED / "data" / "tokencompose_coco" / "metadata.jsonl"


@pytest.fixture(scope="module")
def aligner():
    return PhraseAligner(sd_clip_tokenizer())


def _words(aligner, caption, phrases):
    al = aligner.align(caption, phrases)
    toks = aligner.tokenizer.convert_ids_to_tokens(al.input_ids)
    return al, [None if pos is None else [toks[i] for i in pos] for pos in al.positions]


def test_multi_token_phrases_first_occurrence_case_insensitive(aligner):
    caption = "A Wine Glass beside a CHEST of drawers, and a second wine glass by the window."
    al, words = _words(aligner, caption, ["wine glass", "Chest Of Drawers", "window"])
    assert words == [["wine</w>", "glass</w>"], ["chest</w>", "of</w>", "drawers</w>"], ["window</w>"]]
    assert al.positions[0] == [2, 3]  # first occurrence; position 0 is <|startoftext|>
    assert al.input_ids[0] == aligner.tokenizer.bos_token_id and len(al.input_ids) == 77


def test_whole_words_only_and_drop_reasons(aligner):
    al, words = _words(aligner, "an eyeglass case on a desk", ["glass", "desk", "zebra", ""])
    assert al.reasons == ["not_found", None, "not_found", "empty"]  # "glass" must not match inside "eyeglass"
    long_caption = " ".join(["word"] * 80) + " cat"
    al = aligner.align(long_caption, ["cat", "word"])
    assert al.reasons == ["truncated", None] and al.positions[1] == [1]


def test_overlapping_phrases_longer_first_then_next_free_occurrence(aligner):
    al, words = _words(aligner, "A microwave oven above a stove top oven.", ["oven", "microwave oven"])
    assert words[1] == ["microwave</w>", "oven</w>"] and words[0] == ["oven</w>"]
    assert al.positions[0][0] > al.positions[1][-1]  # "oven" moved to its next free occurrence
    al, _ = _words(aligner, "a dog next to a cat", ["dog", "Dog"])
    assert al.reasons == [None, "overlap"]


def test_alignment_on_official_tokencompose_metadata():
    if not METADATA.is_file():
        if "TCSCALE_SHARED_DIR" in os.environ:
            pytest.fail(f"{METADATA} not found (TCSCALE_SHARED_DIR={os.environ['TCSCALE_SHARED_DIR']})")
        pytest.skip(f"{METADATA} not present (set TCSCALE_SHARED_DIR)")
    report = alignment_report(metadata_rows(METADATA), sd_clip_tokenizer())
    assert report["samples"] == 4526 and report["phrases_with_mask"] > 13000
    assert report["aligned_fraction"] >= 0.99, report["dropped"]
