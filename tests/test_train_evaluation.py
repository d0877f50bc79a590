"""Metrics: hand-made cases and agreement with torchmetrics (users with several held-out items)."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.retrieval import retrieval_normalized_dcg, retrieval_recall

from silvertorch.data.dataset import UserItemSets
from silvertorch.evaluation import hit_matrix, mask_pairs, ndcg_at_k, ranking_metrics, recall_at_k
from train.evaluate import format_comparison, scan_topk


def test_recall_and_ndcg_by_hand() -> None:
    # user 0: 3 relevant, hits at ranks 0 and 2; user 1: 1 relevant, hit at rank 1; user 2: none
    hits = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    num_rel = torch.tensor([3, 1, 0])
    r = recall_at_k(hits, num_rel, 2)
    assert r[0] == pytest.approx(1 / 3) and r[1] == pytest.approx(1.0) and math.isnan(r[2])
    n = ndcg_at_k(hits, num_rel, 4)
    idcg0 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert n[0] == pytest.approx((1 + 1 / math.log2(4)) / idcg0)
    assert n[1] == pytest.approx(1 / math.log2(3))
    m = ranking_metrics(hits, num_rel, recall_ks=[2], ndcg_ks=[4])
    assert m["recall@2"] == pytest.approx((1 / 3 + 1) / 2)  # user 2 is skipped
    with pytest.raises(ValueError):
        ranking_metrics(hits, num_rel, recall_ks=[10], ndcg_ks=[])


def test_full_scan_agrees_with_torchmetrics() -> None:
    g = torch.Generator().manual_seed(0)
    num_users, num_items, k = 12, 40, 10
    # positive scores: torchmetrics 1.9's retrieval_recall counts only items with preds > 0 as
    # retrieved (cosine scores can be negative, one reason the scan uses its own functions)
    scores = torch.rand(num_users, num_items, generator=g) + 0.01
    seen_mask = torch.rand(num_users, num_items, generator=g) < 0.2
    rel_mask = (torch.rand(num_users, num_items, generator=g) < 0.15) & ~seen_mask
    rel_mask[0] = False  # a user without held-out items is skipped
    users = torch.arange(num_users)
    su, si = seen_mask.nonzero(as_tuple=True)
    ru, ri = rel_mask.nonzero(as_tuple=True)
    seen = UserItemSets.from_pairs(su, si, num_users, num_items)
    rel = UserItemSets.from_pairs(ru, ri, num_users, num_items)
    _, ids = scan_topk(lambda u: scores[u], users, seen, k)
    assert not seen_mask.gather(1, ids).any()  # seen items never recommended
    rows, cols = rel.pairs(users)
    hits = hit_matrix(ids, rows, cols, num_items)
    num_rel = rel.lengths()
    assert int(num_rel.max()) > 1  # several held-out items per user
    ours = ranking_metrics(hits, num_rel, recall_ks=[5, 10], ndcg_ks=[5, 10])
    ref: dict[str, list[float]] = {key: [] for key in ours}
    for u in range(num_users):
        if num_rel[u] == 0:
            continue
        keep = ~seen_mask[u]
        p, t = scores[u][keep], rel_mask[u][keep]
        for kk in (5, 10):
            ref[f"recall@{kk}"].append(float(retrieval_recall(p, t, top_k=kk)))
            ref[f"ndcg@{kk}"].append(float(retrieval_normalized_dcg(p, t, top_k=kk)))
    for key, values in ref.items():
        assert ours[key] == pytest.approx(sum(values) / len(values), abs=1e-6), key


def test_mask_pairs_with_offset_and_table() -> None:
    s = torch.zeros(2, 3)
    mask_pairs(s, torch.tensor([0, 3, 4]), torch.tensor([1, 2, 0]), row_offset=3)
    assert s[0, 2] == -math.inf and s[1, 0] == -math.inf and s.isinf().sum() == 2
    table = format_comparison({"recall@10": 0.2}, {"recall@10": 0.1})
    assert "+0.1000" in table and "+100.0%" in table
