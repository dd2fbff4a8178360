"""All-rank DeepSpeed checkpoints, published atomically, pruned to the newest k: the `Checkpointer`.

Layout: <output_dir>/checkpoints/step<N>/ (DeepSpeed's files, plus `<name>.pt` of each extra state, or one file per
rank of an extra that every rank holds a share of, such as the EMA weights: `tcscale.train.ema`) and
checkpoints/latest (the tag of the newest complete checkpoint, DeepSpeed's own convention). Every
rank writes its shards into `tmp-step<N>`; after a barrier, rank 0 writes the extra states into it, renames it to
`step<N>`, then rewrites `latest` through a temp file. An interrupted save therefore never becomes `latest`.
Assumes the checkpoint directory is on a file system shared by all nodes (the usual cluster set-up).

Complete means loadable: rank 0 writes `manifest.json` (every file of the tag and its size) as the last file of a
save, before the rename. Before any engine is built, `plan_resume` checks the tag it would load: every file of the
manifest is there with its size, and every `.pt` file (torch's zip format) has its zip directory (a truncated file
has none) and every record matches the CRC-32 the writer stored for it (torch.load does not check these: a damaged
byte in a tensor would load as a wrong weight). This reads the checkpoint once on rank 0 (about a second per GB).
`resume=latest` whose newest checkpoint fails the check moves it aside to
`corrupt-step<N>` and resumes from the newest complete one, saying so in one line; an explicit `resume=<dir>` that
fails it, or no complete checkpoint at all, is a `CheckpointError` naming the file (exit 2). A file that passes the
check but still cannot be read fails its load with a `CheckpointReadError` naming it (exit 2).

A save that fails (disk full, I/O error, quota) removes its `tmp-step<N>` and raises `CheckpointSaveError` naming the
directory, the cause and the intact previous checkpoint (exit 2).

Elastic resume: ZeRO shards the optimizer state (and under ZeRO-3 the weights) over the data-parallel ranks that
saved it, and DeepSpeed refuses to load such a checkpoint on another number of ranks. `plan_resume` reads how many
ranks wrote a checkpoint (its `*zero_pp_rank_*_optim_states.pt` files) before any engine exists; when that differs
from the current world, rank 0 converts the tag once into DeepSpeed's universal layout (`ds_to_universal`: one
folder per parameter with its fp32 master weights, Adam's exp_avg / exp_avg_sq and step, world-size free) at
`step<N>/universal/` (temp name, then rename; pruned with its tag), the engine is built with
`checkpoint.load_universal` and every rank loads its new partition from it. The same-world path is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tcscale.train.distributed import DistEnv, barrier, broadcast_object
from tcscale.train.safe_load import safe_torch_load

TAG_RE = re.compile(r"^step(\d+)$")
UNIVERSAL = "universal"  # sub-directory of a tag: the same checkpoint in DeepSpeed's universal (world-size free) layout
# ds_to_universal's worker processes (extracting shards, merging slices): 1 runs in-process
UNIVERSAL_WORKERS = max(1, min(8, (os.cpu_count() or 1) // 2))


MANIFEST = "manifest.json"  # {"files": {relative path: size in bytes}}: the last file a save writes
CORRUPT_PREFIX = "corrupt-"  # a checkpoint that failed the completeness check, moved aside (not counted, not pruned)


class CheckpointError(RuntimeError):
    pass


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, I/O error); the previous one is intact."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ShardedState(Protocol):
    """An extra state every rank holds a share of (e.g. `tcscale.train.ema.ShardedEMA`): each rank writes its own
    file(s) into the tag directory and reads back what it needs from all of them."""

    def save(self, tag_dir: Path) -> Path: ...

    def load_from(self, tag_dir: Path) -> bool: ...


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


def saved_world_size(tag_dir: Path) -> int | None:
    """How many data-parallel ranks wrote a checkpoint: its ZeRO optimizer shard files (one per rank, ZeRO 1-3,
    bf16 or not); None when it has none (ZeRO stage 0: the optimizer state is whole and loads on any world)."""
    return len(list(Path(tag_dir).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))) or None


@dataclass(frozen=True)
class ResumePlan:
    """Which checkpoint a run resumes from and how: decided before the engine is built (the universal load is an
    engine config option)."""

    load_dir: Path  # the directory holding the tag (DeepSpeed's load_dir)
    tag: str
    saved_world_size: int | None  # ranks that wrote it (None: not sharded)
    world_size: int  # ranks that load it
    note: str | None = None  # a line for the log: a fall-back to an older checkpoint, or nothing to resume from

    @property
    def fresh(self) -> bool:
        """resume=latest found no checkpoint: the run starts from step 1 (the plan only carries its note)."""
        return not self.tag

    @property
    def path(self) -> Path:
        return self.load_dir / self.tag

    @property
    def elastic(self) -> bool:
        """The ZeRO shards were written by another number of ranks: load through the universal layout."""
        return self.saved_world_size is not None and self.saved_world_size != self.world_size


def write_manifest(tag_dir: Path) -> None:
    """`tag_dir/manifest.json`: every file under the tag (the universal conversion excepted) and its size."""
    tag_dir = Path(tag_dir)
    files = {
        str(p.relative_to(tag_dir)): p.stat().st_size
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST and UNIVERSAL not in p.relative_to(tag_dir).parts[:1]
    }
    tmp = tag_dir / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=0))
    os.replace(tmp, tag_dir / MANIFEST)


def check_complete(tag_dir: Path) -> str | None:
    """None when the checkpoint is complete (see the module docstring), else what is wrong, naming the file. A
    checkpoint from before manifests existed is checked by its `.pt` files' zip directories only."""
    tag_dir = Path(tag_dir)
    manifest = tag_dir / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"{manifest} is unreadable"
        for rel, size in files.items():
            path = tag_dir / rel
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != size:
                return f"{path} is {path.stat().st_size} bytes, the save wrote {size}"
        pt_files = [tag_dir / rel for rel in files if rel.endswith(".pt")]
    else:
        pt_files = sorted(p for p in tag_dir.glob("*.pt"))
        if not pt_files:
            return f"{tag_dir} holds no checkpoint file"
    for path in pt_files:
        if not zipfile.is_zipfile(path):
            return f"{path} is truncated or not a torch checkpoint (no zip directory)"
        try:  # every record against the CRC-32 torch's writer stored for it (torch.load itself does not check)
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
            return f"{path} is corrupt ({type(exc).__name__}: {exc})"
        if bad is not None:
            return f"{path} is corrupt (record {bad} fails its CRC-32 check)"
    return None


