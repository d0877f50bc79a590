"""Hard negatives mined by the index itself, and their multi-task labels from TRAIN interactions.

For a training user the current :class:`~silvertorch.index.search.ItemIndex` is searched for its
top-``K`` candidates (nothing excluded: items the user rated are among them and become positives of
the "rated" task). Labels per task come from the user's train ratings: ``rated`` = the user rated
the item, ``liked`` = rating >= the like threshold.
"""

from __future__ import annotations

import torch
from torch import Tensor

from silvertorch.data.dataset import Interactions
from silvertorch.index.search import ItemIndex, SearchParams

__all__ = ["TASK_NAMES", "InteractionLabels", "mine_candidates"]

TASK_NAMES = ("liked", "rated")  # the tasks whose labels MovieLens ratings define


class InteractionLabels:
    """Rating lookup for (user, item) pairs over a set of interactions (sorted keys, no dense matrix).

    Args:
        inter: the interactions (TRAIN for training labels).
        num_items: ``N``; keys are ``user * N + item``.
        like_threshold: rating at or above which the ``liked`` label is 1.
    """

    def __init__(self, inter: Interactions, num_items: int, like_threshold: float = 4.0) -> None:
        key = inter.user * num_items + inter.item
        order = torch.argsort(key)
        self.keys = key[order]  # (n,) int64 sorted (duplicates keep their last rating below)
        self.ratings = inter.rating[order]  # (n,) f32
        self.num_items = num_items
        self.like_threshold = like_threshold

    def rating(self, users: Tensor, items: Tensor) -> Tensor:
        """``users (B,) int64``, ``items (B, K) int64`` (``-1`` = padding) -> ``(B, K) f32`` rating
        of each pair, 0 where the user has no interaction with the item (or for padding)."""
        if self.keys.numel() == 0:
            return torch.zeros(items.shape, dtype=torch.float32)
        q = users[:, None] * self.num_items + items.clamp_min(0)
        pos = torch.searchsorted(self.keys, q, right=True) - 1
        safe = pos.clamp_min(0)
        found = (pos >= 0) & (self.keys[safe] == q) & (items >= 0)
        return torch.where(found, self.ratings[safe], torch.zeros((), dtype=torch.float32))

    def labels(self, users: Tensor, items: Tensor, tasks: list[str]) -> Tensor:
        """``(B, K, T) f32`` labels of ``tasks`` (each in :data:`TASK_NAMES`) for the pairs."""
        r = self.rating(users, items)
        cols = []
        for t in tasks:
            if t == "rated":
                cols.append((r > 0).float())
            elif t == "liked":
                cols.append((r >= self.like_threshold).float())
            else:
                raise ValueError(f"no labels for task '{t}'; MovieLens ratings define {TASK_NAMES}")
        return torch.stack(cols, dim=-1)


@torch.no_grad()
def mine_candidates(index: ItemIndex, query: Tensor, k: int, nprobe: int) -> Tensor:
    """Top-``k`` item ids of the index for ``query (B, D) f32`` -> ``(B, k) int64`` (``-1`` padding).

    Nothing is excluded; gradients do not flow through the search (the caller recomputes the
    candidates' scores with autograd).
    """
    _, ids = index.search(query.detach(), k, SearchParams(nprobe=nprobe))
    return ids
