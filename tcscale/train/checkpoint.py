"""All-rank DeepSpeed checkpoints, published atomically, pruned to the newest k: the `Checkpointer`.

Layout: <output_dir>/checkpoints/step<N>/ (DeepSpeed's files, plus `<name>.pt` of each extra state such as the
EMA weights) and checkpoints/latest (the tag of the newest complete checkpoint, DeepSpeed's own convention). Every
rank writes its shards into `tmp-step<N>`; after a barrier, rank 0 writes the extra states into it, renames it to
`step<N>`, then rewrites `latest` through a temp file. An interrupted save therefore never becomes `latest`.
Assumes the checkpoint directory is on a file system shared by all nodes (the usual cluster set-up).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tcscale.train.distributed import DistEnv, barrier, broadcast_object
from tcscale.train.safe_load import safe_torch_load

TAG_RE = re.compile(r"^step(\d+)$")


class CheckpointError(RuntimeError):
    pass


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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


@dataclass
class Resumed:
    """What a loaded checkpoint hands back to the trainer."""

    path: Path
    client_state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.client_state["step"])


class Checkpointer:
    """Owns every save and load of one run: the engine's states, the trainer's client state, extra states
    (e.g. {"ema": EMAModel}) and pruning to `keep_last`. Collective: every rank calls `save` and `resume`."""

    def __init__(
        self,
        ckpt_dir: Path,
        engine,
        env: DistEnv,
        *,
        keep_last: int,
        extras: dict[str, Stateful] | None = None,
        allow_unsafe_load: bool = False,
    ):
        self.dir = Path(ckpt_dir)
        self.engine = engine
        self.env = env
        self.keep_last = keep_last
        self.extras = dict(extras or {})
        self.allow_unsafe_load = allow_unsafe_load

    def remove_stale_temp(self) -> list[str]:
        """Collective, at start-up: rank 0 removes `tmp-step*` directories that an interrupted save left (after a
        barrier, so no rank of this job is saving; a complete save is never called tmp-). Returns their names."""
        barrier()
        removed = []
        if self.env.is_rank0 and self.dir.is_dir():
            for p in sorted(self.dir.glob("tmp-step*")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        barrier()
        return removed

    def save(self, step: int, client_state: dict[str, Any]) -> Path:
        tag = tag_for(step)
        tmp_tag = f"tmp-{tag}"
        rank0 = self.env.is_rank0
        if rank0:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.dir / tmp_tag, ignore_errors=True)
        barrier()
        self.engine.save_checkpoint(str(self.dir), tag=tmp_tag, client_state=client_state, save_latest=False)
        if rank0:
            import torch

            for name, obj in self.extras.items():
                torch.save(obj.state_dict(), self.dir / tmp_tag / f"{name}.pt")
        barrier()
        if rank0:
            final = self.dir / tag
            if final.exists():
                shutil.rmtree(final)
            os.replace(self.dir / tmp_tag, final)
            tmp_latest = self.dir / "latest.tmp"
            tmp_latest.write_text(tag)
            os.replace(tmp_latest, self.dir / "latest")
            for _, old in list_checkpoints(self.dir)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return self.dir / tag

    def resume(self, resume: str | None) -> Resumed | None:
        """Load the checkpoint `resume` names ("latest", a tag directory, or None: start fresh): weights, optimizer
        and scheduler states, the extra states; returns the client state (rank 0's, on every rank)."""
        found = resolve_resume(resume, self.dir)
        if found is None:
            return None
        load_dir, tag = found
        import torch

        with safe_torch_load(self.allow_unsafe_load):  # DeepSpeed's own loads too: weights-only unless opted in
            path, client_state = self.engine.load_checkpoint(
                str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
            for name, obj in self.extras.items():
                file = load_dir / tag / f"{name}.pt"
                if file.is_file():
                    obj.load_state_dict(torch.load(file, map_location="cpu"))
        return Resumed(load_dir / tag, broadcast_object(client_state))
