"""Triton kernels (with autograd Functions and the PyTorch references they are tested against)."""

from kernels.grounded_attention import (
    GroundedAttentionFunction,
    KernelConfig,
    cross_attention_with_grounding,
    interpreter_enabled,
    triton_available,
)
from kernels.reference import cross_attention_with_grounding_reference

__all__ = [
    "GroundedAttentionFunction",
    "KernelConfig",
    "cross_attention_with_grounding",
    "cross_attention_with_grounding_reference",
    "interpreter_enabled",
    "triton_available",
]