def plan_resume(resume: str | None, ckpt_dir: Path, world_size: int) -> ResumePlan | None:
    """`resume` config value -> the plan (None: start fresh), after the completeness check: `resume=latest` falls
    back to the newest complete checkpoint (moving broken newer ones aside and saying so in `ResumePlan.note`), an
    explicit directory that fails the check raises CheckpointError. Reads and renames files only: call it on one
    rank and broadcast."""
    found = resolve_resume(resume, ckpt_dir)
    if found is None:
        if resume == "latest":
            return ResumePlan(ckpt_dir, "", None, world_size, note=f"resume=latest: no checkpoint in {ckpt_dir}; "
                              "starting from step 1")  # fmt: skip
        return None
    load_dir, tag = found
    problem = check_complete(load_dir / tag)
    note = None
    if problem is not None:
        if resume != "latest":
            raise CheckpointError(f"resume={resume}: checkpoint not loadable: {problem}")
        newest = int(TAG_RE.match(tag).group(1)) if TAG_RE.match(tag) else None
        broken, problems, chosen = [], [f"{tag}: {problem}"], None
        for step, path in reversed(list_checkpoints(ckpt_dir)):
            if newest is not None and step > newest:
                continue
            bad = problem if path.name == tag else check_complete(path)
            if bad is None:
                chosen = path.name
                break
            broken.append(path)
            if path.name != tag:
                problems.append(f"{path.name}: {bad}")
        if chosen is None:
            raise CheckpointError(f"resume=latest: no loadable checkpoint in {ckpt_dir} ({'; '.join(problems)})")
        for path in broken:
            os.replace(path, path.with_name(CORRUPT_PREFIX + path.name))
        tmp_latest = ckpt_dir / "latest.tmp"
        tmp_latest.write_text(chosen)
        os.replace(tmp_latest, ckpt_dir / "latest")
        moved = ", ".join(CORRUPT_PREFIX + p.name for p in broken)
        note = (f"resume=latest: checkpoint {problem}: resuming from {chosen}, the newest complete checkpoint "
                f"(the broken one is kept as {ckpt_dir}/{moved})")  # fmt: skip
        tag = chosen
    return ResumePlan(load_dir, tag, saved_world_size(load_dir / tag), world_size, note=note)


