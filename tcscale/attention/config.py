"""The `attention` section of a run config: the grounded cross-attention layers, their backend, and how masks
reach them. Kept beside the attention code it configures (tcscale.config assembles the sections)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from tcscale.attention.masks import MaskInterpolation
from tcscale.families.layout import Block

JointReading = Literal["text", "joint"]  # MMDiT grounding map: renormalised over text keys | joint probabilities as is
JOINT_READINGS: tuple[str, ...] = get_args(JointReading)
JointTokens = Literal["both", "clip", "t5"]  # MMDiT text keys a phrase's tokens are taken from
JOINT_TOKENS: tuple[str, ...] = get_args(JointTokens)
GroundedBackend = Literal["reference", "fused"]  # explicit probabilities | the fused Triton kernel
GROUNDED_BACKENDS: tuple[str, ...] = get_args(GroundedBackend)
UngroundedAttention = Literal["sdpa", "xformers"]
UNGROUNDED_ATTENTION: tuple[str, ...] = get_args(UngroundedAttention)


@dataclass
class AttentionConfig:
    """The grounded cross-attention layers (objectives that ground: tokencompose) and how masks reach them."""

    backend: GroundedBackend = "reference"  # grounded layers: explicit probabilities | Triton kernel
    blocks: list[Block] = field(default_factory=lambda: ["mid", "up"])  # grounded attn2 layers: down / mid / up
    resolutions: list[int] | None = None  # keep layers whose latent side is listed (e.g. [16, 32]); null -> all
    mask_interpolation: MaskInterpolation = "bilinear"  # F.interpolate mode for masks -> layer resolution
    mask_threshold: float = 0.0  # binarise resized masks with > threshold (official: > 0)
    ungrounded: UngroundedAttention = "sdpa"  # the layers no objective reads (self-attention, other attn2)
    # model.family=sd3 only (docs/MMDIT.md): the grounding map of a joint-attention layer, the image-query x text-key
    # block of the joint softmax: renormalised over the text keys ("text", what a U-Net's attn2 gives) | as is
    joint_reading: JointReading = "text"
    # model.family=sd3 only: a phrase's tokens in both text sequences (CLIP and T5, summed) | CLIP's only | T5's only
    joint_tokens: JointTokens = "both"
