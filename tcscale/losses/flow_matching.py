"""Flow-matching (rectified flow) L_LDM of SD3-class models, as diffusers' SD3 training scripts compute it.

Per sample: u from the weighting scheme's density (`diffusers.training_utils.compute_density_for_timestep_sampling`:
uniform, ``logit_normal`` sigmoid(N(m, s)), or ``mode`` with its scale), the index ⌊u·T⌋ into the scheduler's
training table of shifted sigmas σ and timesteps t = σ·T (`FlowMatchEulerDiscreteScheduler` built from the run's
scheduler config, so a pipeline's `set_timesteps` never changes the table), the noisy latent
x_σ = (1 − σ)·x₀ + σ·ε and the velocity target ε − x₀. The loss is the mean over samples of
w(σ)·mean((v̂ − (ε − x₀))²), w from `diffusers.training_utils.compute_loss_weighting_for_sd3` (``sigma_sqrt``: σ⁻²,
``cosmap``: 2 / (π(1 − 2σ + 2σ²)), otherwise 1). docs/MMDIT.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

WeightingScheme = Literal["logit_normal", "none", "sigma_sqrt", "mode", "cosmap"]
WEIGHTING_SCHEMES: tuple[str, ...] = get_args(WeightingScheme)


@dataclass
class FlowMatchingConfig:
    """`objective.ldm.flow_matching` (model.family=sd3): diffusers' SD3 scripts' options and defaults."""

    weighting_scheme: WeightingScheme = "logit_normal"  # timestep density / loss weighting (diffusers' names)
    logit_mean: float = 0.0  # logit_normal: mean of the normal before the sigmoid
    logit_std: float = 1.0  # logit_normal: its standard deviation
    mode_scale: float = 1.29  # mode: the density's scale


def training_table(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (T,), sigmas (T,)) of a fresh `FlowMatchEulerDiscreteScheduler` of `scheduler`'s config, t = σ·T,
    σ decreasing from 1."""
    fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    return fresh.timesteps.float(), fresh.sigmas.float()


def flow_matching_noise(
    scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    generator: torch.Generator,
    cfg: FlowMatchingConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(timesteps (B,) float32, noisy latents (B, C, h, w), target ε − x₀, per-sample weights (B,)) of one micro-step;
    the one random draw (u) comes from `generator`."""
    B = latents.shape[0]
    u = compute_density_for_timestep_sampling(
        cfg.weighting_scheme, B, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, mode_scale=cfg.mode_scale,
        device=generator.device, generator=generator,
    )  # fmt: skip
    timesteps_all, sigmas_all = training_table(scheduler)
    T = len(sigmas_all)
    index = (u.cpu() * T).long().clamp(0, T - 1)
    timesteps = timesteps_all[index].to(latents.device)
    sigmas = sigmas_all[index].to(latents.device, latents.dtype).view(B, *([1] * (latents.ndim - 1)))
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    weights = compute_loss_weighting_for_sd3(cfg.weighting_scheme, sigmas).reshape(B).float()
    return timesteps, noisy, noise - latents, weights


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean_b w_b · mean((pred_b − target_b)²), in float32."""
    per_sample = (pred.float() - target.float()).pow(2).reshape(pred.shape[0], -1).mean(dim=1)
    return (weights.float() * per_sample).mean()
