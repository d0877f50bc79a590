"""Batches of interactions as TorchRec inputs: KJT features, labels, and a resumable loader.

``KeyedJaggedTensor`` layout (what TorchRec expects): ``keys`` ``[k_0 .. k_{K-1}]``,
``lengths (K * B,) int64`` key-major (all rows of ``k_0``, then all rows of ``k_1`` ...), ``values``
in the same order, row by row.
Every gather here is a tensor op: no Python loop per row, only per feature key.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from silvertorch.data.dataset import RecDataset
from silvertorch.index.attributes import Attribute

__all__ = ["Batch", "FeatureTable", "features_to_kjt", "InteractionLoader", "all_items_kjt"]

_PAD_LIMIT = 32  # multi-valued features up to this many values per row use a padded table


@dataclass
class Batch:
    """One training batch of ``B`` (user, item) events.

    ``user_ids (B,) int64``, ``item_ids (B,) int64`` (dense indices), ``user_features`` and
    ``item_features`` (KJTs with stride ``B``), ``labels``: task name -> ``(B,) float32``.
    Implements TorchRec's ``Pipelineable`` (``to``, ``record_stream``, ``pin_memory``).
    """

    user_ids: Tensor
    item_ids: Tensor
    user_features: KeyedJaggedTensor
    item_features: KeyedJaggedTensor
    labels: dict[str, Tensor]

    @property
    def size(self) -> int:
        return self.user_ids.numel()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.user_ids.to(device, non_blocking=non_blocking),
            self.item_ids.to(device, non_blocking=non_blocking),
            self.user_features.to(torch.device(device), non_blocking=non_blocking),
            self.item_features.to(torch.device(device), non_blocking=non_blocking),
            {k: v.to(device, non_blocking=non_blocking) for k, v in self.labels.items()},
        )

    def record_stream(self, stream: Any) -> None:
        for t in (self.user_ids, self.item_ids, *self.labels.values()):
            t.record_stream(stream)
        self.user_features.record_stream(stream)
        self.item_features.record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(
            self.user_ids.pin_memory(), self.item_ids.pin_memory(),
            self.user_features.pin_memory(), self.item_features.pin_memory(),
            {k: v.pin_memory() for k, v in self.labels.items()},
        )  # fmt: skip


class _Gather:
    """Precomputed row gather for one attribute: single-valued, padded, or CSR."""

    def __init__(self, attr: Attribute) -> None:
        lengths = attr.lengths
        self.values = attr.values
        self.offsets = attr.offsets
        self.lengths = lengths
        n = lengths.numel()
        max_len = int(lengths.max()) if n else 0
        self.single = bool(n) and bool((lengths == 1).all())
        self.padded: Tensor | None = None
        if not self.single and 0 < max_len <= _PAD_LIMIT:
            pad = torch.full((n, max_len), -1, dtype=torch.int64)
            mask = torch.arange(max_len).unsqueeze(0) < lengths.unsqueeze(1)
            pad[mask] = attr.values  # row-major order matches CSR order
            self.padded = pad

    def __call__(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``(lengths (B,) int64, values (nnz,) int64)`` of ``rows (B,) int64``."""
        # index_select, not advanced indexing: the latter goes parallel on tiny 2-D gathers and
        # stalls for milliseconds when the cores are busy (measured on a loaded 2-core machine)
        if self.single:
            return torch.ones_like(rows), self.values.index_select(0, rows)
        lens = self.lengths.index_select(0, rows)
        if self.padded is not None:
            block = self.padded.index_select(0, rows)
            return lens, block.masked_select(block >= 0)
        starts = self.offsets.index_select(0, rows)
        total = int(lens.sum())
        owner = torch.repeat_interleave(torch.arange(rows.numel()), lens, output_size=total)
        first = torch.cumsum(lens, 0) - lens
        src = starts.index_select(0, owner) + torch.arange(total) - first.index_select(0, owner)
        return lens, self.values.index_select(0, src)


