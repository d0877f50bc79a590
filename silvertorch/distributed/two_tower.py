"""The sharded twin of :class:`silvertorch.model.TwoTower`: the same loss over the GLOBAL batch.

Single process: one batch of ``B`` (user, item) pairs; the sampled softmax scores every query
against the ``B`` in-batch positives (+ ``M`` uniform negatives). With ``W`` ranks, each rank holds
``b = B / W`` rows of that batch. If each rank used only its own rows, a query would see ``b - 1``
in-batch negatives instead of ``B - 1``: a different, easier loss. So every rank

1. runs both towers on its ``b`` rows (embedding lookups go through TorchRec's sharded
   ``EmbeddingBagCollection``: an all-to-all to the ranks owning the tables and back),
2. gathers the ``(b, D)`` query and positive embeddings of all ranks into ``(B, D)`` in rank order
   (= the single-process row order) with :func:`~silvertorch.distributed.collectives.gather_rows`,
3. computes the single-process loss ``L`` on the gathered tensors (identical on every rank;
   ``B x (B + M)`` logits, cheap next to the towers for batches of a few thousand).

Gradients. The backward of ``gather_rows`` keeps this rank's slice, so rank ``r``'s activations get
exactly ``dL/d(its rows)`` and its parameter gradients are the part of ``dL/dθ`` that flows through
its rows: the full gradient is their SUM over ranks. Both libraries AVERAGE over ranks instead (the
convention for a per-rank mean loss): DDP all-reduces the dense gradients and divides by ``W``, and
TorchRec divides the embedding gradients by ``W`` in the backward all-to-all
(``torchrec.distributed.comm_ops`` gradient division, on by default). So the backward pass runs on
:meth:`DistributedTwoTower.backward_loss` = ``W * L``: after their averaging every parameter gets
``dL/dθ``. Terms every rank computes identically — the ``M`` shared uniform negatives and the
temperature — would be counted ``W`` times by that, so their gradient is scaled by ``1 / W`` on the
way in (:func:`scale_grad`). Result: each optimizer step sees ``dL/dθ`` of the global batch, as in
single-process training (checked in tests/test_distributed_train.py: loss curves, and Adagrad's
accumulated squared gradients, which expose any constant gradient scale, across a world-size change).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchrec import KeyedJaggedTensor
from torchrec.distributed import comm_ops

from silvertorch.distributed.collectives import all_gather_cat, gather_rows
from silvertorch.losses import LossOutput, mixed_log_q, sampled_softmax_loss
from silvertorch.model import BatchLike, TwoTower

__all__ = ["DistributedTwoTower", "scale_grad", "cat_rows"]


def cat_rows(a: KeyedJaggedTensor, b: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """Rows of ``a`` (batch ``n``) followed by rows of ``b`` (batch ``m``): a KJT of batch ``n + m``
    over the same keys (in ``a``'s order; ``b`` must have them all). Unweighted KJTs only."""
    keys = a.keys()
    da, db = a.to_dict(), b.to_dict()
    missing = [k for k in keys if k not in db]
    if missing:
        raise KeyError(f"cat_rows: second KJT lacks keys {missing} (has {b.keys()})")
    lengths = torch.cat([torch.cat([da[k].lengths(), db[k].lengths()]) for k in keys])
    values = torch.cat([torch.cat([da[k].values(), db[k].values()]) for k in keys])
    return KeyedJaggedTensor(keys, values, lengths=lengths, stride=a.stride() + b.stride())


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """Identity forward; multiplies the gradient by ``factor`` on the way back."""
    return x if factor == 1.0 else _ScaleGrad.apply(x, factor)


class DistributedTwoTower(nn.Module):
    """Wraps a :class:`TwoTower`'s parts (same submodule names, so the same ``state_dict`` keys) and
    computes its loss over the global batch gathered from all ranks of ``group``.

    Wrap it in TorchRec's ``DistributedModelParallel`` to shard the towers' embedding tables
    (:func:`~silvertorch.distributed.sharding.shard_model`). Forward: ``batch`` = this rank's ``b``
    rows (the same ``b`` on every rank), ``negatives`` = the same ``(ids (M,), KJT)`` on every rank.
    Backward: on :meth:`backward_loss` of the output, not on ``out.loss``.
    """
    def __init__(self, model: TwoTower, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.config = model.config
        self.num_items = model.num_items
        self.user_tower = model.user_tower
        self.item_tower = model.item_tower
        self.temperature = model.temperature
        self.register_buffer("item_probs", model.item_probs)
        self.group = group

    def backward_loss(self, out: LossOutput) -> Tensor:
        """The scalar to call ``backward()`` on: ``W * L`` (see the module docstring). Raises
        ``RuntimeError`` if TorchRec's gradient division was switched off in this process."""
        if not comm_ops.get_gradient_division():
            raise RuntimeError(
                "torchrec.distributed.comm_ops gradient division is off; DistributedTwoTower "
                "assumes TorchRec averages embedding gradients over ranks like DDP"
            )
        return out.loss * dist.get_world_size(self.group)

    @property
    def embedding_dim(self) -> int:
        return self.user_tower.output_dim

    def forward(
        self,
        batch: BatchLike,
        negatives: tuple[Tensor, KeyedJaggedTensor] | None = None,
    ) -> LossOutput:
        """The global-batch loss ``L`` (same value on every rank); see the module docstring."""
        query = gather_rows(self.user_tower(batch.user_features), self.group)  # (B, D)
        ids = all_gather_cat(batch.item_ids, self.group)  # (B,)
        b = batch.item_ids.numel()
        neg_emb = neg_ids = None
        if negatives is None:
            local = self.item_tower(batch.item_features)
        else:
            # ONE item-tower call for positives and negatives: the fused table optimizer steps in
            # every backward of a sharded lookup, so two calls would update the tables twice
            neg_ids, neg_kjt = negatives
            both = self.item_tower(cat_rows(batch.item_features, neg_kjt))  # (b + M, D)
            local, neg_emb = both[:b], both[b:]
        positives = gather_rows(local, self.group)  # (B, D)
        return self.global_loss(query, positives, ids, neg_emb, neg_ids)

    def global_loss(
        self,
        query: Tensor,
        positives: Tensor,
        ids: Tensor,
        neg_emb: Tensor | None = None,
        neg_ids: Tensor | None = None,
    ) -> LossOutput:
        """The sampled softmax of the gathered global batch: ``query, positives (B, D) f32`` (from
        :func:`gather_rows`), ``ids (B,) int64``, ``neg_emb (M, D) f32`` / ``neg_ids (M,) int64`` the
        uniform negatives, computed identically on every rank (their gradient and the temperature's
        are scaled by ``1 / W`` here, see the module docstring)."""
        world = dist.get_world_size(self.group)
        cfg = self.config.loss
        if neg_emb is not None:
            neg_emb = scale_grad(neg_emb, 1.0 / world)  # (M, D), the same on every rank
        log_q = None
        if cfg.logq_correction:
            cand_ids = ids if neg_ids is None else torch.cat([ids, neg_ids])
            m = 0 if neg_ids is None else neg_ids.numel()
            log_q = mixed_log_q(cand_ids, self.item_probs, ids.numel(), m)
        tau = scale_grad(self.temperature(), 1.0 / world)
        out = sampled_softmax_loss(
            query,
            positives,
            ids,
            tau,
            negatives=neg_emb,
            negative_ids=neg_ids,
            log_q=log_q,
            mask_accidental_hits=cfg.mask_accidental_hits,
        )
        out.stats["temperature"] = float(tau.detach())
        return out
