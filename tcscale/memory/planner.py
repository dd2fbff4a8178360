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

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tcscale.config import TrainConfig, expected_vae_factor
from tcscale.memory.activations import ModuleLabels, SavedTensorCounter, flash_sdpa
from tcscale.memory.static import (
    OptimizerSpec,
    StaticBytes,
    ZeroSettings,
    engine_phase_bytes,
    zero_static_bytes,
)

GiB = 2**30
MiB = 2**20
DEFAULT_WORKSPACE = int(1.5 * GiB)
CPU_WORKSPACE = int(3.5 * GiB)
DEFAULT_PHRASES = 4  # phrases per sample of the planned batch (DESIGN §7 measures with 4)
PROVIDERS = ("tcscale", "official")
SUPPORTED_OBJECTIVES = ("ldm", "tokencompose", "sepen")


class PlanError(ValueError):
    """The config cannot be planned (an unknown architecture, an objective the planner does not model)."""


# -- the architecture ------------------------------------------------------------------------------------------------
def architecture_name(cfg: TrainConfig) -> str:
    """ "tiny" (model.pretrained null), "local" (a directory with unet/config.json), or a released SD architecture
    recognised from the hub id (sd14 for SD1.x, sd21 for SD2.x, sdxl for SDXL)."""
    ref = cfg.model.pretrained
    if ref is None:
        return "tiny"
    if (Path(ref).expanduser() / "unet" / "config.json").is_file():
        return "local"
    low = ref.lower()
    if "stable-diffusion-v1" in low or "stable-diffusion-1" in low:
        return "sd14"
    if "stable-diffusion-2" in low:
        return "sd21"
    if "stable-diffusion-xl" in low or "sdxl" in low:
        return "sdxl"
    raise PlanError(
        f"model.pretrained={ref!r}: unknown U-Net architecture (known: SD1.x, SD2.x and SDXL hub ids, a local "
        "pipeline directory, or null for the tiny models); pass --arch sd14|sd21|sdxl|tiny"
    )


@dataclass
class Models:
    """The meta-device (or real) U-Net and the frozen components' parameter counts."""

    unet: torch.nn.Module
    latent_channels: int
    cross_attention_dim: int
    frozen_fp32: int  # parameters kept in fp32 on the device (the VAE)
    frozen_compute: int  # parameters kept in the compute dtype (the text encoder)


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_models(cfg: TrainConfig, arch: str, device: str | torch.device = "meta") -> Models:
    """The configured U-Net on `device` ("meta": shapes only; real devices: random weights, seed model.tiny.seed)."""
    from tcscale.models import architectures as archs

    res = cfg.data.resolution
    frozen_text_2 = 0  # SDXL's second text tower
    if arch == "tiny":
        tiny = cfg.model.tiny
        sdxl = getattr(cfg.model, "family", "sd") == "sdxl"
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(tiny.seed)
            vae = archs.tiny_vae(tiny, res)
            latent_channels = vae.config.latent_channels
            build_unet = archs.tiny_sdxl_unet if sdxl else archs.tiny_unet
            unet = build_unet(tiny, res // expected_vae_factor(cfg.model), latent_channels)
            text = archs.tiny_text_encoder(tiny, 49408)
            if sdxl:
                frozen_text_2 = _numel(archs.tiny_text_encoder_2(tiny, 49408))
    elif arch == "local":
        from diffusers import UNet2DConditionModel

        base = Path(cfg.model.pretrained).expanduser()
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(base / "unet")))
        latent_channels = unet.config.in_channels
        vae, text = None, None
    else:
        comps = archs.build_random_components(arch, res, device=device, seed=cfg.model.tiny.seed)
        unet, vae, text = comps.unet, comps.vae, comps.text_encoder
        frozen_text_2 = _numel(comps.text_encoder_2) if comps.text_encoder_2 is not None else 0
        latent_channels = 4
    return Models(
        unet=unet,
        latent_channels=latent_channels,
        cross_attention_dim=unet.config.cross_attention_dim,
        frozen_fp32=_numel(vae) if vae is not None else 0,
        frozen_compute=(_numel(text) if text is not None else 0) + frozen_text_2,
    )


