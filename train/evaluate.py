"""Held-out evaluation by exact full-catalog scan, for the model and the popularity baseline.

For each user with held-out items: score every item (user embedding @ all item embeddings, or
train popularity for the baseline), set the items the user saw in training to ``-inf``, keep the
top ``k_max``, and compute Recall@K / NDCG@K with :mod:`silvertorch.evaluation` (definitions
there; they agree with torchmetrics' ``RetrievalRecall`` / ``RetrievalNormalizedDCG``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from silvertorch.data.batching import FeatureTable, all_items_kjt
from silvertorch.data.dataset import RecDataset, UserItemSets
from silvertorch.evaluation import hit_matrix, mask_pairs, ranking_metrics
from silvertorch.model import TwoTower
from train.builders import build_model
from train.checkpoint import restore_checkpoint
from train.config import EvalConfig, TrainConfig, config_hash, semantic_config

__all__ = [
    "item_embeddings",
    "user_embeddings",
    "scan_topk",
    "evaluate_scores",
    "evaluate_model",
    "evaluate_popularity",
    "format_comparison",
    "load_trained_model",
    "compare_with_popularity",
]

ScoreFn = Callable[[Tensor], Tensor]  # users (U,) int64 -> scores (U, N) float32


@torch.no_grad()
def item_embeddings(model: TwoTower, dataset: RecDataset, chunk: int = 8192) -> Tensor:
    """``(N, D) float32`` embeddings of every item, in item-id order (on the model's device)."""
    device = model.item_probs.device
    out = [
        model.item_embeddings(kjt.to(device))
        for _, kjt in all_items_kjt(dataset, chunk, model.item_tower.feature_names)
    ]
    return torch.cat(out)


def user_embeddings(model: TwoTower, dataset: RecDataset) -> Callable[[Tensor], Tensor]:
    """A function ``users (U,) int64 -> (U, D) float32`` query vectors (no grad)."""
    table = FeatureTable(dataset.users.features.features, model.user_tower.feature_names)
    device = model.item_probs.device

    @torch.no_grad()
    def embed(users: Tensor) -> Tensor:
        return model.user_embeddings(table.kjt(users).to(device))

    return embed


def scan_topk(
    score_fn: ScoreFn, users: Tensor, seen: UserItemSets, k: int
) -> tuple[Tensor, Tensor]:
    """Exact top-k of ``score_fn(users)`` with each user's seen items removed.

    Returns ``(scores (U, k) float32, ids (U, k) int64)``; when fewer than ``k`` unseen items
    remain, trailing scores are ``-inf``.
    """
    scores = score_fn(users).to(torch.float32).cpu().clone()
    rows, cols = seen.pairs(users)
    mask_pairs(scores, rows, cols)
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return top.values, top.indices


def evaluate_scores(
    score_fn: ScoreFn, dataset: RecDataset, cfg: EvalConfig, seen: UserItemSets | None = None
) -> dict[str, float]:
    """Recall@K / NDCG@K of a scorer over all users with held-out items (chunked by users).

    ``seen`` defaults to ``dataset.train_seen()`` (every train interaction, whatever its rating).
    """
    seen = seen if seen is not None else dataset.train_seen()
    relevant = dataset.test_positives(cfg.min_rating)
    num_rel = relevant.lengths()
    users = torch.nonzero(num_rel > 0).squeeze(1)
    if users.numel() == 0:
        raise ValueError(f"{dataset.name}: no user has a held-out item to evaluate")
    hits = []
    for start in range(0, users.numel(), cfg.user_chunk):
        chunk = users[start : start + cfg.user_chunk]
        _, ids = scan_topk(score_fn, chunk, seen, cfg.k_max)
        rel_rows, rel_cols = relevant.pairs(chunk)
        hits.append(hit_matrix(ids, rel_rows, rel_cols, dataset.num_items))
    return ranking_metrics(torch.cat(hits), num_rel[users], cfg.recall_ks, cfg.ndcg_ks)


@torch.no_grad()
def evaluate_model(model: TwoTower, dataset: RecDataset, cfg: EvalConfig) -> dict[str, float]:
    """Metrics of the two-tower model (eval mode; restores the previous mode)."""
    was_training = model.training
    model.eval()
    try:
        items = item_embeddings(model, dataset)
        embed = user_embeddings(model, dataset)
        return evaluate_scores(lambda u: embed(u) @ items.T, dataset, cfg)
    finally:
        model.train(was_training)


def evaluate_popularity(dataset: RecDataset, cfg: EvalConfig) -> dict[str, float]:
    """Metrics of the most-popular-unseen baseline (score = train interaction count)."""
    pop = dataset.item_popularity()
    return evaluate_scores(lambda u: pop.expand(u.numel(), -1), dataset, cfg)


def format_comparison(
    model: dict[str, float], baseline: dict[str, float], name: str = "popularity"
) -> str:
    """A text table: metric | model | baseline | margin (absolute and relative)."""
    lines = [
        f"{'metric':<12}{'two-tower':>12}{name:>12}{'margin':>12}{'relative':>11}",
        "-" * 59,
    ]
    for key, value in model.items():
        base = baseline[key]
        rel = f"{(value / base - 1) * 100:+.1f}%" if base > 0 else "n/a"
        lines.append(f"{key:<12}{value:>12.4f}{base:>12.4f}{value - base:>+12.4f}{rel:>11}")
    return "\n".join(lines)


def load_trained_model(config: TrainConfig, path: str | Path, dataset: RecDataset) -> TwoTower:
    """Build the model of ``config`` and load its weights from a training checkpoint (verified:
    same config hash and tensor shapes, else :class:`~train.checkpoint.CheckpointError`)."""
    model = build_model(config, dataset, config.train.device)
    restore_checkpoint(
        path,
        model=model,
        optimizer=None,
        config=semantic_config(config),
        config_hash=config_hash(config),
    )
    return model.eval()


def compare_with_popularity(
    model: TwoTower, dataset: RecDataset, cfg: EvalConfig
) -> tuple[dict[str, float], dict[str, float], str]:
    """``(model metrics, popularity metrics, text table)`` on the held-out interactions."""
    ours = evaluate_model(model, dataset, cfg)
    base = evaluate_popularity(dataset, cfg)
    return ours, base, format_comparison(ours, base)