class FeatureTable:
    """Features of an entity table prepared for fast KJT building (precomputes per-key gathers)."""

    def __init__(self, features: dict[str, Attribute], keys: list[str] | None = None) -> None:
        self.keys = list(features) if keys is None else list(keys)
        missing = [k for k in self.keys if k not in features]
        if missing:
            raise KeyError(f"unknown feature keys {missing}; available: {sorted(features)}")
        self._gathers = [_Gather(features[k]) for k in self.keys]
        self.num_rows = features[self.keys[0]].num_items if self.keys else 0

    def kjt(self, rows: Tensor) -> KeyedJaggedTensor:
        """KJT over ``self.keys`` for ``rows (B,) int64`` (stride ``B``)."""
        rows = rows.to(torch.int64)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_rows):
            raise IndexError(f"rows must lie in [0, {self.num_rows})")
        parts = [g(rows) for g in self._gathers]
        lengths = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        values = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        return KeyedJaggedTensor(self.keys, values, lengths=lengths, stride=rows.numel())


def features_to_kjt(
    features: dict[str, Attribute], rows: Tensor, keys: list[str] | None = None
) -> KeyedJaggedTensor:
    """KJT of features ``keys`` (default: all, in dict order) for ``rows (B,) int64``.

    One-off convenience; for repeated use build a :class:`FeatureTable` once.
    """
    return FeatureTable(features, keys).kjt(rows)


class InteractionLoader:
    """Shuffled batches of a dataset's train (or test) interactions, resumable mid-epoch.

    Epoch ``e`` visits the events in the order
    ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))`` (stored order when
    ``shuffle=False``). The loader is a cursor: ``state_dict()`` returns
    ``{"epoch", "position", ...}`` where ``position`` counts batches already yielded in the
    epoch; a loader given that state yields the identical next batch. Leaving a ``for`` loop
    early keeps the cursor where it was; the next ``iter()`` continues from there. Finishing an
    epoch advances ``epoch`` and resets ``position`` to 0.
    """

    def __init__(
        self,
        dataset: RecDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        split: str = "train",
        user_keys: list[str] | None = None,
        item_keys: list[str] | None = None,
        like_threshold: float = 4.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        inter = dataset.train if split == "train" else dataset.test
        self.batch_size, self.seed = batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self._user, self._item = inter.user, inter.item
        self._labels = inter.labels(like_threshold)
        self.users = FeatureTable(dataset.users.features.features, user_keys)
        self.items = FeatureTable(dataset.items.features.features, item_keys)
        self.num_examples = len(inter)
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.num_examples)
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_examples, generator=g)

    def batch(self, index: Tensor) -> Batch:
        """The batch of events ``index (B,) int64`` (positions in the split)."""
        users, items = self._user.index_select(0, index), self._item.index_select(0, index)
        return Batch(
            users, items, self.users.kjt(users), self.items.kjt(items),
            {k: v.index_select(0, index) for k, v in self._labels.items()},
        )  # fmt: skip

    def __iter__(self) -> Iterator[Batch]:
        if len(self) == 0:
            return
        if self.position >= len(self):  # the last batch of an epoch was taken: roll over
            self.epoch, self.position = self.epoch + 1, 0
        epoch = self.epoch
        order = self._order(epoch)
        while self.epoch == epoch and self.position < len(self):
            start = self.position * self.batch_size
            self.position += 1
            yield self.batch(order[start : start + self.batch_size])
        if self.epoch == epoch and self.position >= len(self):
            self.epoch, self.position = epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """The cursor (``epoch``, ``position`` = batches of it yielded) plus consistency checks."""
        epoch, position = self.epoch, self.position
        if len(self) and position >= len(self):
            epoch, position = epoch + 1, 0
        return {
            "epoch": epoch, "position": position, "seed": self.seed,
            "batch_size": self.batch_size, "num_examples": self.num_examples,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the cursor; fails if the data, seed or batch size differ from the saved ones."""
        for key in ("seed", "batch_size", "num_examples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state has {key}={state[key]} but this loader has "
                    f"{getattr(self, key)}; resuming would not reproduce the same batches"
                )
        if not 0 <= state["position"] <= len(self):
            raise ValueError(f"position {state['position']} outside [0, {len(self)}]")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def all_items_kjt(
    dataset: RecDataset, chunk_size: int = 8192, keys: list[str] | None = None
) -> Iterator[tuple[Tensor, KeyedJaggedTensor]]:
    """Chunks of the whole catalog for the item tower: ``(item_ids (b,) int64, KJT stride b)``."""
    table = FeatureTable(dataset.items.features.features, keys)
    for start in range(0, dataset.num_items, chunk_size):
        ids = torch.arange(start, min(start + chunk_size, dataset.num_items))
        yield ids, table.kjt(ids)
