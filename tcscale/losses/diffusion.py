"""Latent-diffusion (LDM) loss: epsilon / v-prediction MSE, optional min-SNR weighting and noise offset."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`; with noise offset, plus offset * N(0, 1) per (sample, channel)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        B, C = latents.shape[:2]
        offset = torch.randn((B, C, 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    return noise


def diffusion_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the U-Net is trained to predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} (use epsilon or v_prediction)")


def ldm_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """MSE between prediction and target, in fp32; min-SNR-gamma weighted per sample when snr_gamma is set."""
    model_pred, target = model_pred.float(), target.float()
    if snr_gamma is None:
        return F.mse_loss(model_pred, target, reduction="mean")
    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma)
    if scheduler.config.prediction_type == "epsilon":
        weights = weights / snr
    elif scheduler.config.prediction_type == "v_prediction":
        weights = weights / (snr + 1)
    per_sample = F.mse_loss(model_pred, target, reduction="none").mean(dim=list(range(1, model_pred.ndim)))
    return (per_sample * weights).mean()
