"""One test at a time among those that need most of the machine's memory, across pytest sessions.

CI runs the released-shape suite (`-m realshape`, up to 15 GiB per run) beside the rest of the suite on its 2 cores
(.ci/run). The few tests of the rest that need several GiB (`@pytest.mark.heavy_memory`) and every released-shape
subprocess take this lock, so the two sessions never hold their largest processes at once on a 24 GiB machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def lock_path() -> Path:
    return Path(os.environ.get("TCSCALE_TEST_MEMORY_LOCK", Path(tempfile.gettempdir()) / "tcscale-tests-memory.lock"))


@contextlib.contextmanager
def heavy_memory() -> Iterator[None]:
    """Hold the machine-wide lock for the block (an exclusive flock: released if the holder dies)."""
    with open(lock_path(), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
