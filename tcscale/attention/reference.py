"""Cross-attention with the grounding losses on materialised probabilities: the PyTorch reference.

The grounding processors' ``reference`` backend runs it, and the fused Triton kernel
(``kernels.cross_attention_with_grounding``) is tested and benchmarked against it. It keeps the (B, H, Lq, Lk)
probability tensor alive for backward — exactly what the fused kernel avoids.
"""

from __future__ import annotations

import math

import torch

from tcscale.losses.grounding import grounding_losses


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, scale: float | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """softmax(q kᵀ·scale) over the key axis: (B, H, Lq, Lk), the softmax taken in `dtype` (default q's)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.softmax(scores if dtype is None else scores.to(dtype), dim=-1)


def cross_attention_with_grounding_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phrase_masks: torch.Tensor,
    token_phrase: torch.Tensor,
    scale: float | None = None,
    *,
    upcast: bool = False,
    probs_dtype: torch.dtype | None = None,
    validate_values: bool = True,
    token_loss_heads: str = "mean_map",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, token_loss, pixel_loss) with explicit probabilities.

    ``upcast=True`` computes everything in float64 (the ground truth tests measure both implementations against);
    ``probs_dtype`` takes the softmax in another dtype than q's (the training processors use float32: bf16
    probabilities make the loss ratios noisy). ``validate_values=False`` skips the token_phrase range check, the
    only host sync (the caller checked it once for the batch, or captures a CUDA graph).
    """
    if upcast:
        q, k, v, phrase_masks = q.double(), k.double(), v.double(), phrase_masks.double()
    probs = attention_probs(q, k, scale, probs_dtype)
    out = torch.matmul(probs.to(v.dtype), v)
    losses = grounding_losses(
        probs, phrase_masks, token_phrase, token_loss_heads=token_loss_heads, validate_values=validate_values
    )
    return out, losses["token"], losses["pixel"]
