"""launchers/slurm/train.sbatch: static checks, and runs against a real single-node Slurm cluster.

The cluster tests (marked ``slow``) start munged + slurmctld + slurmd from a temporary config
(tests/slurm.py) and skip when Slurm is not installed (.ci/install_slurm.sh installs it).
Instead of the trainer they run a tiny stand-in script (TCSCALE_TRAIN_ENTRY) that joins a gloo process
group from the RANK/WORLD_SIZE/MASTER_* variables the batch script exports and records what it saw.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.slurm import REPO, SBATCH, STANDIN, WAIT_S, SlurmCluster, job_env, sbatch_args, wait_for

ENV_SH = REPO / "launchers" / "slurm" / "env.sh"


@pytest.fixture
def slurm(slurm_cluster) -> SlurmCluster:
    return slurm_cluster


def sbatch_header(path: Path) -> list[str]:
    """The #SBATCH options, read as sbatch does: up to the first command line."""
    opts = []
    for line in path.read_text().splitlines()[1:]:
        s = line.strip()
        if not s or s.startswith("#"):
            if s.startswith("#SBATCH"):
                opts.extend(s.split()[1:2])
            continue
        break
    return opts


def test_sbatch_template_parses_and_header():
    others = ("eval.sbatch", "eval_array.sh", "torchrun_node.sh", "../mlflow_server.sh")
    for script in (SBATCH, ENV_SH, *(SBATCH.parent / name for name in others)):
        res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, (script, res.stderr)
    opts = sbatch_header(SBATCH)
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", o) for o in opts), opts
    assert "--requeue" in opts and "--open-mode=append" in opts
    assert "--gpus-per-node=8" in opts  # one task per GPU: the header asks Slurm for the GPUs
    assert SBATCH.read_text().startswith("#!/bin/bash\n")


