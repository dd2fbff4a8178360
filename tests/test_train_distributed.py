"""Real 2-rank DeepSpeed runs of configs/tiny_cpu.yaml (gloo on CPU), launched as the README says."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.launch import final_weights, mlflow_runs, run_and_kill_at, run_deepspeed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
CONFIG = "configs/tiny_cpu.yaml"


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_overfit_fixed_data_with_gradient_checkpointing(tmp_path, stage):
    """On a fixed set of 4 samples (the whole global batch every step) token and pixel losses fall."""
    out = tmp_path / f"zero{stage}"
    steps = 16
    run_deepspeed(
        2,
        CONFIG,
        [
            f"output_dir={out}",
            f"max_steps={steps}",
            f"deepspeed.zero_optimization.stage={stage}",
            "model.gradient_checkpointing=true",
            "data.synthetic.num_samples=4",
            "objective.tokencompose.token_loss_weight=1.0",
            "objective.tokencompose.pixel_loss_weight=1.0",
            "deepspeed.optimizer.params.lr=1e-3",
            "checkpoint.every_steps=0",
        ],
    )
    client, runs = mlflow_runs(out, "tcscale-tiny")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert runs[0].data.tags["world_size"] == "2"
    for term in ("loss/token", "loss/pixel"):
        hist = sorted(client.get_metric_history(run_id, term), key=lambda m: m.step)
        assert [m.step for m in hist] == list(range(1, steps + 1))
        first = sum(m.value for m in hist[:3]) / 3
        last = sum(m.value for m in hist[-3:]) / 3
        assert last < 0.95 * first, f"{term} did not fall: {first:.4f} -> {last:.4f}"
    for metric in ("loss/ldm", "lr", "grad_norm", "samples_per_s"):
        assert len(client.get_metric_history(run_id, metric)) == steps
    seen = max(client.get_metric_history(run_id, "data/samples_seen"), key=lambda m: m.step)
    assert seen.value == steps * 2 * 2  # summed over both ranks: micro-batch 2 x 2 ranks per step
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / f"step{steps}").is_dir()


def test_killed_run_resumes_in_same_mlflow_run_with_same_weights(tmp_path):
    common = ["max_steps=9", "checkpoint.every_steps=3", "checkpoint.keep_last=5", "data.synthetic.num_samples=16"]
    ref = tmp_path / "uninterrupted"
    run_deepspeed(2, CONFIG, [f"output_dir={ref}", *common])

    run = tmp_path / "killed"
    log = run_and_kill_at(2, CONFIG, [f"output_dir={run}", *common], marker="step 4/9")
    assert "step 4/9" in log
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step"))
    assert "step9" not in ckpts and "step3" in ckpts  # killed mid-way, after the first checkpoint
    _, runs = mlflow_runs(run, "tcscale-tiny")
    assert len(runs) == 1
    run_id = runs[0].info.run_id

    proc = run_deepspeed(2, CONFIG, [f"output_dir={run}", *common, "resume=latest"])
    assert "resumed from" in proc.stdout
    client, runs = mlflow_runs(run, "tcscale-tiny")
    assert [r.info.run_id for r in runs] == [run_id]  # the same MLflow run continued
    assert runs[0].info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run_id, "loss/token")}
    assert steps == set(range(1, 10))
    seen = max(client.get_metric_history(run_id, "data/samples_seen"), key=lambda m: m.step)
    assert seen.value == 9 * 2 * 2  # per-rank loader counters restored from the checkpoint, summed over ranks

    a, b = final_weights(ref), final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
