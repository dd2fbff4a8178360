"""The memory planner: will a config fit, at which micro-batch — answered from the config, with no weights and no GPU.

`plan_memory(cfg, world_size)` builds the configured U-Net on the meta device, installs the configured objective's
attention processors (tcscale's own, or the official-style replica's, `tcscale.memory.official`), and runs one
micro-step forward + backward at micro-batch 1 and 2 under `SavedTensorCounter`: the activation bytes kept for
backward per sample (the slope) and per step (the intercept). The engine's own bytes per phase — parameters,
gradients, fp32 master copy, Adam states, the optimizer's temporaries and ZeRO's buffers, from the config's
``zero_optimization`` and ``optimizer`` sections — come from `tcscale.memory.static.engine_phase_bytes`; the frozen
VAE (fp32) and text encoder (compute dtype) sit on every rank as the trainer puts them.

The run's peak at micro-batch B is the larger of two moments:

    backward(B) = engine's backward + frozen + workspace + kept(B) + B · transient
    step        = engine's optimizer step + frozen + workspace

* the engine's backward: its state while gradients are reduced (ZeRO's reduce buckets, the gradients) with the
  Adam states held from the second step on;
* the engine's optimizer step: the gradient partition converted to fp32, the Adam states (created at the first
  step) and the optimizer's temporaries, on top of the parameters and master copy (activations are freed by then);
* kept(B) = intercept + B · per_sample: everything autograd holds when backward starts;
* transient (per sample) = 2 x the largest single saved tensor (its gradient and the op's backward temporary, e.g.
  the softmax backward of the largest attention map) plus, with activation checkpointing, the bytes the largest
  checkpointed segment saves when backward recomputes it (measured on a run without checkpointing, per segment);
* workspace: a fixed margin for the CUDA context, cuBLAS / cuDNN workspaces and allocator fragmentation
  (`DEFAULT_WORKSPACE`, 1.5 GiB; ``--workspace`` changes it). A CPU run's workspace is what its process holds beyond
  tensors — the Python libraries, the allocator's arenas, the loader — `CPU_WORKSPACE`, 3.5 GiB: a LoRA run of SD1.4
  here was resident at 5.7 GiB with 2.2 GiB of tensors written (docs/MEMORY.md).

Model-side, SDPA is modelled as the GPU's flash / memory-efficient kernels (`flash_sdpa`: q, k, v, out and the row
LSE kept), and the fused Triton kernel runs on meta tensors allocating what it allocates on a GPU (its launches are
planned, not run).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tcscale.config import TrainConfig
from tcscale.memory.activations import ModuleLabels, SavedTensorCounter, flash_sdpa
from tcscale.memory.static import (
    OptimizerSpec,
    StaticBytes,
    ZeroSettings,
    engine_phase_bytes,
    zero_static_bytes,
)
from tcscale.models.sd import SDComponents
from tcscale.train.precision import compute_dtype

GiB = 2**30
MiB = 2**20
DEFAULT_WORKSPACE = int(1.5 * GiB)
CPU_WORKSPACE = int(3.5 * GiB)
DEFAULT_PHRASES = 4  # phrases per sample of the planned batch (docs/DESIGN.md §7 measures with 4)
PROVIDERS = ("tcscale", "official")


class PlanError(ValueError):
    """The config cannot be planned (an unknown architecture, an objective the planner does not model)."""


# -- the architecture ------------------------------------------------------------------------------------------------
def architecture_name(cfg: TrainConfig) -> str:
    """ "tiny" (model.pretrained null), "local" (a directory with unet/config.json), or the released architecture a
    hub id names, as the family of `model.family` knows it (sd14 / sd21 for SD1.x / SD2.x, sdxl for SDXL)."""
    from tcscale.families import family_of

    ref = cfg.model.pretrained
    if ref is None:
        return "tiny"
    if (Path(ref).expanduser() / "unet" / "config.json").is_file():
        return "local"
    family = family_of(cfg.model)
    arch = family.released_architecture(ref)
    if arch is None:
        known = ", ".join(sorted(family.hub_names))
        raise PlanError(
            f"model.pretrained={ref!r}: not a released model.family={family.name} architecture the planner knows "
            f"({known}), nor a local pipeline directory; pass --arch"
        )
    return arch


@dataclass
class Models:
    """The run's components on the planning device (meta: shapes only) and the frozen ones' parameter counts."""

    comps: SDComponents
    frozen_fp32: int  # parameters kept in fp32 on the device (the VAE)
    frozen_compute: int  # parameters kept in the compute dtype (the text towers)

    @property
    def unet(self) -> torch.nn.Module:
        return self.comps.unet


def _numel(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def build_models(cfg: TrainConfig, arch: str, device: str | torch.device = "meta") -> Models:
    """The configured components on `device` ("meta": shapes only; real devices: random weights, seed
    model.tiny.seed), built by the family of `model.family`."""
    from tcscale.families import family_of
    from tcscale.models import architectures as archs
    from tcscale.models.tokenizer import sd_clip_tokenizer

    family = family_of(cfg.model)
    res = cfg.data.resolution
    if arch == "tiny":
        with torch.device(device):
            comps = family.build_tiny(cfg.model.tiny, res)
    elif arch == "local":
        comps = family.build_from_configs(Path(cfg.model.pretrained).expanduser(), device)
    else:
        if archs.architecture(arch).family != family.name:
            raise PlanError(f"--arch {arch} is a {archs.architecture(arch).family} model, model.family={family.name}")
        comps = archs.build_random_components(
            arch, res, device=device, seed=cfg.model.tiny.seed, tokenizer=sd_clip_tokenizer()
        )  # fmt: skip
    return Models(
        comps=comps,
        frozen_fp32=0 if cfg.data.latents == "cached" else _numel(comps.vae),  # cached latents: no VAE kept
        frozen_compute=sum(_numel(tower) for tower in comps.text_towers),
    )


# -- one micro-step --------------------------------------------------------------------------------------------------
class StepRunner:
    """One micro-step of the configured objective as the trainer runs it: the registered objective built on the
    planning device's components, its `synthetic_batch(B)` and its own step (official provider: the official-style
    replica of TokenCompose, `tcscale.memory.official`)."""

    def __init__(self, cfg: TrainConfig, models: Models, provider: str = "tcscale", phrases: int = DEFAULT_PHRASES):
        from tcscale.objectives import OBJECTIVES, BuildContext

        if provider not in PROVIDERS:
            raise PlanError(f"provider {provider!r} is not one of {list(PROVIDERS)}")
        spec = OBJECTIVES[cfg.objective.name]
        build = spec.build
        if provider == "official":
            if spec.name != "tokencompose":
                raise PlanError(
                    "provider official replicates TokenCompose training: objective.name must be tokencompose"
                )
            from tcscale.memory.official import OfficialTokenComposeObjective as build
        # xformers is planned as SDPA: both keep q, k, v, out and the row LSE (and xformers needs a GPU to build)
        cfg = copy.deepcopy(cfg)
        cfg.attention.ungrounded = "sdpa"
        self.cfg, self.models, self.provider, self.phrases = cfg, models, provider, phrases
        self.dtype = compute_dtype(cfg.deepspeed)
        comps = models.comps
        device = next(comps.unet.parameters()).device
        ctx = BuildContext(cfg, comps, self.dtype, device, micro_batch_size=1)
        self.objective = build(getattr(cfg.objective, spec.name), ctx)
        try:
            self.objective.synthetic_batch(1, phrases=phrases)
        except NotImplementedError as exc:
            raise PlanError(f"objective.name={spec.name}: {exc}") from None
        if cfg.model.lora is not None:  # adapters replace the objective's trainable set, as in the trainer
            from tcscale.models.lora import apply_lora

            apply_lora(self.objective, cfg)
        self.unet = unet = self.objective.module
        self.plan = self.objective.plan
        self.held: list[torch.Tensor] = []  # tensors the last loss() kept alive outside autograd (see count)
        unet.to(self.dtype)
        unet.train()
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing(self._checkpoint)
        self.segments: dict[int, torch.nn.Module] = {}  # checkpointed modules seen (id -> module)

    def _checkpoint(self, fn, *args, **kwargs):
        if isinstance(fn, torch.nn.Module):
            self.segments[id(fn)] = fn
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)

    def loss(self, B: int, device: torch.device | None = None) -> torch.Tensor:
        """The micro-step's loss on B synthetic samples (forward and loss; the caller runs backward)."""
        batch = self.objective.synthetic_batch(B, phrases=self.phrases)
        out = self.objective(self.unet, batch, torch.Generator().manual_seed(0))
        # e.g. the maps a grouped recorder keeps until its losses are read: alive with the saved tensors at the
        # forward's end (saved for backward anyway without checkpointing; with it, only held)
        self.held = list(out.held)
        return out.loss

    def count(self, B: int, device: str | torch.device = "meta", labels=None) -> SavedTensorCounter:
        """Forward + backward of one micro-step of B samples; the saved-tensor count of its forward."""
        device = torch.device(device)
        counter = SavedTensorCounter(exclude=list(self.unet.parameters()), labels=labels)
        with flash_sdpa():
            with counter:
                loss = self.loss(B, device)
                counter.hold(self.held)
                self.held = []
            loss.backward()
        for p in self.unet.parameters():
            p.grad = None
        return counter


