"""Uniform random negatives for the mixed sampled softmax (ids + their item-feature KJT)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchrec import KeyedJaggedTensor

from silvertorch.data.batching import FeatureTable
from silvertorch.index.attributes import Attribute

__all__ = ["UniformNegatives"]


class UniformNegatives:
    """Draws ``num`` item ids uniformly (with replacement) from ``[0, N)`` with its own generator,
    whose state goes into checkpoints so a resumed run draws the same negatives."""

    def __init__(self, items: dict[str, Attribute], keys: list[str], num: int, seed: int) -> None:
        self.table = FeatureTable(items, keys)
        self.num = num
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> tuple[Tensor, KeyedJaggedTensor]:
        """``(ids (M,) int64, KJT of their features, batch size M)``."""
        ids = torch.randint(self.table.num_rows, (self.num,), generator=self.generator)
        return ids, self.table.kjt(ids)
