"""Where a denoiser's cross-attention layers are, and the latent side each one sees: the layout of a denoiser form.

A family (tcscale.families) names its denoiser's layout; the grounding plan (tcscale.attention.plan) asks the layout
which layers a block / resolution choice selects, so no module outside tcscale/families parses layer names.

`UNetLayout` is the layout of diffusers' `UNet2DConditionModel` (SD1.x, SD2.x, SDXL): its cross-attention layers are
the ``attn2`` modules of ``down_blocks.N...``, ``mid_block...`` and ``up_blocks.N...``; the latent side halves once
per down block before N (encoder) and doubles back in the decoder.
"""

from __future__ import annotations

import re
from typing import Literal, Protocol, get_args

import torch
from diffusers.models.attention_processor import Attention

# U-Net blocks, and the thirds of an MMDiT's stack of joint blocks (tcscale.families.sd3.MMDiTLayout)
Block = Literal["down", "mid", "up", "early", "middle", "late"]
BLOCKS: tuple[str, ...] = get_args(Block)


class DenoiserLayout(Protocol):
    """The questions the grounding plan asks of a denoiser."""

    def cross_attention_layers(self, denoiser: torch.nn.Module) -> dict[str, Attention]:
        """Every text cross-attention module, by module name, in module order."""
        ...

    def place(self, name: str, denoiser: torch.nn.Module | None = None) -> str:
        """The block a layer belongs to: one of `BLOCKS` (an MMDiT's depth thirds need the `denoiser`)."""
        ...

    def latent_side(self, denoiser: torch.nn.Module, name: str, input_side: int) -> int:
        """The latent side a layer sees for an input latent of side `input_side`."""
        ...


class UNetLayout:
    """`UNet2DConditionModel`: attn2 modules of the down / mid / up blocks."""

    _BLOCK_RE = re.compile(r"^(down_blocks|mid_block|up_blocks)(?:\.(\d+))?")
    _PLACES = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}

    def cross_attention_layers(self, denoiser: torch.nn.Module) -> dict[str, Attention]:
        return {
            name: mod for name, mod in denoiser.named_modules() if isinstance(mod, Attention) and name.endswith("attn2")
        }

    def _match(self, name: str) -> re.Match:
        match = self._BLOCK_RE.match(name)
        if match is None:
            raise ValueError(f"{name!r} is not a layer of a down/mid/up block")
        return match

    def place(self, name: str, denoiser: torch.nn.Module | None = None) -> str:
        return self._PLACES[self._match(name).group(1)]

    def latent_side(self, denoiser: torch.nn.Module, name: str, input_side: int) -> int:
        match = self._match(name)
        n_down = len(denoiser.config.block_out_channels) - 1  # downsamplers in the encoder
        if match.group(1) == "mid_block":
            return input_side >> n_down
        idx = int(match.group(2))
        return input_side >> (idx if match.group(1) == "down_blocks" else n_down - idx)


UNET_LAYOUT = UNetLayout()


def select_layers(
    denoiser: torch.nn.Module,
    blocks: list[str],
    resolutions: list[int] | None,
    input_side: int,
    layout: DenoiserLayout = UNET_LAYOUT,
) -> list[str]:
    """Names of the cross-attention layers in `blocks` ("down"/"mid"/"up") whose latent side is in `resolutions`
    (None: any), in module order."""
    unknown = [b for b in blocks if b not in BLOCKS]
    if unknown:
        raise ValueError(f"unknown block {unknown[0]!r}, expected one of {list(BLOCKS)}")
    names = []
    for name in layout.cross_attention_layers(denoiser):
        if layout.place(name, denoiser) not in blocks:
            continue
        if resolutions is not None and layout.latent_side(denoiser, name, input_side) not in resolutions:
            continue
        names.append(name)
    return names
