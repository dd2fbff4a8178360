"""LDM-only objective: the latent-diffusion loss on the batch images, no grounding (docs/DESIGN.md §3 "LDM loss").

Its options (`objective.ldm`) also configure the L_LDM term of the objectives built on it (TokenCompose).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tcscale.attention.plan import vae_scale_factor
from tcscale.data.latent_cache import sample_latents
from tcscale.losses.diffusion import ldm_loss, sample_noise
from tcscale.losses.flow_matching import FlowMatchingConfig, flow_matching_loss
from tcscale.models.conditioning import (
    Conditioning,
    batch_conditioning,
    caption_dropout_mask,
    drop_captions,
    empty_caption_ids,
)
from tcscale.models.lora import ATTENTION_PROJECTIONS
from tcscale.objectives.base import BuildContext, Objective, StepOutput, register_objective


@dataclass
class LDMConfig:
    snr_gamma: float | None = None  # min-SNR weighting gamma (5.0 is the usual value); null -> plain MSE
    noise_offset: float = 0.0  # noise offset scale (0 disables)
    # model.family=sd3: the flow-matching timestep density and loss weighting (tcscale.losses.flow_matching)
    flow_matching: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)


@dataclass
class NoisedBatch:
    latents: torch.Tensor  # (B, C, h, w) float32 VAE latents x scaling factor
    timesteps: torch.Tensor  # (B,) int64, t ~ U{0..T-1} (flow matching: float t = σ·T)
    noisy: torch.Tensor  # (B, C, h, w) compute dtype: the U-Net input z_t
    target: torch.Tensor  # epsilon or v (flow matching: ε − x₀), float32
    text: torch.Tensor  # (B, 77, D) compute dtype: what attn2 reads (tcscale.models.conditioning)
    added_cond_kwargs: dict | None = None  # SDXL: text_embeds + micro-conditioning time_ids; SD3: pooled_projections
    weights: torch.Tensor | None = None  # (B,) per-sample loss weights (flow matching's scheme), None: plain / min-SNR
    # (B,) bool: the samples whose caption `data.caption_dropout` replaced by the empty one; None: none was
    dropped: torch.Tensor | None = None

    @property
    def cond(self) -> Conditioning:
        return Conditioning(self.text, self.added_cond_kwargs)


class LDMObjective(Objective):
    """L_LDM: ε- (or v-) prediction MSE, optional min-SNR weighting and noise offset. Trains the whole U-Net."""

    # model.lora default: every U-Net attention projection (self- and cross-attention), as diffusers' LoRA scripts
    lora_target_modules = ATTENTION_PROJECTIONS
    # data.caption_dropout: that fraction of the captions is replaced by the empty one (classifier-free guidance)
    caption_dropout = True

    def __init__(self, cfg: LDMConfig, ctx: BuildContext):
        self.ldm = cfg
        self.comps = ctx.comps
        self.family = ctx.family
        self.module = ctx.comps.unet
        self.dtype = ctx.dtype
        self.device = ctx.device
        self.resolution = ctx.cfg.data.resolution
        self.cached_latents = ctx.cfg.data.latents == "cached"  # the VAE is config only (weights on "meta")
        self.dropout_p = ctx.cfg.data.caption_dropout if type(self).caption_dropout else 0.0
        self._empty_ids: torch.Tensor | None = None
        self.install_attention(ctx)

    def install_attention(self, ctx: BuildContext) -> None:
        """The attention processors of the run: LDM-only grounds nothing, so only `attention.ungrounded` applies."""
        if ctx.cfg.attention.ungrounded != "sdpa":
            from tcscale.attention.processors import set_ungrounded_attention

            set_ungrounded_attention(self.module, ctx.cfg.attention.ungrounded)

    def synthetic_batch(self, batch_size: int, *, phrases: int = 4) -> dict:
        """Images at the run's resolution and captions of `phrases` two-token phrases (BOS, 2·phrases tokens, EOS
        padding), with each grounded layer's masks when the objective grounds layers."""
        B, side = batch_size, self.resolution
        tok = self.comps.tokenizer
        bos, eos = (tok.bos_token_id, tok.eos_token_id) if tok is not None else (49406, 49407)
        g = torch.Generator().manual_seed(0)
        input_ids = torch.full((B, 77), eos, dtype=torch.int64)
        input_ids[:, 0] = bos
        input_ids[:, 1 : 1 + 2 * phrases] = torch.randint(400, 40000, (B, 2 * phrases), generator=g)
        token_phrase = torch.full((B, 77), -1, dtype=torch.int64)
        for p in range(phrases):
            token_phrase[:, 1 + 2 * p : 3 + 2 * p] = p
        batch = {
            "input_ids": input_ids,
            "token_phrase": token_phrase,
            "keys": [f"synthetic{b}" for b in range(B)],
        }
        if (
            self.cached_latents
        ):  # data.latents=cached: the posterior's mean and log-variance (tcscale.data.latent_cache)
            vae = self.comps.vae.config
            shape = (
                B,
                vae.latent_channels,
                side // vae_scale_factor(self.comps.vae),
                side // vae_scale_factor(self.comps.vae),
            )
            batch["latent_mean"] = torch.randn(shape, generator=g)
            batch["latent_logvar"] = torch.full(shape, -2.0)
            batch["target_sizes"] = torch.tensor([[side, side]] * B)
        else:
            batch["pixel_values"] = torch.rand((B, 3, side, side), generator=g) * 2 - 1
        if self.plan is not None:
            batch["layer_masks"] = {
                size: torch.bernoulli(torch.full((B, phrases, size[0] * size[1]), 0.5), generator=g)
                for size in self.plan.layer_sizes
            }
        return batch

    @torch.no_grad()
    def noised(self, batch: dict, generator: torch.Generator) -> NoisedBatch:
        """Encode the batch (frozen VAE, or its cached posterior: `data.latents`, and the frozen text encoder), draw
        noise and timesteps from `generator`."""
        vae, scheduler = self.comps.vae, self.comps.noise_scheduler
        device = self.device
        if "latent_mean" in batch:  # the same draw as vae.encode(x).latent_dist.sample(generator) (latent_cache)
            mean = batch["latent_mean"].to(device, torch.float32)
            logvar = batch["latent_logvar"].to(device, torch.float32)
            latents = self.family.scale_latents(vae, sample_latents(mean, logvar, generator))
        else:
            latents = self.family.latents(vae, batch["pixel_values"].to(device, vae.dtype), generator)
        drop = self.drop_mask(batch, generator)
        if drop is not None:
            if self._empty_ids is None or self._empty_ids.shape[0] != batch["input_ids"].shape[1]:
                self._empty_ids = empty_caption_ids(self.comps.tokenizer, batch["input_ids"].shape[1])
            batch = {**batch, "input_ids": drop_captions(batch["input_ids"], drop, self._empty_ids)}
        cond = batch_conditioning(self.comps, batch, dtype=self.dtype, device=device)
        noise = sample_noise(latents, generator, self.ldm.noise_offset)
        timesteps, noisy, target, weights = self.family.noise_latents(scheduler, latents, noise, generator, self.ldm)
        return NoisedBatch(
            latents, timesteps, noisy.to(self.dtype), target, cond.text, cond.added_cond_kwargs, weights, drop
        )  # fmt: skip

    def drop_mask(self, batch: dict, generator: torch.Generator) -> torch.Tensor | None:
        """(B,) bool: which captions `data.caption_dropout` replaces by the empty caption (drawn from the micro-step's
        generator: resumes replay it); None when it drops none."""
        drop = caption_dropout_mask(generator, batch["input_ids"].shape[0], self.dropout_p)
        return drop if bool(drop.any()) else None

    def ldm_loss(self, pred: torch.Tensor, nb: NoisedBatch) -> torch.Tensor:
        if nb.weights is not None:
            return flow_matching_loss(pred, nb.target, nb.weights)
        return ldm_loss(pred, nb.target, nb.timesteps, self.comps.noise_scheduler, self.ldm.snr_gamma)

    def __call__(self, model, batch: dict, generator: torch.Generator) -> StepOutput:
        nb = self.noised(batch, generator)
        pred = self.family.denoise(model, nb.noisy, nb.timesteps, nb.cond)
        ldm = self.ldm_loss(pred, nb)
        return StepOutput(ldm, {"ldm": ldm})


def check_ldm_options(cfg) -> None:
    if cfg.objective.ldm.noise_offset < 0:
        raise ValueError(f"objective.ldm.noise_offset must be >= 0, got {cfg.objective.ldm.noise_offset}")
    from tcscale.families import family_of

    if not family_of(cfg.model).flow_matching:
        return
    family = cfg.model.family
    if cfg.objective.ldm.snr_gamma is not None:
        raise ValueError(
            f"objective.ldm.snr_gamma: min-SNR weighting is for DDPM schedules; model.family={family} trains with "
            "flow matching, weighted by objective.ldm.flow_matching.weighting_scheme"
        )
    if cfg.model.prediction_type is not None:
        raise ValueError(f"model.prediction_type: model.family={family} predicts the flow-matching velocity; set null")


register_objective("ldm", LDMConfig, LDMObjective, check=check_ldm_options, description="L_LDM only (the baseline)")
