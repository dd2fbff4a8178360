"""PyTorch reference for the fused grounded attention kernel: materialised probabilities + ``grounding_losses``.

This is what the tests and the benchmark compare ``kernels.cross_attention_with_grounding`` against. It keeps the
(B, H, Lq, Lk) probability tensor alive for backward — exactly what the fused kernel avoids.
"""

from __future__ import annotations

import math

import torch

from tcscale.losses.grounding import grounding_losses


def attention_probs_reference(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ·scale) over the key axis, computed in the inputs' dtype: (B, H, Lq, Lk)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)


def cross_attention_with_grounding_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phrase_masks: torch.Tensor,
    token_phrase: torch.Tensor,
    scale: float | None = None,
    *,
    upcast: bool = False,
    validate_values: bool = True,
    token_loss_heads: str = "mean_map",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, token_loss, pixel_loss) with explicit probabilities; ``upcast=True`` computes everything in float64
    (the ground truth the tests measure both implementations against). ``validate_values=False`` skips the
    token_phrase range check, the reference's only host sync (needed to capture it in a CUDA graph)."""
    if upcast:
        q, k, v, phrase_masks = q.double(), k.double(), v.double(), phrase_masks.double()
    attn_probs = attention_probs_reference(q, k, scale)
    out = torch.matmul(attn_probs, v)
    losses = grounding_losses(
        attn_probs, phrase_masks, token_phrase, token_loss_heads=token_loss_heads, validate_values=validate_values
    )
    return out, losses["token"], losses["pixel"]
