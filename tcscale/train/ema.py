"""An fp32 exponential moving average of the trained weights, kept as each rank's share of DeepSpeed's fp32 master
weights: `ShardedEMA`.

Why not an EMA of the module's parameters: under bf16 (or fp16) the module holds bf16 copies, and at decay 0.9999 an
update of (1 - decay) x the change is below bf16's resolution, so a bf16 average never moves. DeepSpeed's optimizer
keeps the fp32 master weights it updates; under ZeRO 1-3 they are partitioned over the data-parallel ranks. Each
rank averages the fp32 elements it owns, in place, after every optimizer step:

    shadow <- d * shadow + (1 - d) * master,   d = decay  (ema.warmup: d = min(decay, (1 + n) / (10 + n)) at update n)

starting from the master weights the engine starts from (under bf16: the initial weights rounded to bf16). No
collective per step, and 4 bytes x trained parameters / world per rank (ZeRO 1-3; stage 0 keeps the whole on every
rank). Gathering each step instead would cost a full all-gather per step and the whole average on every rank.

Where a rank's share sits: ZeRO-3 partitions every parameter (rank r holds elements [r x p, (r + 1) x p) of the
flattened parameter, p = its partition size); ZeRO 1/2 (and DeepSpeed's bf16 optimizer at stage 0) partition the
concatenation of all parameters, so a parameter may be split between ranks or absent from one (DeepSpeed's
`_hp_mapping` fragment says which elements). fp32 at stage 0: the parameter is its own master copy.

Checkpoint: every rank writes `ema-rank<r>.pt`: per parameter name, the offset into the flattened parameter and the
values it owns. Reading every rank's file gives the whole average (`load_ema_state_dict`, used by export) and a run
on any number of ranks takes its own shares back from them (`ShardedEMA.load_files`), so elastic resume keeps it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

FILE_PREFIX = "ema-rank"


def ema_files(tag_dir: Path) -> list[Path]:
    """The EMA shares a checkpoint holds, one file per saving rank."""
    return sorted(Path(tag_dir).glob(f"{FILE_PREFIX}*.pt"))


@dataclass
class _Share:
    name: str
    param: torch.nn.Parameter
    shape: tuple[int, ...]
    offset: int  # first element of the flattened parameter this rank owns
    shadow: torch.Tensor  # fp32, the owned elements (possibly empty)
    backup: torch.Tensor | None = None  # stage-0 fp32 only: the trained weights while the EMA is swapped in


class ShardedEMA:
    """fp32 EMA of the engine's trained parameters, each rank its share of the master weights (module docstring).
    Build it after `deepspeed.initialize`; `step()` after every optimizer step (every rank)."""

    def __init__(self, engine, decay: float, warmup: bool = False):
        self.engine = engine
        self.decay = float(decay)
        self.warmup = warmup
        self.updates = 0
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        stage = int(engine.zero_optimization_stage())
        # ZeRO 1/2 and DeepSpeed's bf16 optimizer link each parameter to its fp32 fragment (_hp_mapping)
        self._fragmented = stage in (1, 2) or (stage == 0 and (engine.bfloat16_enabled() or engine.fp16_enabled()))
        self.shares: list[_Share] = []
        for name, p in engine.module.named_parameters():
            if not p.requires_grad:
                continue
            shape = tuple(getattr(p, "ds_shape", p.shape))
            master, offset = self._master(p)
            self.shares.append(_Share(name, p, shape, offset, master.detach().float().clone()))

    # -- where this rank's fp32 master elements are ------------------------------------------------------------
    def _master(self, p: torch.nn.Parameter) -> tuple[torch.Tensor, int]:
        """(this rank's fp32 master elements of p, flat, as a view; their offset in the flattened parameter)."""
        if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition, in rank order (DeepSpeed pads the last one)
            from deepspeed.utils import safe_get_local_fp32_param

            local = safe_get_local_fp32_param(p).view(-1)
            offset = p.ds_tensor.ds_numel * self.rank
            return local[: max(0, min(local.numel(), p.ds_numel - offset))], offset
        if self._fragmented:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:  # no element of p lives on this rank
                return torch.empty(0, dtype=torch.float32, device=p.device), 0
            return mapping.get_hp_fragment().view(-1), int(mapping.lp_fragment_address.start)
        return p.data.view(-1), 0  # fp32 without partitioning: the parameter is the master copy

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def step(self) -> None:
        """Fold the current master weights into the average (after the optimizer step)."""
        d = self.current_decay()
        for share in self.shares:
            master, _ = self._master(share.param)
            share.shadow.lerp_(master.to(share.shadow.device, torch.float32), 1.0 - d)
        self.updates += 1

    def numel(self) -> int:
        """Elements this rank keeps (4 bytes each)."""
        return sum(s.shadow.numel() for s in self.shares)

    # -- checkpoint -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "updates": self.updates,
            "shares": {
                s.name: {"shape": list(s.shape), "offset": s.offset, "values": s.shadow.detach().cpu()}
                for s in self.shares
            },
        }

    def save(self, tag_dir: Path) -> Path:
        """This rank's file in a checkpoint being written (every rank calls it)."""
        path = Path(tag_dir) / f"{FILE_PREFIX}{self.rank:05d}.pt"
        torch.save(self.state_dict(), path)
        return path

    def load_from(self, tag_dir: Path) -> bool:
        """Resume: this rank's shares from a checkpoint's EMA files (False when it has none: the average then
        restarts from the loaded weights)."""
        files = ema_files(tag_dir)
        if files:
            self.load_files(files)
        return bool(files)

    @torch.no_grad()
    def load_files(self, files: Iterable[Path]) -> None:
        """Take this rank's shares back from the files of every saving rank (any number of them), one file in memory
        at a time; read with `torch.load(weights_only=True)` by the caller's `safe_torch_load`."""
        by_name = {s.name: s for s in self.shares}
        covered = dict.fromkeys(by_name, 0)
        for file in files:
            state = torch.load(file, map_location="cpu")
            self.updates = int(state["updates"])
            for name, saved in state["shares"].items():
                share = by_name.get(name)
                if share is None:
                    continue
                lo = max(share.offset, int(saved["offset"]))
                hi = min(share.offset + share.shadow.numel(), int(saved["offset"]) + saved["values"].numel())
                if hi > lo:
                    src = saved["values"][lo - int(saved["offset"]) : hi - int(saved["offset"])]
                    share.shadow[lo - share.offset : hi - share.offset].copy_(src)
                    covered[name] += hi - lo
        short = [n for n, s in by_name.items() if covered[n] < s.shadow.numel()]
        if short:
            raise ValueError(f"EMA files do not cover this rank's share of {len(short)} parameter(s), e.g. {short[0]}")

    # -- the average in the module, for validation ---------------------------------------------------------------
    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the module's parameters hold the EMA weights (in the module's dtype); afterwards the
        trained weights, rebuilt from the fp32 master copy. Collective: every rank enters it."""
        self._write_module(use_ema=True)
        try:
            yield
        finally:
            self._write_module(use_ema=False)

    @torch.no_grad()
    def _write_module(self, use_ema: bool) -> None:
        import deepspeed

        world = dist.get_world_size() if dist.is_initialized() else 1
        for share in self.shares:
            p = share.param
            master, _ = self._master(p)
            if not hasattr(p, "ds_id") and not self._fragmented:  # stage-0 fp32: p is the master itself
                if use_ema:
                    share.backup = p.data.clone()
                    p.data.copy_(share.shadow.view_as(p))
                else:
                    p.data.copy_(share.backup)
                    share.backup = None
                continue
            numel = int(torch.Size(share.shape).numel())
            full = torch.zeros(numel, dtype=torch.float32, device=master.device)
            source = share.shadow if use_ema else master
            full[share.offset : share.offset + source.numel()] = source.to(full.device)
            if world > 1:  # every element is owned by exactly one rank
                dist.all_reduce(full)
            if hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(full.view(share.shape))
            else:
                p.data.copy_(full.view_as(p))


def load_ema_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The whole fp32 average from a checkpoint's `ema-rank*.pt` files: {parameter name: tensor}. Read inside
    `safe_torch_load` (weights only)."""
    files = ema_files(tag_dir)
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no EMA weights (ema-rank*.pt); was the run trained with ema.enabled=true?")
    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    filled: dict[str, int] = {}
    for file in files:
        state = torch.load(file, map_location="cpu")
        for name, saved in state["shares"].items():
            shape = shapes[name] = tuple(saved["shape"])
            flat = out.setdefault(name, torch.zeros(torch.Size(shape).numel(), dtype=torch.float32))
            n, at = saved["values"].numel(), int(saved["offset"])
            flat[at : at + n] = saved["values"].float()
            filled[name] = filled.get(name, 0) + n
    short = [n for n, t in out.items() if filled[n] < t.numel()]
    if short:
        raise FileNotFoundError(f"{tag_dir}: the EMA files miss part of {short[0]} (a rank's ema-rank*.pt is absent)")
    return {name: flat.view(shapes[name]) for name, flat in out.items()}
