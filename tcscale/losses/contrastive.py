"""InfoNCE between paired text and image embeddings (docs/DESIGN.md §4; the contrastive text-encoder stage).

N pairs (t_i, v_i). Rows are L2-normalised, t̂_i = t_i / ‖t_i‖, v̂_j = v_j / ‖v_j‖, and

    logits[i, j] = t̂_i · v̂_j / τ                                         (N, N)
    L_t→v = −(1/N) Σ_i log softmax_j(logits[i, :])[i]                    row i's positive is column i
    L_v→t = −(1/N) Σ_j log softmax_i(logits[:, j])[j]
    L     = (L_t→v + L_v→t) / 2   (symmetric, default)  |  L_t→v   (symmetric=False: the seed study's form)

Duplicates: two pairs that share a phrase ("person" twice in a batch) make each other's image a false negative.
`labels` (N,) (equal label = same phrase) or `positive_mask` (N, N) bool (mask[a, b]: pair b is also a positive of
pair a) removes those entries from the softmax denominators, in both directions: text a's row drops image b, and
image a's row (a column of the logits) drops text b, for every b ≠ a with mask[a, b]. The target stays the pair's
own partner; with no duplicates the result equals the plain InfoNCE.

Computed in float32 (float64 for float64 inputs) whatever the embeddings' dtype. `temperature` may be a Python
float or a 0-dim tensor (a learnable temperature: the gradient reaches it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def duplicate_mask(labels: torch.Tensor) -> torch.Tensor:
    """(N,) labels -> (N, N) bool, True where two pairs carry the same label (the diagonal included)."""
    return labels[:, None] == labels[None, :]


def info_nce(
    text_emb: torch.Tensor,
    image_emb: torch.Tensor,
    temperature: float | torch.Tensor,
    *,
    symmetric: bool = True,
    labels: torch.Tensor | None = None,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar InfoNCE of N (text, image) pairs; see the module docstring.

    text_emb, image_emb: (N, D) (not necessarily normalised); temperature τ > 0; labels: (N,) ints, or
    positive_mask: (N, N) bool (give at most one): other columns of row i that are positives too, left out of the
    negatives. N = 0 gives 0 (connected to the inputs, so a backward still runs)."""
    if text_emb.ndim != 2 or text_emb.shape != image_emb.shape:
        raise ValueError(f"text_emb and image_emb must both be (N, D), got {tuple(text_emb.shape)} and "
                         f"{tuple(image_emb.shape)}")  # fmt: skip
    if labels is not None and positive_mask is not None:
        raise ValueError("give labels or positive_mask, not both")
    n = text_emb.shape[0]
    dtype = torch.float64 if text_emb.dtype == torch.float64 else torch.float32
    if n == 0:
        return (text_emb.sum() + image_emb.sum()).to(dtype) * 0.0
    t = F.normalize(text_emb.to(dtype), dim=-1)
    v = F.normalize(image_emb.to(dtype), dim=-1)
    tau = temperature.to(dtype) if torch.is_tensor(temperature) else torch.tensor(float(temperature), dtype=dtype)
    logits = t @ v.T / tau  # (N, N): row = text i, column = image j
    text_rows, image_rows = logits, logits.T  # text→image queries are the rows, image→text the columns
    if labels is not None:
        positive_mask = duplicate_mask(labels.to(logits.device))
    if positive_mask is not None:
        if positive_mask.shape != (n, n):
            raise ValueError(f"positive_mask must be ({n}, {n}), got {tuple(positive_mask.shape)}")
        eye = torch.eye(n, dtype=torch.bool, device=logits.device)
        drop = positive_mask.to(device=logits.device, dtype=torch.bool) & ~eye  # [a, b]: pair b also fits pair a
        text_rows = text_rows.masked_fill(drop, float("-inf"))
        image_rows = image_rows.masked_fill(drop, float("-inf"))
    target = torch.arange(n, device=logits.device)
    text_to_image = F.cross_entropy(text_rows, target)
    if not symmetric:
        return text_to_image
    return (text_to_image + F.cross_entropy(image_rows, target)) / 2
