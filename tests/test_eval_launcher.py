"""launchers/eval.py end to end on 2 CPU ranks: a tiny trained run, a tiny OWLv2, MultiGen + the synthetic suite.

Every (prompt, round) is generated exactly once across ranks, a run killed mid-way resumes by generating only the
images that are missing, and the metrics land in MLflow nested under the training run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import launch
from tests.helpers.eval_models import build_tiny_owlv2

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
CATEGORIES = ["book", "cup", "kite", "mouse", "surfboard", "boat", "vase", "bench"]


def prompt_file(path: Path, n: int = 3) -> Path:
    """n prompts in the official MultiGen format (5 categories each)."""
    rows = []
    for i in range(n):
        objs = [CATEGORIES[(i + k) % len(CATEGORIES)] for k in range(5)]
        text = "a photo of " + ", ".join(f"a {o}" for o in objs[:4]) + f", and a {objs[4]}."
        rows.append({"unique_id": i, "num_objects": 5, **{f"obj_{k + 1}_attributes": [o] for k, o in enumerate(objs)},
                     "text": text})  # fmt: skip
    path.write_text(json.dumps(rows))
    return path


def manifest_keys(suite_dir: Path) -> dict[int, list[str]]:
    """Per rank, the keys of its generated-rank<R>.jsonl, in the order they were appended."""
    out = {}
    for rank in (0, 1):
        f = suite_dir / f"generated-rank{rank}.jsonl"
        lines = f.read_text().splitlines() if f.is_file() else []
        out[rank] = [json.loads(line)["key"] for line in lines if line.strip()]
    return out


def test_eval_on_two_ranks_exactly_once_resumable_and_nested_in_mlflow(tmp_path, tiny_config):
    from tcscale.train.trainer import train

    run = tmp_path / "run"
    train(tiny_config(run, "max_steps=1"))
    parent = json.loads((run / "run.json").read_text())["mlflow_run_id"]
    owl = build_tiny_owlv2(tmp_path / "owlv2")
    out = tmp_path / "eval"
    overrides = [
        f"model.run_dir={run}",
        f"output_dir={out}",
        "multigen.enabled=true",
        f"multigen.sets=[{prompt_file(tmp_path / 'mg.json')}]",
        "multigen.rounds=3",
        f"multigen.detector={owl}",
        "synthetic.num_objects=[2]",
        "synthetic.num_prompts=2",
        "grounding.enabled=false",
        "sampler.batch_size=2",
        "sampler.num_inference_steps=2",
    ]
    cmd = ["launchers/eval.py", "--config", "configs/eval/tiny_cpu.yaml", *overrides]
    launch.run_and_kill_at(2, cmd[2], overrides, marker="generated 2/", script=cmd[0])
    suite = out / "multigen_mg"
    items = [json.loads(line)["key"] for line in (suite / "items.jsonl").read_text().splitlines()]
    assert len(items) == 9  # 3 prompts x 3 rounds
    before = {p.stem for p in (suite / "images").glob("*.png")}
    generated_before = manifest_keys(suite)
    assert 0 < len(before) < len(items), "the kill should land mid-way through MultiGen"

    proc = launch.run_deepspeed(2, cmd[2], overrides, script=cmd[0])
    after = manifest_keys(suite)
    resumed = []
    for rank in (0, 1):
        assert after[rank][: len(generated_before[rank])] == generated_before[rank]  # append-only
        resumed += after[rank][len(generated_before[rank]) :]
        assert sorted(after[rank]) == sorted(items[rank::2])  # each image on the rank that owns it, once
    assert sorted(resumed) == sorted(set(items) - before)  # the resumed run made only the missing images
    seeds = {json.loads(x)["key"]: json.loads(x)["seed"] for x in (suite / "items.jsonl").read_text().splitlines()}
    assert len(set(seeds.values())) == len(seeds)  # one recorded seed per image

    results = json.loads((out / "results.json").read_text())
    for k in range(1, 6):
        assert 0 <= results["metrics"][f"multigen/mg/MG{k}"] <= 100
    assert "synthetic/k2/all_objects" in results["metrics"]
    assert 0 < results["metrics"]["synthetic/k2/pixel_noise"] < 255  # an untrained tiny model: speckle, never flat
    assert "| tiny_cpu |" in proc.stdout  # the table is printed

    client, runs = launch.mlflow_runs(run, "tcscale-tiny")
    evals = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(evals) == 1 and evals[0].info.status == "FINISHED"
    logged = evals[0].data.metrics
    assert logged["multigen/mg/MG1"] == pytest.approx(results["metrics"]["multigen/mg/MG1"])
    params = evals[0].data.params  # each suite's protocol, its precision labelled
    assert params["protocol.multigen/mg.precision"] == "fp32" and params["protocol.multigen/mg.samples"] == "9"
    files = {a.path for a in client.list_artifacts(evals[0].info.run_id)}
    assert {"results.json", "table.md"} <= files
