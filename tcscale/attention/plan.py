"""Which cross-attention layers are grounded, at which latent sizes, and how masks reach them: the grounding plan.

A `GroundingPlan` is built once per run from the U-Net, the layer choice (blocks, resolutions), the image resolution
and the VAE's downsampling factor. The loader reads it (which layer masks to make, by which rule), the objective
reads it (which processors to install) and validation / evaluation read it (which maps to capture).

Layer names are diffusers module names of attn2 modules: ``down_blocks.N.attentions.M.transformer_blocks.K.attn2``,
``mid_block.attentions.0...``, ``up_blocks.N...``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from diffusers.models.attention_processor import Attention

from tcscale.attention.masks import MaskRule

Block = Literal["down", "mid", "up"]
BLOCKS: tuple[str, ...] = get_args(Block)
_PREFIX = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}
_BLOCK_RE = re.compile(r"^(down_blocks|mid_block|up_blocks)(?:\.(\d+))?")


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, Attention]:
    """All attn2 (cross-attention) modules of a diffusers U-Net, by module name, in module order."""
    return {name: mod for name, mod in unet.named_modules() if isinstance(mod, Attention) and name.endswith("attn2")}


def vae_scale_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent cell along a side: 2^(number of VAE blocks - 1), as diffusers' pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_side(image_resolution: int, scale_factor: int) -> int:
    """Side of the U-Net's input latent for a square image; the resolution must divide evenly."""
    if image_resolution % scale_factor:
        raise ValueError(f"image resolution {image_resolution} is not a multiple of the VAE factor {scale_factor}")
    return image_resolution // scale_factor


def layer_latent_side(unet: torch.nn.Module, name: str, input_side: int) -> int:
    """Latent side at an attn2 layer for an input latent of side `input_side` (one halving per down block)."""
    match = _BLOCK_RE.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a layer of a down/mid/up block")
    n_down = len(unet.config.block_out_channels) - 1  # downsamplers in the encoder
    if match.group(1) == "mid_block":
        return input_side >> n_down
    idx = int(match.group(2))
    return input_side >> (idx if match.group(1) == "down_blocks" else n_down - idx)


def layer_size(seq_len: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer from its number of query positions and the U-Net input latent's (h, w)."""
    H, W = latent_size
    factor = math.isqrt(max(H * W // max(seq_len, 1), 1))
    h, w = H // factor, W // factor
    if h * w != seq_len:
        raise ValueError(f"cannot map {seq_len} query positions onto latent {H}x{W}")
    return h, w


def select_layers(
    unet: torch.nn.Module, blocks: list[str], resolutions: list[int] | None, input_side: int
) -> list[str]:
    """Names of attn2 layers in the given blocks ("down"/"mid"/"up") whose latent side is in `resolutions`
    (None: any), in module order."""
    unknown = [b for b in blocks if b not in BLOCKS]
    if unknown:
        raise ValueError(f"unknown block {unknown[0]!r}, expected one of {list(BLOCKS)}")
    wanted = tuple(_PREFIX[b] for b in blocks)
    names = []
    for name in cross_attention_layers(unet):
        m = _BLOCK_RE.match(name)
        if not m or m.group(1) not in wanted:
            continue
        if resolutions is not None and layer_latent_side(unet, name, input_side) not in resolutions:
            continue
        names.append(name)
    return names


@dataclass(frozen=True)
class GroundingPlan:
    """The grounded attn2 layers of one run and the latent side of each."""

    layers: tuple[str, ...]  # attn2 module names, module order
    sides: tuple[int, ...]  # latent side of each layer (square inputs)
    input_side: int  # side of the U-Net's input latent
    mask_rule: MaskRule = field(default_factory=MaskRule)

    @classmethod
    def build(
        cls,
        unet: torch.nn.Module,
        *,
        blocks: list[str],
        resolutions: list[int] | None,
        image_resolution: int,
        scale_factor: int,
        mask_rule: MaskRule | None = None,
    ) -> GroundingPlan:
        """The layers of `blocks` at latent sides `resolutions` (None: all) for square images of
        `image_resolution` px and a VAE that downsamples by `scale_factor`. Raises if no layer matches."""
        side = latent_side(image_resolution, scale_factor)
        names = select_layers(unet, blocks, resolutions, side)
        if not names:
            raise ValueError(
                f"no cross-attention layer in blocks {blocks} has a latent side in {resolutions} "
                f"at {image_resolution} px (input latent {side}x{side})"
            )
        sides = tuple(layer_latent_side(unet, n, side) for n in names)
        return cls(tuple(names), sides, side, mask_rule or MaskRule())

    @classmethod
    def from_config(
        cls,
        unet: torch.nn.Module,
        attention,
        image_resolution: int,
        scale_factor: int,
        *,
        mask_full_res: str = "binary",
    ) -> GroundingPlan:
        """The plan of a run's `attention` section (blocks, resolutions, mask_interpolation, mask_threshold);
        `mask_full_res` ("binary" | "soft") is the objective's choice of full-resolution mask (`MaskRule.full_res`)."""
        return cls.build(
            unet,
            blocks=list(attention.blocks),
            resolutions=None if attention.resolutions is None else list(attention.resolutions),
            image_resolution=image_resolution,
            scale_factor=scale_factor,
            mask_rule=MaskRule(attention.mask_interpolation, attention.mask_threshold, mask_full_res),
        )

    @property
    def layer_sizes(self) -> tuple[tuple[int, int], ...]:
        """The distinct (h, w) grids of the grounded layers, ascending: the layer masks a batch must carry."""
        return tuple((s, s) for s in sorted(set(self.sides)))

    def side_of(self, layer: str) -> int:
        return self.sides[self.layers.index(layer)]

    def groups(self) -> dict[str, list[str]]:
        """Layers by (place, resolution), e.g. {"mid_8": [...], "up_16": [...]} (the official code's grouping)."""
        out: dict[str, list[str]] = {}
        for name, side in zip(self.layers, self.sides):
            place = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[_BLOCK_RE.match(name).group(1)]
            out.setdefault(f"{place}_{side}", []).append(name)
        return out
