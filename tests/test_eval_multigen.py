"""MultiGen scoring (docs/DESIGN.md §4): hand-computed cases, the official algorithm, validation, prompt files,
plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tcscale.eval import multigen_scores
from tcscale.eval.multigen import (
    category_success_rates,
    detect_records,
    detector_queries,
    load_multigen_prompts,
    multigen_metrics,
    plot_category_success,
    records_from_official,
)
from tests.helpers.eval_models import shared_dir


def rec(pid, rnd, objects, labels=(), scores=()):
    return {"prompt_id": pid, "round": rnd, "objects": list(objects), "labels": list(labels), "scores": list(scores)}


def test_hand_computed_two_prompts_two_rounds():
    records = [
        # cat detected twice (counts once), dog exactly at the threshold (absent), bus not in the prompt: count 1
        rec(0, 0, ["cat", "dog", "car"], ["cat", "cat", "dog", "bus"], [0.5, 0.9, 0.1, 0.9]),
        rec(0, 1, ["cat", "dog", "car"]),  # no detections at all: count 0
        rec(1, 0, ["cup", "book", "kite"], ["cup", "book", "kite"], [0.2, 0.3, 0.11]),  # count 3
        rec(1, 1, ["cup", "book", "kite"], ["cup", "book"], [0.5, 0.05]),  # count 1
    ]
    out = multigen_scores(records, num_objects=3)
    assert list(out) == ["MG1", "MG2", "MG3"]
    # counts: round 0 -> [1, 3], round 1 -> [0, 1]
    assert out["MG1"]["mean"] == pytest.approx(75.0) and out["MG1"]["std"] == pytest.approx(25.0)  # rounds 100 / 50
    assert out["MG2"]["mean"] == pytest.approx(25.0) and out["MG2"]["std"] == pytest.approx(25.0)  # rounds 50 / 0
    assert out["MG3"]["mean"] == pytest.approx(25.0) and out["MG3"]["std"] == pytest.approx(25.0)


def test_threshold_is_strict_and_configurable():
    r = [rec(0, 0, ["cat"], ["cat"], [0.1])]
    assert multigen_scores(r, num_objects=1)["MG1"]["mean"] == 0.0  # 0.1 is not > 0.1
    assert multigen_scores(r, threshold=0.0999, num_objects=1)["MG1"]["mean"] == 100.0
    r = [rec(0, 0, ["cat"], ["cat"], [0.1000001])]
    assert multigen_scores(r, num_objects=1)["MG1"]["mean"] == 100.0


def test_std_is_population_std_over_rounds():
    # one prompt, three rounds: success 1, 1/2, 0 of the round's images for MG1 -> 100, 50, 0 %
    records = [
        rec(0, 0, ["a"], ["a"], [0.9]),
        rec(1, 0, ["a"], ["a"], [0.9]),
        rec(0, 1, ["a"], ["a"], [0.9]),
        rec(1, 1, ["a"], [], []),
        rec(0, 2, ["a"]),
        rec(1, 2, ["a"]),
    ]
    out = multigen_scores(records, num_objects=1)["MG1"]
    assert out["mean"] == pytest.approx(50.0)
    assert out["std"] == pytest.approx(math.sqrt((50**2 + 0 + 50**2) / 3))  # ddof=0: 40.82, not 50 (ddof=1)


def _official_get_multigen(results, threshold, text_data, num_ins, img_per_prompt):
    """The official gen_multigen_scores.py algorithm, restated (results keyed "uid_round")."""
    mg_n = [0] * num_ins
    mg_std = np.zeros((img_per_prompt, num_ins))
    for img_id, rr in results.items():
        uid, slot = (int(x) for x in img_id.split("_"))
        obj_list = text_data[uid][:num_ins]
        detected = [c for c, s in zip(rr["classes"], rr["scores"]) if s > threshold]
        for k in range(len(set(detected) & set(obj_list))):
            mg_n[k] += 1
            mg_std[slot][k] += 1
    mg_std = np.std(100 * mg_std / (len(results) / img_per_prompt), axis=0)
    return [100 * m / len(results) for m in mg_n], mg_std


def test_matches_the_official_algorithm_on_random_detections():
    rng = np.random.default_rng(3)
    vocab = [f"obj{i}" for i in range(12)]
    prompts = [list(rng.choice(vocab, size=5, replace=False)) for _ in range(40)]
    results, records = {}, []
    for uid, objs in enumerate(prompts):
        for slot in range(10):
            n = int(rng.integers(0, 9))
            labels = [str(x) for x in rng.choice(vocab, size=n)]
            scores = [float(x) for x in rng.choice([0.05, 0.1, 0.15, 0.5, 0.9], size=n)]
            results[f"{uid}_{slot}"] = {"classes": labels, "scores": scores}
            records.append(rec(uid, slot, objs, labels, scores))
    mean, std = _official_get_multigen(results, 0.1, prompts, 5, 10)
    ours = multigen_scores(records)
    for k in range(5):
        assert ours[f"MG{k + 1}"]["mean"] == pytest.approx(mean[k], abs=1e-9)
        assert ours[f"MG{k + 1}"]["std"] == pytest.approx(std[k], abs=1e-9)
    # the official detection-file layout converts to the same records
    loaded = [{"prompt_id": i, "prompt": "", "objects": o} for i, o in enumerate(prompts)]
    assert multigen_scores(records_from_official(results, loaded)) == ours


@pytest.mark.parametrize(
    "bad, message",
    [
        ([{"prompt_id": 0, "round": 0, "objects": ["a"], "labels": []}], r"record 0 has no 'scores'"),
        (
            [rec(0, 0, ["a"]), {"round": 1, "objects": ["a"], "labels": [], "scores": []}],
            r"record 1 has no 'prompt_id'",
        ),
        ([rec(0, 0, ["a"], ["a", "b"], [0.5])], r"record 0 .*2 labels but 1 scores"),
        ([rec(0, 0, ["a"]), rec(1, 0, ["a"]), rec(0, 0, ["a"])], r"records 0 and 2 .*prompt_id=0, round=0"),
        ([rec(0, -1, ["a"])], r"record 0: 'round'"),
        ([rec(0, 0, ["a"], ["a"], [float("nan")])], r"not a finite number"),
        ([], r"no MultiGen records"),
    ],
)
def test_bad_records_raise_one_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        multigen_scores(bad)


def test_category_success_rates_and_metrics():
    records = [
        rec(0, 0, ["cat", "dog"], ["cat", "dog", "cow"], [0.9, 0.1, 0.9]),
        rec(0, 1, ["cat", "dog"], ["dog"], [0.4]),
        rec(1, 0, ["cat", "bus"], ["cat", "cat"], [0.2, 0.3]),
    ]
    rates = category_success_rates(records)
    assert rates == {
        "bus": {"rate": 0.0, "present": 0, "images": 1},
        "cat": {"rate": 2 / 3, "present": 2, "images": 3},
        "dog": {"rate": 0.5, "present": 1, "images": 2},
    }  # "cow" was never asked for
    flat = multigen_metrics(multigen_scores(records, num_objects=2), "multigen/coco")
    assert set(flat) == {"multigen/coco/MG1", "multigen/coco/MG1_std", "multigen/coco/MG2", "multigen/coco/MG2_std"}
    assert flat["multigen/coco/MG1"] == pytest.approx(100.0)


def test_plot_writes_a_png_atomically(tmp_path):
    rates = {f"c{i}": {"rate": i / 10, "present": i, "images": 10} for i in range(11)}
    out = plot_category_success(rates, tmp_path / "plots" / "per_category.png", max_categories=5)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["per_category.png"]  # no temporary left behind
    with pytest.raises(ValueError, match="no category"):
        plot_category_success({}, tmp_path / "x.png")


@pytest.mark.parametrize("name, n_categories", [("coco_obj_comp_5_1k.json", 80), ("ade20k_obj_comp_5_1k.json", 100)])
def test_load_shipped_prompt_files(name, n_categories):
    prompts = load_multigen_prompts(shared_dir() / "data" / "multigen" / name)
    assert len(prompts) == 1000
    assert [p["prompt_id"] for p in prompts] == list(range(1000))
    assert all(len(p["objects"]) == 5 for p in prompts)
    assert len({o for p in prompts for o in p["objects"]}) == n_categories
    for p in prompts:  # the objects are the prompt's, in its order: "a photo of a A, a B, a C, a D, and a E."
        o = p["objects"]
        assert p["prompt"] == f"a photo of a {o[0]}, a {o[1]}, a {o[2]}, a {o[3]}, and a {o[4]}."
    assert detector_queries(prompts[0]["objects"])[0] == f"a photo of a {prompts[0]['objects'][0]}"


def test_prompt_file_of_the_wrong_shape(tmp_path):
    good = {"unique_id": 0, "num_objects": 2, "obj_1_attributes": ["cat"], "obj_2_attributes": ["dog"], "text": "t"}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([good, dict(good, unique_id=1, obj_2_attributes=[])]))
    with pytest.raises(ValueError, match=r"bad\.json: entry 1: 'obj_2_attributes'"):
        load_multigen_prompts(path)
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match=r"bad\.json: expected a non-empty JSON list"):
        load_multigen_prompts(path)
    path.write_text("[{")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        load_multigen_prompts(path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_multigen_prompts(tmp_path / "missing.json")


def test_detect_records_batches_a_detector():
    calls = []

    def fake_detector(images, categories):
        calls.append(len(images))
        return [
            {"labels": cats[:1], "scores": [0.5] * len(cats[:1]), "boxes": [[0, 0, 1, 1]] * len(cats[:1])}
            for cats in categories
        ]

    items = [{"prompt_id": i // 2, "round": i % 2, "objects": ["a", "b"], "image": None} for i in range(5)]
    records = detect_records(items, fake_detector, batch_size=2)
    assert calls == [2, 2, 1]
    assert [(r["prompt_id"], r["round"], r["labels"]) for r in records] == [
        (0, 0, ["a"]),
        (0, 1, ["a"]),
        (1, 0, ["a"]),
        (1, 1, ["a"]),
        (2, 0, ["a"]),
    ]
    assert multigen_scores(records, num_objects=2)["MG1"]["mean"] == 100.0