def universal_engine_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config section with `checkpoint.load_universal` on (a copy)."""
    out = dict(ds_config)
    out["checkpoint"] = {**dict(ds_config.get("checkpoint") or {}), "load_universal": True}
    return out


def convert_to_universal(tag_dir: Path, *, allow_unsafe_load: bool = False, workers: int = UNIVERSAL_WORKERS) -> Path:
    """`tag_dir/universal/`: the checkpoint in DeepSpeed's universal layout, converted once (reused when present).
    Written under a temp name and renamed, so an interrupted conversion is redone, never half-used. Every file is
    read weights-only unless `allow_unsafe_load` (DeepSpeed's converter pickles nothing else)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    tag_dir = Path(tag_dir)
    out = tag_dir / UNIVERSAL
    if (out / "zero").is_dir():
        return out
    tmp = tag_dir / f"{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=workers, num_merge_workers=workers,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )  # fmt: skip
    log = io.StringIO()
    try:
        with safe_torch_load(allow_unsafe_load), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{tag_dir}: conversion to DeepSpeed's universal checkpoint failed ({type(exc).__name__}: {exc}); "
            f"converter output: {log.getvalue()[-1500:]}"
        ) from exc
    (tag_dir / "latest_universal").unlink(missing_ok=True)  # the converter points its parent folder at the output
    os.replace(tmp, out)
    return out


def save_failure_cause(exc: BaseException, folder: Path) -> str:
    """What made a save fail, in words: a full disk (ENOSPC / EDQUOT anywhere in the exception chain, or torch's
    zip writer's "unexpected pos" / "file write failed" with the file system's free space), else the exception."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    codes = {getattr(e, "errno", None) for e in chain}
    text = " ".join(str(e) for e in chain)
    free = None
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage(folder)
        free = f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB on that file system"
    if errno.ENOSPC in codes or "No space left" in text:
        return f"no space left on device ({free or 'free space unknown'})"
    if errno.EDQUOT in codes or "quota" in text.lower():
        return f"disk quota exceeded ({free or 'free space unknown'})"
    if "unexpected pos" in text or "file write failed" in text:  # torch's zip writer hides the errno
        return f"the file system refused the write, most likely full ({free or 'free space unknown'})"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}"


@dataclass(frozen=True)
class DataAnchor:
    """Where this world's sequence of global sample slots starts: micro-step `step` of rank 0 begins at slot `slot`
    (`tcscale.data.loader.first_slot`: ranks interleave micro-batches from there). (0, 0) for a fresh run; every resume
    re-anchors at its micro-step, at the slot after the last one the saving world consumed, so a world of another
    size (or micro-batch) continues the same sequence. With an unchanged layout the slots are the same as before."""

    step: int = 0
    slot: int = 0

    @property
    def position(self) -> tuple[int, int]:
        return self.step, self.slot

    def consumed(self, micro_step: int, world_size: int, micro_batch: int) -> int:
        """The first slot not yet consumed after `micro_step` micro-steps of every rank."""
        return self.slot + (micro_step - self.step) * world_size * micro_batch

    def state(self, world_size: int, micro_batch: int) -> dict[str, int]:
        """For the checkpoint's client state (with the layout that consumes the slots)."""
        return {"step": self.step, "slot": self.slot, "world_size": world_size, "micro_batch_size": micro_batch}

    @classmethod
    def resumed(cls, client_state: dict[str, Any], micro_step: int) -> DataAnchor:
        """The anchor of a run resuming at `micro_step` (its own count) from a checkpoint's client state (a
        checkpoint from before anchors existed: anchor (0, 0) with the world size and micro-batch it recorded)."""
        saved = client_state.get("data_anchor") or {}
        old = cls(int(saved.get("step", 0)), int(saved.get("slot", 0)))
        world = int(saved.get("world_size") or client_state.get("world_size") or 1)
        batch = saved.get("micro_batch_size")
        if batch is None:
            batch = ((client_state.get("config") or {}).get("deepspeed") or {}).get("train_micro_batch_size_per_gpu", 1)
        return cls(micro_step, old.consumed(int(client_state.get("micro_step", 0)), world, int(batch)))


@dataclass
class Resumed:
    """What a loaded checkpoint hands back to the trainer."""

    path: Path
    client_state: dict[str, Any]
    plan: ResumePlan | None = None
    seconds: float = 0.0  # wall time of the load (with the universal conversion, if any)

    @property
    def step(self) -> int:
        return int(self.client_state["step"])