# -- the plan --------------------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """What one config needs per rank. Bytes unless named otherwise."""

    arch: str
    provider: str
    objective: str
    backend: str
    dtype: str
    resolution: int
    gradient_checkpointing: bool
    zero_stage: int
    world_size: int
    micro_batch: int  # the config's train_micro_batch_size_per_gpu
    trainable_params: int
    frozen_params: int  # untrained U-Net parameters + VAE + text encoder
    static: dict[str, int]  # held between steps (tcscale.memory.static.zero_static_bytes)
    frozen_bytes: int  # VAE (fp32) + text encoder (compute dtype) + L_norm's frozen U-Net copy
    activations_per_sample: int
    activations_intercept: int
    largest_saved_per_sample: int
    recompute_per_sample: int  # largest checkpointed segment's saved bytes (0 without checkpointing)
    workspace: int
    attention_bytes: dict[str, int]  # per-sample bytes saved inside attn1 / attn2 modules
    seconds: float
    phrases: int = DEFAULT_PHRASES
    fits: dict[str, int] = field(default_factory=dict)  # GPU memory label -> largest micro-batch (0: none)
    optimizer: str = "foreach"  # tcscale.memory.static.OptimizerSpec.impl
    # the engine's parts at each phase's worst moment (tcscale.memory.static.engine_phase_bytes): "build", "backward"
    # (the first micro-step, before the Adam states exist), "step" (the first optimizer step), "backward2" (every
    # later micro-step: the states are held)
    engine: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def transient_per_sample(self) -> int:
        return 2 * self.largest_saved_per_sample + self.recompute_per_sample

    def activations(self, B: int) -> int:
        return self.activations_intercept + B * self.activations_per_sample

    def _engine(self, phase: str) -> int:
        return sum(self.engine[phase].values())

    def backward_peak(self, B: int | None = None) -> int:
        """The worst micro-step's backward: the engine's state and buffers, activations kept and the transient."""
        B = self.micro_batch if B is None else B
        engine = max(self._engine("backward"), self._engine("backward2"))
        return self.frozen_bytes + self.workspace + engine + self.activations(B) + B * self.transient_per_sample

    def step_peak(self) -> int:
        """The first optimizer step (activations are freed by then; the Adam states are created here)."""
        return self.frozen_bytes + self.workspace + self._engine("step")

    def peak(self, B: int | None = None) -> int:
        return max(self.backward_peak(B), self.step_peak())

    def peak_phase(self, B: int | None = None) -> str:
        return "optimizer step" if self.step_peak() >= self.backward_peak(B) else "backward"

    def parts(self, B: int = 1) -> dict[str, dict[str, int]]:
        """The two candidate peaks at micro-batch B, each as its named parts (they sum to the phase's peak)."""
        later = "backward2" if self._engine("backward2") >= self._engine("backward") else "backward"
        common = {"frozen_models": self.frozen_bytes, "workspace": self.workspace}
        backward = {**self.engine[later], "activations": self.activations(B),
                    "backward_transient": B * self.transient_per_sample, **common}  # fmt: skip
        return {"backward": backward, "optimizer_step": {**self.engine["step"], **common}}

    def max_micro_batch(self, gpu_bytes: int) -> int:
        if self.step_peak() > gpu_bytes:
            return 0
        free = gpu_bytes - self.backward_peak(0)
        per = self.activations_per_sample + self.transient_per_sample
        return max(0, math.floor(free / per)) if per > 0 else 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["transient_per_sample"] = self.transient_per_sample
        out["predicted_peak"] = self.peak(1)  # micro-batch 1: the larger of the backward and the optimizer step
        out["predicted_peak_phase"] = self.peak_phase(1)
        out["predicted_peak_parts"] = self.parts(1)
        out["peak_at_config_micro_batch"] = self.peak()
        return out


