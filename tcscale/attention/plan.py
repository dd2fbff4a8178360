"""Which cross-attention layers are grounded, at which latent sizes, and how masks reach them: the grounding plan.

A `GroundingPlan` is built once per run from the denoiser, its family's layout (where its cross-attention layers are;
tcscale.families.layout), the layer choice (blocks, resolutions), the image resolution and the VAE's downsampling
factor. The loader reads it (which layer masks to make, by which rule), the objective reads it (which processors to
install) and validation / evaluation read it (which maps to capture).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention

from tcscale.attention.masks import MaskRule
from tcscale.families.layout import BLOCKS, UNET_LAYOUT, Block, DenoiserLayout, select_layers

__all__ = ["BLOCKS", "Block", "GroundingPlan", "cross_attention_layers", "latent_side", "layer_size", "select_layers"]


def cross_attention_layers(unet: torch.nn.Module, layout: DenoiserLayout = UNET_LAYOUT) -> dict[str, Attention]:
    """All cross-attention modules of a denoiser (default: a diffusers U-Net's attn2), by module name, in order."""
    return layout.cross_attention_layers(unet)


def vae_scale_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent cell along a side: 2^(number of VAE blocks - 1), as diffusers' pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_side(image_resolution: int, scale_factor: int) -> int:
    """Side of the U-Net's input latent for a square image; the resolution must divide evenly."""
    if image_resolution % scale_factor:
        raise ValueError(f"image resolution {image_resolution} is not a multiple of the VAE factor {scale_factor}")
    return image_resolution // scale_factor


def layer_size(seq_len: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer from its number of query positions and the U-Net input latent's (h, w)."""
    H, W = latent_size
    factor = math.isqrt(max(H * W // max(seq_len, 1), 1))
    h, w = H // factor, W // factor
    if h * w != seq_len:
        raise ValueError(f"cannot map {seq_len} query positions onto latent {H}x{W}")
    return h, w


@dataclass(frozen=True)
class GroundingPlan:
    """The grounded attn2 layers of one run and the latent side of each."""

    layers: tuple[str, ...]  # cross-attention module names, module order
    sides: tuple[int, ...]  # latent side of each layer (square inputs)
    input_side: int  # side of the U-Net's input latent
    mask_rule: MaskRule = field(default_factory=MaskRule)
    places: tuple[str, ...] = ()  # block of each layer ("down" / "mid" / "up")

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
        layout: DenoiserLayout = UNET_LAYOUT,
    ) -> GroundingPlan:
        """The layers of `blocks` at latent sides `resolutions` (None: all) for square images of
        `image_resolution` px and a VAE that downsamples by `scale_factor`, found by the family's `layout` (the
        families' `layout`; default: a diffusers U-Net). Raises if no layer matches."""
        side = latent_side(image_resolution, scale_factor)
        names = select_layers(unet, blocks, resolutions, side, layout)
        if not names:
            raise ValueError(
                f"no cross-attention layer in blocks {blocks} has a latent side in {resolutions} "
                f"at {image_resolution} px (input latent {side}x{side})"
            )
        sides = tuple(layout.latent_side(unet, n, side) for n in names)
        places = tuple(layout.place(n, unet) for n in names)
        return cls(tuple(names), sides, side, mask_rule or MaskRule(), places)

    @classmethod
    def from_config(
        cls,
        unet: torch.nn.Module,
        attention,
        image_resolution: int,
        scale_factor: int,
        *,
        mask_full_res: str = "binary",
        layout: DenoiserLayout = UNET_LAYOUT,
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
            layout=layout,
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
        for name, side, place in zip(self.layers, self.sides, self.places):
            out.setdefault(f"{place}_{side}", []).append(name)
        return out
