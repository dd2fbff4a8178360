"""TokenCompose objective: L = L_LDM + sum_m (lambda L_token^(m) + gamma L_pixel^(m)); with no layers, LDM only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tcscale.attention.grounding_processor import GroundingContext
from tcscale.config import AttentionConfig, ObjectiveConfig
from tcscale.losses.diffusion import diffusion_target, ldm_loss, sample_noise
from tcscale.models.sd import SDComponents


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar the engine backpropagates
    terms: dict[str, torch.Tensor]  # named scalar terms (detached use only), e.g. {"ldm": .., "token": ..}


class DiffusionObjective:
    """LDM loss on VAE latents of the batch images, plus the grounding terms when a collector is given."""

    def __init__(
        self,
        comps: SDComponents,
        cfg: ObjectiveConfig,
        attention: AttentionConfig | None,
        compute_dtype: torch.dtype,
        layer_names: list[str] = (),
    ):
        """attention: the grounding options, or None for LDM-only (no grounding processors installed)."""
        self.comps = comps
        self.cfg = cfg
        self.attention = attention
        self.compute_dtype = compute_dtype
        self.layer_names = list(layer_names)  # the grounded attn2 layers (processors installed by the trainer)

    def trainable_parameters(self, unet: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in unet.parameters() if p.requires_grad]

    @torch.no_grad()
    def encode(
        self, batch: dict, device: torch.device, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        vae, text_encoder = self.comps.vae, self.comps.text_encoder
        pixels = batch["pixel_values"].to(device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor
        text = text_encoder(batch["input_ids"].to(device))[0]
        return latents.float(), text.to(self.compute_dtype)

    def __call__(self, unet, batch: dict, device: torch.device, generator: torch.Generator) -> StepOutput:
        latents, text = self.encode(batch, device, generator)
        scheduler = self.comps.noise_scheduler
        noise = sample_noise(latents, generator, self.cfg.noise_offset)
        B = latents.shape[0]
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (B,), generator=generator, device=device
        ).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(scheduler, latents, noise, timesteps)

        if self.attention is None:
            pred = unet(noisy.to(self.compute_dtype), timesteps, text).sample
            ldm = ldm_loss(pred, target, timesteps, scheduler, self.cfg.snr_gamma)
            return StepOutput(ldm, {"ldm": ldm})

        att = self.attention
        ctx = GroundingContext(
            latent_size=tuple(latents.shape[-2:]),
            token_phrase=batch["token_phrase"].to(device),
            phrase_masks=batch.get("phrase_masks"),
            layer_masks={k: v.to(device) for k, v in (batch.get("layer_masks") or {}).items()},
            token_loss_heads=att.token_loss_heads,
            mask_interpolation=att.mask_interpolation,
            mask_threshold=att.mask_threshold,
        )
        ctx.check_token_phrase()  # once per batch; the grounded layers then never synchronise to validate it
        pred = unet(noisy.to(self.compute_dtype), timesteps, text, cross_attention_kwargs={"grounding": ctx}).sample
        ctx.recording = False  # an activation checkpoint's recompute during backward must not record again
        records = ctx.records
        if not records:
            raise RuntimeError("tokencompose: no grounded layer recorded a loss (are the processors installed?)")
        ldm = ldm_loss(pred, target, timesteps, scheduler, self.cfg.snr_gamma)
        token = torch.stack([r.token for r in records]).sum()
        pixel = torch.stack([r.pixel for r in records]).sum()
        loss = ldm + self.cfg.token_loss_weight * token + self.cfg.pixel_loss_weight * pixel
        return StepOutput(loss, {"ldm": ldm, "token": token, "pixel": pixel})