def _segment_bytes(runner: StepRunner, device) -> int:
    """Per-sample bytes the largest checkpointed segment saves when recomputed: its saved bytes without
    checkpointing (the segments are the modules diffusers hands to the checkpoint function)."""
    unet = runner.unet
    runner.count(1, device)  # a checkpointed pass: records which modules are segments
    segments = list(runner.segments.values())
    if not segments:
        return 0
    unet.disable_gradient_checkpointing()
    labels = ModuleLabels((str(i), m) for i, m in enumerate(segments))
    try:
        counter = runner.count(1, device, labels=labels)
    finally:
        labels.remove()
        unet.enable_gradient_checkpointing(runner._checkpoint)
    return max((v for k, v in counter.by_label.items() if k != "other"), default=0)


COUNT_FIELDS = (
    "activations_per_sample",
    "activations_intercept",
    "largest_saved_per_sample",
    "recompute_per_sample",
    "attention_bytes",
)


def _count_activations(cfg: TrainConfig, runner: StepRunner, device) -> dict[str, Any]:
    """One micro-step at micro-batch 1 and 2 under the saved-tensor counter (and the checkpointed segments)."""
    unet = runner.unet
    attn_labels = ModuleLabels(
        (name.rsplit(".", 1)[-1], mod) for name, mod in unet.named_modules() if name.endswith(("attn1", "attn2"))
    )
    try:
        one = runner.count(1, device, labels=attn_labels)
    finally:
        attn_labels.remove()
    two = runner.count(2, device)
    per_sample = two.total - one.total
    return {
        "activations_per_sample": per_sample,
        "activations_intercept": one.total - per_sample,
        "largest_saved_per_sample": one.largest,
        "recompute_per_sample": _segment_bytes(runner, device) if cfg.model.gradient_checkpointing else 0,
        "attention_bytes": {k: v for k, v in sorted(one.by_label.items()) if k != "other"},
    }


