"""All-rank DeepSpeed checkpoints, published atomically, pruned to the newest k.

Layout: <output_dir>/checkpoints/step<N>/ (DeepSpeed's files) and checkpoints/latest (the tag of
the newest complete checkpoint, DeepSpeed's own convention). Every rank writes its shards into
`tmp-step<N>`; after a barrier, rank 0 renames it to `step<N>`, then rewrites `latest` through a
temp file. An interrupted save therefore never becomes `latest`. Assumes the checkpoint directory
is on a file system shared by all nodes (the usual cluster set-up).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from tcscale.train.distributed import barrier, broadcast_object

TAG_RE = re.compile(r"^step(\d+)$")


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step{step}"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))]
    return sorted(found)


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"{latest} names {tag!r}, but {ckpt_dir / tag} does not exist")
    return tag


def resolve_resume(resume: str | None, ckpt_dir: Path) -> tuple[Path, str] | None:
    """`resume` config value -> (checkpoint dir, tag), or None to start fresh."""
    if resume is None:
        return None
    if resume == "latest":
        tag = latest_tag(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume={resume!r}: checkpoint directory not found")
    return path.parent, path.name


def save_checkpoint(
    engine,
    ckpt_dir: Path,
    step: int,
    client_state: dict[str, Any],
    keep_last: int,
    is_rank0: bool,
    extra: dict[str, Any] | None = None,
):
    """Collective: every rank must call it. `extra` {file name: object} is torch-saved by rank 0 into the
    checkpoint before it is published (e.g. the EMA weights)."""
    tag = tag_for(step)
    tmp_tag = f"tmp-{tag}"
    if is_rank0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    if is_rank0:
        import torch

        for name, obj in (extra or {}).items():
            torch.save(obj, ckpt_dir / tmp_tag / name)
    barrier()
    if is_rank0:
        final = ckpt_dir / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(ckpt_dir / tmp_tag, final)
        tmp_latest = ckpt_dir / "latest.tmp"
        tmp_latest.write_text(tag)
        os.replace(tmp_latest, ckpt_dir / "latest")
        for _, old in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return ckpt_dir / tag


def load_checkpoint(engine, load_dir: Path, tag: str) -> dict[str, Any]:
    """Collective: load weights + optimizer + scheduler states; returns the client state."""
    path, client_state = engine.load_checkpoint(
        str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
    return broadcast_object(client_state)
