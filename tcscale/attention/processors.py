"""Cross-attention processors of the grounded layers, and their installation on a U-Net.

`GroundingAttnProcessor` is installed on the attn2 layers of a `GroundingPlan`: with a recorder in the call's
``cross_attention_kwargs["grounding"]`` (``tcscale.attention.recorders``) it hands q, k, v to the recorder, which
computes the attention output and keeps its losses, probabilities or maps; without one (validation images, frozen
copies, exported pipelines) it runs plain SDPA. Every other attention layer gets `PlainAttnProcessor`, SDPA that
accepts (and ignores) the ``grounding`` keyword, so one ``cross_attention_kwargs`` dict reaches every layer.

Backends of the grounded layers: ``reference`` (probabilities materialised, ``tcscale.attention.reference``) or
``fused`` (the Triton kernel ``kernels.cross_attention_with_grounding``; no B x H x Lq x Lk tensor kept).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, XFormersAttnProcessor

from tcscale.attention.config import GROUNDED_BACKENDS, UNGROUNDED_ATTENTION
from tcscale.attention.plan import GroundingPlan, cross_attention_layers
from tcscale.attention.recorders import Recorder


class PlainAttnProcessor(AttnProcessor2_0):
    """SDPA for the layers that are not grounded; accepts (and ignores) the recorder."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        grounding: Recorder | None = None,
        **kwargs,
    ):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


class GroundingAttnProcessor:
    """attn2 processor: the attention computed by the call's recorder (or SDPA without one)."""

    def __init__(self, name: str, backend: str = "reference"):
        if backend not in GROUNDED_BACKENDS:
            raise ValueError(f"attention.backend={backend!r}: grounded layers support {list(GROUNDED_BACKENDS)}")
        self.name = name
        self.backend = backend

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
        if encoder_hidden_states is None or attention_mask is not None or attn.spatial_norm is not None:
            raise ValueError(f"{self.name}: grounding processors are for plain cross-attention (attn2) layers")
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            B, C, h4, w4 = hidden_states.shape
            hidden_states = hidden_states.view(B, C, h4 * w4).transpose(1, 2)
        B, Lq, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        q = query.view(B, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, Lq, d)
        k = key.view(B, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, Lk, d)
        v = value.view(B, -1, attn.heads, head_dim).transpose(1, 2)

        if grounding is None:
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        else:
            out = grounding.attend(self.name, q, k, v, attn.scale, self.backend)

        out = out.transpose(1, 2).reshape(B, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(B, C, h4, w4)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class XFormersPlainProcessor(XFormersAttnProcessor):
    """xformers' memory-efficient attention (diffusers' processor) for the layers that are not grounded; accepts
    (and ignores) the recorder. Needs the xformers package and a CUDA GPU (no CPU kernels)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 grounding: Recorder | None = None, **kwargs):  # fmt: skip
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def ungrounded_processor(kind: str):
    """The processor of a layer no objective reads: SDPA (default) or xformers."""
    if kind not in UNGROUNDED_ATTENTION:
        raise ValueError(f"attention.ungrounded={kind!r} is not one of {list(UNGROUNDED_ATTENTION)}")
    return XFormersPlainProcessor() if kind == "xformers" else PlainAttnProcessor()


def check_backend_available(backend: str, on_meta: bool = False) -> None:
    """The fused backend needs a CUDA GPU or the Triton interpreter (not on the meta device, where its launches are
    planned, not run): a clear error naming the config key."""
    if backend != "fused" or on_meta:
        return
    try:
        from kernels import triton_available
    except ImportError as exc:
        raise RuntimeError(f"attention.backend=fused needs Triton and the tcscale kernels package: {exc}") from exc
    if not triton_available():
        raise RuntimeError(
            "attention.backend=fused needs a CUDA GPU (or the Triton CPU interpreter, TRITON_INTERPRET=1, for "
            "tests); use attention.backend=reference on this machine"
        )


def install_grounding_processors(
    unet: torch.nn.Module, plan: GroundingPlan | list[str], backend: str, ungrounded: str = "sdpa"
) -> None:
    """Grounding processors on the plan's attn2 layers (or a list of names); every other attention layer gets the
    `ungrounded` implementation (SDPA or xformers) that accepts (and ignores) the ``grounding`` keyword."""
    check_backend_available(backend, on_meta=any(p.is_meta for p in unet.parameters()))
    layers = list(plan.layers if isinstance(plan, GroundingPlan) else plan)
    if not layers:
        raise ValueError("no cross-attention layer matches attention.blocks / attention.resolutions")
    unknown = [n for n in layers if n not in cross_attention_layers(unet)]
    if unknown:
        raise KeyError(f"not cross-attention layers of this U-Net: {unknown}")
    for name, mod in unet.named_modules():
        if isinstance(mod, Attention):
            mod.set_processor(
                GroundingAttnProcessor(name, backend) if name in layers else ungrounded_processor(ungrounded)
            )


def set_ungrounded_attention(unet: torch.nn.Module, kind: str) -> None:
    """Every attention layer without a grounding processor gets the `kind` implementation (an LDM-only run)."""
    for mod in unet.modules():
        if isinstance(mod, Attention) and not isinstance(mod.processor, GroundingAttnProcessor):
            mod.set_processor(ungrounded_processor(kind))


def observe(unet: torch.nn.Module, plan: GroundingPlan) -> None:
    """Make the plan's layers hand their attention to a recorder (for maps): reference processors where a layer has
    none yet (without a recorder they compute plain SDPA, so the model's outputs do not change); other layers keep
    their implementation, made to accept the ``grounding`` keyword where they do not."""
    for name, mod in unet.named_modules():
        if not isinstance(mod, Attention):
            continue
        if name in plan.layers:
            if not isinstance(mod.processor, GroundingAttnProcessor):
                mod.set_processor(GroundingAttnProcessor(name, "reference"))
        elif not isinstance(mod.processor, (PlainAttnProcessor, XFormersPlainProcessor, GroundingAttnProcessor)):
            mod.set_processor(PlainAttnProcessor())
