"""A tiny U-Net with grounding processors and hand-made inputs for the processor / fused-backend tests."""

from __future__ import annotations

import torch

from tcscale.attention.plan import GroundingPlan
from tcscale.attention.processors import install_grounding_processors
from tcscale.config import TinyModelConfig
from tcscale.families.sd import tiny_unet


def make_inputs(B: int = 2, side: int = 8, seed: int = 0):
    """(latents (B, 4, side, side), t, text (B, 77, 32), masks (B, 2, 8·side, 8·side), token_phrase (B, 77))."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(B, 4, side, side, generator=g)
    t = torch.tensor([10, 500])[:B]
    text = torch.randn(B, 77, 32, generator=g)
    masks = torch.zeros(B, 2, side * 8, side * 8)
    masks[0, 0, :32, :32] = 1
    masks[0, 1, 20:, 30:] = 1
    masks[1, 0, 10:50, 5:40] = 1
    token_phrase = torch.full((B, 77), -1, dtype=torch.long)
    token_phrase[0, [2, 3]] = 0
    token_phrase[0, 6] = 1
    token_phrase[1, 4] = 0
    return latents, t, text, masks, token_phrase


def grounded_unet(seed: int = 0):
    """(tiny U-Net for 64 px / 8x8 latents with reference processors on mid + up blocks, its GroundingPlan)."""
    torch.manual_seed(seed)
    unet = tiny_unet(TinyModelConfig(), 8)
    plan = GroundingPlan.build(unet, blocks=["mid", "up"], resolutions=None, image_resolution=64, scale_factor=8)
    install_grounding_processors(unet, plan, "reference")
    return unet, plan
