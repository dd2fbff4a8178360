"""Grounding maps of an MMDiT's joint-attention layers (SD3 / SD3.5), and the processors that hand them to a recorder.

In a joint-attention layer the queries and keys are the image tokens (N of them, first) and the text tokens (M,
after them) in one softmax (diffusers' `JointAttnProcessor2_0`). The grounding map of the layer is the image-query x
text-key block of that softmax, read one of two ways (docs/MMDIT.md):

* ``joint``: the probabilities as they are, P[u, N + i] (a row sums to the mass the image query gives all text keys,
  below 1);
* ``text``: that block renormalised over the text keys, P[u, N + i] / Σ_j P[u, N + j] — exactly the softmax of the
  image query's scores against the text keys alone, what a U-Net's cross-attention (attn2) gives.

Either way the map is (B, H, N, M) per head, float32, in the graph; the recorders (tcscale.attention.recorders) take
it through ``Recorder.ground`` and compute the TokenCompose losses (docs/DESIGN.md §3) or the heat maps from it as
from a cross-attention layer's probabilities. Reference backend only: the (B, H, N + M, N + M) probabilities are
materialised (benchmarks/gpu/NOTES.md says what a fused kernel would need).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

from tcscale.attention.config import JOINT_READINGS
from tcscale.attention.reference import attention_probs


def image_text_map(probs: torch.Tensor, num_image: int, reading: str = "text") -> torch.Tensor:
    """(B, H, N, M) grounding map from joint probabilities (B, H, N + M, N + M) with the N image tokens first."""
    if reading not in JOINT_READINGS:
        raise ValueError(f"attention.joint_reading={reading!r} is not one of {list(JOINT_READINGS)}")
    block = probs[:, :, :num_image, num_image:]  # image queries x text keys
    return block / block.sum(dim=-1, keepdim=True) if reading == "text" else block


def joint_attention_with_map(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, num_image: int, reading: str = "text"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, N + M, d) in v's dtype, grounding map (B, H, N, M) float32) of joint attention with explicit
    probabilities (softmax in float32, as the cross-attention reference)."""
    probs = attention_probs(q, k, scale, torch.float32)  # (B, H, N + M, N + M)
    return torch.matmul(probs.to(v.dtype), v), image_text_map(probs, num_image, reading)


def _joint_qkv(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """q, k, v (B, H, N [+ M], d) of a joint layer: image projections, qk-norm, then the context's, concatenated
    after the image tokens (the order `JointAttnProcessor2_0` uses)."""
    B = hidden_states.shape[0]
    heads = attn.heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(B, -1, heads, x.shape[-1] // heads).transpose(1, 2)

    q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if encoder_hidden_states is not None:
        cq = split(attn.add_q_proj(encoder_hidden_states))
        ck = split(attn.add_k_proj(encoder_hidden_states))
        cv = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
    return q, k, v


def _joint_out(attn: Attention, out: torch.Tensor, num_image: int, joint: bool):
    """The layer's outputs from the (B, H, N + M, d) attention output: image part through to_out, the context part
    through to_add_out (unless the block is `context_pre_only`), as `JointAttnProcessor2_0`."""
    B, H, L, d = out.shape
    out = out.transpose(1, 2).reshape(B, L, H * d)
    image, context = out[:, :num_image], out[:, num_image:]
    image = attn.to_out[1](attn.to_out[0](image))
    if not joint:
        return image
    if not attn.context_pre_only:
        context = attn.to_add_out(context)
    return image, context


class JointGroundingAttnProcessor:
    """A grounded joint-attention layer: explicit probabilities, the grounding map handed to the call's recorder
    (``joint_attention_kwargs={"grounding": recorder}``); without a recorder, SDPA as diffusers computes it."""

    def __init__(self, name: str, reading: str = "text"):
        if reading not in JOINT_READINGS:
            raise ValueError(f"attention.joint_reading={reading!r} is not one of {list(JOINT_READINGS)}")
        self.name = name
        self.reading = reading

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 grounding=None, **kwargs):  # fmt: skip
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError(f"{self.name}: joint grounding processors are for joint (image + text) attention layers")
        num_image = hidden_states.shape[1]
        q, k, v = _joint_qkv(attn, hidden_states, encoder_hidden_states)
        if grounding is None:
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        else:
            out, attn_map = joint_attention_with_map(q, k, v, attn.scale, num_image, self.reading)
            grounding.ground(self.name, attn_map)
        return _joint_out(attn, out.to(q.dtype), num_image, joint=True)


class PlainJointAttnProcessor(JointAttnProcessor2_0):
    """diffusers' joint (or image-only) attention for the layers that are not grounded; accepts (and ignores) the
    recorder, so one ``joint_attention_kwargs`` dict reaches every layer without diffusers' unused-kwarg warning."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, grounding=None, **kwargs):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


def install_joint_grounding_processors(denoiser: torch.nn.Module, plan, attention) -> None:
    """`JointGroundingAttnProcessor` on the plan's layers (``attention.joint_reading``), `PlainJointAttnProcessor`
    on every other attention module (the other joint layers, SD3.5's image-only attn2). Reference backend only."""
    if attention.backend != "reference":
        raise ValueError(
            f"attention.backend={attention.backend!r}: joint-attention layers (model.family=sd3) have the reference "
            "backend only (no fused joint-attention kernel yet; benchmarks/gpu/NOTES.md)"
        )
    if attention.ungrounded != "sdpa":
        raise ValueError(f"attention.ungrounded={attention.ungrounded!r}: joint-attention layers use sdpa only")
    for name, mod in denoiser.named_modules():
        if isinstance(mod, Attention):
            if name in plan.layers:
                mod.set_processor(JointGroundingAttnProcessor(name, attention.joint_reading))
            else:
                mod.set_processor(PlainJointAttnProcessor())


def observe_joint(denoiser: torch.nn.Module, plan, reading: str = "text") -> None:
    """Make the plan's joint layers hand their grounding maps to a recorder (validation and evaluation maps): a
    `JointGroundingAttnProcessor` of `reading` where a layer has none yet (without a recorder it computes diffusers'
    SDPA, so the outputs do not change); a layer grounded already keeps its processor (and its run's reading); every
    other attention module gets `PlainJointAttnProcessor`, which accepts the recorder keyword."""
    for name, mod in denoiser.named_modules():
        if not isinstance(mod, Attention):
            continue
        if name in plan.layers:
            if not isinstance(mod.processor, JointGroundingAttnProcessor):
                mod.set_processor(JointGroundingAttnProcessor(name, reading))
        elif not isinstance(mod.processor, (PlainJointAttnProcessor, JointGroundingAttnProcessor)):
            mod.set_processor(PlainJointAttnProcessor())
