"""Triton kernels with their launchers and autograd Functions. The lowest layer: nothing here imports tcscale.

The kernel names load lazily, so that ``kernels.modes`` (the token-loss definitions) is importable without Triton.
The PyTorch reference the kernels are tested against is ``tcscale.attention.reference``.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "GroundedAttentionFunction": "kernels.grounded_attention",
    "KernelConfig": "kernels.grounded_attention",
    "cross_attention_with_grounding": "kernels.grounded_attention",
    "interpreter_enabled": "kernels.grounded_attention",
    "triton_available": "kernels.grounded_attention",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
