"""The dataset types every loader returns: entity tables, interactions, and a train/test split.

Users and items are *dense* indices ``0..n-1``; ``EntityTable.raw_ids[i]`` is the id in the source
file. Features use the shared attribute format (:class:`~silvertorch.index.attributes.Attribute`):
for every model feature, value id 0 is the out-of-vocabulary value :data:`OOV`, so a value never
seen at training time maps to row 0 of its embedding table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from silvertorch.index.attributes import Attribute, ItemAttributes

__all__ = [
    "OOV",
    "EntityTable",
    "Interactions",
    "UserItemSets",
    "RecDataset",
    "encode_vocab",
    "temporal_split",
    "single_attribute",
    "multi_attribute",
]

OOV = "<oov>"


def encode_vocab(
    names: list[str] | np.ndarray, order: list[str] | None = None
) -> tuple[list[str], Tensor]:
    """Codes for string values: ``(vocab, codes (n,) int64)`` with ``vocab[0] == OOV``.

    ``vocab[1:]`` is ``order`` when given (values not in it become 0), else the sorted unique names.
    """
    arr = np.asarray(names, dtype=object).astype(str)
    if order is None:
        uniq, inverse = np.unique(arr, return_inverse=True)
        return [OOV, *uniq.tolist()], torch.from_numpy(inverse.reshape(-1).astype(np.int64) + 1)
    index = {name: i + 1 for i, name in enumerate(order)}
    codes = torch.tensor([index.get(x, 0) for x in arr.tolist()], dtype=torch.int64)
    return [OOV, *order], codes


@dataclass
class EntityTable:
    """Users or items: ``raw_ids[i]`` names dense index ``i``; ``features`` holds attributes."""

    raw_ids: list[str]
    features: ItemAttributes
    titles: list[str] | None = None

    def __post_init__(self) -> None:
        if self.features.num_items != len(self.raw_ids):
            raise ValueError(
                f"features cover {self.features.num_items} rows "
                f"but there are {len(self.raw_ids)} ids"
            )
        if self.titles is not None and len(self.titles) != len(self.raw_ids):
            raise ValueError(f"{len(self.titles)} titles for {len(self.raw_ids)} ids")

    def __len__(self) -> int:
        return len(self.raw_ids)

    @property
    def feature_names(self) -> list[str]:
        return list(self.features.features)

    def cardinalities(self) -> dict[str, int]:
        """Embedding table sizes: feature name -> number of value ids (OOV row included)."""
        return {n: a.cardinality for n, a in self.features.features.items()}


@dataclass
class Interactions:
    """Column tensors of ``n`` (user, item) events, all on CPU.

    ``user (n,) int64`` and ``item (n,) int64`` are dense indices, ``rating (n,) float32``,
    ``timestamp (n,) int64`` (seconds).
    """

    user: Tensor
    item: Tensor
    rating: Tensor
    timestamp: Tensor

    def __post_init__(self) -> None:
        n = self.user.numel()
        for name, t, dtype in (("user", self.user, torch.int64), ("item", self.item, torch.int64),
                               ("rating", self.rating, torch.float32),
                               ("timestamp", self.timestamp, torch.int64)):  # fmt: skip
            if t.dtype != dtype or t.dim() != 1 or t.numel() != n:
                raise ValueError(
                    f"Interactions.{name}: expected ({n},) {dtype}, got {tuple(t.shape)} {t.dtype}"
                )

    def __len__(self) -> int:
        return self.user.numel()

    def select(self, index: Tensor) -> Interactions:
        """Rows ``index`` (a ``(m,) int64`` index or an ``(n,) bool`` mask)."""
        return Interactions(self.user[index], self.item[index], self.rating[index],
                            self.timestamp[index])  # fmt: skip

    def labels(self, like_threshold: float = 4.0) -> dict[str, Tensor]:
        """Multi-task labels, each ``(n,) float32``: ``liked`` = rating >= threshold, ``rated`` = 1.
        """
        return {
            "liked": (self.rating >= like_threshold).to(torch.float32),
            "rated": torch.ones(len(self), dtype=torch.float32),
        }


@dataclass
class UserItemSets:
    """Per-user item sets in CSR: user ``u`` has ``items[offsets[u]:offsets[u+1]]``, sorted, unique.

    ``offsets (U+1,) int64``, ``items (nnz,) int64``.
    """

    offsets: Tensor
    items: Tensor

    @classmethod
    def from_pairs(cls, user: Tensor, item: Tensor, num_users: int, num_items: int) -> UserItemSets:
        """Build from ``(n,)`` user / item index columns (duplicates removed)."""
        key = torch.unique(user.to(torch.int64) * num_items + item.to(torch.int64))  # sorted
        counts = torch.bincount(key // num_items, minlength=num_users)
        offsets = torch.zeros(num_users + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(counts, 0)
        return cls(offsets, key % num_items)

    @property
    def num_users(self) -> int:
        return self.offsets.numel() - 1

    def lengths(self) -> Tensor:
        """(U,) int64 set sizes."""
        return self.offsets[1:] - self.offsets[:-1]

    def of(self, user: int) -> Tensor:
        """(m,) int64 items of one user."""
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def pairs(self, users: Tensor) -> tuple[Tensor, Tensor]:
        """For ``users (B,) int64``: ``(row (m,), item (m,))`` int64, one pair per set member.

        ``scores[row, item] = -inf`` masks every seen item of a ``(B, I)`` score matrix at once.
        """
        starts = self.offsets[users]
        lens = self.offsets[users + 1] - starts
        total = int(lens.sum())
        row = torch.repeat_interleave(torch.arange(users.numel()), lens, output_size=total)
        first = torch.cumsum(lens, 0) - lens
        pos = starts[row] + torch.arange(total) - first[row]
        return row, self.items[pos]


def temporal_split(
    inter: Interactions, num_users: int, test_fraction: float = 0.1
) -> tuple[Interactions, Interactions]:
    """Per-user temporal leave-last-out split; returns ``(train, test)``.

    Each user's events are ordered by ``(timestamp, item)``; the last
    ``max(1, floor(test_fraction * n_u))`` of them go to test (but at most ``n_u - 1`` when the user
    has two or more, so everyone with history keeps a train row), the rest to train. Hence, per
    user, every train timestamp is <= every test timestamp. Both outputs are sorted by
    (user, timestamp, item).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    order = torch.argsort(inter.item, stable=True)
    order = order[torch.argsort(inter.timestamp[order], stable=True)]
    order = order[torch.argsort(inter.user[order], stable=True)]
    sorted_inter = inter.select(order)
    counts = torch.bincount(sorted_inter.user, minlength=num_users)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(sorted_inter)) - start[sorted_inter.user]
    n_test = torch.floor(counts.to(torch.float64) * test_fraction).to(torch.int64).clamp(min=1)
    n_test = torch.minimum(n_test, (counts - 1).clamp(min=1))
    is_test = rank >= (counts - n_test)[sorted_inter.user]
    return sorted_inter.select(~is_test), sorted_inter.select(is_test)


