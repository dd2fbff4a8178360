"""Separate-and-Enhance objective: L = λ_sep L_sep + λ_en L_en (+ λ_n L_norm), training attn2.to_k only (paper Eq. 6).

Data-free: each micro-step draws K-object prompts from the concept list (a pure function of (seed, micro_step,
rank)), feeds a latent at a random timestep, and reads the probabilities of every cross-attention layer at
`objective.sepen.map_resolution`. With lambda_norm > 0, single-concept prompts on fresh latents keep the
prediction close to a frozen copy of the U-Net taken before training.

Paper or official code (docs/FIDELITY.md): `fidelity: paper | official` sets `kernel` (L_en's 3×3 smoothing),
`latent` (pure noise z_t ~ N(0, I) or the official z₀ = 0.18215·N(0, I) noised to step t) and `prompts` (paper
templates or the official ones) at once; each left null takes the preset's value, one set explicitly wins.
`pair_index` trains one model on one concept pair (the paper's protocol; launchers/slurm/sepen_pairs.sbatch runs
every pair as an array job); the λ weights are plain options (the paper's text is ambiguous, see FIDELITY.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch

from tcscale.attention.plan import GroundingPlan, vae_scale_factor
from tcscale.attention.processors import install_grounding_processors
from tcscale.attention.recorders import ProbsRecorder
from tcscale.losses.sepen import SmoothingKernel, norm_loss, sepen_losses
from tcscale.models.conditioning import Conditioning, encode_text
from tcscale.objectives.base import BuildContext, Objective, StepOutput, register_objective
from tcscale.objectives.fidelity import Fidelity, apply_preset, resolved
from tcscale.objectives.sepen_prompts import SepEnPromptSampler, pair_concepts

TRAINABLE_SUFFIXES = ("attn2.to_k.weight", "attn2.to_k.bias")
SepEnLatent = Literal["pure_noise", "official"]
SepEnPrompts = Literal["paper", "official"]

FIDELITY_PRESETS: dict[str, dict[str, str]] = {
    "paper": {"kernel": "paper", "latent": "pure_noise", "prompts": "paper"},
    "official": {"kernel": "official", "latent": "official", "prompts": "official"},
}
"""What `objective.sepen.fidelity` sets (docs/FIDELITY.md has the source of every row)."""
SECTION = "objective.sepen"


@dataclass
class SepEnConfig:
    concepts: str = "pairs"  # "pairs" | "large" | path to a concept list (one object noun per line)
    split: Literal["seen", "unseen", "all"] = "seen"  # large-scale list split to train on
    pair_index: int | None = None  # concepts=pairs: train on pair N of pairs.txt only (0-based; paper); null: all
    objects_per_prompt: int = 2  # K >= 2 objects per composed prompt
    map_resolution: int = 16  # latent side of the maps L_sep / L_en use (16 for SD1.4 at 512 px)
    lambda_sep: float = 1.0  # weight of L_sep (official config 1.0)
    lambda_en: float = 0.5  # weight of L_en (official config 0.5)
    lambda_norm: float = 0.0  # weight of L_norm (0.5 for large-scale training; 0 disables the frozen copy)
    gaussian_sigma: float = 0.5  # sigma of the 3x3 Gaussian smoothing in L_en
    fidelity: Fidelity = "paper"  # preset for the three options below: paper | official (docs/FIDELITY.md)
    kernel: SmoothingKernel | None = None  # L_en smoothing exp(-x²/2σ²) paper | exp(-x²/4σ²) official; null: preset
    latent: SepEnLatent | None = None  # z_t ~ N(0, I) pure_noise | 0.18215·N(0, I) noised to t official; null: preset
    prompts: SepEnPrompts | None = None  # paper templates (a/an) | official ones (docs/FIDELITY.md); null: preset


def resolve_sepen(cfg: SepEnConfig) -> SepEnConfig:
    """A copy with every preset-driven option set (the config check does this in place at load time)."""
    return resolved(cfg, FIDELITY_PRESETS, SECTION)


def prompt_style(cfg: SepEnConfig) -> str:
    """The sampler style of `cfg.prompts`: the official code has one template per setting (pairs / large-scale)."""
    if cfg.prompts == "paper":
        return "paper"
    return "official_pairs" if cfg.concepts == "pairs" else "official_large"


def sepen_latents(
    kind: str,
    shape: tuple[int, ...],
    scheduler,
    generator: torch.Generator,
    *,
    device: torch.device | str = "cpu",
    scaling_factor: float = 0.18215,
    timesteps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t, t) for one SepEn forward: t ~ U{0..T−1} (or `timesteps`) and

    * ``pure_noise`` (paper): z_t ~ N(0, I), whatever t;
    * ``official``: z₀ = scaling_factor · N(0, I) (0.18215: the SD VAE's latent scale), noised to step t by the
      scheduler, z_t = √ᾱ_t z₀ + √(1 − ᾱ_t) ε — std √(ᾱ_t · 0.18215² + 1 − ᾱ_t), 0.184 at t = 0 on the SD schedule.
    """
    B = shape[0]
    T = scheduler.config.num_train_timesteps
    if kind == "pure_noise":
        z = torch.randn(shape, generator=generator, device=device)
        t = torch.randint(0, T, (B,), generator=generator, device=device).long() if timesteps is None else timesteps
        return z, t.to(device)
    if kind != "official":
        raise ValueError(f"latent must be 'pure_noise' or 'official', got {kind!r}")
    z0 = scaling_factor * torch.randn(shape, generator=generator, device=device)
    eps = torch.randn(shape, generator=generator, device=device)
    t = torch.randint(0, T, (B,), generator=generator, device=device).long() if timesteps is None else timesteps
    t = t.to(device)
    return scheduler.add_noise(z0, eps, t), t


