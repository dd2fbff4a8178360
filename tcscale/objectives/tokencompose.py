"""TokenCompose objective: L = L_LDM + Σ_m (λ L_token^(m) + γ L_pixel^(m)) over the grounded layers (docs/DESIGN.md §3).

The grounded layers come from `attention` (blocks, resolutions, mask rule) as a `GroundingPlan`; the loader makes
each batch's layer masks from the same plan. The L_LDM term is configured by `objective.ldm`.

Paper or official code (docs/FIDELITY.md): `fidelity: paper | official` sets `token_loss_heads`,
`pixel_loss_reduction` and `mask_full_res` at once; each left null takes the preset's value, one set explicitly
wins. With `pixel_loss_reduction: per_resolution` the pixel term is computed once per (place, resolution) group
(mid_8, up_16, up_32, up_64 on SD1.4) on the map averaged over the group's layers and heads, as the official
`get_grounding_loss_by_layer` does; the token term stays a sum over layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tcscale.attention.masks import MaskFullRes
from tcscale.attention.plan import GroundingPlan, vae_scale_factor
from tcscale.attention.recorders import GroupedLossRecorder, LossRecorder
from tcscale.losses.grounding import PixelLossReduction, TokenLossHeads
from tcscale.models.conditioning import drop_phrases
from tcscale.objectives.base import BuildContext, StepOutput, register_objective
from tcscale.objectives.fidelity import Fidelity, apply_preset, resolved
from tcscale.objectives.ldm import LDMObjective, NoisedBatch, check_ldm_options

FIDELITY_PRESETS: dict[str, dict[str, str]] = {
    "paper": {"token_loss_heads": "mean_map", "pixel_loss_reduction": "per_layer", "mask_full_res": "binary"},
    "official": {"token_loss_heads": "per_head", "pixel_loss_reduction": "per_resolution", "mask_full_res": "soft"},
}
"""What `objective.tokencompose.fidelity` sets (docs/FIDELITY.md has the source of every row)."""
SECTION = "objective.tokencompose"


@dataclass
class TokenComposeConfig:
    token_loss_weight: float = 1e-3  # λ: weight of L_token, per grounded layer (paper 1e-3)
    pixel_loss_weight: float = 5e-5  # γ: weight of L_pixel, per grounded layer (or group, per_resolution) (5e-5)
    fidelity: Fidelity = "paper"  # preset for the three options below: paper | official (docs/FIDELITY.md)
    # ratio on the head-averaged map (paper Eq. 5) | per_head (official); null -> from the preset
    token_loss_heads: TokenLossHeads | None = None
    # L_pixel per layer (paper Eq. 7) | per_resolution: once per (place, resolution) group (official); null -> preset
    pixel_loss_reduction: PixelLossReduction | None = None
    # 512-px mask before the layer resize: binary (at 0.5) | soft (normalised to max 1, official); null -> preset
    mask_full_res: MaskFullRes | None = None
    # ground only the samples whose timestep t >= this (t in the noise schedule's 0..T-1; flow matching: sigma*T); the
    # others train with L_LDM alone. 0 (the paper's and the official code's): every sample (docs/FIDELITY.md)
    grounding_min_timestep: float = 0.0


def resolve_tokencompose(cfg: TokenComposeConfig) -> TokenComposeConfig:
    """A copy with every preset-driven option set (the config check does this in place at load time)."""
    return resolved(cfg, FIDELITY_PRESETS, SECTION)


class TokenComposeObjective(LDMObjective):
    """L_LDM plus the token and pixel losses of every grounded layer (or group of layers), summed."""

    # data.caption_dropout: a sample whose caption is dropped trains the unconditional branch with L_LDM alone; its
    # phrases leave the grounding losses (its token_phrase row is -1: no phrase, so it is out of their batch mean)
    caption_dropout = True

    def __init__(self, cfg: TokenComposeConfig, ctx: BuildContext):
        self.tc = resolve_tokencompose(cfg)
        super().__init__(ctx.cfg.objective.ldm, ctx)

    def install_attention(self, ctx: BuildContext) -> None:
        """Grounding processors on the plan's layers (`attention.backend`), `attention.ungrounded` elsewhere."""
        self.plan = GroundingPlan.from_config(
            self.module,
            ctx.cfg.attention,
            ctx.cfg.data.resolution,
            vae_scale_factor(ctx.comps.vae),
            mask_full_res=self.tc.mask_full_res,
            layout=ctx.family.layout,
        )
        ctx.family.install_grounding(self.module, self.plan, ctx.cfg.attention)
        self.attention = ctx.cfg.attention

    @property
    def phrase_device(self) -> torch.device:
        """Where masks and token-phrase indices go: the run's device, except on the meta device (the memory
        planner), where they stay on the host because the losses read their values."""
        return torch.device("cpu") if self.device.type == "meta" else self.device

    def grounded_token_phrase(self, batch: dict, ungrounded: torch.Tensor | None) -> torch.Tensor:
        """(B, keys) phrase index of every text key the grounded layers read (an MMDiT's: CLIP then T5 positions;
        tcscale.families), -1 elsewhere and on every key of an `ungrounded` sample."""
        token_phrase = self.family.key_token_phrase(
            self.comps, batch["input_ids"], batch["token_phrase"], self.attention
        ).to(self.phrase_device)
        return token_phrase if ungrounded is None else drop_phrases(token_phrase, ungrounded)

    def ungrounded(self, nb: NoisedBatch) -> torch.Tensor | None:
        """(B,) bool: the samples that ground no phrase (their caption was dropped, or their timestep is below
        `grounding_min_timestep`); None when every sample grounds its phrases."""
        out = nb.dropped
        # on the meta device (the memory planner) timesteps have no values; which rows ground changes no buffer size
        if self.tc.grounding_min_timestep > 0 and nb.timesteps.device.type != "meta":
            early = nb.timesteps < self.tc.grounding_min_timestep  # stays on the device: drop_phrases moves it, no sync
            out = early if out is None else out.to(early.device) | early
        return out

    def recorder(
        self, latent_size: tuple[int, int], batch: dict, ungrounded: torch.Tensor | None = None
    ) -> LossRecorder:
        """The recorder of one micro-step: per layer (paper) or per (place, resolution) group (official pixel loss).
        `ungrounded` (B,) bool: the samples that ground no phrase (from the method `ungrounded`)."""
        device = self.phrase_device
        layer_masks = {k: v.to(device) for k, v in (batch.get("layer_masks") or {}).items()}
        phrase_masks = batch.get("phrase_masks")
        kwargs = dict(
            layer_masks=layer_masks,
            phrase_masks=None if phrase_masks is None else phrase_masks.to(device),
            mask_rule=self.plan.mask_rule,
            token_loss_heads=self.tc.token_loss_heads,
        )
        token_phrase = self.grounded_token_phrase(batch, ungrounded)
        if self.tc.pixel_loss_reduction == "per_resolution":
            return GroupedLossRecorder(
                latent_size, token_phrase, groups=self.plan.groups(), pixel_loss_reduction="per_resolution", **kwargs
            )
        return LossRecorder(latent_size, token_phrase, **kwargs)

    def __call__(self, model, batch: dict, generator: torch.Generator) -> StepOutput:
        nb = self.noised(batch, generator)
        with self.recorder(tuple(nb.latents.shape[-2:]), batch, self.ungrounded(nb)) as rec:
            pred = self.family.denoise(model, nb.noisy, nb.timesteps, nb.cond, rec.kwargs)
        ldm = self.ldm_loss(pred, nb)
        token, pixel = rec.total("token"), rec.total("pixel")
        loss = ldm + self.tc.token_loss_weight * token + self.tc.pixel_loss_weight * pixel
        return StepOutput(loss, {"ldm": ldm, "token": token, "pixel": pixel}, held=rec.held())


def check_tokencompose_options(cfg) -> None:
    """Resolve the fidelity preset in place (the saved config.yaml shows the values), then check combinations."""
    check_ldm_options(cfg)
    tc = cfg.objective.tokencompose
    filled = apply_preset(tc, FIDELITY_PRESETS, SECTION)
    if tc.grounding_min_timestep < 0:
        raise ValueError(f"{SECTION}.grounding_min_timestep must be >= 0, got {tc.grounding_min_timestep}")
    if tc.pixel_loss_reduction == "per_resolution" and cfg.attention.backend == "fused":
        source = f" (from objective.tokencompose.fidelity={tc.fidelity})" if "pixel_loss_reduction" in filled else ""
        raise ValueError(
            f"objective.tokencompose.pixel_loss_reduction=per_resolution{source} needs the attention probabilities "
            "of every layer of a group, which attention.backend=fused never materialises: set "
            "attention.backend=reference or objective.tokencompose.pixel_loss_reduction=per_layer"
        )


register_objective(
    "tokencompose",
    TokenComposeConfig,
    TokenComposeObjective,
    check=check_tokencompose_options,
    description="L_LDM + λ L_token + γ L_pixel on the grounded cross-attention layers (Wang et al., CVPR 2024)",
)