@dataclass
class RecDataset:
    """A recommendation dataset: entity tables and a train/test split of interactions."""

    name: str
    users: EntityTable
    items: EntityTable
    train: Interactions
    test: Interactions

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_interactions(self) -> int:
        return len(self.train) + len(self.test)

    def item_popularity(self) -> Tensor:
        """(I,) float32 number of train interactions per item."""
        return torch.bincount(self.train.item, minlength=self.num_items).to(torch.float32)

    def train_seen(self) -> UserItemSets:
        """Items each user interacted with in train (to filter them out at evaluation)."""
        return UserItemSets.from_pairs(self.train.user, self.train.item, self.num_users,
                                       self.num_items)  # fmt: skip

    def test_positives(self, min_rating: float | None = None) -> UserItemSets:
        """Held-out items per user; with ``min_rating``, only those rated at least that."""
        test = self.test
        if min_rating is not None:
            test = test.select(test.rating >= min_rating)
        return UserItemSets.from_pairs(test.user, test.item, self.num_users, self.num_items)

    def summary(self) -> str:
        """One line: counts and feature names."""
        return (
            f"{self.name}: {self.num_users} users, {self.num_items} items, "
            f"{self.num_interactions} interactions ({len(self.train)} train / {len(self.test)} "
            f"test); user features {self.users.feature_names}; "
            f"item features {self.items.feature_names}"
        )


def single_attribute(name: str, codes: Tensor, vocab: list[str]) -> Attribute:
    """A one-value-per-row attribute from ``codes (n,) int64`` in ``[0, len(vocab))``."""
    return Attribute.from_single(name, codes, len(vocab), vocab)


def multi_attribute(
    name: str, lists: list[list[str]], vocab_order: list[str] | None = None
) -> Attribute:
    """A multi-valued attribute from per-row lists of names (small tables only: a Python loop).

    Vocab is ``[OOV, *vocab_order]`` or ``[OOV, *sorted(all names)]``; unknown names map to OOV.
    """
    order = vocab_order if vocab_order is not None else sorted({x for row in lists for x in row})
    index = {v: i + 1 for i, v in enumerate(order)}
    codes = [[index.get(x, 0) for x in row] for row in lists]
    return Attribute.from_lists(name, codes, len(order) + 1, [OOV, *order])
