"""Recall@K / NDCG@K of a sharded two-tower model: embeddings computed by all ranks, gathered.

Every rank embeds an equal, contiguous share of the users and of the items through the sharded
towers (padded with id 0 so that every rank makes the same number of equally sized lookups: a
sharded lookup is a collective), the shares are all-gathered in rank order, and rank 0 scores them
with the single-process :func:`train.evaluate.evaluate_scores`. The result is broadcast, so every
rank returns the same metrics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from silvertorch.data.batching import FeatureTable
from silvertorch.data.dataset import RecDataset
from silvertorch.distributed.collectives import all_gather_cat
from train.config import EvalConfig
from train.evaluate import evaluate_scores

__all__ = ["embed_all", "evaluate_distributed"]


@torch.no_grad()
def embed_all(
    tower: nn.Module, table: FeatureTable, num_rows: int, device: torch.device, chunk: int = 4096
) -> Tensor:
    """``(num_rows, D) float32`` embeddings of rows ``0..num_rows-1``, computed in shares by all
    ranks and gathered (collective). ``tower``: KJT -> ``(n, D)``."""
    world, rank = dist.get_world_size(), dist.get_rank()
    share = -(-num_rows // world)  # ceil
    ids = torch.arange(rank * share, (rank + 1) * share).clamp_(max=num_rows - 1)
    parts = [tower(table.kjt(ids[s : s + chunk]).to(device)) for s in range(0, share, chunk)]
    return all_gather_cat(torch.cat(parts).float().contiguous())[:num_rows].cpu()


@torch.no_grad()
def evaluate_distributed(
    model: nn.Module, dataset: RecDataset, cfg: EvalConfig, device: torch.device
) -> dict[str, float]:
    """Metrics of a sharded two-tower ``model`` (``DistributedModelParallel.module``: has
    ``user_tower`` / ``item_tower``); collective, every rank returns rank 0's metrics."""
    was_training = model.training
    model.eval()
    try:
        users = FeatureTable(dataset.users.features.features, model.user_tower.feature_names)
        items = FeatureTable(dataset.items.features.features, model.item_tower.feature_names)
        user_emb = embed_all(model.user_tower, users, users.num_rows, device, cfg.user_chunk)
        item_emb = embed_all(model.item_tower, items, items.num_rows, device)
        result = [None]
        if dist.get_rank() == 0:
            result[0] = evaluate_scores(lambda u: user_emb[u] @ item_emb.T, dataset, cfg)
        dist.broadcast_object_list(result, src=0)
        return result[0]  # type: ignore[return-value]
    finally:
        model.train(was_training)
