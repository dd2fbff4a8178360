"""Retrieval recall@k between two embedded sets (pure function; the text-encoder stage's held-out check).

Queries and gallery items carry labels (for text→crop: a query is one distinct phrase, a gallery item one object
crop labelled with its phrase). A query is a hit at k when at least one of the k gallery items most similar to it
(cosine similarity) has the query's label. recall@k = hits / queries. Several crops of the same phrase are all
correct answers for that phrase's text, which is the only reading a text query can have.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def retrieval_recall(
    query_emb: torch.Tensor,
    gallery_emb: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor,
    ks: Sequence[int] = (1, 5),
) -> dict[int, float]:
    """{k: recall@k} of (Q, D) queries against a (G, D) gallery; labels (Q,) and (G,) ints. k is capped at G."""
    if query_emb.shape[0] == 0 or gallery_emb.shape[0] == 0:
        return {k: float("nan") for k in ks}
    q = F.normalize(query_emb.double(), dim=-1)
    g = F.normalize(gallery_emb.double(), dim=-1)
    sim = q @ g.T  # (Q, G)
    top = sim.topk(min(max(ks), g.shape[0]), dim=1).indices  # (Q, kmax), most similar first
    match = gallery_labels.to(top.device)[top] == query_labels.to(top.device)[:, None]  # (Q, kmax)
    return {k: float(match[:, :k].any(dim=1).double().mean()) for k in ks}
