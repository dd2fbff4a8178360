"""Cross-attention processors that compute the TokenCompose grounding losses per layer.

The objective passes a `GroundingContext` to one U-Net forward as
`cross_attention_kwargs={"grounding": ctx}`; each grounding processor computes its layer's
token/pixel losses from the phrase masks at its own resolution and records them into the context.
Because the context travels as a forward argument, a non-reentrant activation checkpoint re-runs
exactly the same computation during backward; the objective clears `ctx.recording` after the
forward, so the recompute records nothing twice.

Backends: "reference" computes the probabilities explicitly and calls
`tcscale.losses.grounding_losses`; "fused" calls the Triton kernel
`kernels.cross_attention_with_grounding` (no B x H x Lq x Lk tensor kept). Without a context
(validation, frozen copies) the processors run plain SDPA.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from tcscale.attention.masks import masks_to_layer
from tcscale.losses.grounding import check_token_phrase, grounding_losses

_BLOCK_RE = re.compile(r"^(down_blocks|mid_block|up_blocks)")


@dataclass
class LayerRecord:
    name: str
    size: tuple[int, int]
    token: torch.Tensor | None = None  # this layer's token loss (mode "grounding")
    pixel: torch.Tensor | None = None  # this layer's pixel loss (mode "grounding")
    probs: torch.Tensor | None = None  # (B, H, Lq, Lk) probabilities kept in the graph (mode "probs", SepEn)


@dataclass
class GroundingContext:
    """What one U-Net forward needs to ground its attention; passed as `cross_attention_kwargs["grounding"]`.

    Modes: "grounding" records each layer's token/pixel losses; "probs" records the probabilities
    (SepEn); "capture" sums detached head-averaged maps per layer (validation heatmaps).
    """

    latent_size: tuple[int, int]  # (h, w) of the U-Net input latent
    mode: str = "grounding"
    token_phrase: torch.Tensor | None = None  # (B, Lk) phrase slot of each token, or -1
    phrase_masks: torch.Tensor | None = None  # (B, P, H, W) full-resolution masks (resized per layer on use)
    layer_masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # {(h, w): (B, P, h*w)}
    token_loss_heads: str = "mean_map"
    mask_interpolation: str = "bilinear"
    mask_threshold: float = 0.0
    records: list[LayerRecord] = field(default_factory=list)
    captured: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> running sum (B, Lq, Lk)
    recording: bool = True  # the caller clears it after the forward: a checkpoint's recompute records nothing
    token_phrase_checked: bool = False  # set by check_token_phrase(): the layers then validate nothing (no sync)

    def check_token_phrase(self) -> None:
        """Validate token_phrase against the phrase slots once for the whole forward (one host sync), so that no
        grounded layer synchronises with the device to validate it again."""
        masks = self.phrase_masks if self.phrase_masks is not None else next(iter(self.layer_masks.values()), None)
        if self.token_phrase is None or masks is None:
            raise ValueError("grounding context needs token_phrase and phrase masks (full-resolution or per layer)")
        check_token_phrase(self.token_phrase, masks.shape[1])
        self.token_phrase_checked = True

    def layer_size(self, seq_len: int) -> tuple[int, int]:
        """(h, w) of a layer from its number of query positions and the input latent size."""
        H, W = self.latent_size
        factor = math.isqrt(max(H * W // max(seq_len, 1), 1))
        h, w = H // factor, W // factor
        if h * w != seq_len:
            raise ValueError(f"cannot map {seq_len} query positions onto latent {H}x{W}")
        return h, w

    def masks_for(self, size: tuple[int, int], device: torch.device) -> torch.Tensor:
        masks = self.layer_masks.get(size)
        if masks is None:
            if self.phrase_masks is None:
                raise KeyError(f"no phrase masks for layer resolution {size[0]}x{size[1]} and no full-resolution masks")
            masks = masks_to_layer(self.phrase_masks, size, mode=self.mask_interpolation, threshold=self.mask_threshold)
            self.layer_masks[size] = masks
        return masks.to(device)

    def record(self, rec: LayerRecord) -> None:
        if self.recording:
            self.records.append(rec)


class PlainAttnProcessor(AttnProcessor2_0):
    """SDPA for the layers that are not grounded; accepts (and ignores) the grounding context."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        grounding: GroundingContext | None = None,
        **kwargs,
    ):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


