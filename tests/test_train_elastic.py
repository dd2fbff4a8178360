"""Elastic resume and the multi-node launch, on configs/tiny_cpu.yaml (gloo on CPU).

A checkpoint saved on N ranks resumes on M ranks through DeepSpeed's universal checkpoint (tcscale.train.checkpoint).
What is asserted, precisely: with the global batch kept (ranks x accumulation constant) the resized run computes
what an uninterrupted run computes — the same per-step losses, the same final weights, and the same Adam state
(step counter, exp_avg, exp_avg_sq, read whole from each final checkpoint) — so the optimizer state, the data
position and the random draws all continued. The uninterrupted reference runs on 1 rank with accumulation 2: the
micro-batches' samples and generators are keyed by global sample slot, so it is the same computation as 2 ranks x
accumulation 1 (measured bit-identical on both ZeRO stages when this was written). The MLflow run and the step
count continue across every resize. A 2-rank checkpoint resumed on 2 ranks (same world) is
tests/test_train_distributed.py::test_killed_run_resumes_in_same_mlflow_run_with_same_weights.
"""

from __future__ import annotations

import pytest
import torch

from tcscale.config import load_config
from tcscale.train.trainer import train
from tests.helpers.launch import (
    REPO,
    final_weights,
    mlflow_runs,
    optimizer_state,
    run_deepspeed,
    run_torchrun_nodes,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
CONFIG = "configs/tiny_cpu.yaml"
COMMON = ["data.synthetic.num_samples=16", "checkpoint.every_steps=0", "checkpoint.keep_last=5"]


def one_rank(run_dir, *overrides: str):
    """In this process, one rank, accumulation 2 (the global batch of 2 ranks x 1)."""
    cfg = load_config(REPO / CONFIG, [f"output_dir={run_dir}", *COMMON, "deepspeed.gradient_accumulation_steps=2",
                                      *overrides])  # fmt: skip
    return train(cfg)


def shards(run_dir, step: int) -> int:
    return len(list((run_dir / "checkpoints" / f"step{step}").glob("zero_pp_rank_*_optim_states.pt")))


def assert_same_training(run, ref, steps: int):
    """Same MLflow step losses, final weights and whole Adam state as the uninterrupted reference."""
    client, runs = mlflow_runs(run, "tcscale-tiny")
    ref_client, ref_runs = mlflow_runs(ref, "tcscale-tiny")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one MLflow run, continued through each resume
    for key in ("loss/ldm", "loss/token", "loss/pixel", "grad_norm"):
        got = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key))
        want = sorted((m.step, m.value) for m in ref_client.get_metric_history(ref_runs[0].info.run_id, key))
        assert [s for s, _ in got] == list(range(1, steps + 1)), key  # the step count continued, each step once
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6, abs=1e-7), key
    seen = max(client.get_metric_history(runs[0].info.run_id, "data/samples_seen"), key=lambda m: m.step)
    assert seen.step == steps and seen.value == steps * 4  # loader counters carried over every resize

    a, b = final_weights(ref), final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    want, got = optimizer_state(ref), optimizer_state(run)
    assert want.keys() == got.keys() and len(got) > 100
    for name, state in got.items():
        # Adam's step counter continued, not restarted (ZeRO-3 conversions do not keep it: there, a restarted
        # counter would change the bias correction of steps after the resume, so the weights would differ)
        if state["step"] is not None:
            assert float(state["step"]) == steps, name
        else:
            assert want[name]["step"] is None
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], want[name][key], rtol=0, atol=1e-6, msg=f"{name} {key}")
    return runs[0]


def test_two_node_checkpoint_resumes_on_one_then_two_ranks_as_if_uninterrupted(tmp_path, capsys):
    """ZeRO-2: a 2x1 job of two torchrun launchers (node ranks 0 and 1, c10d rendezvous on 127.0.0.1) trains 2
    steps; its checkpoint resumes on 1 rank (steps 3-4), whose checkpoint resumes on 2 ranks again (steps 5-6)."""
    run, ref = tmp_path / "elastic", tmp_path / "uninterrupted"
    outs = run_torchrun_nodes(2, CONFIG, [f"output_dir={run}", "max_steps=2", *COMMON])
    assert sum("run tiny_cpu: world 2" in o for o in outs) == 1  # one job of world 2: global rank 0 on one node
    assert sum("step 2/2" in o for o in outs) == 1
    assert shards(run, 2) == 2  # one ZeRO shard per node

    one_rank(run, "max_steps=4", "resume=latest")
    out = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoints' / 'step2'} at step 2" in out
    assert "elastic resume: saved on 2 ranks, loaded on 1" in out
    assert "data: world size 2 -> 1: the synthetic slot sequence continues at slot 8" in out  # 2 steps x 4 samples
    assert (run / "checkpoints" / "step2" / "universal" / "zero").is_dir() and shards(run, 4) == 1

    proc = run_deepspeed(2, CONFIG, [f"output_dir={run}", "max_steps=6", *COMMON, "resume=latest"])
    assert "elastic resume: saved on 1 ranks, loaded on 2" in proc.stdout
    assert "continues at slot 16" in proc.stdout
    assert "the global batch changes from 4 to 8" not in proc.stdout  # accumulation 1 on 2 ranks keeps it at 4
    assert shards(run, 6) == 2

    one_rank(ref, "max_steps=6")
    mlrun = assert_same_training(run, ref, steps=6)
    assert mlrun.data.tags["world_size"] == "2" and mlrun.data.tags["resumed_world_size"] == "2"


def test_zero3_checkpoint_resumes_on_one_rank(tmp_path, capsys):
    run, ref = tmp_path / "elastic", tmp_path / "uninterrupted"
    zero3 = "deepspeed.zero_optimization.stage=3"
    run_deepspeed(2, CONFIG, [f"output_dir={run}", "max_steps=2", *COMMON, zero3])
    assert shards(run, 2) == 2
    one_rank(run, "max_steps=4", "resume=latest", zero3)
    out = capsys.readouterr().out
    assert "elastic resume: saved on 2 ranks, loaded on 1" in out
    one_rank(ref, "max_steps=4", zero3)
    mlrun = assert_same_training(run, ref, steps=4)
    assert mlrun.data.tags["resumed_world_size"] == "1"
