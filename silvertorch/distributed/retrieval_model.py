"""The sharded twin of the joint step: towers + OverArch trained together, index in the loop.

:class:`DistributedRetrievalModel` is a :class:`~silvertorch.distributed.two_tower.DistributedTwoTower`
(the same tower submodules and global-batch sampled softmax, reused) plus the OverArch as a
:class:`~silvertorch.distributed.overarch_tables.ShardableOverArch` (attribute tables in an EBC that
DMP shards next to the towers' tables; the MLP data-parallel). One joint step on rank ``r`` of ``W``
(``b = B / W`` rows each):

1. ``q = gather_rows(user_tower(own rows))`` -> ``(B, D)``, the single-process query matrix;
2. the first ``H`` rows' candidates are mined from the index with ``q[:H]`` (no gradient): every rank
   holds the same index (built from all-gathered item vectors, same seed) and the same ``q``, so
   every rank mines the same ``(H, K)`` ids, equal to the single-process ones;
3. ONE item-tower call over [own positives, unique(mined + uniform negatives)] (a sharded lookup
   updates the fused tables in its backward: one call per step), STE-quantized for an int8 index;
   positives gathered to ``(B, D)``;
4. ``R``: the two-tower loss on the gathered rows (:meth:`DistributedTwoTower.global_loss`);
   ``J``: the head (+ hard-negative) terms, computed by a caller-supplied function
   (``train/dist_joint.py`` reuses ``train/joint_step.py``) on the gathered rows, identically on
   every rank. The reported loss is ``R + J`` (the single-process value).

Gradient. ``R`` follows two_tower.py: backward on ``W * R``, replicated inputs (negatives,
temperature) scaled ``1 / W``. ``J`` is replicated as a whole - including the OverArch parameters,
which have no input to scale - so it enters the backward scalar once, ``W * R + J~``, where ``J~`` is
``J`` with the gathered tensors (``q``, positives) scaled by ``W`` on the way back (they keep only
their own slice, :func:`~silvertorch.distributed.collectives.gather_rows`). That equals
``W * (R + J)`` with every replicated leaf of ``J`` scaled by ``1 / W``:

- OverArch MLP: every rank gets ``dJ/dθ``; DDP averages identical values -> ``dJ/dθ``;
- OverArch tables: every rank looks up the same ids with gradient ``dJ/dpooled``; TorchRec sums the
  W copies in the backward all-to-all and divides by ``W`` -> ``dJ/dθ``;
- mined candidates' item vectors (replicated): as the tables, ``dJ/dθ``;
- towers through ``q`` / positives: rank ``r`` gets ``W * dJ/d(its rows)``, averaged -> the sum over
  ranks = ``dJ/dθ``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor
from torchrec import KeyedJaggedTensor
from torchrec.distributed import comm_ops

from silvertorch.distributed.collectives import all_gather_cat, gather_rows
from silvertorch.distributed.overarch_tables import ShardableOverArch
from silvertorch.distributed.two_tower import DistributedTwoTower, cat_rows, scale_grad
from silvertorch.index.quantize import fake_quantize_int8_ste
from silvertorch.losses import LossOutput
from silvertorch.model import BatchLike, TwoTower
from silvertorch.modules.overarch import OverArch
from silvertorch.retrieval_ops import gather_features

__all__ = ["GlobalRows", "JointPlan", "JointLossOutput", "DistributedRetrievalModel"]


@dataclass
class GlobalRows:
    """What the head terms read, the same on every rank. ``query, positives (B, D) f32`` gathered
    (gradients scaled by ``W``, see the module docstring); ``cand (H, K, D) f32`` mined vectors;
    ``mined (H, K) int64`` (``-1`` padding); ``item_ids, user_ids (B,) int64`` and
    ``labels[task] (B,) f32`` of the global batch; ``tau`` () the temperature (unscaled)."""

    query: Tensor
    positives: Tensor
    cand: Tensor
    mined: Tensor
    item_ids: Tensor
    user_ids: Tensor
    labels: dict[str, Tensor]
    tau: Tensor


# rows, the model (for score_candidates) -> (weighted loss terms to add to R, stats)
HeadLoss = Callable[[GlobalRows, "DistributedRetrievalModel"], tuple[list[Tensor], dict[str, float]]]


@dataclass
class JointPlan:
    """Per-step inputs of the joint forward besides the batch.

    ``mine``: ``(H, D) f32 -> (H, K) int64`` index candidates; ``head_rows``: ``H`` (capped at
    ``B``); ``item_kjt``: ``ids (n,) int64 -> KJT`` of the item tower's features;
    ``quantize``: STE int8 item vectors; ``head_loss``: the replicated terms ``J`` (see
    :data:`HeadLoss`)."""

    mine: Callable[[Tensor], Tensor]
    head_rows: int
    item_kjt: Callable[[Tensor], KeyedJaggedTensor]
    quantize: bool
    head_loss: HeadLoss


@dataclass
class JointLossOutput(LossOutput):
    """``loss``: ``R + J`` (the single-process value); ``backward``: ``W * R + J~``, what
    :meth:`DistributedRetrievalModel.backward_loss` returns."""

    backward: Tensor | None = None


class DistributedRetrievalModel(DistributedTwoTower):
    """Towers (as :class:`DistributedTwoTower`, same ``state_dict`` keys) + ``overarch``
    (:class:`ShardableOverArch`, keys ``overarch.tables.*`` / ``overarch.mlp.*``).

    Args:
        model: the TwoTower whose towers are trained.
        overarch: the OverArch whose weights start the twin (its MLP module is shared).
        feature_tables: ``{feature: (N + 1, L) int64}`` padded attribute ids per item
            (``RetrievalModel.feature_tables()``; padding = the OverArch's padding id); kept as
            non-persistent buffers (not in ``state_dict``: they are data, rebuilt from the dataset).
    """

    def __init__(
        self,
        model: TwoTower,
        overarch: OverArch,
        feature_tables: Mapping[str, Tensor],
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(model, group)
        missing = [f for f in overarch.feature_names if f not in feature_tables]
        if missing:
            raise ValueError(f"feature_tables lack OverArch features {missing} (has {sorted(feature_tables)})")
        self.overarch = ShardableOverArch(overarch)
        self.feature_buffers: dict[str, str] = {}
        for name in overarch.feature_names:
            buf = f"item_feature_{name}"
            self.register_buffer(buf, feature_tables[name].clone(), persistent=False)
            self.feature_buffers[name] = buf

    def score_candidates(self, query: Tensor, item_vectors: Tensor, item_ids: Tensor) -> Tensor:
        """``RetrievalModel.score_candidates`` through the shardable OverArch: ``query (H, D)``,
        ``item_vectors (H, C, D) f32``, ``item_ids (H, C) int64`` (-1 = padding) -> ``(H, C, T)``."""
        tables = {name: self._buffers[b] for name, b in self.feature_buffers.items()}
        return self.overarch(query, item_vectors, gather_features(tables, item_ids))

    def backward_loss(self, out: LossOutput) -> Tensor:
        """``W * L`` for a two-tower output, ``W * R + J~`` for a joint one (module docstring)."""
        if isinstance(out, JointLossOutput) and out.backward is not None:
            if not comm_ops.get_gradient_division():
                raise RuntimeError(
                    "torchrec.distributed.comm_ops gradient division is off; DistributedRetrievalModel "
                    "assumes TorchRec averages embedding gradients over ranks like DDP"
                )
            return out.backward
        return super().backward_loss(out)

    def forward(  # type: ignore[override]
        self,
        batch: BatchLike,
        negatives: tuple[Tensor, KeyedJaggedTensor] | None = None,
        joint: JointPlan | None = None,
    ) -> LossOutput:
        """Without ``joint``: the two-tower loss (``DistributedTwoTower.forward``). With it: the
        joint loss of the module docstring (a :class:`JointLossOutput`)."""
        if joint is None:
            return super().forward(batch, negatives)
        world = dist.get_world_size(self.group)
        device = self.item_probs.device
        b = batch.item_ids.numel()
        query = gather_rows(self.user_tower(batch.user_features), self.group)  # (B, D)
        ids = all_gather_cat(batch.item_ids, self.group)  # (B,)
        H = min(joint.head_rows, ids.numel())
        mined = joint.mine(query[:H].detach()).to(device)  # (H, K), identical on every rank
        K = mined.shape[1]
        extra = [mined.reshape(-1).clamp_min(0)]
        neg_ids = None
        if negatives is not None:
            neg_ids = negatives[0].to(device)
            extra.append(neg_ids)
        uniq, inverse = torch.unique(torch.cat(extra), return_inverse=True)
        vec = self.item_tower(cat_rows(batch.item_features, joint.item_kjt(uniq.cpu()).to(device)))
        if joint.quantize:
            vec = fake_quantize_int8_ste(vec)
        positives = gather_rows(vec[:b], self.group)  # (B, D)
        shared = vec[b:].index_select(0, inverse.to(device))  # (H*K + M, D), identical on every rank
        cand = shared[: H * K].reshape(H, K, -1)
        neg_emb = shared[H * K :] if neg_ids is not None else None
        retrieval = self.global_loss(query, positives, ids, neg_emb, neg_ids)
        rows = GlobalRows(
            query=scale_grad(query, float(world)),
            positives=scale_grad(positives, float(world)),
            cand=cand,
            mined=mined,
            item_ids=ids,
            user_ids=all_gather_cat(batch.user_ids, self.group),
            labels={t: all_gather_cat(v, self.group) for t, v in sorted(batch.labels.items())},
            tau=self.temperature(),
        )
        terms, stats = joint.head_loss(rows, self)
        loss, backward = retrieval.loss, retrieval.loss * world
        for term in terms:
            loss = loss + term
            backward = backward + term
        stats = {**stats, "retrieval_loss": retrieval.stats["loss"], "top1": retrieval.stats["top1"],
                 "temperature": retrieval.stats["temperature"], "loss": float(loss.detach())}  # fmt: skip
        return JointLossOutput(loss, stats, backward=backward)