class GroundingAttnProcessor:
    """attn2 processor: SDPA output + this layer's token/pixel losses recorded into the grounding context."""

    def __init__(self, name: str, backend: str = "reference"):
        if backend not in ("reference", "fused"):
            raise ValueError(f"attention.backend={backend!r}: grounding processors support 'reference' or 'fused'")
        self.name = name
        self.backend = backend

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        grounding: GroundingContext | None = None,
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
            out = self._grounded(attn, q, k, v, Lq, grounding)

        out = out.transpose(1, 2).reshape(B, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(B, C, h4, w4)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _grounded(self, attn: Attention, q, k, v, Lq: int, ctx: GroundingContext) -> torch.Tensor:
        size = ctx.layer_size(Lq)
        if ctx.mode in ("probs", "capture"):
            probs = (q @ k.transpose(-1, -2) * attn.scale).float().softmax(dim=-1)  # (B, H, Lq, Lk)
            if ctx.mode == "probs":
                ctx.record(LayerRecord(self.name, size, probs=probs))
            else:
                mean_map = probs.mean(dim=1).detach()  # (B, Lq, Lk)
                prev = ctx.captured.get(self.name)
                ctx.captured[self.name] = mean_map if prev is None else prev + mean_map
            return probs.to(v.dtype) @ v
        if ctx.token_phrase is None:
            raise ValueError("grounding context in mode 'grounding' needs token_phrase")
        masks = ctx.masks_for(size, q.device)  # (B, P, Lq)
        token_phrase = ctx.token_phrase.to(q.device)
        if self.backend == "fused":
            from kernels import cross_attention_with_grounding

            out, token, pixel = cross_attention_with_grounding(
                q,
                k,
                v,
                masks,
                token_phrase,
                scale=attn.scale,
                validate_values=not ctx.token_phrase_checked,
                token_loss_heads=ctx.token_loss_heads,
            )
        else:
            # softmax in fp32: bf16 probabilities would make the loss ratios noisy
            probs = (q @ k.transpose(-1, -2) * attn.scale).float().softmax(dim=-1)  # (B, H, Lq, Lk)
            out = probs.to(v.dtype) @ v
            losses = grounding_losses(
                probs,
                masks,
                token_phrase,
                token_loss_heads=ctx.token_loss_heads,
                validate_values=not ctx.token_phrase_checked,
            )
            token, pixel = losses["token"], losses["pixel"]
        ctx.record(LayerRecord(self.name, size, token, pixel))
        return out


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, Attention]:
    """All attn2 (cross-attention) modules of a diffusers U-Net, by module name."""
    return {name: mod for name, mod in unet.named_modules() if isinstance(mod, Attention) and name.endswith("attn2")}


def layer_latent_side(unet: torch.nn.Module, name: str, latent_side: int) -> int:
    """Latent side length at an attn2 layer for an input latent of side `latent_side`."""
    match = re.match(r"^(down_blocks|up_blocks)\.(\d+)", name)
    n_down = len(unet.config.block_out_channels) - 1  # downsamplers in the encoder
    if name.startswith("mid_block"):
        return latent_side >> n_down
    assert match, name
    idx = int(match.group(2))
    return latent_side >> (idx if match.group(1) == "down_blocks" else n_down - idx)


def select_layers(
    unet: torch.nn.Module, blocks: list[str], resolutions: list[int] | None, latent_side: int
) -> list[str]:
    """Names of attn2 layers in the given blocks ("down"/"mid"/"up") and latent side lengths."""
    prefix = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}
    wanted = tuple(prefix[b] for b in blocks)
    names = []
    for name in cross_attention_layers(unet):
        m = _BLOCK_RE.match(name)
        if not m or m.group(1) not in wanted:
            continue
        if resolutions is not None and layer_latent_side(unet, name, latent_side) not in resolutions:
            continue
        names.append(name)
    return names


def install_grounding_processors(unet: torch.nn.Module, layer_names: list[str], backend: str) -> None:
    """Grounding processors on the named attn2 layers; every other attention layer gets SDPA that accepts
    (and ignores) the `grounding` cross-attention kwarg."""
    if backend == "fused":
        try:
            from kernels import triton_available
        except ImportError as exc:
            raise RuntimeError(f"attention.backend=fused needs Triton and the tcscale kernels package: {exc}") from exc
        if not triton_available():
            raise RuntimeError(
                "attention.backend=fused needs a CUDA GPU (or the Triton CPU interpreter, TRITON_INTERPRET=1, for "
                "tests); use attention.backend=reference on this machine"
            )
    if not layer_names:
        raise ValueError("no cross-attention layer matches attention.blocks / attention.resolutions")
    modules = cross_attention_layers(unet)
    unknown = [n for n in layer_names if n not in modules]
    if unknown:
        raise KeyError(f"not cross-attention layers of this U-Net: {unknown}")
    for name, mod in unet.named_modules():
        if isinstance(mod, Attention):
            mod.set_processor(GroundingAttnProcessor(name, backend) if name in layer_names else PlainAttnProcessor())