class Checkpointer:
    """Owns every save and load of one run: the engine's states, the trainer's client state, extra states
    (rank 0's `Stateful` ones, or every rank's share of a `ShardedState` such as {"ema": ShardedEMA}) and pruning
    to `keep_last`. Collective: every rank calls `save` and `resume`."""

    def __init__(
        self,
        ckpt_dir: Path,
        engine,
        env: DistEnv,
        *,
        keep_last: int,
        extras: dict[str, Stateful | ShardedState] | None = None,
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
        try:
            self.engine.save_checkpoint(str(self.dir), tag=tmp_tag, client_state=client_state, save_latest=False)
            import torch

            for name, obj in self.extras.items():
                if hasattr(obj, "load_from"):  # every rank writes its share
                    obj.save(self.dir / tmp_tag)
                elif rank0:
                    torch.save(obj.state_dict(), self.dir / tmp_tag / f"{name}.pt")
        except (OSError, RuntimeError) as exc:
            from tcscale.train.errors import is_peer_failure

            if is_peer_failure(exc):  # another rank went away during DeepSpeed's collectives: not this save's fault
                raise
            raise self._save_failed(tag, exc) from exc
        barrier()
        if rank0:
            try:
                write_manifest(self.dir / tmp_tag)
                final = self.dir / tag
                if final.exists():
                    shutil.rmtree(final)
                os.replace(self.dir / tmp_tag, final)
                tmp_latest = self.dir / "latest.tmp"
                tmp_latest.write_text(tag)
                os.replace(tmp_latest, self.dir / "latest")
            except OSError as exc:
                (self.dir / "latest.tmp").unlink(missing_ok=True)
                raise self._save_failed(tag, exc) from exc
            for _, old in list_checkpoints(self.dir)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return self.dir / tag

    def _save_failed(self, tag: str, exc: BaseException) -> CheckpointSaveError:
        """The one-line error of a failed save, after removing its temp directory (this rank's part of it; the
        next start removes what is left). Names the directory, the cause (a full disk as such) and the intact
        previous checkpoint."""
        tmp = self.dir / f"tmp-{tag}"
        cause = save_failure_cause(exc, self.dir)  # the free space as the save left it
        shutil.rmtree(tmp, ignore_errors=True)
        previous = None
        with contextlib.suppress(CheckpointError, OSError):
            previous = latest_tag(self.dir)
        kept = f"the previous checkpoint {self.dir / previous} is intact" if previous else "no earlier checkpoint"
        return CheckpointSaveError(
            f"checkpoint {tag}: writing {tmp} failed: {cause}; {kept}; the temp directory was removed. Free space "
            "(or choose an output_dir on a larger disk) and rerun with resume=latest"
        )

    def resume(self, resume: str | ResumePlan | None) -> Resumed | None:
        """Load the checkpoint `resume` names ("latest", a tag directory, a `ResumePlan`, or None: start fresh):
        weights, optimizer and scheduler states, the extra states; returns the client state (rank 0's, on every
        rank). An elastic plan (saved on another number of ranks) needs an engine built with
        `universal_engine_config`: rank 0 converts the tag once, then every rank loads its partition from it."""
        plan = resume if isinstance(resume, ResumePlan) else None
        if plan is not None and plan.fresh:
            return None
        if plan is None:
            found = resolve_resume(resume, self.dir)
            if found is None:
                return None
            plan = ResumePlan(*found, None, self.env.world_size)  # same-world load (the caller says so)
        import torch

        t0 = time.perf_counter()
        load_dir, tag = plan.load_dir, plan.tag
        if plan.elastic:
            if not getattr(self.engine, "load_universal_checkpoint", lambda: False)():
                raise CheckpointError(
                    f"{plan.path} was saved on {plan.saved_world_size} ranks and is loaded on {plan.world_size}: "
                    "build the engine with universal_engine_config(...)"
                )
            error = None
            if self.env.is_rank0:
                try:
                    convert_to_universal(plan.path, allow_unsafe_load=self.allow_unsafe_load)
                except CheckpointError as exc:
                    error = exc
            error = broadcast_object(error)
            if error is not None:
                error.agreed = True
                raise error
            load_dir, tag = plan.path, UNIVERSAL
        with safe_torch_load(self.allow_unsafe_load):  # DeepSpeed's own loads too: weights-only unless opted in
            path, client_state = self.engine.load_checkpoint(
                str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
            for name, obj in self.extras.items():
                if hasattr(obj, "load_from"):
                    obj.load_from(plan.path)
                    continue
                file = plan.path / f"{name}.pt"
                if file.is_file():
                    obj.load_state_dict(torch.load(file, map_location="cpu"))
        return Resumed(plan.path, broadcast_object(client_state), plan, time.perf_counter() - t0)
