"""The memory planner: will a config fit, at which micro-batch — answered from the config, with no weights and no GPU.

`plan_memory(cfg, world_size)` builds the configured U-Net on the meta device, installs the configured objective's
attention processors (tcscale's own, or the official-style replica's, `tcscale.memory.official`), and runs one
micro-step forward + backward at micro-batch 1 and 2 under `SavedTensorCounter`: the activation bytes kept for
backward per sample (the slope) and per step (the intercept). Static bytes follow ZeRO's partitioning
(`tcscale.memory.static`); the frozen VAE (fp32) and text encoder (compute dtype) sit on every rank as the trainer
puts them.

The step's peak for micro-batch B is estimated as

    peak(B) = static + frozen + workspace + kept(B) + B · transient

* kept(B) = intercept + B · per_sample: everything autograd holds when backward starts;
* transient (per sample) = 2 x the largest single saved tensor (its gradient and the op's backward temporary, e.g.
  the softmax backward of the largest attention map) plus, with activation checkpointing, the bytes the largest
  checkpointed segment saves when backward recomputes it (measured on a run without checkpointing, per segment);
* workspace: a fixed margin for the CUDA context, cuBLAS / cuDNN workspaces and allocator fragmentation
  (`DEFAULT_WORKSPACE`, 1.5 GiB; ``--workspace`` changes it).

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
from tcscale.memory.static import StaticBytes, zero_static_bytes
from tcscale.models.sd import SDComponents
from tcscale.train.precision import compute_dtype

GiB = 2**30
MiB = 2**20
DEFAULT_WORKSPACE = int(1.5 * GiB)
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
        frozen_fp32=_numel(comps.vae),
        frozen_compute=_numel(comps.text_encoder) + _numel(comps.text_encoder_2),
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
    static: dict[str, int]
    frozen_bytes: int  # VAE (fp32) + text encoder (compute dtype) + untrained U-Net parameters when not counted
    activations_per_sample: int
    activations_intercept: int
    largest_saved_per_sample: int
    recompute_per_sample: int  # largest checkpointed segment's saved bytes (0 without checkpointing)
    workspace: int
    attention_bytes: dict[str, int]  # per-sample bytes saved inside attn1 / attn2 modules
    seconds: float
    phrases: int = DEFAULT_PHRASES
    fits: dict[str, int] = field(default_factory=dict)  # GPU memory label -> largest micro-batch (0: none)

    @property
    def transient_per_sample(self) -> int:
        return 2 * self.largest_saved_per_sample + self.recompute_per_sample

    def activations(self, B: int) -> int:
        return self.activations_intercept + B * self.activations_per_sample

    def peak(self, B: int | None = None) -> int:
        B = self.micro_batch if B is None else B
        base = self.static["total"] + self.frozen_bytes + self.workspace
        return base + self.activations(B) + B * self.transient_per_sample

    def max_micro_batch(self, gpu_bytes: int) -> int:
        free = gpu_bytes - self.peak(0)
        per = self.activations_per_sample + self.transient_per_sample
        return max(0, math.floor(free / per)) if per > 0 else 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["transient_per_sample"] = self.transient_per_sample
        out["predicted_peak"] = self.peak()
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


def plan_memory(
    cfg: TrainConfig,
    world_size: int = 1,
    *,
    provider: str = "tcscale",
    arch: str | None = None,
    workspace: int = DEFAULT_WORKSPACE,
    gpu_mems: dict[str, int] | None = None,
    phrases: int = DEFAULT_PHRASES,
    device: str | torch.device = "meta",
) -> MemoryPlan:
    """Plan one config on `world_size` ranks (see the module docstring for how the peak is estimated)."""
    t0 = time.perf_counter()
    arch = arch or architecture_name(cfg)
    models = build_models(cfg, arch, device)
    runner = StepRunner(cfg, models, provider, phrases)
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
    recompute = _segment_bytes(runner, device) if cfg.model.gradient_checkpointing else 0

    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    frozen_unet = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
    dtype = runner.dtype
    stage = int(cfg.deepspeed.get("zero_optimization", {}).get("stage", 0))
    static: StaticBytes = zero_static_bytes(trainable, frozen_unet, dtype=dtype, stage=stage, world_size=world_size)
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
        activations_per_sample=per_sample,
        activations_intercept=one.total - per_sample,
        largest_saved_per_sample=one.largest,
        recompute_per_sample=recompute,
        workspace=workspace,
        attention_bytes={k: v for k, v in sorted(one.by_label.items()) if k != "other"},
        seconds=0.0,
        phrases=phrases,
    )
    for label, nbytes in (gpu_mems or {}).items():
        plan.fits[label] = plan.max_micro_batch(nbytes)
    plan.seconds = round(time.perf_counter() - t0, 2)
    return plan