def test_sbatch_usage_without_config(tmp_path):
    res = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True, cwd=tmp_path, timeout=10)
    assert res.returncode == 2 and "usage" in res.stderr
    for name in ("eval.sbatch", "eval_array.sh", "torchrun_node.sh"):
        res = subprocess.run(["bash", str(SBATCH.parent / name)], capture_output=True, text=True, cwd=tmp_path,
                             timeout=10)  # fmt: skip
        assert res.returncode == 2 and "usage" in res.stderr, (name, res.stderr)
    res = subprocess.run(["bash", str(SBATCH.parent / "eval_array.sh"), "two", "c.yaml"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=10)  # fmt: skip
    assert res.returncode == 2 and "N must be a positive integer, got 'two'" in res.stderr


# -------------------------------------------------------------------------------------------------------
# On a real cluster
# -------------------------------------------------------------------------------------------------------
def expedite_requeued(cluster: SlurmCluster, job_id: str, log: Path) -> None:
    """Start a requeued job now instead of after Slurm's ~2 min requeue hold (Reason=BeginTime).

    Waits until the killed instance is fully gone (job PENDING with Restarts=1, node idle) and then one more
    second: slurmd refuses a launch whose credential is not newer, to the second, than the kill of the
    previous instance ("Job N already killed, do not launch batch job").
    """

    def ready() -> bool:
        info = cluster.job_info(job_id)
        node = cluster.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()
        return info.get("Restarts") == "1" and info.get("JobState") == "PENDING" and node[:1] == ["idle"]

    wait_for("the job to be requeued (PENDING, Restarts=1, node idle)", ready, cluster=cluster, log=log)
    time.sleep(2.0)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


@pytest.mark.slow
def test_sbatch_wait_two_tasks_all_reduce(slurm, tmp_path):
    entry = tmp_path / "standin.py"
    entry.write_text(STANDIN)
    env = job_env(slurm, tmp_path, entry)
    t0 = time.monotonic()
    res = slurm.run(
        *sbatch_args(tmp_path, "--wait"), "configs/some.yaml", "a.b=1", "name=two words",
        env=env, timeout=WAIT_S, check=False,
    )  # fmt: skip
    job_id = res.stdout.strip().split(";")[0]
    log = tmp_path / f"slurm-{job_id}.out"
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{log.read_text() if log.is_file() else ''}"
    records = [json.loads((tmp_path / f"started.0.rank{r}.json").read_text()) for r in range(2)]
    for r, rec in enumerate(records):
        e = rec["env"]
        assert (e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"], e["SLURM_PROCID"]) == (str(r), "2", str(r), str(r))
        assert (e["LOCAL_WORLD_SIZE"], e["NODE_RANK"], e["SLURM_JOB_ID"]) == ("2", "0", job_id)
        assert e["MASTER_ADDR"] == slurm.node and int(e["MASTER_PORT"]) == 20000 + int(job_id) % 20000
        assert e["OMP_NUM_THREADS"] == "1"
        assert rec["all_reduce"] == 3.0  # 1 + 2 across the two tasks
        assert rec["argv"] == ["--config", "configs/some.yaml", "a.b=1", "name=two words"]  # no resume on 1st run
        assert (tmp_path / f"done.0.rank{r}").is_file()
    assert "restart 0: 1 node(s) x 2 task(s)" in log.read_text()
    assert "2 GPU(s) per node from Slurm (SLURM_GPUS_ON_NODE)" in log.read_text()  # ranks = allocated GPUs
    print(f"sbatch --wait round trip: {time.monotonic() - t0:.1f} s")


@pytest.mark.slow
def test_usr1_forwarded_then_requeued_with_resume(slurm, tmp_path):
    entry = tmp_path / "standin.py"
    entry.write_text(STANDIN)
    env = job_env(slurm, tmp_path, entry, STANDIN_MODE="wait_signal")
    t0 = time.monotonic()
    job_id = slurm.run(*sbatch_args(tmp_path), "configs/some.yaml", "x=1", env=env).stdout.strip()
    job_id = job_id.split(";")[0]
    log = tmp_path / f"slurm-{job_id}.out"
    try:
        started = [tmp_path / f"started.0.rank{r}.json" for r in range(2)]
        wait_for("both tasks to start", lambda: all(p.is_file() for p in started), cluster=slurm, log=log)
        # What --signal=B:USR1@N does at the time limit, now: signal the batch shell only.
        slurm.run("scancel", "--signal=USR1", "--batch", job_id)
        usr1 = [tmp_path / f"usr1.0.rank{r}" for r in range(2)]
        wait_for("SIGUSR1 to reach both tasks", lambda: all(p.is_file() for p in usr1), cluster=slurm, log=log)
        assert (tmp_path / "PREEMPTED").is_file()

        # The batch script requeued the job: pending again with one restart; start it without the ~2 min hold.
        expedite_requeued(slurm, job_id, log)

        resumed = [tmp_path / f"started.1.rank{r}.json" for r in range(2)]
        wait_for("the requeued job to run again", lambda: all(p.is_file() for p in resumed), cluster=slurm,
                 log=log)  # fmt: skip
        for p in resumed:
            assert json.loads(p.read_text())["argv"] == ["--config", "configs/some.yaml", "x=1", "resume=latest"]

        last: dict[str, str] = {}

        def finished() -> bool:
            last.update(slurm.job_info(job_id))
            return last.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")

        wait_for("the restarted job to finish", finished, cluster=slurm, log=log)
        assert last["JobState"] == "COMPLETED" and last["Restarts"] == "1", last
        text = log.read_text()  # --open-mode=append: both runs in one log
        assert "SIGUSR1: forwarding" in text and "requeueing job" in text and "restart 1:" in text
        print(f"submit -> signal -> requeue -> completed: {time.monotonic() - t0:.1f} s")
    finally:
        slurm.run("scancel", job_id, check=False)


# -------------------------------------------------------------------------------------------------------
# The real entry point (launchers/train.py on configs/tiny_cpu.yaml), two srun tasks under train.sbatch
# -------------------------------------------------------------------------------------------------------
TRAIN_WAIT_S = 240  # two DeepSpeed ranks start in ~35 s on an idle 2-core machine; leave room for a busy one


def require_trainer() -> None:
    for p in ("launchers/train.py", "configs/tiny_cpu.yaml"):
        if not (REPO / p).is_file():
            pytest.skip(f"{p} not present")


@pytest.mark.slow
def test_real_trainer_two_steps_under_slurm(slurm, tmp_path):
    require_trainer()
    run_dir = tmp_path / "run"
    env = job_env(slurm, tmp_path, None)
    t0 = time.monotonic()
    res = slurm.run(
        *sbatch_args(tmp_path, "--wait"), "configs/tiny_cpu.yaml", "max_steps=2", "tracking.enabled=false",
        f"output_dir={run_dir}", env=env, timeout=TRAIN_WAIT_S, check=False,
    )  # fmt: skip
    job_id = res.stdout.strip().split(";")[0]
    log = tmp_path / f"slurm-{job_id}.out"
    text = log.read_text() if log.is_file() else ""
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{text[-4000:]}"
    assert "restart 0: 1 node(s) x 2 task(s)" in text and "world 2" in text, text[-4000:]
    assert "step 2/2" in text and "training step exited with 0" in text, text[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step2"
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "PREEMPTED").exists()
    print(f"real trainer, 2 ranks x 2 steps under sbatch --wait: {time.monotonic() - t0:.1f} s")


@pytest.mark.slow
def test_real_trainer_preempted_requeued_resumes(slurm, tmp_path):
    require_trainer()
    run_dir = tmp_path / "run"
    env = job_env(slurm, tmp_path, None)
    t0 = time.monotonic()
    job_id = slurm.run(
        *sbatch_args(tmp_path), "configs/tiny_cpu.yaml", "max_steps=100000", "tracking.enabled=false",
        "checkpoint.every_steps=0", f"output_dir={run_dir}", env=env,
    ).stdout.strip().split(";")[0]  # fmt: skip
    log = tmp_path / f"slurm-{job_id}.out"

    def log_has(s: str):
        return lambda: log.is_file() and s in log.read_text()

    try:
        # The trainer installs its SIGUSR1 handler before the loop: signal once steps are running.
        wait_for("training steps", log_has("step 2/"), timeout=TRAIN_WAIT_S, cluster=slurm, log=log)
        slurm.run("scancel", "--signal=USR1", "--batch", job_id)
        wait_for("the PREEMPTED marker", (run_dir / "PREEMPTED").is_file, cluster=slurm, log=log)
        wait_for("requeue", log_has("requeueing job"), cluster=slurm, log=log)
        tag = (run_dir / "checkpoints" / "latest").read_text().strip()
        step = int(tag.removeprefix("step"))
        assert (run_dir / "PREEMPTED").read_text().strip() == f"step {step}"

        expedite_requeued(slurm, job_id, log)
        resumed = f"resumed from {run_dir / 'checkpoints' / tag} at step {step}"
        wait_for("the resumed run", log_has(resumed), timeout=TRAIN_WAIT_S, cluster=slurm, log=log)
        text = log.read_text()
        assert "restart 1:" in text and "resume=latest" in text
        wait_for("a step after the resume point", log_has(f"step {step + 1}/"), cluster=slurm, log=log)
        print(f"real trainer: preempted at step {step}, requeued, resumed: {time.monotonic() - t0:.1f} s")
    finally:
        slurm.run("scancel", job_id, check=False)


@pytest.mark.slow
def test_job_without_gpus_warns_and_a_cuda_config_refuses(slurm, tmp_path):
    """No GPUs allocated (--gpus-per-node=0 overrides the header): one rank per task, a warning, and a config that
    expects CUDA stops at once with exit 2 and one line, instead of training on the CPU."""
    require_trainer()
    if torch_cuda_available():
        pytest.skip("this machine has a CUDA GPU")
    env = job_env(slurm, tmp_path, None)
    args = [a for a in sbatch_args(tmp_path, "--wait") if not a.startswith("--gpus-per-node")]
    res = slurm.run(
        *args[:-1], "--gpus-per-node=0", args[-1], "configs/tiny_cpu.yaml", "device=cuda", "max_steps=1",
        f"output_dir={tmp_path / 'run'}", env=env, timeout=TRAIN_WAIT_S, check=False,
    )  # fmt: skip
    job_id = res.stdout.strip().split(";")[0]
    text = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert res.returncode != 0, text[-3000:]
    assert "no GPUs allocated (SLURM_GPUS_ON_NODE unset): 2 CPU rank(s) per node" in text
    refusals = [line for line in text.splitlines() if "device: cuda, but no CUDA GPU is visible" in line]
    assert len(refusals) == 1, text[-3000:]  # rank 0's line only
    # the first rank to stop exits 2; srun (--kill-on-bad-exit) then terminates the other
    assert "Exited with exit code 2" in text and not (tmp_path / "run").exists()


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
