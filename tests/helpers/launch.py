"""Helpers for trainer tests: launching real multi-process runs and reading what they left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
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


def mlflow_runs(run_dir: Path, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from tcscale.train.checkpoint import latest_tag
    from tcscale.train.export import consolidated_state_dict

    ckpt = run_dir / "checkpoints"
    return consolidated_state_dict(ckpt, latest_tag(ckpt))
