"""Separate-and-Enhance losses on cross-attention object maps (Bao et al., SIGGRAPH 2024; docs/DESIGN.md §3).

Notation: B samples, K object slots, h×w the SepEn resolution (16×16 for SD1.4 at 512 px, Lq = h·w),
Lk text tokens (77, SOT at position 0). Token positions index the tokenizer's ``input_ids`` directly,
SOT included, so position i is column i of the attention probabilities (the official code is off by one).

* ``object_maps``   (docs/DESIGN.md §3): Ā = mean over the given layers and their heads of the per-head
  probabilities (all Lk tokens, no SOT exclusion, no re-softmax); object k's map A_k = mean of Ā[:, i]
  over its tokens i ∈ T_k.
* ``separate_loss`` paper Eq. 2: L_sep = max_u ( Π_k A_k[u] / Σ_k A_k[u] ), per sample, mean over the batch.
* ``enhance_loss``  paper Eq. 3: L_en = 1 − min_k max_u (G ∗ A_k)[u], G a 3×3 Gaussian (σ = 0.5, sum 1),
  reflect padding; mean over the batch. ``kernel="paper"``: G ∝ exp(−x²/2σ²); ``kernel="official"``: the
  official code's kernel (from Attend-and-Excite), G ∝ exp(−x²/4σ²) — centre weight 0.62 vs 0.33 at σ = 0.5.
* ``norm_loss``     paper Eq. 5: mean squared error between the trained and the frozen U-Net's ε predictions.
  The total, paper Eq. 6: L = λ_n L_norm + λ_sep L_sep + λ_en L_en (the objective, tcscale.objectives.sepen).

Variable object counts: objects are given per sample, so samples may name different numbers of objects
(K ≥ 2 each). Maps are returned padded to the batch's largest K together with a (B, K) ``valid`` mask;
both losses take that mask and ignore padded slots (they count as 1 in the product, 0 in the sum, and
+∞ in the min). Every object of every sample is used: no 2-object limit, no half-batch slicing.

Everything is computed in float32 (float64 when the inputs are float64) whatever the attention dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F

ObjectTokens = Sequence[Sequence[Sequence[int]]]
"""Per sample, a list of K objects, each a list of token positions (indices into the 77 input_ids)."""

SmoothingKernel = Literal["paper", "official"]
"""3×3 Gaussian of L_en: ``paper`` exp(−x²/2σ²) (paper Eq. 3, σ = 0.5); ``official`` exp(−x²/4σ²) (the official code,
whose smoothing comes from Attend-and-Excite)."""
SMOOTHING_KERNELS: tuple[str, ...] = get_args(SmoothingKernel)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def object_token_matrix(
    object_tokens: ObjectTokens,
    seq_len: int,
    *,
    num_objects: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Ragged per-sample token positions -> (B, K, Lk) bool membership, K = max objects (or ``num_objects``).

    Row [b, k] marks the tokens of object k of sample b; padded object slots are all-False rows.
    Build it once per batch (e.g. in the collate function) and pass it to ``object_maps``.
    """
    batch = len(object_tokens)
    k_max = max((len(objs) for objs in object_tokens), default=0)
    if num_objects is not None:
        if num_objects < k_max:
            raise ValueError(f"num_objects={num_objects} but a sample names {k_max} objects")
        k_max = num_objects
    member = torch.zeros(batch, k_max, seq_len, dtype=torch.bool)
    for b, objs in enumerate(object_tokens):
        for k, positions in enumerate(objs):
            if len(positions) == 0:
                raise ValueError(f"sample {b}, object {k} has no token positions")
            for i in positions:
                if not 0 <= int(i) < seq_len:
                    raise ValueError(f"sample {b}, object {k}: token position {i} outside [0, {seq_len})")
                member[b, k, int(i)] = True
    return member.to(device) if device is not None else member