class SepEnObjective(Objective):
    reads_data = False
    lora_target_modules = ("attn2.to_k",)  # model.lora default: adapters on the paper's trainable set only

    def __init__(self, cfg: SepEnConfig, ctx: BuildContext):
        cfg = resolve_sepen(cfg)
        self.sep, self.comps, self.dtype, self.device, self.rank = cfg, ctx.comps, ctx.dtype, ctx.device, ctx.rank
        self.micro_batch = ctx.micro_batch_size
        self.resolution = ctx.cfg.data.resolution
        unet = self.module = ctx.comps.unet
        try:
            self.plan = GroundingPlan.build(
                unet,
                blocks=["down", "mid", "up"],
                resolutions=[cfg.map_resolution],
                image_resolution=ctx.cfg.data.resolution,
                scale_factor=vae_scale_factor(ctx.comps.vae),
                layout=ctx.family.layout,
            )
        except ValueError:
            raise ValueError(
                f"objective.sepen.map_resolution={cfg.map_resolution}: no cross-attention layer has that latent side "
                f"at data.resolution={ctx.cfg.data.resolution}"
            ) from None
        for name, p in unet.named_parameters():
            p.requires_grad_(name.endswith(TRAINABLE_SUFFIXES))
        self.frozen = None
        if cfg.lambda_norm > 0:
            self.frozen = copy.deepcopy(unet).requires_grad_(False).to(ctx.device, ctx.dtype).eval()
        install_grounding_processors(unet, self.plan, "reference", ctx.cfg.attention.ungrounded)
        self.sampler = SepEnPromptSampler.from_concepts(
            cfg.concepts,
            split=None if cfg.concepts == "pairs" else cfg.split,
            pair_index=cfg.pair_index,
            num_objects=(2, cfg.objects_per_prompt),
            seed=ctx.cfg.seed,
            tokenizer=ctx.comps.tokenizer,
            style=prompt_style(cfg),
        )

    def batch(self, micro_step: int) -> dict:
        return self._prompts(micro_step, self.rank, self.micro_batch)

    def _prompts(self, micro_step: int, rank: int, count: int) -> dict:
        out = {"prompts": self.sampler.multi(micro_step, rank, count)}
        if self.frozen is not None:
            out["singles"] = self.sampler.single(micro_step, rank, count)
        return out

    def synthetic_batch(self, batch_size: int, *, phrases: int = 4) -> dict:
        """The prompts of micro-step 0 for `batch_size` samples (data-free: real prompts cost nothing)."""
        return self._prompts(0, 0, batch_size)

    def extra_modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.frozen,) if self.frozen is not None else ()

    @torch.no_grad()
    def _text(self, prompts: list[str]) -> Conditioning:
        """SDXL: data-free prompts are conditioned as uncropped images at the run's resolution."""
        tok = self.comps.tokenizer
        ids = tok(
            prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        side = self.resolution
        return encode_text(self.comps, ids, dtype=self.dtype, device=self.device, target_size=(side, side))

    def _noise_and_t(self, B: int, generator: torch.Generator):
        side = self.plan.input_side
        shape = (B, self.module.config.in_channels, side, side)
        z, t = sepen_latents(
            self.sep.latent, shape, self.comps.noise_scheduler, generator, device=self.device,
            scaling_factor=self.comps.vae.config.scaling_factor,
        )  # fmt: skip
        return z.to(self.dtype), t

    def __call__(self, model, batch: dict, generator: torch.Generator) -> StepOutput:
        prompts = batch["prompts"]
        cond = self._text([p.text for p in prompts])
        z, t = self._noise_and_t(len(prompts), generator)
        with ProbsRecorder(z.shape[-2:]) as rec:
            model(z, t, cond.text, added_cond_kwargs=cond.added_cond_kwargs, cross_attention_kwargs=rec.kwargs)
        losses = sepen_losses(
            [r.probs for r in rec.records],
            [list(p.token_positions) for p in prompts],
            sigma=self.sep.gaussian_sigma,
            kernel=self.sep.kernel,
        )
        loss = self.sep.lambda_sep * losses["sep"] + self.sep.lambda_en * losses["en"]
        terms = {"sep": losses["sep"], "en": losses["en"]}
        if self.frozen is not None:
            singles = batch["singles"]
            c1 = self._text([p.text for p in singles])
            z1, t1 = self._noise_and_t(len(singles), generator)
            pred = model(z1, t1, c1.text, added_cond_kwargs=c1.added_cond_kwargs).sample
            with torch.no_grad():
                ref = self.frozen(z1, t1, c1.text, added_cond_kwargs=c1.added_cond_kwargs).sample
            terms["norm"] = norm_loss(pred, ref)
            loss = loss + self.sep.lambda_norm * terms["norm"]
        return StepOutput(loss, terms)


def check_sepen_options(cfg) -> None:
    """Resolve the fidelity preset in place (the saved config.yaml shows the values), then check combinations."""
    sep = cfg.objective.sepen
    apply_preset(sep, FIDELITY_PRESETS, SECTION)
    if sep.objects_per_prompt < 2:
        raise ValueError(f"objective.sepen.objects_per_prompt must be >= 2, got {sep.objects_per_prompt}")
    if sep.prompts == "official" and sep.objects_per_prompt != 2 and sep.concepts != "pairs":
        raise ValueError(
            f"objective.sepen.prompts=official: the official templates name two objects; "
            f"objective.sepen.objects_per_prompt must be 2, got {sep.objects_per_prompt}"
        )
    if sep.pair_index is not None:
        if sep.concepts != "pairs":
            raise ValueError(
                f"objective.sepen.pair_index applies to objective.sepen.concepts=pairs, got concepts={sep.concepts!r}"
            )
        n = len(pair_concepts())
        if not 0 <= sep.pair_index < n:
            raise ValueError(
                f"objective.sepen.pair_index must be in [0, {n}) (concepts/pairs.txt), got {sep.pair_index}"
            )
    if cfg.attention.backend != "reference":
        raise ValueError(
            f"objective.name=sepen reads the attention probabilities: attention.backend must be 'reference', "
            f"got {cfg.attention.backend!r}"
        )


register_objective(
    "sepen",
    SepEnConfig,
    SepEnObjective,
    check=check_sepen_options,
    description="λ_sep L_sep + λ_en L_en (+ λ_n L_norm), attn2.to_k only, data-free (Bao et al., SIGGRAPH 2024)",
)