def plan_memory(
    cfg: TrainConfig,
    world_size: int = 1,
    *,
    provider: str = "tcscale",
    arch: str | None = None,
    workspace: int | None = None,
    gpu_mems: dict[str, int] | None = None,
    phrases: int = DEFAULT_PHRASES,
    device: str | torch.device = "meta",
    target: str = "cuda",
    counts: dict[str, Any] | None = None,
) -> MemoryPlan:
    """Plan one config on `world_size` ranks (see the module docstring for how the peak is estimated). `target`:
    the device type the run trains on ("cuda" or "cpu": torch AdamW's default implementation differs). `counts`:
    the activation counts of an earlier plan of the same config (its `COUNT_FIELDS`), reused instead of running the
    micro-steps again (the engine's parts, the static bytes and the fits are computed anew)."""
    t0 = time.perf_counter()
    if workspace is None:
        workspace = CPU_WORKSPACE if target == "cpu" else DEFAULT_WORKSPACE
    arch = arch or architecture_name(cfg)
    models = build_models(cfg, arch, device)
    runner = StepRunner(cfg, models, provider, phrases)
    unet = runner.unet
    if counts is None:
        counts = _count_activations(cfg, runner, device)

    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    frozen_unet = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
    dtype = runner.dtype
    zero = ZeroSettings.from_config(cfg.deepspeed)
    stage = zero.stage
    try:
        optimizer = OptimizerSpec.from_config(cfg.deepspeed, device_type=target)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    static: StaticBytes = zero_static_bytes(trainable, frozen_unet, dtype=dtype, stage=stage, world_size=world_size)
    largest = max((p.numel() for p in unet.parameters() if p.requires_grad), default=0)
    engine = engine_phase_bytes(trainable, frozen_unet, dtype=dtype, world_size=world_size, zero=zero,
                                optimizer=optimizer, largest_param=largest, ema=cfg.ema.enabled,
                                backend="gloo" if target == "cpu" else "nccl")  # fmt: skip
    item = torch.empty((), dtype=dtype).element_size()
    frozen_bytes = 4 * models.frozen_fp32 + item * models.frozen_compute
    for module in runner.objective.extra_modules():  # e.g. SepEn's frozen U-Net copy for L_norm
        frozen_bytes += sum(p.numel() * p.element_size() for p in module.parameters())
    plan = MemoryPlan(
        arch=arch,
        provider=provider,
        objective=cfg.objective.name,
        backend="explicit" if provider == "official" else cfg.attention.backend,
        dtype=str(dtype).removeprefix("torch."),
        resolution=cfg.data.resolution,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        zero_stage=stage,
        world_size=world_size,
        micro_batch=int(cfg.deepspeed["train_micro_batch_size_per_gpu"]),
        trainable_params=trainable,
        frozen_params=frozen_unet + models.frozen_fp32 + models.frozen_compute,
        static=static.as_dict(),
        frozen_bytes=frozen_bytes,
        **{k: counts[k] for k in COUNT_FIELDS},
        workspace=workspace,
        seconds=0.0,
        phrases=phrases,
        optimizer=optimizer.impl,
        engine={name: phase.parts for name, phase in engine.items()},
    )
    for label, nbytes in (gpu_mems or {}).items():
        plan.fits[label] = plan.max_micro_batch(nbytes)
    plan.seconds = round(time.perf_counter() - t0, 2)
    return plan
