"""Helpers for trainer tests: launching real multi-process runs and reading what they left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def deepspeed_cmd(nproc: int, config: str, overrides: list[str], script: str = "launchers/train.py") -> list[str]:
    """The README's launch: `deepspeed launchers/train.py --config ...` (--num_gpus is required on CPU)."""
    launcher = Path(sys.executable).parent / "deepspeed"
    return [
        str(launcher),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(free_port()),
        script,
        "--config",
        config,
        *overrides,
    ]


def run_deepspeed(
    nproc: int, config: str, overrides: list[str], timeout: float = 600, script: str = "launchers/train.py"
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        deepspeed_cmd(nproc, config, overrides, script),
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"training run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def run_and_kill_at(
    nproc: int, config: str, overrides: list[str], marker: str, timeout: float = 600, script: str = "launchers/train.py"
) -> str:
    """Start a run and SIGKILL its whole process group as soon as `marker` appears in its output."""
    proc = subprocess.Popen(
        deepspeed_cmd(nproc, config, overrides, script),
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    deadline = time.time() + timeout
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if time.time() > deadline:
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    out = "".join(seen)
    if marker not in out:
        raise AssertionError(f"run ended before {marker!r}:\n{out[-4000:]}")
    return out


def run_torchrun_nodes(
    nnodes: int, config: str, overrides: list[str], timeout: float = 600, script: str = "launchers/train.py"
) -> list[str]:
    """A multi-node job on this machine: `nnodes` launchers of launchers/slurm/torchrun_node.sh (one rank each, node
    ranks 0.., a c10d rendezvous on 127.0.0.1), started last node first; returns each node's output."""
    import tempfile

    port, rdzv = free_port(), f"test-{os.getpid()}-{time.monotonic_ns()}"
    procs, logs = [], []
    try:
        for node in reversed(range(nnodes)):
            env = clean_env(
                NNODES=str(nnodes), NODE_RANK=str(node), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), RDZV_ID=rdzv, RDZV_TIMEOUT="120", TCSCALE_SHUTDOWN_S="30",
            )  # fmt: skip
            cmd = ["bash", "launchers/slurm/torchrun_node.sh", sys.executable, script, "--config", config, *overrides]
            log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed below
            logs.insert(0, log)
            procs.insert(0, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True))  # fmt: skip
        deadline = time.time() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=60)
        outs = []
        for log in logs:
            log.seek(0)
            outs.append(log.read())
            log.close()
    codes = [p.returncode for p in procs]
    if any(codes):
        detail = "\n".join(f"--- node {i} (exit {c})\n{o[-3000:]}" for i, (c, o) in enumerate(zip(codes, outs)))
        raise AssertionError(f"multi-node run failed: {codes}\n{detail}")
    return outs


def optimizer_state(run_dir: Path, tag: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per parameter: the fp32 master weights, Adam's exp_avg / exp_avg_sq (flattened) and step (None where the
    conversion does not keep it) of a checkpoint
    (default: the latest), whole (not partitioned), read from its universal conversion (tcscale.train.checkpoint)."""
    from tcscale.train.checkpoint import convert_to_universal, latest_tag

    ckpt = run_dir / "checkpoints"
    zero = convert_to_universal(ckpt / (tag or latest_tag(ckpt))) / "zero"

    def tensor(path: Path) -> torch.Tensor:
        obj = torch.load(path, weights_only=True)  # ZeRO-1/2 conversions hold {"param": t, ...}; ZeRO-3 ones t
        return (obj["param"] if isinstance(obj, dict) else obj).reshape(-1)

    out = {}
    for folder in sorted(p for p in zero.iterdir() if p.is_dir()):
        state = {k: tensor(folder / f"{k}.pt") for k in ("fp32", "exp_avg", "exp_avg_sq")}
        # ZeRO-1/2 conversions keep Adam's step per parameter; ZeRO-3 ones do not (deepspeed 0.19.8)
        step = folder / "step.pt"
        state["step"] = torch.load(step, weights_only=True) if step.is_file() else None
        out[folder.name] = state
    return out


def mlflow_runs(run_dir: Path, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def image_series(paths) -> set[tuple[str, int]]:
    """(key, step) of the step-indexed images (MLflow's `log_image(key=, step=)`) among artifact paths of a run's
    `images/` folder: `images/<key with / as ~>+step+<step>+timestamp+<ms>+<uuid>.png`."""
    out = set()
    for path in paths:
        name = str(path).rsplit("/", 1)[-1]
        if name.endswith(".png") and "+step+" in name:
            key, rest = name.split("+step+", 1)
            out.add((key.replace("~", "/"), int(rest.split("+", 1)[0])))
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from tcscale.train.checkpoint import latest_tag
    from tcscale.train.export import consolidated_state_dict

    ckpt = run_dir / "checkpoints"
    return consolidated_state_dict(ckpt, latest_tag(ckpt))


def two_rank_grounded_run_resumes_exactly(
    tmp_path: Path, config: str, experiment: str, extra: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """A family's tiny config (plus the `extra` overrides): 4 steps on 2 ranks (ZeRO-2) with checkpoints at 2 and 4
    log loss/ldm, loss/token and loss/pixel at every step; a copy of the run cut back to its step-2 checkpoint resumes
    to step 4 with the same weights. Returns the uninterrupted run's final weights (the run is
    `tmp_path / "uninterrupted"`)."""
    import shutil

    common = ["max_steps=4", "checkpoint.every_steps=2", "data.synthetic.num_samples=16", *extra]
    ref = tmp_path / "uninterrupted"
    run_deepspeed(2, config, [f"output_dir={ref}", *common])
    client, runs = mlflow_runs(ref, experiment)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    for term in ("loss/ldm", "loss/token", "loss/pixel"):
        hist = client.get_metric_history(runs[0].info.run_id, term)
        assert sorted(m.step for m in hist) == [1, 2, 3, 4] and all(m.value > 0 for m in hist)

    run = tmp_path / "resumed"  # the same run, as if killed after its step-2 checkpoint
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints" / "step4")
    (run / "checkpoints" / "latest").write_text("step2")
    proc = run_deepspeed(2, config, [f"output_dir={run}", *common, "resume=latest"])
    assert "resumed from" in proc.stdout
    a, b = final_weights(ref), final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    return a
