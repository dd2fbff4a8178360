"""What an objective is to the trainer, and the registry that names them.

An objective brings: the module the engine wraps and the parameters it trains, the layers it grounds (a
`GroundingPlan`, or None), whether it reads batches from the training loader, and one call that turns a batch into
a `StepOutput`. The trainer builds it through the registry and never branches on which one it is:

    spec = OBJECTIVES[cfg.objective.name]
    objective = spec.build(getattr(cfg.objective, spec.name), BuildContext(...))

Adding an objective is one new module: its config dataclass (the options under ``objective.<name>``), the
objective class, and one ``register_objective(...)`` line. Nothing in ``tcscale/train`` or ``tcscale/config.py``
changes; a module outside the package registers through the config's ``imports`` list.

Optional hooks, for an objective whose module is not the U-Net or whose batches are not grounded images (the
trainer asks for them with ``getattr``; the built-in diffusion objectives define none):

* ``build_loader(data_cfg, tokenizer, *, rank, world_size, micro_batch_size, seed, start_step)``: the training
  loader (a `tcscale.data.TrainLoader`, or anything with its iteration, ``state_dict``/``load_state_dict``,
  ``counters`` and ``close``) instead of ``build_train_loader``;
* ``validate(module) -> dict[str, float]``: called on every rank at ``validation.every_steps`` (collective under
  ZeRO-3) with the engine's module; rank 0 logs the metrics. Replaces the U-Net validation (images, heatmaps);
* ``export_components`` (a registry argument, since exports run without building the objective): the trained
  module's consolidated state dict -> ``{pipeline component: its state dict}``; default ``{"unet": state}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from tcscale.attention.plan import GroundingPlan
    from tcscale.config import TrainConfig
    from tcscale.models.sd import SDComponents


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar the engine backpropagates
    terms: dict[str, torch.Tensor]  # named scalar terms, logged as loss/<name> (e.g. {"ldm": .., "token": ..})


@dataclass(frozen=True)
class BuildContext:
    """What an objective's builder receives: the loaded models and the run's settings. Nothing distributed: `rank`
    and `world_size` only seed data-free prompt streams."""

    cfg: TrainConfig  # the whole run config (read `cfg.objective.<name>` for the objective's own options)
    comps: SDComponents  # U-Net (trainable), frozen VAE / text encoder already on `device`, tokenizer, scheduler
    dtype: torch.dtype  # compute dtype of the engine (bf16 / fp16 / fp32)
    device: torch.device
    micro_batch_size: int  # samples per micro-step on this rank
    rank: int = 0
    world_size: int = 1


@runtime_checkable
class Objective(Protocol):
    """A training objective as the trainer sees it."""

    module: torch.nn.Module  # what the DeepSpeed engine wraps (the U-Net for the diffusion objectives)
    plan: GroundingPlan | None  # the grounded layers (loader masks, validation maps); None: nothing grounded
    reads_data: bool  # True: batches come from the training loader; False: from `batch(micro_step)`

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates (a subset of `module`'s)."""
        ...

    def batch(self, micro_step: int) -> dict[str, Any]:
        """Data-free objectives: the batch of this rank's micro-step (a pure function of it, so resumes replay)."""
        ...

    def __call__(self, model: Callable[..., Any], batch: dict[str, Any], generator: torch.Generator) -> StepOutput:
        """One micro-step's loss. `model` is the engine (call it like `module`); every random draw uses
        `generator`, which the trainer derives from (seed, rank, micro-step)."""
        ...


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective: its name (``objective.name``), config dataclass (``objective.<name>``), builder,
    and an optional config check run at load time (raise ValueError naming the key)."""

    name: str
    config: type
    build: Callable[[Any, BuildContext], Objective]
    check: Callable[[TrainConfig], None] | None = None
    description: str = ""
    # the trained module's state dict -> {pipeline component ("unet", "text_encoder"): its state dict}; None: U-Net
    export_components: Callable[[dict[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]]] | None = None

    def exported(self, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """The pipeline components a checkpoint of this objective replaces, with their state dicts."""
        return self.export_components(state) if self.export_components is not None else {"unet": state}


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(
    name: str,
    config: type,
    build: Callable[[Any, BuildContext], Objective],
    *,
    check: Callable[[TrainConfig], None] | None = None,
    description: str = "",
    export_components: Callable[[dict[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]]] | None = None,
) -> ObjectiveSpec:
    """Add an objective to `OBJECTIVES` (re-registering a name with the same config class replaces it, so a
    module imported twice is harmless; another config class under a taken name is an error)."""
    if not name.isidentifier():
        raise ValueError(f"objective name {name!r} must be a Python identifier (it is a config section)")
    if name == "name":
        raise ValueError("'name' is reserved: objective.name selects the objective")
    old = OBJECTIVES.get(name)
    if old is not None and old.config.__qualname__ != config.__qualname__:
        raise ValueError(f"objective {name!r} is already registered with config {old.config.__qualname__}")
    spec = ObjectiveSpec(name, config, build, check, description, export_components)
    OBJECTIVES[name] = spec
    return spec


def unet_trainable_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]
