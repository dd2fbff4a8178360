"""The official-style replica provider: how the official TokenCompose training computes attention, for memory
planning and throughput comparison (written from the description in docs/DESIGN.md §7, not from the official code).

* every attention layer, self-attention included, computes ``softmax(Q Kᵀ · scale) V`` with explicit probabilities
  (`ExplicitAttnProcessor`): autograd keeps each layer's B x H x Lq x Lk probabilities;
* the grounded cross-attention layers hand their probabilities to a `GroupedLossRecorder`, which keeps every
  layer's maps until the losses are read after the forward (the official code collects all maps, then computes
  the losses per (place, resolution) group: token loss per head, pixel loss on the group's averaged map);
* fp32, micro-batch 1 x gradient accumulation 4, no activation checkpointing (`OFFICIAL_OVERRIDES`; the planner's
  tables vary dtype and checkpointing on top of it).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention

from tcscale.attention.plan import GroundingPlan, layer_size
from tcscale.attention.processors import GroundingAttnProcessor
from tcscale.attention.recorders import GroupedLossRecorder, LayerProbs, Recorder
from tcscale.attention.reference import attention_probs
from tcscale.objectives.tokencompose import TokenComposeObjective

OFFICIAL_OVERRIDES: tuple[str, ...] = (
    "objective.name=tokencompose",
    "objective.tokencompose.fidelity=official",
    "attention.backend=reference",
    "deepspeed.bf16.enabled=false",
    "deepspeed.fp16.enabled=false",
    "deepspeed.train_micro_batch_size_per_gpu=1",
    "deepspeed.gradient_accumulation_steps=4",
    "model.gradient_checkpointing=false",
)
"""Config overrides of the official setup; a user's own overrides come after them and win."""


class ExplicitAttnProcessor:
    """``softmax(Q Kᵀ · scale) V`` with the probabilities materialised, for self- and cross-attention alike; the
    softmax in the compute dtype. Accepts (and ignores) the ``grounding`` keyword of tcscale's processors."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        grounding: Recorder | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if attention_mask is not None or attn.spatial_norm is not None:
            raise ValueError("ExplicitAttnProcessor handles the SD U-Net's unmasked attention only")
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            B, C, h4, w4 = hidden_states.shape
            hidden_states = hidden_states.view(B, C, h4 * w4).transpose(1, 2)
        B = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        q = query.view(B, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, Lq, d)
        k = key.view(B, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, Lk, d)
        v = value.view(B, -1, attn.heads, head_dim).transpose(1, 2)
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * attn.scale, dim=-1)  # (B, H, Lq, Lk)
        out = torch.matmul(probs, v)
        out = out.transpose(1, 2).reshape(B, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(B, C, h4, w4)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class KeptMapsRecorder(GroupedLossRecorder):
    """The official way of keeping the grounded layers' maps: each layer's probabilities in the compute dtype (the
    same softmax as every other layer), all kept until the losses are read after the forward."""

    def attend(self, layer, q, k, v, scale, backend):
        probs = attention_probs(q, k, scale)  # (B, H, Lq, Lk), q's dtype
        if self.recording:
            if layer not in self.group_of:
                raise KeyError(f"{layer} is in no grounding group {sorted(set(self.group_of.values()))}")
            self.layer_probs.append(LayerProbs(layer, layer_size(q.shape[2], self.latent_size), probs))
            self._totals = None
        return torch.matmul(probs, v)


def install_official_processors(unet: torch.nn.Module, plan: GroundingPlan) -> None:
    """Explicit probabilities everywhere: the plan's attn2 layers get grounding processors (their recorder, a
    `GroupedLossRecorder`, materialises and keeps the maps), every other attention layer `ExplicitAttnProcessor`."""
    for name, mod in unet.named_modules():
        if isinstance(mod, Attention):
            mod.set_processor(
                GroundingAttnProcessor(name, "reference") if name in plan.layers else ExplicitAttnProcessor()
            )


class OfficialTokenComposeObjective(TokenComposeObjective):
    """TokenCompose trained the official way (see the module docstring): explicit probabilities in every attention
    layer, and every grounded layer's maps kept until the losses are read (`KeptMapsRecorder`, the pixel loss per
    (place, resolution) group)."""

    def install_attention(self, ctx) -> None:
        super().install_attention(ctx)  # the plan, from the run's attention section
        install_official_processors(self.module, self.plan)

    def recorder(
        self, latent_size: tuple[int, int], batch: dict, ungrounded: torch.Tensor | None = None
    ) -> KeptMapsRecorder:
        layer_masks = {k: v.to(self.phrase_device) for k, v in (batch.get("layer_masks") or {}).items()}
        return KeptMapsRecorder(
            latent_size, self.grounded_token_phrase(batch, ungrounded), groups=self.plan.groups(),
            pixel_loss_reduction="per_resolution", layer_masks=layer_masks, mask_rule=self.plan.mask_rule,
            token_loss_heads=self.tc.token_loss_heads,
        )  # fmt: skip
