"""A throw-away single-node Slurm cluster for tests (munged + slurmctld + slurmd on 127.0.0.1).

Installs nothing: it needs the Debian ``slurm-wlm`` and ``munge`` packages already installed (CI runs
``.ci/install_slurm.sh``). Everything the daemons write lives in a temporary directory: the munge key and
socket, ``slurm.conf`` (``SLURM_CONF`` points at it for the client commands), state, spool, logs. Ports are
picked free, so several clusters (and a system one) can coexist on one machine. The daemons run in the
foreground as children of the test process, in their own sessions, and are stopped by their pids.

Tests use the ``slurm_cluster`` fixture (tests/conftest.py), or ``start_cluster(path)`` / ``cluster.stop()``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SBIN_FALLBACK = ("/usr/sbin", "/usr/local/sbin", "/sbin")  # daemons live in sbin, not always on a user's PATH
NODE_CPUS = 2
NODE_GPUS = 2  # stand-in GPUs (gres.conf): jobs get SLURM_GPUS_ON_NODE as on a GPU node; nothing uses them
FAKE_GPU_FILES = ("/dev/null", "/dev/zero")


def find_program(name: str) -> str | None:
    """``name`` on PATH, else in the usual sbin directories."""
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN_FALLBACK:
        cand = Path(d) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def missing_programs() -> list[str]:
    return [
        p for p in ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel") if not find_program(p)
    ]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """A running test cluster; ``env`` is os.environ plus SLURM_CONF for client commands."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        # "localhost" is accepted as SlurmctldHost on any machine and always resolves (MASTER_ADDR = node name).
        self.node = "localhost"
        self.partition = "debug"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: dict[str, subprocess.Popen] = {}

    # -- client helpers ----------------------------------------------------------------------------------
    def run(self, *args: str, timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm client command (sbatch, scontrol, ...) against this cluster."""
        prog = find_program(args[0]) or args[0]
        return subprocess.run(
            [prog, *args[1:]], env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout,
            check=check, **kw,
        )  # fmt: skip

    def job_info(self, job_id: str | int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, ...); {} once the job is purged."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if out.returncode != 0:
            return {}
        info = {}
        for tok in out.stdout.split():
            key, _, value = tok.partition("=")
            info.setdefault(key, value)
        return info

    def logs(self) -> str:
        """Tails of the daemons' logs (for assertion messages)."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            p = self.root / name
            if p.is_file():
                parts.append(f"--- {name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "w")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()

    def _wait_until(self, what: str, ok, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n{self.logs()}")
            if ok():
                return
            time.sleep(0.1)
        raise TimeoutError(f"test cluster: {what} not ready after {timeout} s\n{self.logs()}")

    def start(self, timeout: float = 20.0) -> None:
        root = self.root
        for d in ("state", "spool"):
            (root / d).mkdir(parents=True, exist_ok=True)
        key = root / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        munge_socket = root / "munge.socket"
        ctld_port, slurmd_port = _free_port(), _free_port()
        while slurmd_port == ctld_port:
            slurmd_port = _free_port()
        user = _current_user()
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=tcscaletest",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmdPort={slurmd_port}",
                    f"SlurmUser={user}",
                    f"SlurmdUser={user}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={munge_socket}",
                    f"StateSaveLocation={root / 'state'}",
                    f"SlurmdSpoolDir={root / 'spool'}",
                    f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={root / 'slurmctld.log'}",
                    f"SlurmdLogFile={root / 'slurmd.log'}",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SwitchType=switch/none",
                    "MpiDefault=none",
                    "SchedulerType=sched/backfill",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "ReturnToService=2",
                    "JobRequeue=1",
                    "MinJobAge=10",  # sbatch --wait sleeps 2 s, then x4 while < MinJobAge/2: polls at 2, 10, 18, ... s
                    "KillWait=5",
                    "InactiveLimit=0",
                    "SlurmctldTimeout=30",
                    "SlurmdTimeout=30",
                    "GresTypes=gpu",
                    f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} Gres=gpu:{NODE_GPUS} State=UNKNOWN",
                    f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        # NODE_GPUS stand-in GPUs: Slurm counts a GPU per device file (character devices that every machine has)
        (root / "gres.conf").write_text("".join(f"Name=gpu File={f}\n" for f in FAKE_GPU_FILES[:NODE_GPUS]))
        self._spawn(
            "munged",
            [
                find_program("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
                f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
                f"--seed-file={root / 'munged.seed'}",
            ],
        )  # fmt: skip
        self._wait_until("munged", munge_socket.exists, timeout)
        self._spawn("slurmctld", [find_program("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait_until("slurmctld", lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout)
        self._spawn("slurmd", [find_program("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])

        def node_up() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()
            return bool(out) and out[0].rstrip("*") in ("idle", "mix", "alloc")

        self._wait_until("slurmd (node idle)", node_up, timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """Cancel every job of this cluster, then stop slurmd, slurmctld and munged (SIGTERM, then SIGKILL)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", f"--partition={self.partition}", check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                out = self.run("squeue", "-h", "-o", "%i", check=False)
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def start_cluster(root: str | os.PathLike) -> SlurmCluster:
    """Start a cluster whose files live under ``root`` (must be private: munged checks permissions)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    cluster = SlurmCluster(root)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def running_cluster() -> Iterator[SlurmCluster]:
    """Generator behind the fixture: skip if Slurm is missing, start, yield, stop and clean up."""
    missing = missing_programs()
    if missing:
        pytest.skip(f"Slurm not installed (missing {', '.join(missing)}); run .ci/install_slurm.sh as root")
    if os.getuid() != 0:
        pytest.skip("the test cluster runs slurmd, which must run as root to launch jobs")
    root = Path(tempfile.mkdtemp(prefix="tcscale-slurm-"))
    cluster = start_cluster(root)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- jobs of the train.sbatch tests (tests/test_slurm*.py) ------------------------------------------------------------
REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launchers" / "slurm" / "train.sbatch"
WAIT_S = 60  # every wait on the cluster is bounded by this

STANDIN = textwrap.dedent(
    """
    # Stand-in for launchers/train.py: proves the env wiring and the signal path of train.sbatch.
    import json, os, signal, sys, time
    from pathlib import Path

    import torch
    import torch.distributed as dist

    out = Path(os.environ["STANDIN_OUT"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    tag = f"{restart}.rank{rank}"
    got = []
    signal.signal(signal.SIGUSR1, lambda *_: got.append(time.time()))

    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
            "SLURM_PROCID", "SLURM_JOB_ID", "OMP_NUM_THREADS")
    record = {"env": {k: os.environ.get(k) for k in keys}, "argv": sys.argv[1:], "all_reduce": t.item()}
    (out / f"started.{tag}.json").write_text(json.dumps(record))

    if os.environ.get("STANDIN_MODE") == "wait_signal" and restart == 0:
        deadline = time.time() + 90
        while not got and time.time() < deadline:
            time.sleep(0.1)
        if not got:
            sys.exit(3)
        # The trainer's protocol: all ranks agree, checkpoint, marker, exit 0.
        flag = torch.tensor([1.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        (out / f"usr1.{tag}").write_text("SIGUSR1\\n")
        if rank == 0:
            (out / "PREEMPTED").write_text("step 0\\n")
    dist.barrier()
    dist.destroy_process_group()
    (out / f"done.{tag}").write_text("ok\\n")
    """
)


def wait_for(what: str, ok, timeout: float = WAIT_S, cluster: SlurmCluster | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.2)
    detail = log.read_text(errors="replace")[-3000:] if log and log.is_file() else ""
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what}\n{detail}\n{cluster.logs() if cluster else ''}"
    )


def job_env(cluster: SlurmCluster, tmp_path: Path, entry: Path | None, **extra: str) -> dict[str, str]:
    env = dict(cluster.env)
    env.update(
        TCSCALE_ROOT=str(REPO),
        TCSCALE_PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        STANDIN_OUT=str(tmp_path),
        **extra,
    )
    if entry is not None:
        env["TCSCALE_TRAIN_ENTRY"] = str(entry)
    for k in ("MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)  # the batch script must derive these itself
    return env


def sbatch_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1",
        "--time=10",
        f"--output={tmp_path / 'slurm-%j.out'}", *extra, str(SBATCH),
    ]  # fmt: skip
