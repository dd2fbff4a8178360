"""DeepSpeed's CPU all-reduce buffers in /dev/shm: the ones no live process maps (left by a killed rank)."""

from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")


def deepspeed_buffers() -> list[Path]:
    """This user's DeepSpeed all-reduce buffers (tcscale.train.distributed.shm_buffer_path names them)."""
    return sorted(SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")) if SHM_DIR.is_dir() else []


def mapped_paths() -> set[str]:
    """Every file some process on this machine has mapped (read from /proc/<pid>/maps; unreadable ones skipped)."""
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6:  # address, perms, offset, dev, inode, path (anonymous maps have no path)
                mapped.add(fields[5].strip())
    return mapped


def remove_orphan_buffers(since: float) -> list[Path]:
    """Unlink the buffers made at or after `since` (a time.time()) that no live process maps; returns them."""
    live = mapped_paths()
    removed = []
    for path in deepspeed_buffers():
        try:
            if path.stat().st_mtime >= since and str(path) not in live:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue
    return removed
