"""Move whole (unsharded) weights in and out of a sharded model's ``state_dict``.

A sharded model's ``state_dict`` holds ``ShardedTensor`` values for sharded tables (each rank owns
some shards, described by offsets and sizes into the global tensor) and plain tensors for the
data-parallel parts (replicated). These helpers work for any world size, including 1.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

__all__ = ["copy_full_state", "gather_full_state"]


def _slices(offsets: list[int], sizes: list[int]) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(offsets, sizes))


@torch.no_grad()
def copy_full_state(sharded: nn.Module, full: Mapping[str, Tensor]) -> None:
    """Copy whole tensors ``full`` (e.g. the unsharded model's ``state_dict``) into ``sharded``:
    each rank copies the slices of the shards it owns. Used to start a sharded run from exactly the
    single-process initialization. Checks every key and shape before writing anything."""
    target = sharded.state_dict()
    missing = sorted(set(target) - set(full))
    extra = sorted(set(full) - set(target))
    if missing or extra:
        raise KeyError(f"state mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, value in target.items():
        size = tuple(value.size())
        if tuple(full[key].shape) != size:
            raise ValueError(f"'{key}': full tensor {tuple(full[key].shape)}, sharded model {size}")
    for key, value in target.items():
        src = full[key]
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                md = shard.metadata
                shard.tensor.copy_(src[_slices(md.shard_offsets, md.shard_sizes)])
        else:
            value.copy_(src)


@torch.no_grad()
def gather_full_state(sharded: nn.Module, dst: int = 0) -> dict[str, Tensor] | None:
    """Whole tensors of ``sharded.state_dict()`` on rank ``dst`` (None elsewhere); collective: every
    rank must call it. Sharded values are gathered, replicated ones taken from ``dst``."""
    rank = dist.get_rank()
    out: dict[str, Tensor] = {}
    for key, value in sharded.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == dst else None
            value.gather(dst=dst, out=full)
            if full is not None:
                out[key] = full
        elif rank == dst:
            out[key] = value.detach().cpu().clone()
    return out if rank == dst else None
