"""Held-out evaluation of the served path: the RetrievalModel's composite ranking and its heads.

**Seen-item exclusion.** A user's train items must not be recommended. :func:`retrieve_unseen`
asks the model for ``K'' = max(k, k_prime) + n_seen`` candidates (the largest ``n_seen`` of the
chunk; ``max_k`` is raised for the call), so the output holds *every* candidate the index returned
with its composite and retrieval score. On the host it drops the seen items, keeps the best
``max(k, k_prime)`` unseen ones **by retrieval score** - exactly the candidate set an index that
skipped seen items would return at the same nprobe (fewer when the probed clusters run out) - and
ranks those by the composite. Costs ``n_seen`` extra candidates per user through the OverArch; a
per-user exclusion inside the scan would avoid that (left for the serving issue).

**Metrics.** Recall@K / NDCG@K of that final ranking (definitions in :mod:`silvertorch.evaluation`,
relevant = held-out test items), and per task head the binary AUROC (torchmetrics) over, for each
test user, the test items (``rated`` = 1; ``liked`` = rating >= the like threshold) plus the
retrieved unseen, non-test candidates as negatives (label 0 for every task), all scored with the
index's stored vectors as in serving.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor
from torchmetrics.classification import BinaryAUROC

from silvertorch.data.batching import FeatureTable
from silvertorch.data.dataset import RecDataset, UserItemSets
from silvertorch.evaluation import hit_matrix, ranking_metrics
from silvertorch.model import RetrievalModel, RetrievalOutput
from train.config import EvalConfig

__all__ = ["retrieve_unseen", "evaluate_retrieval_model", "format_joint_comparison"]


def _pair_mask(users: Tensor, ids: Tensor, sets: UserItemSets, num_items: int) -> Tensor:
    """``(B, K) bool``: ``ids[b, j]`` is in the set of ``users[b]`` (``-1`` ids are False)."""
    rows, cols = sets.pairs(users)
    return hit_matrix(ids, rows, cols, num_items) & (ids >= 0)


@torch.no_grad()
def _retrieve_all(model: RetrievalModel, kjt: Any, k_all: int, filters: list[str | None] | None,
                  nprobe: int | None) -> RetrievalOutput:
    cfg = model.config
    if k_all > cfg.max_k:  # host-side evaluation may ask for more than a serving request
        model.config = dataclasses.replace(cfg, max_k=k_all)
    try:
        return model.retrieve(kjt, k_all, filters, nprobe=nprobe)
    finally:
        model.config = cfg


@torch.no_grad()
def retrieve_unseen(model: RetrievalModel, kjt: Any, users: Tensor, seen: UserItemSets, k: int,
                    filters: list[str | None] | None = None, nprobe: int | None = None,
                    ) -> tuple[RetrievalOutput, Tensor, Tensor]:
    """Top-``k`` composite ranking without each user's ``seen`` items (see the module docstring).

    ``kjt``: user features (batch ``B``) of ``users (B,) int64``. Returns ``(output (B, k) padded
    like the model's, pool_ids (B, K') int64, pool_mask (B, K') bool)``: the unseen candidate pool
    the ranking was taken from (``K' = max(k, k_prime) + max n_seen``).
    """
    kp = max(k, model.config.k_prime)
    extra = int(seen.lengths()[users].max()) if users.numel() else 0
    out = _retrieve_all(model, kjt, kp + extra, filters, nprobe)
    ids = out.ids
    unseen = (ids >= 0) & ~_pair_mask(users, ids, seen, model.num_items)
    ret = out.retrieval_scores.masked_fill(~unseen, float("-inf"))
    top_ret, pos = torch.topk(ret, min(kp, ret.shape[1]), dim=1)
    pool = torch.zeros_like(unseen).scatter(1, pos, top_ret > float("-inf"))
    comp = out.scores.masked_fill(~pool, float("-inf"))
    s, p = torch.topk(comp, k, dim=1)
    keep = s > float("-inf")
    T = out.task_scores.shape[-1]
    result = RetrievalOutput(
        torch.where(keep, ids.gather(1, p), -1),
        s,
        torch.where(keep[..., None], out.task_scores.gather(1, p[..., None].expand(-1, -1, T)), 0.0),
        torch.where(keep, out.retrieval_scores.gather(1, p), float("-inf")),
    )
    return result, ids, pool


def _test_items(dataset: RecDataset, users: Tensor, like: float) -> tuple[Tensor, Tensor]:
    """Padded ``(B, L)`` test item ids (``-1`` pad) and ratings of ``users``."""
    test = dataset.test
    lists = [torch.nonzero(test.user == u).squeeze(1) for u in users.tolist()]
    L = max([1, *(x.numel() for x in lists)])
    ids = torch.full((users.numel(), L), -1, dtype=torch.int64)
    rating = torch.zeros(users.numel(), L)
    for r, rows in enumerate(lists):
        ids[r, : rows.numel()] = test.item[rows]
        rating[r, : rows.numel()] = test.rating[rows]
    return ids, rating


@torch.no_grad()
def evaluate_retrieval_model(model: RetrievalModel, dataset: RecDataset, cfg: EvalConfig, *,
                             k: int = 100, like_threshold: float = 4.0, user_chunk: int = 128,
                             nprobe: int | None = None) -> dict[str, float]:
    """Recall@K / NDCG@K of the composite ranking (``k`` = 100) and ``auc_<task>`` per head."""
    model.eval()
    seen, relevant = dataset.train_seen(), dataset.test_positives(cfg.min_rating)
    num_rel = relevant.lengths()
    users = torch.nonzero(num_rel > 0).squeeze(1)
    users = users[torch.argsort(seen.lengths()[users], stable=True)]  # similar n_seen per chunk
    table = FeatureTable(dataset.users.features.features, model.user_tower.feature_names)
    tasks = model.overarch.tasks
    aucs = {t: BinaryAUROC() for t in tasks}
    hits, nrel = [], []
    test_all = UserItemSets.from_pairs(dataset.test.user, dataset.test.item, dataset.num_users,
                                       dataset.num_items)  # fmt: skip
    for start in range(0, users.numel(), user_chunk):
        chunk = users[start : start + user_chunk]
        kjt = table.kjt(chunk)
        out, pool_ids, pool = retrieve_unseen(model, kjt, chunk, seen, k, nprobe=nprobe)
        hits.append(_pair_mask(chunk, out.ids, relevant, dataset.num_items))
        nrel.append(num_rel[chunk])
        # heads: test items vs retrieved non-interacted candidates
        test_ids, test_rating = _test_items(dataset, chunk, like_threshold)
        negatives = torch.where(pool & ~_pair_mask(chunk, pool_ids, test_all, dataset.num_items),
                                pool_ids, -1)  # fmt: skip
        ids = torch.cat([test_ids, negatives], dim=1)
        q = model.user_tower(kjt)
        probs = torch.sigmoid(model.score_candidates(q, model.candidate_vectors(ids), ids))
        valid = ids >= 0
        n_test = test_ids.shape[1]
        for t, name in enumerate(tasks):
            label = torch.zeros(ids.shape)
            label[:, :n_test] = (test_rating >= like_threshold).float() if name == "liked" else 1.0
            aucs[name].update(probs[..., t][valid], label[valid].long())
    metrics = ranking_metrics(torch.cat(hits), torch.cat(nrel), cfg.recall_ks, cfg.ndcg_ks)
    for name, auc in aucs.items():
        metrics[f"auc_{name}"] = float(auc.compute())
    return metrics


def format_joint_comparison(joint: dict[str, float], two_stage: dict[str, float]) -> str:
    """A text table: metric | joint | two-stage | difference."""
    lines = [f"{'metric':<22}{'joint':>10}{'two-stage':>12}{'diff':>10}", "-" * 54]
    for key, value in joint.items():
        base = two_stage.get(key, float("nan"))
        lines.append(f"{key:<22}{value:>10.4f}{base:>12.4f}{value - base:>+10.4f}")
    return "\n".join(lines)
