"""Separate-and-Enhance objective: L = λ_sep L_sep + λ_en L_en (+ λ_n L_norm), training attn2.to_k only.

Data-free: each micro-step draws K-object prompts from the concept list (a pure function of (seed, micro_step,
rank)), feeds z_t ~ N(0, I) at a random timestep, and reads the probabilities of every cross-attention layer at
`objective.sepen.map_resolution`. With lambda_norm > 0, single-concept prompts on fresh z_t keep the prediction
close to a frozen copy of the U-Net taken before training.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch

from tcscale.attention.plan import GroundingPlan, vae_scale_factor
from tcscale.attention.processors import install_grounding_processors
from tcscale.attention.recorders import ProbsRecorder
from tcscale.losses.sepen import norm_loss, sepen_losses
from tcscale.objectives.base import BuildContext, StepOutput, register_objective, unet_trainable_parameters
from tcscale.objectives.sepen_prompts import SepEnPromptSampler

TRAINABLE_SUFFIXES = ("attn2.to_k.weight", "attn2.to_k.bias")


@dataclass
class SepEnConfig:
    concepts: str = "pairs"  # "pairs" | "large" | path to a concept list (one object noun per line)
    split: Literal["seen", "unseen", "all"] = "seen"  # large-scale list split to train on
    objects_per_prompt: int = 2  # K >= 2 objects per composed prompt
    map_resolution: int = 16  # latent side of the maps L_sep / L_en use (16 for SD1.4 at 512 px)
    lambda_sep: float = 1.0  # weight of L_sep
    lambda_en: float = 0.5  # weight of L_en
    lambda_norm: float = 0.0  # weight of L_norm (0.5 for large-scale training; 0 disables the frozen copy)
    gaussian_sigma: float = 0.5  # sigma of the 3x3 Gaussian smoothing in L_en


class SepEnObjective:
    reads_data = False

    def __init__(self, cfg: SepEnConfig, ctx: BuildContext):
        self.sep, self.comps, self.dtype, self.device, self.rank = cfg, ctx.comps, ctx.dtype, ctx.device, ctx.rank
        self.micro_batch = ctx.micro_batch_size
        unet = self.module = ctx.comps.unet
        try:
            self.plan = GroundingPlan.build(
                unet,
                blocks=["down", "mid", "up"],
                resolutions=[cfg.map_resolution],
                image_resolution=ctx.cfg.data.resolution,
                scale_factor=vae_scale_factor(ctx.comps.vae),
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
        install_grounding_processors(unet, self.plan, "reference")
        self.sampler = SepEnPromptSampler.from_concepts(
            cfg.concepts,
            split=None if cfg.concepts == "pairs" else cfg.split,
            num_objects=(2, cfg.objects_per_prompt),
            seed=ctx.cfg.seed,
            tokenizer=ctx.comps.tokenizer,
        )

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return unet_trainable_parameters(self.module)

    def batch(self, micro_step: int) -> dict:
        out = {"prompts": self.sampler.multi(micro_step, self.rank, self.micro_batch)}
        if self.frozen is not None:
            out["singles"] = self.sampler.single(micro_step, self.rank, self.micro_batch)
        return out

    @torch.no_grad()
    def _text(self, prompts: list[str]) -> torch.Tensor:
        tok = self.comps.tokenizer
        ids = tok(
            prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        return self.comps.text_encoder(ids)[0].to(self.dtype)

    def _noise_and_t(self, B: int, generator: torch.Generator):
        side = self.plan.input_side
        channels = self.module.config.in_channels
        z = torch.randn((B, channels, side, side), generator=generator, device=self.device)
        T = self.comps.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, T, (B,), generator=generator, device=self.device).long()
        return z.to(self.dtype), t

    def __call__(self, model, batch: dict, generator: torch.Generator) -> StepOutput:
        prompts = batch["prompts"]
        text = self._text([p.text for p in prompts])
        z, t = self._noise_and_t(len(prompts), generator)
        with ProbsRecorder(z.shape[-2:]) as rec:
            model(z, t, text, cross_attention_kwargs=rec.kwargs)
        losses = sepen_losses(
            [r.probs for r in rec.records], [list(p.token_positions) for p in prompts], sigma=self.sep.gaussian_sigma
        )
        loss = self.sep.lambda_sep * losses["sep"] + self.sep.lambda_en * losses["en"]
        terms = {"sep": losses["sep"], "en": losses["en"]}
        if self.frozen is not None:
            singles = batch["singles"]
            text1 = self._text([p.text for p in singles])
            z1, t1 = self._noise_and_t(len(singles), generator)
            pred = model(z1, t1, text1).sample
            with torch.no_grad():
                ref = self.frozen(z1, t1, text1).sample
            terms["norm"] = norm_loss(pred, ref)
            loss = loss + self.sep.lambda_norm * terms["norm"]
        return StepOutput(loss, terms)


def check_sepen_options(cfg) -> None:
    sep = cfg.objective.sepen
    if sep.objects_per_prompt < 2:
        raise ValueError(f"objective.sepen.objects_per_prompt must be >= 2, got {sep.objects_per_prompt}")
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
