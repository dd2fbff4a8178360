"""One training run per output directory: `<output_dir>/.tcscale.lock`, held by global rank 0 for the run's life.

Why not `fcntl.flock`: the lock must also work where the output directory is on a cluster file system shared by
several hosts (NFS, Lustre), where flock is off or node-local depending on mount options, and a user who is refused
must be told by whom. So the lock is a file created with O_EXCL (atomic on every POSIX file system, NFS v3+
included) that names its holder (host, pid, the process's start time, the Slurm job id) and whose mtime the holder
refreshes every `HEARTBEAT_S` seconds from a daemon thread.

A lock that is left behind (the holder was SIGKILLed, its node died) is recognised as stale and taken over, saying
so in one line:
* same host: the holder's pid is gone, or belongs to a process started at another time (pid reuse);
* same Slurm job id: a requeued job's earlier incarnation (it can land on another node);
* another host: not refreshed for `STALE_AFTER_S` seconds.
Anything else is a live run: the second run is refused with one line naming the holder and the lock file (exit 2).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from tcscale.train.errors import RunInputError

LOCK_NAME = ".tcscale.lock"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), None when the process is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19] if len(fields) > 19 else ""


def _identity() -> dict[str, str | int | None]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _start_time(os.getpid()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def stale_reason(holder: dict, age_s: float, me: dict | None = None) -> str | None:
    """Why the lock of `holder` (refreshed `age_s` seconds ago) is stale, or None when its run may be alive."""
    me = me or _identity()
    if holder.get("partial"):
        return "the lock file is empty or partial (its writer died while creating it)" if age_s > 5 else None
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me.get("slurm_job_id"):
        return f"it was taken by an earlier attempt of this Slurm job ({holder['slurm_job_id']})"
    if holder.get("host") == me.get("host"):
        pid = int(holder.get("pid") or 0)
        started = _start_time(pid) if pid > 0 else None
        if started is None:
            return f"its process {pid} on this host is gone"
        if holder.get("pid_start") is not None and started != holder.get("pid_start"):
            return f"pid {pid} on this host is now another process"
        return None
    if age_s > STALE_AFTER_S:
        return f"not refreshed for {age_s:.0f} s (its host {holder.get('host')} is gone?)"
    return None


def _parse(text: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"partial": True}  # an empty / partial lock file: its writer died while creating it


def _describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, started {holder.get('started')}"


class RunLock:
    """The output directory's lock (rank 0 only). `acquire()` raises RunInputError naming the live holder; the
    heartbeat keeps it fresh until `release()`. Returns a line about a stale lock it took over, if any."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_NAME
        self.me = _identity()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
        return True

    def _read(self) -> tuple[dict, float] | None:
        try:
            text, mtime = self.path.read_text(), self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        return _parse(text), mtime

    def acquire(self) -> str | None:
        note = None
        for _ in range(5):  # the holder may release between our attempts; a stale lock is taken over once
            if self._create():
                self.held = True
                self._thread = threading.Thread(target=self._heartbeat, daemon=True)
                self._thread.start()
                return note
            found = self._read()
            if found is None:
                continue
            holder, mtime = found
            reason = stale_reason(holder, time.time() - mtime, self.me)
            if reason is None:
                raise RunInputError(
                    f"output_dir {self.path.parent} is in use by another training run ({_describe(holder)}; lock "
                    f"{self.path}); choose another output_dir or stop that run (if it is dead, delete the lock file)"
                )
            # take the stale lock over: rename it away (atomic: one taker wins), check we moved what we judged
            aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
            try:
                os.replace(self.path, aside)
            except FileNotFoundError:
                continue
            moved = _parse(aside.read_text())
            aside.unlink(missing_ok=True)
            if moved != holder and not self.path.exists():  # we moved a fresh lock someone just took: give it back
                with open(self.path, "x") as f:
                    json.dump(moved, f)
                continue
            note = f"output_dir lock {self.path}: took over the stale lock of {_describe(holder)}: {reason}"
        raise RunInputError(f"output_dir {self.path.parent}: could not take the lock {self.path} (contended)")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a full or unreachable disk: the run itself reports it

    def release(self) -> None:
        self._stop.set()
        if self.held:
            found = self._read()
            if found is not None and found[0].get("pid") == self.me["pid"] and found[0].get("host") == self.me["host"]:
                self.path.unlink(missing_ok=True)
            self.held = False
