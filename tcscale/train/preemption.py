"""SIGUSR1 (SLURM's `--signal=B:USR1@N`, forwarded by the batch script) -> checkpoint, marker, clean exit."""

from __future__ import annotations

import signal


class PreemptionFlag:
    def __init__(self) -> None:
        self.requested = False

    def install(self) -> PreemptionFlag:
        signal.signal(signal.SIGUSR1, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.requested = True
