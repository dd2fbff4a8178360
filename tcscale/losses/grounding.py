"""TokenCompose grounding losses on cross-attention probabilities: the PyTorch reference (DESIGN §3, §4).

Notation per layer: B samples, H heads, Lq latent positions, Lk text tokens, P phrase slots.
A sample's phrases are the phrase indices that occur in its ``token_phrase`` row; padded phrase
slots (no token points at them) do not count. Per sample each term is averaged over its phrases;
the batch value is the mean over samples with at least one phrase, and 0 (still attached to the
graph) when no sample has one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.modes import TOKEN_LOSS_HEADS, TokenLossHeads

__all__ = ["TOKEN_LOSS_HEADS", "TokenLossHeads", "check_token_phrase", "grounding_losses", "phrase_token_onehot"]


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
    bce = F.binary_cross_entropy(phrase_maps.clamp(0.0, 1.0), masks, reduction="none")  # log clamped at -100
    per_phrase_pixel = bce.mean(dim=-1)  # (B, P)

    def batch_mean(per_phrase: torch.Tensor) -> torch.Tensor:
        per_phrase = torch.where(phrase_present, per_phrase, torch.zeros_like(per_phrase))
        per_sample = per_phrase.sum(-1) / phrases_per_sample.clamp(min=1).to(dtype)  # (B,)
        n_valid = sample_has_phrase.sum().clamp(min=1).to(dtype)
        # with no phrase in the batch every term is a masked 0: the result is 0, still attached to the graph (every
        # rank must run backward), and no data-dependent branch forces a host sync
        return torch.where(sample_has_phrase, per_sample, torch.zeros_like(per_sample)).sum() / n_valid

    return {"token": batch_mean(per_phrase_token), "pixel": batch_mean(per_phrase_pixel)}
