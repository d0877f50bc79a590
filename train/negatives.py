"""Uniform random negatives for the mixed sampled softmax (ids + their item-feature KJT)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchrec import KeyedJaggedTensor

from silvertorch.data.batching import FeatureTable
from silvertorch.index.attributes import Attribute

__all__ = ["UniformNegatives", "uniform_negatives", "check_batches"]


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


def uniform_negatives(item_features: dict[str, Attribute], item_keys: list[str], num: int,
                      seed: int) -> UniformNegatives | None:
    """The ``model.loss.num_uniform_negatives`` sampler of a training loop (None when ``num`` is 0);
    seeded ``seed + 1`` so it never shares a stream with the batch order."""
    return UniformNegatives(item_features, item_keys, num, seed=seed + 1) if num > 0 else None


def check_batches(loader: object, batch_size: int) -> None:
    """``ValueError`` when ``loader`` yields no full batch per epoch (the batch is too large)."""
    if len(loader) == 0:  # type: ignore[arg-type]
        raise ValueError(
            f"train.batch_size={batch_size} exceeds the {loader.num_examples} "  # type: ignore[attr-defined]
            "training interactions: no full batch per epoch"
        )
