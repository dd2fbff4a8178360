"""Cross-attention processors that compute the TokenCompose grounding losses per layer.

A `GroundingCollector` is shared by the processors of the selected attn2 layers. The objective
opens it for one U-Net forward (`with collector.forward(layer_masks, token_phrase):`); each
processor computes its layer's token/pixel losses from the phrase masks at its own resolution and
records them. Records are taken only while the collector is open, so a non-reentrant activation
checkpoint that re-runs the forward during backward does not record twice.

Backends: "reference" computes the probabilities explicitly and calls
`tcscale.losses.grounding_losses`; "fused" calls the Triton kernel
`kernels.cross_attention_with_grounding` (no B x H x Lq x Lk tensor kept). When the collector is
closed (validation, frozen copies) the processors run plain SDPA, unless maps are being captured.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from tcscale.attention.masks import masks_to_layer
from tcscale.losses.grounding import grounding_losses

_BLOCK_RE = re.compile(r"^(down_blocks|mid_block|up_blocks)")


@dataclass
class LayerRecord:
    name: str
    size: tuple[int, int]
    token: torch.Tensor
    pixel: torch.Tensor


@dataclass
class GroundingCollector:
    """Per-forward context shared by the grounding processors of one U-Net."""

    latent_size: tuple[int, int] = (0, 0)  # (h, w) of the U-Net input latent
    token_loss_heads: str = "mean_map"
    mask_interpolation: str = "bilinear"
    mask_threshold: float = 0.0
    records: list[LayerRecord] = field(default_factory=list)
    capture: dict[str, torch.Tensor] | None = None  # layer name -> running sum of head-averaged maps (B, Lq, Lk)
    _open: bool = False
    _full_masks: torch.Tensor | None = None
    _layer_masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    _token_phrase: torch.Tensor | None = None

    @contextmanager
    def forward(
        self,
        latent_size: tuple[int, int],
        token_phrase: torch.Tensor,
        phrase_masks: torch.Tensor | None = None,
        layer_masks: dict[tuple[int, int], torch.Tensor] | None = None,
    ) -> Iterator[list[LayerRecord]]:
        """Open the collector for one U-Net forward; yields the list the layers' records go into.

        phrase_masks: (B, P, H, W) full-resolution masks, resized per layer on first use;
        layer_masks: {(h, w): (B, P, h*w)} already at layer resolution (the loader precomputes them).
        """
        self.latent_size = tuple(latent_size)
        self.records = []
        self._full_masks = phrase_masks
        self._layer_masks = dict(layer_masks or {})
        self._token_phrase = token_phrase
        self._open = True
        try:
            yield self.records
        finally:
            self._open = False
            self._full_masks = None
            self._layer_masks = {}
            self._token_phrase = None

    @property
    def is_open(self) -> bool:
        return self._open

    def layer_size(self, seq_len: int) -> tuple[int, int]:
        """(h, w) of a layer from its number of query positions and the input latent size."""
        H, W = self.latent_size
        factor = math.isqrt(max(H * W // max(seq_len, 1), 1))
        h, w = H // factor, W // factor
        if h * w != seq_len:
            raise ValueError(f"cannot map {seq_len} query positions onto latent {H}x{W}")
        return h, w

    def masks_for(self, size: tuple[int, int], device: torch.device) -> torch.Tensor:
        masks = self._layer_masks.get(size)
        if masks is None:
            if self._full_masks is None:
                raise KeyError(f"no phrase masks for layer resolution {size[0]}x{size[1]} and no full-resolution masks")
            masks = masks_to_layer(self._full_masks, size, mode=self.mask_interpolation, threshold=self.mask_threshold)
            self._layer_masks[size] = masks
        return masks.to(device)

    @property
    def token_phrase(self) -> torch.Tensor:
        assert self._token_phrase is not None
        return self._token_phrase


class GroundingAttnProcessor:
    """attn2 processor: SDPA output + this layer's token/pixel losses recorded into the collector."""

    def __init__(self, name: str, collector: GroundingCollector, backend: str = "reference"):
        if backend not in ("reference", "fused"):
            raise ValueError(f"attention.backend={backend!r}: grounding processors support 'reference' or 'fused'")
        self.name = name
        self.collector = collector
        self.backend = backend

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
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

        collector = self.collector
        if collector.is_open:
            out = self._grounded(attn, q, k, v, Lq)
        elif collector.capture is not None:
            probs = (q @ k.transpose(-1, -2) * attn.scale).float().softmax(dim=-1)  # (B, H, Lq, Lk)
            mean_map = probs.mean(dim=1).detach()
            prev = collector.capture.get(self.name)
            collector.capture[self.name] = mean_map if prev is None else prev + mean_map
            out = probs.to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)

        out = out.transpose(1, 2).reshape(B, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(B, C, h4, w4)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _grounded(self, attn: Attention, q, k, v, Lq: int) -> torch.Tensor:
        collector = self.collector
        size = collector.layer_size(Lq)
        masks = collector.masks_for(size, q.device)  # (B, P, Lq)
        token_phrase = collector.token_phrase.to(q.device)
        if self.backend == "fused":
            from kernels import cross_attention_with_grounding

            out, token, pixel = cross_attention_with_grounding(q, k, v, masks, token_phrase, scale=attn.scale)
        else:
            # softmax in fp32: bf16 probabilities would make the loss ratios noisy
            probs = (q @ k.transpose(-1, -2) * attn.scale).float().softmax(dim=-1)  # (B, H, Lq, Lk)
            out = probs.to(v.dtype) @ v
            losses = grounding_losses(probs, masks, token_phrase, token_loss_heads=collector.token_loss_heads)
            token, pixel = losses["token"], losses["pixel"]
        collector.records.append(LayerRecord(self.name, size, token, pixel))
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


def install_grounding_processors(
    unet: torch.nn.Module, layer_names: list[str], collector: GroundingCollector, backend: str
) -> None:
    """Put grounding processors on the named attn2 layers; every other layer keeps SDPA."""
    if backend == "fused":
        from kernels import require_triton_runtime

        require_triton_runtime()
    if not layer_names:
        raise ValueError("no cross-attention layer matches attention.blocks / attention.resolutions")
    modules = cross_attention_layers(unet)
    for name in layer_names:
        modules[name].set_processor(GroundingAttnProcessor(name, collector, backend))
