"""A real `mlflow server` on loopback (the cluster set-up), started through launchers/mlflow_server.sh in its own
session and process group so that it and its worker children stop together; it can be stopped and started again on
the same port and database. `processes()` lists what still runs in its session (empty once stopped)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.helpers.launch import REPO, free_port

SCRIPT = REPO / "launchers" / "mlflow_server.sh"


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose session id is `sid` (zombies excluded)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
            if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
                cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append((int(stat.parent.name), cmd.strip()))
        except (OSError, IndexError, ValueError):
            continue
    return found


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.sid: int | None = None  # the server's session (= its pid): every process it starts lives in it

    def start(self, timeout: float = 120) -> MlflowServer:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", TCSCALE_PYTHON=sys.executable)
        self.proc = subprocess.Popen(
            ["bash", str(SCRIPT), "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "server-artifacts")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.sid = self.proc.pid
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError("mlflow server did not come up")
            time.sleep(0.5)

    def processes(self) -> list[tuple[int, str]]:
        return session_processes(self.sid) if self.sid is not None else []

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        deadline = time.time() + 20  # the workers exit shortly after the master
        while self.processes() and time.time() < deadline:
            time.sleep(0.2)
        if self.processes():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None
