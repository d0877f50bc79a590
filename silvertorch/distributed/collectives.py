"""Collectives the sharded training loop needs, all on ``torch.distributed``.

- :func:`gather_rows`: concatenate every rank's rows in rank order, with an autograd backward that
  keeps only this rank's slice of the incoming gradient. It is meant for computations that every rank
  repeats identically on the gathered tensor (the global-batch loss), where every rank holds the
  same full gradient, so no communication is needed on the way back.
- :func:`all_reduce_sums`: sum a dict of Python numbers across ranks (loss sums, counts).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather_rows", "all_gather_cat", "all_reduce_sums"]


def all_gather_cat(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """``x (b, ...)`` on every rank (same shape everywhere) -> ``(W * b, ...)`` in rank order.
    No autograd. Every rank must pass the same shape (the loaders guarantee equal local batches)."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous(), group=group)
    return torch.cat(out, 0)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.rank = dist.get_rank(group)
        ctx.rows = x.shape[0]
        return all_gather_cat(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None


def gather_rows(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """``x (b, D)`` -> ``(W * b, D)``, rank ``r``'s rows at ``[r*b, (r+1)*b)``; differentiable.

    The backward returns ``grad[r*b:(r+1)*b]`` of this rank's own upstream gradient: correct when
    every rank computes the same function of the gathered tensor (then the upstream gradients are
    identical on all ranks, and this rank's slice is exactly d(loss)/d(its rows)).
    """
    return _GatherRows.apply(x, group)


def all_reduce_sums(values: dict[str, float], group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Sum each value across ranks (float64 on CPU for gloo, or on the group's device for nccl).
    Every rank must pass the same keys in the same order."""
    keys = list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if (
        dist.get_backend(group) == "nccl") else torch.device("cpu")  # fmt: skip
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return dict(zip(keys, t.cpu().tolist()))
