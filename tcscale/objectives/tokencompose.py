"""TokenCompose objective: L = L_LDM + Σ_m (λ L_token^(m) + γ L_pixel^(m)) over the grounded layers (DESIGN §3).

The grounded layers come from `attention` (blocks, resolutions, mask rule) as a `GroundingPlan`; the loader makes
each batch's layer masks from the same plan. The L_LDM term is configured by `objective.ldm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tcscale.attention.plan import GroundingPlan, vae_scale_factor
from tcscale.attention.processors import install_grounding_processors
from tcscale.attention.recorders import LossRecorder
from tcscale.losses.grounding import TokenLossHeads
from tcscale.objectives.base import BuildContext, StepOutput, register_objective
from tcscale.objectives.ldm import LDMObjective, check_ldm_options


@dataclass
class TokenComposeConfig:
    token_loss_weight: float = 1e-3  # λ: weight of L_token, per grounded layer (paper 1e-3)
    pixel_loss_weight: float = 5e-5  # γ: weight of L_pixel, per grounded layer (paper 5e-5)
    token_loss_heads: TokenLossHeads = "mean_map"  # ratio on the head-averaged map (paper Eq. 5) | per_head (official)


class TokenComposeObjective(LDMObjective):
    """L_LDM plus the token and pixel losses of every grounded layer, summed over layers."""

    def __init__(self, cfg: TokenComposeConfig, ctx: BuildContext):
        super().__init__(ctx.cfg.objective.ldm, ctx)
        self.tc = cfg
        self.plan = GroundingPlan.from_config(
            self.module, ctx.cfg.attention, ctx.cfg.data.resolution, vae_scale_factor(ctx.comps.vae)
        )
        install_grounding_processors(self.module, self.plan, ctx.cfg.attention.backend)

    def __call__(self, model, batch: dict, generator: torch.Generator) -> StepOutput:
        nb = self.noised(batch, generator)
        layer_masks = {k: v.to(self.device) for k, v in (batch.get("layer_masks") or {}).items()}
        phrase_masks = batch.get("phrase_masks")
        with LossRecorder(
            tuple(nb.latents.shape[-2:]),
            batch["token_phrase"].to(self.device),
            layer_masks=layer_masks,
            phrase_masks=None if phrase_masks is None else phrase_masks.to(self.device),
            mask_rule=self.plan.mask_rule,
            token_loss_heads=self.tc.token_loss_heads,
        ) as rec:
            pred = model(nb.noisy, nb.timesteps, nb.text, cross_attention_kwargs=rec.kwargs).sample
        ldm = self.ldm_loss(pred, nb)
        token, pixel = rec.total("token"), rec.total("pixel")
        loss = ldm + self.tc.token_loss_weight * token + self.tc.pixel_loss_weight * pixel
        return StepOutput(loss, {"ldm": ldm, "token": token, "pixel": pixel})


register_objective(
    "tokencompose",
    TokenComposeConfig,
    TokenComposeObjective,
    check=check_ldm_options,
    description="L_LDM + λ L_token + γ L_pixel on the grounded cross-attention layers (Wang et al., CVPR 2024)",
)
