"""TokenCompose grounding losses on cross-attention probabilities: the PyTorch reference (docs/DESIGN.md §3, §4).

Notation per layer: B samples, H heads, Lq latent positions, Lk text tokens, P phrase slots.
A sample's phrases are the phrase indices that occur in its ``token_phrase`` row; padded phrase
slots (no token points at them) do not count. Per sample each term is averaged over its phrases;
the batch value is the mean over samples with at least one phrase, and 0 (still attached to the
graph) when no sample has one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from kernels.modes import TOKEN_LOSS_HEADS, TokenLossHeads

__all__ = [
    "PIXEL_LOSS_REDUCTIONS",
    "TOKEN_LOSS_HEADS",
    "PixelLossReduction",
    "TokenLossHeads",
    "check_token_phrase",
    "grounding_losses",
    "grounding_losses_grouped",
    "phrase_token_onehot",
]

PixelLossReduction = Literal["per_layer", "per_resolution"]
"""``per_layer``: paper Eq. 7, the pixel loss of every grounded layer, summed; ``per_resolution``: official
``get_grounding_loss_by_layer``, one pixel loss per (place, resolution) group on the map averaged over the group's
layers and heads."""
PIXEL_LOSS_REDUCTIONS: tuple[str, ...] = get_args(PixelLossReduction)


def check_token_phrase(token_phrase: torch.Tensor, num_phrases: int) -> None:
    """token_phrase holds integers in [-1, num_phrases): one host sync (a trainer calls this once per batch and
    passes ``validate_values=False`` to the per-layer losses, which then run without any sync)."""
    if token_phrase.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token_phrase must be an integer tensor, got {token_phrase.dtype}")
    if token_phrase.numel():
        lo, hi = torch.stack(torch.aminmax(token_phrase)).tolist()
        if lo < -1 or hi >= num_phrases:
            raise ValueError(
                f"token_phrase values must be -1 or a phrase index < P={num_phrases} (the phrase_masks slots), "
                f"got range [{lo}, {hi}]"
            )


def phrase_token_onehot(
    token_phrase: torch.Tensor, num_phrases: int, dtype: torch.dtype, validate_values: bool = True
) -> torch.Tensor:
    """(B, Lk) phrase index per token (or -1) -> (B, Lk, P) one-hot membership of token i in phrase p."""
    if token_phrase.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token_phrase must be an integer tensor, got {token_phrase.dtype}")
    if validate_values:
        check_token_phrase(token_phrase, num_phrases)
    phrase_ids = torch.arange(num_phrases, device=token_phrase.device)
    return (token_phrase.long().unsqueeze(-1) == phrase_ids).to(dtype)


def grounding_losses(
    attn: torch.Tensor,
    phrase_masks: torch.Tensor,
    token_phrase: torch.Tensor,
    *,
    token_loss_heads: str = "mean_map",
    validate_values: bool = True,
) -> dict[str, torch.Tensor]:
    """Token and pixel losses of one cross-attention layer.

    Args:
        attn: (B, H, Lq, Lk) per-head attention probabilities (rows sum to 1 over Lk).
        phrase_masks: (B, P, Lq) phrase masks at this layer's resolution, values in [0, 1] (binary in training).
        token_phrase: (B, Lk) int64 phrase index of each token, or -1.
        token_loss_heads: "mean_map" (paper Eq. 5 on the head-averaged map) or "per_head" (official code:
            the activation ratio is computed per head and averaged over heads before squaring).
        validate_values: check token_phrase ∈ [-1, P) here (one host sync); with False the function never
            synchronises with the device (the caller has run ``check_token_phrase`` once for the batch).

    Returns:
        {"token": scalar, "pixel": scalar}, float32 (float64 if attn is float64).
    """
    if attn.dim() != 4:
        raise ValueError(f"attn must be (B, H, Lq, Lk), got shape {tuple(attn.shape)}")
    B, H, Lq, Lk = attn.shape
    if phrase_masks.dim() != 3 or phrase_masks.shape[0] != B or phrase_masks.shape[2] != Lq:
        raise ValueError(f"phrase_masks must be (B={B}, P, Lq={Lq}), got shape {tuple(phrase_masks.shape)}")
    if tuple(token_phrase.shape) != (B, Lk):
        raise ValueError(f"token_phrase must be (B={B}, Lk={Lk}), got shape {tuple(token_phrase.shape)}")
    if token_loss_heads not in TOKEN_LOSS_HEADS:
        raise ValueError(f"token_loss_heads must be one of {TOKEN_LOSS_HEADS}, got {token_loss_heads!r}")

    dtype = torch.float64 if attn.dtype == torch.float64 else torch.float32
    attn = attn.to(dtype)
    masks = phrase_masks.to(dtype)  # (B, P, Lq)
    P = masks.shape[1]
    onehot = phrase_token_onehot(token_phrase, P, dtype, validate_values)  # (B, Lk, P)
    is_phrase_token = onehot.sum(-1) > 0  # (B, Lk)
    tokens_per_phrase = onehot.sum(1)  # (B, P)
    phrase_present = tokens_per_phrase > 0  # (B, P)
    phrases_per_sample = phrase_present.sum(-1)  # (B,)
    sample_has_phrase = phrases_per_sample > 0  # (B,)

    attn_mean = attn.mean(dim=1)  # Ā: (B, Lq, Lk)
    token_masks = torch.einsum("bpu,bip->bui", masks, onehot)  # mask of each token's phrase: (B, Lq, Lk)

    # --- token loss: ratio_i = Σ_u M_p[u] Ā[u,i] / Σ_u Ā[u,i], i ∈ T_p -------------------------------
    if token_loss_heads == "mean_map":
        inside = (attn_mean * token_masks).sum(dim=1)  # (B, Lk)
        total = attn_mean.sum(dim=1)
        ratio = inside / torch.where(is_phrase_token, total, torch.ones_like(total))
    else:
        inside = (attn * token_masks.unsqueeze(1)).sum(dim=2)  # (B, H, Lk)
        total = attn.sum(dim=2)
        ratio_h = inside / torch.where(is_phrase_token.unsqueeze(1), total, torch.ones_like(total))
        ratio = ratio_h.mean(dim=1)  # (B, Lk)
    token_err = torch.where(is_phrase_token, (1.0 - ratio) ** 2, torch.zeros_like(ratio))  # (B, Lk)
    per_phrase_token = torch.einsum("bi,bip->bp", token_err, onehot) / tokens_per_phrase.clamp(min=1)  # (B, P)

    # --- pixel loss: S_p[u] = Σ_{i∈T_p} Ā[u,i]; BCE(S_p, M_p) averaged over u ----------------------------
    phrase_maps = torch.einsum("bui,bip->bpu", attn_mean, onehot)  # (B, P, Lq)
    # Σ of probabilities can exceed 1 by rounding; BCELoss requires [0, 1]. Clamp passes gradient inside.
    # A NaN/inf map (diverged weights) would make BCELoss raise (CPU) or assert on the device (CUDA) before the
    # trainer could name the term: BCE sees a finite stand-in, and `poison` (NaN exactly when a map is not finite,
    # else 0, with zero gradient) carries the NaN into the returned terms without a host sync.
    finite = torch.isfinite(phrase_maps)
    poison = (phrase_maps - phrase_maps).sum()
    safe_maps = torch.where(finite, phrase_maps, torch.full_like(phrase_maps, 0.5)).clamp(0.0, 1.0)
    bce = F.binary_cross_entropy(safe_maps, masks, reduction="none")  # log clamped at -100
    per_phrase_pixel = bce.mean(dim=-1)  # (B, P)

    def batch_mean(per_phrase: torch.Tensor) -> torch.Tensor:
        per_phrase = torch.where(phrase_present, per_phrase, torch.zeros_like(per_phrase))
        per_sample = per_phrase.sum(-1) / phrases_per_sample.clamp(min=1).to(dtype)  # (B,)
        n_valid = sample_has_phrase.sum().clamp(min=1).to(dtype)
        # with no phrase in the batch every term is a masked 0: the result is 0, still attached to the graph (every
        # rank must run backward), and no data-dependent branch forces a host sync
        return torch.where(sample_has_phrase, per_sample, torch.zeros_like(per_sample)).sum() / n_valid

    return {"token": batch_mean(per_phrase_token) + poison, "pixel": batch_mean(per_phrase_pixel) + poison}


def grounding_losses_grouped(
    attns: Sequence[torch.Tensor],
    phrase_masks: torch.Tensor,
    token_phrase: torch.Tensor,
    *,
    token_loss_heads: str = "mean_map",
    pixel_loss_reduction: str = "per_layer",
    validate_values: bool = True,
) -> dict[str, torch.Tensor]:
    """Token and pixel losses of the layers of one (place, resolution) group, e.g. the three up-block layers at 16².

    Args:
        attns: list of (B, H_m, Lq, Lk) per-head probabilities, one per layer of the group (same B, Lq, Lk).
        phrase_masks, token_phrase, token_loss_heads, validate_values: as in ``grounding_losses``.
        pixel_loss_reduction: "per_layer" (paper Eq. 7: Σ over the layers of each layer's pixel loss) or
            "per_resolution" (official ``get_grounding_loss_by_layer``: one pixel loss on the map averaged over the
            group's layers and heads, Ā_group = (1/M) Σ_m (1/H_m) Σ_h P_{m,h}).

    Returns:
        {"token": Σ_m L_token^(m), "pixel": Σ_m L_pixel^(m) or L_pixel(Ā_group)}. Per sample and batch mean as in
        ``grounding_losses`` (the official code takes one mean over batch and heads together: batch 1 agrees).
    """
    if len(attns) == 0:
        raise ValueError("attns is empty: give the probabilities of at least one layer of the group")
    if pixel_loss_reduction not in PIXEL_LOSS_REDUCTIONS:
        raise ValueError(f"pixel_loss_reduction must be one of {PIXEL_LOSS_REDUCTIONS}, got {pixel_loss_reduction!r}")
    B, _, Lq, Lk = attns[0].shape
    for m, a in enumerate(attns):
        if a.dim() != 4 or a.shape[0] != B or a.shape[2] != Lq or a.shape[3] != Lk:
            raise ValueError(f"attns[{m}] has shape {tuple(a.shape)}; every layer must be (B={B}, H, Lq={Lq}, Lk={Lk})")
    if validate_values:
        check_token_phrase(token_phrase, phrase_masks.shape[1])
    kw = {"token_loss_heads": token_loss_heads, "validate_values": False}
    per_layer = [grounding_losses(a, phrase_masks, token_phrase, **kw) for a in attns]
    token = torch.stack([out["token"] for out in per_layer]).sum()
    if pixel_loss_reduction == "per_layer":
        return {"token": token, "pixel": torch.stack([out["pixel"] for out in per_layer]).sum()}
    dtype = torch.float64 if attns[0].dtype == torch.float64 else torch.float32
    group_map = torch.stack([a.to(dtype).mean(dim=1) for a in attns]).mean(dim=0)  # Ā_group: (B, Lq, Lk)
    # one "head" holding Ā_group: grounding_losses' head mean is then the identity
    pixel = grounding_losses(group_map.unsqueeze(1), phrase_masks, token_phrase, **kw)["pixel"]
    return {"token": token, "pixel": pixel}
