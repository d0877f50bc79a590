"""This rank's share of every global batch: the single-process batches, split by rows.

:class:`RankSlicedLoader` is an :class:`~silvertorch.data.batching.InteractionLoader` whose
``batch_size`` is the GLOBAL batch ``B``: it visits the same epochs, orders and global batches as
the single-process loader (same seed), and rank ``r`` of ``W`` builds only rows
``[r * B/W, (r+1) * B/W)`` of each. Like ``DistributedSampler``, but per batch, so that the rows
gathered back in rank order are exactly the single-process batch. The cursor (``state_dict``) is
the single-process one and does not depend on ``W``: a checkpoint resumes on any world size.
"""

from __future__ import annotations

from torch import Tensor

from silvertorch.data.batching import Batch, InteractionLoader
from silvertorch.data.dataset import RecDataset

__all__ = ["RankSlicedLoader"]


class RankSlicedLoader(InteractionLoader):
    """``InteractionLoader`` yielding rank ``rank``'s ``batch_size // world_size`` rows of each
    global batch of ``batch_size`` (``drop_last`` is forced: every rank gets equal batches)."""

    def __init__(
        self, dataset: RecDataset, batch_size: int, *, rank: int, world_size: int, **kwargs: object
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"train.batch_size={batch_size} (the global batch) must be divisible by the "
                f"world size {world_size}; each rank takes batch_size / world_size rows"
            )
        kwargs["drop_last"] = True
        super().__init__(dataset, batch_size, **kwargs)  # type: ignore[arg-type]
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size

    def batch(self, index: Tensor) -> Batch:
        """``index (B,) int64`` of the global batch -> this rank's ``(B / W)`` rows of it."""
        b = self.local_batch_size
        return super().batch(index[self.rank * b : (self.rank + 1) * b])
