"""The recipe's global batch, kept on any number of ranks: `resolve_batch`.

A config states the samples per optimizer step it means (`batch.global_size`, e.g. the paper's 4); the trainer
derives the accumulation from the world size: accumulation = global / (world x micro-batch). A world that cannot
keep it (no whole accumulation) is refused before any model loads, in one line naming the choices, unless the config
names an lr-scaling rule (`batch.lr_scaling`: linear | sqrt): then it trains at the nearest global batch the world
allows (accumulation = max(1, round(global / (world x micro-batch)))) with every lr of the DeepSpeed section scaled
by (new global / global), or its square root. Without `batch.global_size` the global batch is whatever
world x micro-batch x `deepspeed.gradient_accumulation_steps` gives. Either way the start-up line states it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from tcscale.train.errors import RunInputError


class BatchError(RunInputError):
    """The world size cannot keep the config's global batch (exit 2)."""


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    micro_batch: int
    accumulation: int
    recipe_global: int | None  # batch.global_size (None: not stated)
    lr_scale: float = 1.0
    lr_changes: dict[str, tuple[float, float]] = field(default_factory=dict)  # deepspeed key -> (before, after)

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch * self.accumulation

    def describe(self) -> str:
        """The start-up line."""
        ranks = f"{self.world_size} rank{'s' if self.world_size != 1 else ''}"
        line = (
            f"batch: global {self.global_batch} samples per optimizer step = micro-batch {self.micro_batch} x "
            f"accumulation {self.accumulation} x {ranks}"
        )
        if self.recipe_global is None:
            return line + " (batch.global_size not set: it follows the world size)"
        if self.global_batch == self.recipe_global:
            return line + f" (the recipe's batch.global_size={self.recipe_global}, kept)"
        lrs = ", ".join(f"{k} {a:g} -> {b:g}" for k, a, b in ((k, *v) for k, v in self.lr_changes.items()))
        return line + (
            f" (NOT the recipe's batch.global_size={self.recipe_global}: lr scaled x{self.lr_scale:.4g} by "
            f"batch.lr_scaling: {lrs})"
        )

    def deepspeed_section(self, ds: dict[str, Any]) -> dict[str, Any]:
        """The DeepSpeed section to build the engine with: this accumulation, the scaled lrs (a copy)."""
        out = copy.deepcopy(ds)
        out["gradient_accumulation_steps"] = self.accumulation
        for key, (_, after) in self.lr_changes.items():
            section, name = key.rsplit(".", 1)
            node = out
            for part in section.split("."):
                node = node[part]
            node[name] = after
        return out


def lr_keys(ds: dict[str, Any]) -> dict[str, float]:
    """The learning rates a DeepSpeed section sets: optimizer.params.lr and the scheduler's *_lr values."""
    found = {}
    opt = (ds.get("optimizer") or {}).get("params") or {}
    if isinstance(opt.get("lr"), (int, float)):
        found["optimizer.params.lr"] = float(opt["lr"])
    sched = (ds.get("scheduler") or {}).get("params") or {}
    for name, value in sched.items():
        if (name == "lr" or name.endswith("_lr")) and isinstance(value, (int, float)):
            found[f"scheduler.params.{name}"] = float(value)
    return found


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_batch(ds: dict[str, Any], global_size: int | None, lr_scaling: str, world_size: int) -> BatchPlan:
    """Micro-batch, accumulation and lr for this world size (module docstring); raises BatchError (one line)."""
    micro = int(ds["train_micro_batch_size_per_gpu"])
    given = ds.get("gradient_accumulation_steps")
    if global_size is None:
        return BatchPlan(world_size, micro, int(given), None)
    per_micro_step = world_size * micro
    exact = global_size % per_micro_step == 0
    if exact:
        accum = global_size // per_micro_step
        if given is not None and int(given) != accum:
            raise BatchError(
                f"deepspeed.gradient_accumulation_steps={given} gives global batch {per_micro_step * int(given)} on "
                f"{world_size} rank(s), not batch.global_size={global_size}: leave it out (derived here: {accum})"
            )
        return BatchPlan(world_size, micro, accum, global_size)
    if lr_scaling == "none":
        nearest = per_micro_step * max(1, round(global_size / per_micro_step))
        worlds = [w for w in _divisors(global_size) if (global_size // w) % micro == 0]
        micros = [m for m in _divisors(global_size) if global_size % (world_size * m) == 0]
        choices = []
        if worlds:
            choices.append(f"run on {', '.join(map(str, worlds))} rank(s)")
        if micros:
            sizes = " or ".join(map(str, micros))
            choices.append(f"set deepspeed.train_micro_batch_size_per_gpu={sizes} (the accumulation follows)")
        choices.append(f"change batch.global_size (the recipe) to a multiple of {per_micro_step}")
        choices.append(f"name an lr-scaling rule, batch.lr_scaling=linear|sqrt, to train at global batch {nearest}")
        raise BatchError(
            f"batch.global_size={global_size} cannot be kept on {world_size} rank(s) at micro-batch {micro} "
            f"(no whole gradient accumulation: {global_size} / ({world_size} x {micro})"
            + ("" if micros else f", and no deepspeed.train_micro_batch_size_per_gpu makes one on {world_size} ranks")
            + "); choose one: "
            + "; or ".join(choices)
        )
    accum = max(1, round(global_size / per_micro_step))
    new_global = per_micro_step * accum
    ratio = new_global / global_size
    scale = ratio if lr_scaling == "linear" else math.sqrt(ratio)
    changes = {k: (v, v * scale) for k, v in lr_keys(ds).items()}
    return BatchPlan(world_size, micro, accum, global_size, scale, changes)
