"""Offline retrieval metrics as pure functions (exact full-catalog scan, no model imports).

Definitions, per user ``u`` with a non-empty set ``R_u`` of held-out relevant items, after the
items ``u`` saw in training are removed from the ranking:

* ``Recall@K = |top-K(u) ∩ R_u| / |R_u|`` (the fraction of the user's held-out items retrieved;
  a user with more than K held-out items cannot reach 1.0). Same as
  ``torchmetrics.retrieval.RetrievalRecall(top_k=K)``.
* ``NDCG@K = DCG@K / IDCG@K`` with binary gains, ``DCG@K = sum_{r<K} rel(r) / log2(r + 2)`` and
  ``IDCG@K`` the DCG of ``min(K, |R_u|)`` hits at the top. Same as
  ``torchmetrics.retrieval.RetrievalNormalizedDCG(top_k=K)``.

Metrics are averaged over users with at least one held-out item. Pairs ``(rows, cols)`` of int64
tensors describe sparse user x item sets (training history, held-out positives).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "mask_pairs",
    "hit_matrix",
    "recall_at_k",
    "ndcg_at_k",
    "ranking_metrics",
    "metric_names",
]


def mask_pairs(scores: Tensor, rows: Tensor, cols: Tensor, row_offset: int = 0) -> Tensor:
    """Set ``scores[rows - row_offset, cols] = -inf`` for pairs whose row falls in this block.

    Args:
        scores: ``(U, N) float32`` scores of users ``row_offset .. row_offset + U - 1``.
        rows, cols: ``(nnz,) int64`` user and item ids to exclude (all users; filtered here).
    Returns:
        the same tensor, modified in place.
    """
    local = rows - row_offset
    keep = (local >= 0) & (local < scores.shape[0])
    scores[local[keep], cols[keep]] = -math.inf
    return scores


def hit_matrix(
    topk_ids: Tensor, rel_rows: Tensor, rel_cols: Tensor, num_items: int, row_offset: int = 0
) -> Tensor:
    """``topk_ids (U, K) int64``: ranked item ids of users ``row_offset ..``.

    Returns ``(U, K) bool``: True where the item is in the user's relevant set, given as pairs
    ``rel_rows, rel_cols (nnz,) int64`` (global user ids, item ids).
    """
    users = torch.arange(topk_ids.shape[0], device=topk_ids.device).unsqueeze(1) + row_offset
    keys = users * num_items + topk_ids
    rel_keys = rel_rows.to(topk_ids.device) * num_items + rel_cols.to(topk_ids.device)
    return torch.isin(keys, rel_keys)


def recall_at_k(hits: Tensor, num_relevant: Tensor, k: int) -> Tensor:
    """``hits (U, >=K) bool``, ``num_relevant (U,) int64`` -> ``(U,) float32`` Recall@K
    (NaN where ``num_relevant == 0``)."""
    found = hits[:, :k].sum(1).to(torch.float32)
    denom = num_relevant.to(torch.float32)
    return torch.where(denom > 0, found / denom.clamp_min(1), torch.full_like(found, math.nan))


def ndcg_at_k(hits: Tensor, num_relevant: Tensor, k: int) -> Tensor:
    """``hits (U, >=K) bool``, ``num_relevant (U,) int64`` -> ``(U,) float32`` binary NDCG@K
    (NaN where ``num_relevant == 0``)."""
    discount = 1.0 / torch.log2(torch.arange(k, dtype=torch.float32, device=hits.device) + 2.0)
    dcg = (hits[:, :k].to(torch.float32) * discount).sum(1)
    ideal_cum = torch.cat([discount.new_zeros(1), discount.cumsum(0)])  # (K+1,)
    idcg = ideal_cum[num_relevant.clamp(max=k).to(hits.device)]
    valid = num_relevant.to(hits.device) > 0
    return torch.where(valid, dcg / idcg.clamp_min(1e-12), torch.full_like(dcg, math.nan))


def metric_names(recall_ks: Sequence[int], ndcg_ks: Sequence[int]) -> list[str]:
    return [f"recall@{k}" for k in recall_ks] + [f"ndcg@{k}" for k in ndcg_ks]


def ranking_metrics(
    hits: Tensor,
    num_relevant: Tensor,
    recall_ks: Sequence[int] = (10, 50, 100),
    ndcg_ks: Sequence[int] = (10,),
) -> dict[str, float]:
    """Mean Recall@K / NDCG@K over users with ``num_relevant > 0``.

    Args:
        hits: ``(U, K_max) bool`` hit flags of each user's ranked list (``K_max >= max k``).
        num_relevant: ``(U,) int64`` held-out items per user.
    """
    k_max = max([*recall_ks, *ndcg_ks])
    if hits.shape[1] < k_max:
        raise ValueError(f"hits has {hits.shape[1]} columns, metrics need {k_max}")
    out: dict[str, float] = {}
    valid = num_relevant > 0
    if not bool(valid.any()):
        raise ValueError("no user has a held-out item: metrics are undefined")
    for k in recall_ks:
        out[f"recall@{k}"] = float(recall_at_k(hits, num_relevant, k)[valid].mean())
    for k in ndcg_ks:
        out[f"ndcg@{k}"] = float(ndcg_at_k(hits, num_relevant, k)[valid].mean())
    return out
