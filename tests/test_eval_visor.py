"""VISOR: the SR2D prompt set with the official ids, the spatial rule, and the scores on a hand-computed case."""

from __future__ import annotations

import itertools

import pytest

from tcscale.eval.visor import (
    COCO_CATEGORIES,
    RELATIONS,
    relation_holds,
    visor_metrics,
    visor_prompts,
    visor_scores,
)


def test_prompt_set_covers_every_ordered_pair_and_relation():
    assert len(COCO_CATEGORIES) == 80 == len(set(COCO_CATEGORIES))
    prompts = visor_prompts()
    assert len(prompts) == 80 * 79 * 4
    seen = {(tuple(p["objects"]), p["relation"]) for p in prompts}
    assert seen == {((a, b), r) for a, b in itertools.permutations(COCO_CATEGORIES, 2) for r in RELATIONS}
    everything = visor_prompts(include_and=True, include_single=True)
    assert len(everything) == 31680  # the SR2D size in the VISOR README
    assert [p["prompt_id"] for p in everything] == list(range(31680))
    by_id = {p["prompt_id"]: p for p in everything}
    # examples printed in the microsoft/VISOR README (its objdet_results format section)
    assert by_id[1103]["prompt"] == "a kite to the right of a bicycle"
    assert by_id[11036]["prompt"] == "a cat below a bottle"
    assert by_id[0]["prompt"] == "a person to the left of a bicycle"
    assert by_id[1]["prompt"] == "a bicycle to the left of a person"
    assert by_id[8]["prompt"] == "a person and a bicycle" and by_id[8]["relation"] == "and"
    assert by_id[31600]["prompt"] == "a person" and by_id[31600]["objects"] == ["person"]
    assert {p["prompt_id"] for p in prompts} <= set(by_id)  # relation prompts keep the official ids


def test_articles():
    texts = {p["prompt"] for p in visor_prompts()}
    assert "an umbrella above an elephant" in texts
    assert "an orange below a hair drier" in texts
    assert "an airplane to the right of an oven" in texts
    assert "a hot dog to the left of an apple" in texts
    assert not any(" a apple" in t or " a orange" in t or t.startswith("a umbrella") for t in texts)


def test_relation_rule_is_strict_in_image_coordinates():
    assert relation_holds("to the left of", (10, 50), (20, 0))
    assert not relation_holds("to the left of", (20, 50), (20, 0))
    assert relation_holds("to the right of", (30, 0), (20, 0))
    assert relation_holds("above", (0, 10), (0, 40))  # y grows downwards
    assert relation_holds("below", (0, 40), (0, 10))
    assert not relation_holds("below", (0, 10), (0, 10))
    with pytest.raises(ValueError, match="unknown VISOR relation"):
        relation_holds("next to", (0, 0), (1, 1))


def box(cx, cy, half=5):
    return [cx - half, cy - half, cx + half, cy + half]


def r(pid, rnd, objects, relation, dets):
    return {
        "prompt_id": pid,
        "round": rnd,
        "objects": objects,
        "relation": relation,
        "labels": [d[0] for d in dets],
        "scores": [d[1] for d in dets],
        "boxes": [d[2] for d in dets],
    }


def test_scores_on_a_hand_computed_case():
    left, above = ["cat", "dog"], ["cup", "book"]
    records = [
        r(0, 0, left, "to the left of", [("cat", 0.9, box(10, 30)), ("dog", 0.5, box(50, 30))]),  # right
        # the only cat above threshold is right of the dog; the one left of it scores 0.05
        r(
            0,
            1,
            left,
            "to the left of",
            [("cat", 0.9, box(60, 30)), ("cat", 0.05, box(5, 30)), ("dog", 0.5, box(20, 30))],
        ),
        r(0, 2, left, "to the left of", [("cat", 0.9, box(60, 30))]),  # dog missing
        r(0, 3, left, "to the left of", []),
        r(1, 0, above, "above", [("cup", 0.3, box(30, 10)), ("book", 0.3, box(30, 40))]),  # right
        # one of the two cups is above the book: any pair counts
        r(1, 1, above, "above", [("cup", 0.3, box(30, 40)), ("cup", 0.5, box(30, 5)), ("book", 0.3, box(30, 10))]),
        r(1, 2, above, "above", [("cup", 0.3, box(30, 20)), ("book", 0.3, box(80, 20))]),  # same height: wrong
        r(1, 3, above, "above", [("cup", 0.9, box(30, 20)), ("book", 0.1, box(30, 60))]),  # book at the threshold
    ]
    s = visor_scores(records)
    assert s["images"] == 8 and s["prompts"] == 2
    assert s["OA"] == pytest.approx(100 * 5 / 8)
    assert s["OA_A"] == pytest.approx(100 * 7 / 8) and s["OA_B"] == pytest.approx(100 * 5 / 8)
    assert s["cond"] == pytest.approx(100 * 3 / 5)
    assert s["uncond"] == pytest.approx(100 * 3 / 8)
    assert s["uncond"] == pytest.approx(s["cond"] * s["OA"] / 100)  # how the official visor.py reports it
    assert [s[f"VISOR_{k}"] for k in range(1, 5)] == pytest.approx([100.0, 50.0, 0.0, 0.0])
    flat = visor_metrics(s)
    assert flat["visor/OA"] == s["OA"] and flat["visor/cond"] == s["cond"] and "visor/images" not in flat


@pytest.mark.parametrize(
    "bad, message",
    [
        ([{"prompt_id": 0}], r"record 0 has no 'round'"),
        ([r(0, 0, ["cat"], "above", [])], "two objects"),
        ([r(0, 0, ["cat", "dog"], "near", [])], "relation 'near'"),
        (
            [dict(r(0, 0, ["cat", "dog"], "above", [("cat", 0.5, box(1, 1))]), boxes=[])],
            "1 labels, 1 scores and 0 boxes",
        ),
        ([r(0, 0, ["cat", "dog"], "above", []), r(0, 0, ["cat", "dog"], "above", [])], "appears twice"),
        ([], "no VISOR records"),
    ],
)
def test_bad_records(bad, message):
    with pytest.raises(ValueError, match=message):
        visor_scores(bad)
