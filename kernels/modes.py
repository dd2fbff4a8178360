"""The token-loss definitions the grounding losses offer: one list, read by the kernel, the PyTorch losses and the
config schema (this module imports nothing, so every layer above may use it)."""

from __future__ import annotations

from typing import Literal, get_args

TokenLossHeads = Literal["mean_map", "per_head"]
"""``mean_map``: paper Eq. 5, the ratio on the head-averaged map; ``per_head``: official code, the ratio per head,
averaged over heads before squaring."""
TOKEN_LOSS_HEADS: tuple[str, ...] = get_args(TokenLossHeads)
