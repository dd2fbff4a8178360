"""What an objective is to the trainer, and the registry that names them.

An objective brings: the module the engine wraps and the parameters it trains, the layers it grounds (a
`GroundingPlan`, or None), whether it reads batches from the training loader, and one call that turns a batch into
a `StepOutput`. The trainer builds it through the registry and never branches on which one it is:

    spec = OBJECTIVES[cfg.objective.name]
    objective = spec.build(getattr(cfg.objective, spec.name), BuildContext(...))

Adding an objective is one new module: its config dataclass (the options under ``objective.<name>``), a subclass of
`Objective`, and one ``register_objective(...)`` line. Nothing in ``tcscale/train``, ``tcscale/memory`` or
``tcscale/config.py`` changes; a module outside the package registers through the config's ``imports`` list.

Every hook is declared on `Objective` with its default; an objective overrides what it needs:

* ``reads_data`` (True): batches come from the training loader, else from ``batch(micro_step)``;
* ``lora_target_modules`` (None: `model.lora` does not apply): module-name suffixes peft adapts by default;
* ``caption_dropout`` (False: a config with ``data.caption_dropout > 0`` is refused): the objective replaces that
  fraction of its batches' captions by the empty caption (classifier-free guidance training);
* ``build_loader(...)``: the training loader; default the grounded-image loader (`tcscale.data.build_train_loader`)
  over the objective's plan;
* ``validate(module)``: metrics at ``validation.every_steps`` (every rank, collective under ZeRO-3), or None for the
  trainer's U-Net validation (images, heatmaps);
* ``synthetic_batch(B)``: a batch of B samples with the shapes real data has (random values), so the memory planner
  and the benchmarks run the objective's real step on meta-device components;
* ``extra_modules()``: modules the objective keeps besides the run's components (e.g. a frozen copy), which the
  planner counts;
* ``export_components`` (a registry argument, since exports run without building the objective): the trained
  module's consolidated state dict -> ``{pipeline component: its state dict}``; default ``{"unet": state}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tcscale.attention.plan import GroundingPlan
    from tcscale.config import TrainConfig
    from tcscale.models.sd import SDComponents


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar the engine backpropagates
    terms: dict[str, torch.Tensor]  # named scalar terms, logged as loss/<name> (e.g. {"ldm": .., "token": ..})
    # tensors the step held outside autograd until its losses were computed (a grouped recorder's per-layer maps):
    # alive at the forward's end, so the memory planner counts them
    held: tuple[torch.Tensor, ...] = ()


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

    @property
    def family(self):
        """The model family of the run (tcscale.families): conditioning, grounded layers, training target."""
        from tcscale.families import family_of

        return family_of(self.cfg.model)


class Objective:
    """A training objective as the trainer sees it: subclass it, set `module` (and `plan`), implement `__call__`."""

    module: torch.nn.Module  # what the DeepSpeed engine wraps (the U-Net for the diffusion objectives)
    plan: GroundingPlan | None = None  # the grounded layers (loader masks, validation maps); None: nothing grounded
    reads_data: bool = True  # True: batches come from the training loader; False: from `batch(micro_step)`
    lora_target_modules: tuple[str, ...] | None = None  # model.lora's default targets; None: LoRA does not apply
    caption_dropout: bool = False  # applies data.caption_dropout (empty captions for guidance); False: refused

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates (a subset of `module`'s): those that require grad."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def batch(self, micro_step: int) -> dict[str, Any]:
        """Data-free objectives: the batch of this rank's micro-step (a pure function of it, so resumes replay)."""
        raise TypeError(f"{type(self).__name__} reads its batches from the training loader")

    def build_loader(
        self, data_cfg, tokenizer, *, rank: int, world_size: int, micro_batch_size: int, seed: int, start_step: int,
        anchor: tuple[int, int] | None = None,
    ):  # fmt: skip
        """The training loader (a `tcscale.data.TrainLoader` or anything with its iteration, ``state_dict`` /
        ``load_state_dict``, ``counters`` and ``close``): by default grounded images over the objective's plan;
        `anchor` is the (micro-step, slot) the synthetic stream continues from (elastic resume)."""
        from tcscale.data import build_train_loader

        return build_train_loader(
            data_cfg, tokenizer, plan=self.plan, anchor=anchor, rank=rank, world_size=world_size,
            micro_batch_size=micro_batch_size, seed=seed, start_step=start_step,
        )  # fmt: skip

    def validate(self, module: torch.nn.Module) -> dict[str, float] | None:
        """Validation metrics for rank 0 to log (every rank calls it), or None: the trainer's U-Net validation."""
        return None

    def synthetic_batch(self, batch_size: int, *, phrases: int = 4) -> dict[str, Any]:
        """A batch of `batch_size` samples shaped like real data (random values; grounded objectives: `phrases`
        phrases of two tokens each), for the memory planner and the benchmarks."""
        raise NotImplementedError(
            f"{type(self).__name__} offers no synthetic_batch(B): the memory planner cannot run its step"
        )

    def extra_modules(self) -> tuple[torch.nn.Module, ...]:
        """Modules the objective holds besides the run's components (the planner counts their parameters)."""
        return ()

    def __call__(self, model: Callable[..., Any], batch: dict[str, Any], generator: torch.Generator) -> StepOutput:
        """One micro-step's loss. `model` is the engine (call it like `module`); every random draw uses
        `generator`, which the trainer derives from (seed, rank, micro-step)."""
        raise NotImplementedError


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective: its name (``objective.name``), config dataclass (``objective.<name>``), its
    `Objective` subclass (built as ``build(config, ctx)``), and an optional config check run at load time (raise
    ValueError naming the key)."""

    name: str
    config: type
    build: type[Objective]
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
    build: type[Objective],
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
    if not (isinstance(build, type) and issubclass(build, Objective)):
        raise TypeError(f"objective {name!r}: register a subclass of tcscale.objectives.Objective, got {build!r}")
    old = OBJECTIVES.get(name)
    if old is not None and old.config.__qualname__ != config.__qualname__:
        raise ValueError(f"objective {name!r} is already registered with config {old.config.__qualname__}")
    spec = ObjectiveSpec(name, config, build, check, description, export_components)
    OBJECTIVES[name] = spec
    return spec