# -- one micro-step --------------------------------------------------------------------------------------------------
def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    ds = cfg.deepspeed
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def _token_phrase(B: int, phrases: int) -> torch.Tensor:
    """(B, 77) int64: tokens 1+2p and 2+2p belong to phrase p (two BPE tokens per phrase), the rest -1."""
    tp = torch.full((B, 77), -1, dtype=torch.int64)
    for p in range(phrases):
        tp[:, 1 + 2 * p : 3 + 2 * p] = p
    return tp


class StepRunner:
    """One micro-step of the configured objective on a U-Net whose processors it installs (meta or real tensors)."""

    def __init__(self, cfg: TrainConfig, models: Models, provider: str = "tcscale", phrases: int = DEFAULT_PHRASES):
        if provider not in PROVIDERS:
            raise PlanError(f"provider {provider!r} is not one of {list(PROVIDERS)}")
        name = cfg.objective.name
        if name not in SUPPORTED_OBJECTIVES:
            raise PlanError(f"objective.name={name}: the memory planner models {list(SUPPORTED_OBJECTIVES)}")
        if provider == "official" and name != "tokencompose":
            raise PlanError("provider official replicates TokenCompose training: objective.name must be tokencompose")
        self.cfg, self.models, self.provider, self.phrases = cfg, models, provider, phrases
        self.unet = unet = models.unet
        self.dtype = compute_dtype(cfg)
        self.factor = expected_vae_factor(cfg.model)
        self.side = cfg.data.resolution // self.factor
        self.plan = None
        self.held: list[torch.Tensor] = []  # tensors the last loss() kept alive outside autograd (see count)
        self._install()
        if cfg.model.lora is not None:  # adapters replace the objective's trainable set, as in the trainer
            from tcscale.models.lora import add_lora, lora_target_modules

            add_lora(unet, cfg.model.lora, lora_target_modules(cfg), seed=cfg.seed)
        unet.to(self.dtype)
        unet.train()
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing(self._checkpoint)
        self.segments: dict[int, torch.nn.Module] = {}  # checkpointed modules seen (id -> module)

    def _checkpoint(self, fn, *args, **kwargs):
        if isinstance(fn, torch.nn.Module):
            self.segments[id(fn)] = fn
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)

    def _install(self) -> None:
        from tcscale.attention.plan import GroundingPlan
        from tcscale.attention.processors import install_grounding_processors, set_ungrounded_attention

        cfg, unet = self.cfg, self.unet
        name = cfg.objective.name
        if name == "ldm":
            set_ungrounded_attention(unet, "sdpa")  # xformers is modelled as SDPA (both keep q, k, v, out, LSE)
            return
        if name == "sepen":
            sep = cfg.objective.sepen
            self.plan = GroundingPlan.build(
                unet, blocks=["down", "mid", "up"], resolutions=[sep.map_resolution],
                image_resolution=cfg.data.resolution, scale_factor=self.factor,
            )  # fmt: skip
            for pname, p in unet.named_parameters():
                p.requires_grad_(pname.endswith(("attn2.to_k.weight", "attn2.to_k.bias")))
            install_grounding_processors(unet, self.plan, "reference", "sdpa")
            return
        from tcscale.objectives.tokencompose import resolve_tokencompose

        self.tc = resolve_tokencompose(cfg.objective.tokencompose)
        self.plan = GroundingPlan.from_config(
            unet, cfg.attention, cfg.data.resolution, self.factor, mask_full_res=self.tc.mask_full_res
        )
        if self.provider == "official":
            from tcscale.memory.official import install_official_processors

            install_official_processors(unet, self.plan)
            return
        # installed as reference, then switched: the install-time check asks for a GPU or the Triton interpreter,
        # which the fused kernel does not need on meta tensors (it allocates, and plans its launches without running)
        install_grounding_processors(unet, self.plan, "reference", "sdpa")
        if cfg.attention.backend == "fused":
            for mod in unet.modules():
                if hasattr(mod, "processor") and hasattr(mod.processor, "backend"):
                    mod.processor.backend = "fused"

    def _recorder(self, B: int):
        from tcscale.attention.recorders import GroupedLossRecorder, LossRecorder

        masks = {
            size: torch.bernoulli(torch.full((B, self.phrases, size[0] * size[1]), 0.5))
            for size in self.plan.layer_sizes
        }
        kwargs = dict(layer_masks=masks, mask_rule=self.plan.mask_rule, token_loss_heads=self.tc.token_loss_heads)
        tp = _token_phrase(B, self.phrases)
        if self.provider == "official":
            from tcscale.memory.official import KeptMapsRecorder

            groups = self.plan.groups()
            return KeptMapsRecorder(
                (self.side, self.side), tp, groups=groups, pixel_loss_reduction="per_resolution", **kwargs
            )
        if self.tc.pixel_loss_reduction == "per_resolution":
            reduction = "per_resolution" if self.provider == "official" else self.tc.pixel_loss_reduction
            return GroupedLossRecorder(
                (self.side, self.side), tp, groups=self.plan.groups(), pixel_loss_reduction=reduction, **kwargs
            )
        return LossRecorder((self.side, self.side), tp, **kwargs)

    def inputs(self, B: int, device: torch.device):
        g = torch.Generator().manual_seed(0)
        shape = (B, self.models.latent_channels, self.side, self.side)
        noisy = torch.randn(shape, generator=g).to(device, self.dtype)
        timesteps = torch.randint(0, 1000, (B,), generator=g).to(device)
        text = torch.randn((B, 77, self.models.cross_attention_dim), generator=g).to(device, self.dtype)
        target = torch.randn(shape, generator=g).to(device)
        return noisy, timesteps, text, target

    def added_cond(self, B: int, device: torch.device) -> dict[str, Any]:
        """SDXL's `added_cond_kwargs` (pooled text embedding, the six size/crop time ids); {} for SD1.x/2.x."""
        c = self.unet.config
        if c.addition_embed_type != "text_time":
            return {}
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        return {"added_cond_kwargs": {
            "text_embeds": torch.zeros((B, pooled), device=device, dtype=self.dtype),
            "time_ids": torch.zeros((B, 6), device=device, dtype=self.dtype),
        }}  # fmt: skip

    def loss(self, B: int, device: torch.device) -> torch.Tensor:
        """The micro-step's loss (forward and loss; the caller runs backward)."""
        noisy, timesteps, text, target = self.inputs(B, device)
        extra = self.added_cond(B, device)
        name = self.cfg.objective.name
        if name == "ldm":
            return F.mse_loss(self.unet(noisy, timesteps, text, **extra).sample.float(), target)
        if name == "sepen":
            from tcscale.attention.recorders import ProbsRecorder
            from tcscale.losses.sepen import sepen_losses

            sep = self.cfg.objective.sepen
            with ProbsRecorder((self.side, self.side)) as rec:
                self.unet(noisy, timesteps, text, cross_attention_kwargs=rec.kwargs, **extra)
            objects = [[[1 + k] for k in range(sep.objects_per_prompt)] for _ in range(B)]
            losses = sepen_losses([r.probs for r in rec.records], objects, sigma=sep.gaussian_sigma, kernel=sep.kernel)
            loss = sep.lambda_sep * losses["sep"] + sep.lambda_en * losses["en"]
            if sep.lambda_norm > 0:  # L_norm's second forward (its frozen reference runs without a graph)
                loss = loss + sep.lambda_norm * F.mse_loss(
                    self.unet(noisy, timesteps, text, **extra).sample.float(), target
                )
            return loss
        with self._recorder(B) as rec:
            pred = self.unet(noisy, timesteps, text, cross_attention_kwargs=rec.kwargs, **extra).sample
        # maps a grouped recorder keeps until its losses are read: alive with the saved tensors at the forward's end
        # (saved for backward anyway without checkpointing; with it, only held)
        self.held = [lp.probs for lp in getattr(rec, "layer_probs", ())]
        ldm = F.mse_loss(pred.float(), target)
        return ldm + self.tc.token_loss_weight * rec.total("token") + self.tc.pixel_loss_weight * rec.total("pixel")

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
                                optimizer=optimizer, largest_param=largest)  # fmt: skip
    item = torch.empty((), dtype=dtype).element_size()
    frozen_bytes = 4 * models.frozen_fp32 + item * models.frozen_compute
    if cfg.objective.name == "sepen" and cfg.objective.sepen.lambda_norm > 0:
        frozen_bytes += item * (trainable + frozen_unet)  # L_norm's frozen U-Net copy
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


def write_json(plans: list[MemoryPlan], path: str | Path, meta: dict[str, Any] | None = None) -> None:
    data = {"meta": meta or {}, "plans": [p.as_dict() for p in plans]}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