def object_maps(
    attn_maps: Sequence[torch.Tensor],
    object_tokens: ObjectTokens | torch.Tensor,
    *,
    size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-object attention maps averaged over layers and heads: the A_k of paper Eq. 2 and 3 (docs/DESIGN.md §3).

    Args:
        attn_maps: list of (B, H_m, Lq, Lk) per-head attention probabilities, one per cross-attention layer
            at the SepEn resolution (all with the same Lq and Lk; the head count may differ per layer).
        object_tokens: either per sample a list of K_b ≥ 1 lists of token positions (the tokens of object k,
            indices into input_ids, SOT = 0), or a (B, K, Lk) bool/0-1 membership tensor from
            ``object_token_matrix`` in which an all-zero row is a padded (absent) object slot.
        size: (h, w) of the layer's latent grid; None -> square, h = w = √Lq.

    Returns:
        maps: (B, K, h, w) A_k, zero in padded slots; float32 (float64 for float64 input).
        valid: (B, K) bool, True for real objects.
    """
    if len(attn_maps) == 0:
        raise ValueError("attn_maps is empty: select at least one cross-attention layer at the SepEn resolution")
    B, _, Lq, Lk = attn_maps[0].shape
    for m, a in enumerate(attn_maps):
        if a.dim() != 4 or a.shape[0] != B or a.shape[2] != Lq or a.shape[3] != Lk:
            raise ValueError(
                f"attn_maps[{m}] has shape {tuple(a.shape)}; every layer must be (B={B}, H, Lq={Lq}, Lk={Lk})"
            )
    if size is None:
        side = math.isqrt(Lq)
        if side * side != Lq:
            raise ValueError(f"Lq={Lq} is not a square; pass size=(h, w)")
        size = (side, side)
    if size[0] * size[1] != Lq:
        raise ValueError(f"size={size} does not match Lq={Lq}")

    dtype = _compute_dtype(attn_maps[0])
    device = attn_maps[0].device
    if isinstance(object_tokens, torch.Tensor):
        member = object_tokens
        if member.dim() != 3 or member.shape[0] != B or member.shape[2] != Lk:
            raise ValueError(f"object token tensor must be (B={B}, K, Lk={Lk}), got {tuple(member.shape)}")
    else:
        if len(object_tokens) != B:
            raise ValueError(f"object_tokens has {len(object_tokens)} samples, attention has B={B}")
        member = object_token_matrix(object_tokens, Lk)
    member = member.to(device=device, dtype=dtype)  # (B, K, Lk)
    tokens_per_object = member.sum(-1)  # (B, K)
    valid = tokens_per_object > 0
    # Mean over an object's tokens folded into the membership weights: w[b, k, i] = 1/|T_k| for i ∈ T_k.
    weights = member / tokens_per_object.clamp(min=1).unsqueeze(-1)  # (B, K, Lk)

    total = None
    for a in attn_maps:
        # Σ_h over heads then /H: the head mean; einsum contracts tokens with the per-object weights.
        per_layer = torch.einsum("bhqi,bki->bkq", a.to(dtype), weights) / a.shape[1]  # (B, K, Lq)
        total = per_layer if total is None else total + per_layer
    maps = total / len(attn_maps)
    return maps.reshape(B, -1, size[0], size[1]), valid


def _check_maps(A: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if A.dim() != 4:
        raise ValueError(f"object maps must be (B, K, h, w), got shape {tuple(A.shape)}")
    if valid is None:
        return torch.ones(A.shape[:2], dtype=torch.bool, device=A.device)
    if tuple(valid.shape) != tuple(A.shape[:2]):
        raise ValueError(f"valid must be (B, K)={tuple(A.shape[:2])}, got {tuple(valid.shape)}")
    return valid.to(device=A.device, dtype=torch.bool)


def separate_loss(A: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_sep = max_u ( Π_k A_k[u] / Σ_k A_k[u] ) per sample, mean over the batch (paper Eq. 2).

    Args:
        A: (B, K, h, w) object maps (``object_maps``), non-negative.
        valid: (B, K) bool, real object slots; None -> all K. Every sample needs ≥ 2 real objects.

    0/0 guard: where every real A_k[u] is exactly 0 (underflow, or synthetic maps) the product is 0 too;
    the denominator is replaced by 1 there, so the pixel contributes exactly 0 and its gradient stays
    finite. No epsilon is added anywhere else, so the value is exact for positive maps.
    """
    valid = _check_maps(A, valid)
    counts = valid.sum(-1)
    if not counts.is_meta and bool((counts < 2).any()):  # meta: shapes only (the memory planner)
        raise ValueError(f"separate_loss needs K >= 2 objects per sample, got object counts {counts.tolist()}")
    A = A.to(_compute_dtype(A))
    v = valid[:, :, None, None]
    prod = torch.where(v, A, torch.ones_like(A)).prod(dim=1)  # (B, h, w)
    total = torch.where(v, A, torch.zeros_like(A)).sum(dim=1)  # (B, h, w)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    overlap = prod / safe_total  # (B, h, w)
    return overlap.flatten(1).amax(dim=1).mean()


def gaussian_kernel_3x3(
    sigma: float = 0.5, *, kernel: str = "paper", dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """(3, 3) Gaussian on offsets {−1, 0, 1}², normalised to sum 1: exp(−(x² + y²) / 2σ²) (``kernel="paper"``) or
    exp(−(x² + y²) / 4σ²) (``kernel="official"``, the official code's Attend-and-Excite smoothing)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if kernel not in SMOOTHING_KERNELS:
        raise ValueError(f"kernel must be one of {SMOOTHING_KERNELS}, got {kernel!r}")
    x = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    g1 = torch.exp(-(x**2) / ((2.0 if kernel == "paper" else 4.0) * sigma**2))
    g2 = torch.outer(g1, g1)
    return (g2 / g2.sum()).to(dtype=dtype, device=device)


def smooth_maps(A: torch.Tensor, sigma: float = 0.5, kernel: str = "paper") -> torch.Tensor:
    """G ∗ A_k per map: 3×3 Gaussian with reflect padding (same size). A: (B, K, h, w), h, w ≥ 2."""
    B, K, h, w = A.shape
    weights = gaussian_kernel_3x3(sigma, kernel=kernel, dtype=A.dtype, device=A.device).view(1, 1, 3, 3)
    x = F.pad(A.reshape(B * K, 1, h, w), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(x, weights).reshape(B, K, h, w)


def enhance_loss(
    A: torch.Tensor, valid: torch.Tensor | None = None, sigma: float = 0.5, kernel: str = "paper"
) -> torch.Tensor:
    """L_en = 1 − min_k max_u (G ∗ A_k)[u] per sample, mean over the batch (paper Eq. 3).

    Args:
        A: (B, K, h, w) object maps (``object_maps``).
        valid: (B, K) bool, real object slots; None -> all K. Every sample needs ≥ 1 real object.
        sigma: standard deviation of the 3×3 Gaussian G (paper: 0.5).
        kernel: "paper" exp(−x²/2σ²) | "official" exp(−x²/4σ²) (``gaussian_kernel_3x3``).
    """
    valid = _check_maps(A, valid)
    if not valid.is_meta and bool((valid.sum(-1) < 1).any()):
        raise ValueError("enhance_loss needs at least one object per sample")
    A = A.to(_compute_dtype(A))
    peak = smooth_maps(A, sigma, kernel).flatten(2).amax(dim=2)  # (B, K) max_u (G ∗ A_k)[u]
    peak = torch.where(valid, peak, torch.full_like(peak, math.inf))
    return (1.0 - peak.amin(dim=1)).mean()


def norm_loss(eps_pred: torch.Tensor, eps_frozen: torch.Tensor) -> torch.Tensor:
    """L_norm = ‖ε_θ − ε_frozen‖² as a mean over every element (F.mse_loss, reduction="mean"; paper Eq. 5).

    ``eps_frozen`` (the frozen U-Net's prediction on the same z_t, t and single-concept prompt) is a target:
    it is detached. Computed in float32 (float64 for float64 inputs).
    """
    if eps_pred.shape != eps_frozen.shape:
        raise ValueError(f"shape mismatch: eps_pred {tuple(eps_pred.shape)} vs eps_frozen {tuple(eps_frozen.shape)}")
    dtype = _compute_dtype(eps_pred)
    return F.mse_loss(eps_pred.to(dtype), eps_frozen.detach().to(dtype), reduction="mean")


def sepen_losses(
    attn_maps: Sequence[torch.Tensor],
    object_tokens: ObjectTokens | torch.Tensor,
    *,
    sigma: float = 0.5,
    kernel: str = "paper",
    size: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """{"sep": L_sep (Eq. 2), "en": L_en (Eq. 3)} from the SepEn-resolution attention probabilities (object_maps +
    both losses); ``kernel`` picks L_en's smoothing ("paper" exp(−x²/2σ²) | "official" exp(−x²/4σ²))."""
    maps, valid = object_maps(attn_maps, object_tokens, size=size)
    return {"sep": separate_loss(maps, valid), "en": enhance_loss(maps, valid, sigma=sigma, kernel=kernel)}
