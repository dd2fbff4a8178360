"""A rank's DeepSpeed shared-memory all-reduce buffer is gone when its process ends (DeepSpeed never unlinks it:
67 MB of RAM per rank per process, which filled a CI machine's memory across a suite)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers.paths import REPO

pytestmark = pytest.mark.distributed

CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from tcscale.train.distributed import init_distributed, shm_buffer_path
    init_distributed(device="cpu")
    path = shm_buffer_path()
    print("BUFFER", path, Path(path).exists(), flush=True)
    mode = sys.argv[1]
    if mode == "raise":
        raise RuntimeError("a failing run")
    if mode == "signal":  # the trainer's SIGTERM handler: checkpoint, then sys.exit(75)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
        print("WAITING", flush=True)
        time.sleep(60)
    """
)


def _env(port: int) -> dict[str, str]:
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_SIZE="1",  # the deepspeed launcher sets it; DeepSpeed makes the buffer only when every rank is local
    )
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _buffer_line(stdout: str) -> tuple[str, bool]:
    line = next(line for line in stdout.splitlines() if line.startswith("BUFFER"))
    _, path, exists = line.split()
    return path, exists == "True"


@pytest.mark.parametrize(("mode", "code"), [("exit", 0), ("raise", 1)])
def test_buffer_removed_when_the_rank_ends(mode, code):
    from tcscale.train.distributed import _free_port

    port = _free_port()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode], env=_env(port), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == code, proc.stderr[-2000:]
    path, existed = _buffer_line(proc.stdout)
    assert path == f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0"
    assert existed, "DeepSpeed's CPU all-reduce made no buffer: the name tcscale computes no longer matches"
    assert not Path(path).exists()


def test_buffer_removed_after_sigterm():
    from tcscale.train.distributed import _free_port

    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, "signal"], env=_env(_free_port()), stdout=subprocess.PIPE, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("WAITING"):
            break
    path, existed = _buffer_line("".join(lines))
    assert existed and Path(path).exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    assert not Path(path).exists()
