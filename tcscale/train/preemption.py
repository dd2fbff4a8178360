"""Preemption: SIGUSR1 (SLURM's `--signal=B:USR1@N`, forwarded by the batch script), SIGTERM (what `scancel`, a
job's time limit and most schedulers send first), or the launcher going away, asks every rank to agree to stop,
checkpoint, write <output_dir>/PREEMPTED and exit with code 75 (requeue). With `checkpoint.on_sigterm: false` a
SIGTERM stops at the end of the step without a checkpoint (exit 143: for a scheduler whose kill follows too soon
for a save). Either way the MLflow run is marked KILLED with the reason. Further SIGTERMs are ignored: they ask the
same stop (a `scancel` reaches the ranks directly and again through the launcher); the scheduler's SIGKILL ends
what does not stop in time.

Why watch the launcher: `deepspeed` (its runner and launch processes) and torchrun do not forward SIGUSR1 — a
USR1 sent to the launcher's pid kills it and leaves the ranks training on, unowned. Each rank therefore watches
the launcher processes it was started under; when one of them is gone, it treats that as a preemption request.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path


def _proc_identity(pid: int) -> tuple[str, str] | None:
    """(command line, start time) of a live process, from /proc; None if it is gone (or a zombie: a launcher
    killed by a signal stays in /proc until its parent reaps it)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # fields[0] is field 3 of stat (the state)
    if not fields or fields[0] in ("Z", "X"):
        return None
    return cmdline.strip(), fields[19] if len(fields) > 19 else ""  # field 22 of stat: start time


def is_launcher(cmdline: str) -> bool:
    """The `deepspeed` runner or launch module, torchrun / torch.distributed.run, or srun."""
    words = cmdline.split()
    names = [w.rsplit("/", 1)[-1] for w in words[:3]]
    return (
        any(n in ("deepspeed", "torchrun", "srun") for n in names)
        or "deepspeed.launcher.launch" in words
        or "torch.distributed.run" in words
    )


def launcher_ancestors(max_depth: int = 4) -> list[tuple[int, str, str]]:
    """(pid, command line, start time) of the ancestors of this process that are a distributed launcher."""
    found = []
    pid = os.getpid()
    for _ in range(max_depth):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[-1].split()[1])  # the parent's pid
        if pid <= 1:
            break
        ident = _proc_identity(pid)
        if ident is None:
            break
        if is_launcher(ident[0]):
            found.append((pid, *ident))
    return found


def _rank0() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


class PreemptionFlag:
    def __init__(self) -> None:
        self.requested = False
        self.reason: str | None = None
        self.sigterm = False  # a SIGTERM asked to stop (checkpoint.on_sigterm decides whether to save first)
        self._stop = threading.Event()
        self._previous: dict[int, object] = {}

    def install(self, watch_launcher: bool = True, interval_s: float = 1.0) -> PreemptionFlag:
        self._previous = {
            signal.SIGUSR1: signal.signal(signal.SIGUSR1, self._handler),
            signal.SIGTERM: signal.signal(signal.SIGTERM, self._term_handler),
        }
        if watch_launcher and Path("/proc/self/stat").exists():
            watched = launcher_ancestors()
            if watched:
                threading.Thread(target=self._watch, args=(watched, interval_s), daemon=True).start()
        return self

    def _handler(self, signum, frame) -> None:
        self.requested = True
        self.reason = "SIGUSR1"

    def _term_handler(self, signum, frame) -> None:
        if self.sigterm:
            return  # the same stop asked again (scancel signals the launcher too, which passes it on)
        self.requested = self.sigterm = True
        self.reason = "SIGTERM"
        if _rank0():
            print("tcscale: SIGTERM received: stopping at the end of this step", flush=True)

    def _watch(self, watched: list[tuple[int, str, str]], interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            for pid, cmdline, started in watched:
                ident = _proc_identity(pid)
                if ident is None or ident[1] != started:
                    self.requested = True
                    self.reason = f"launcher process {pid} ({cmdline[:80]}) is gone"
                    print(f"tcscale: {self.reason}: checkpointing and stopping at the end of this step", flush=True)
                    return

    def stop_watching(self) -> None:
        """Stop the launcher watch and give the signals back their previous handlers (the run is over)."""
        self._stop.set()
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}
