"""The loss of one joint step: towers and OverArch trained together through the index path.

For a batch of ``B`` (user, positive item) pairs and the first ``H`` rows' index-mined candidates
``mined (H, K)`` (:func:`train.mining.mine_candidates`, no gradient through the search):

1. ``q = user_tower(users) (B, D)``; item vectors ``e = STE(item_tower(items))`` for the positives,
   the uniform negatives and the mined candidates (one tower pass over their unique ids), where STE
   is :func:`~silvertorch.index.quantize.fake_quantize_int8_ste` for an int8 index (forward = what
   the index stores, gradient = identity) and the identity otherwise;
2. retrieval loss: the in-batch sampled softmax of :class:`~silvertorch.model.TwoTower`
   (``silvertorch.losses``; logQ correction and accidental-hit masking as configured);
3. head loss: the OverArch (``RetrievalModel.score_candidates``) scores each head row's candidates
   ``[positive, mined_1 .. mined_K]`` from ``(q, e)`` and their attributes; BCE against the labels
   (positive column: the batch labels; mined: the user's TRAIN ratings), padding and mined copies of
   the positive weighted 0; with ``skip_seen`` the mined candidates the user rated in train are
   weighted 0 as well, so the heads learn what they do when served - the positive against retrieved
   items the user has not rated. ``<q, e>`` - the scan's score, recomputed with autograd - is an
   OverArch input, so head gradients reach both towers, scaled by ``head_tower_grad`` (0 = the
   head loss trains the OverArch only; the forward pass is unchanged);
4. optional hard-negative loss: softmax of the positive against the mined candidates the user
   never rated, logits ``q . e / tau`` (the recomputed scan scores).

``loss = retrieval + head_loss_weight * heads + hard_negative_weight * hard``. With
``train_towers=False`` (the two-stage baseline's second stage) the towers run without gradient and
only the head loss is returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from silvertorch.data.batching import Batch, FeatureTable
from silvertorch.index.quantize import fake_quantize_int8_ste
from silvertorch.losses import LossOutput, mixed_log_q, sampled_softmax_loss
from silvertorch.model import RetrievalModel, TwoTower
from train.mining import InteractionLabels

__all__ = ["JointInputs", "HeadTerms", "joint_loss", "head_terms", "hard_negative_loss", "head_bce",
           "scale_grad"]


@dataclass
class JointInputs:
    """What one joint step reads besides the batch.

    ``mine``: ``query (H, D) f32 -> (H, K) int64`` index candidates (``-1`` = padding), e.g.
    :func:`train.mining.mine_candidates` on the current index; ``head_rows``: ``H``, the first rows
    of the batch whose candidates train the heads; ``negatives (M,) int64 | None``: uniform
    negative ids shared by the batch.
    """

    mine: Callable[[Tensor], Tensor]
    head_rows: int
    negatives: Tensor | None = None


def _item_vectors(two: TwoTower, items: FeatureTable, ids: Tensor, quantize: bool) -> Tensor:
    """``ids (n,) int64 >= 0`` -> ``(n, D) f32`` (STE-quantized when ``quantize``), one tower pass
    over the unique ids."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    device = two.item_probs.device
    vec = two.item_tower(items.kjt(uniq.cpu()).to(device))
    if quantize:
        vec = fake_quantize_int8_ste(vec)
    return vec.index_select(0, inverse.to(device))


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``scale`` in the backward pass
    (``0`` = stop-gradient, ``1`` = unchanged)."""
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()
    return x.detach() + scale * (x - x.detach())


def head_bce(logits: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
    """``logits, labels (H, C, T) f32``, ``weight (H, C) f32`` -> weighted mean BCE over pairs and
    tasks (0 when every weight is 0)."""
    per = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(-1)  # (H, C)
    return (per * weight).sum() / weight.sum().clamp_min(1.0)


@dataclass
class HeadTerms:
    """The head loss of :func:`head_terms` and what the hard-negative loss reuses: ``weight
    (H, 1 + C) f32`` per (row, candidate) BCE weight, ``rated (H, C) bool`` mined candidates the
    user rated in train, ``stats`` for logging."""

    heads: Tensor
    weight: Tensor
    rated: Tensor
    stats: dict[str, float]


def head_terms(
    score: Callable[[Tensor, Tensor, Tensor], Tensor],
    query: Tensor,
    positives: Tensor,
    cand: Tensor,
    mined: Tensor,
    item_ids: Tensor,
    user_ids: Tensor,
    batch_labels: Mapping[str, Tensor],
    labels: InteractionLabels,
    tasks: list[str],
    *,
    head_tower_grad: float,
    skip_seen: bool,
) -> HeadTerms:
    """Step 3 of the module docstring for the first ``H = mined.shape[0]`` rows of a batch.

    ``score (q (H, D), e (H, C, D), ids (H, C)) -> (H, C, T)`` logits (the OverArch);
    ``query, positives (>= H, D) f32``; ``cand (H, K, D) f32`` mined vectors; ``mined (H, K) int64``;
    ``item_ids, user_ids (>= H,) int64`` and ``batch_labels[task] (>= H,) f32`` of the batch rows.
    Shared by the single-process step and the sharded one (``train/dist_joint.py``).
    """
    H = mined.shape[0]
    device = query.device
    # heads: [positive, mined candidates] of the first H rows
    cand_ids = torch.cat([item_ids[:H, None], mined], dim=1)  # (H, 1 + K)
    cand_vec = torch.cat([positives[:H, None], cand], dim=1)
    head_q, head_e = scale_grad(query[:H], head_tower_grad), scale_grad(cand_vec, head_tower_grad)
    logits = score(head_q, head_e, cand_ids.to(device))  # (H, 1+K, T)
    pos_labels = torch.stack(
        [batch_labels[t][:H] if t in batch_labels else torch.ones(H) for t in tasks], dim=-1
    )
    mined_labels = labels.labels(user_ids[:H].cpu(), mined.cpu(), tasks)
    target = torch.cat([pos_labels[:, None], mined_labels], dim=1).to(device)
    valid = ((mined >= 0) & (mined != item_ids[:H, None])).float().cpu()  # (H, K)
    rated = labels.rating(user_ids[:H].cpu(), mined.cpu()) > 0  # (H, K) in the train set
    keep = valid * (~rated).float() if skip_seen else valid
    weight = torch.cat([torch.ones(H, 1), keep], dim=1).to(device)
    heads = head_bce(logits, target, weight)
    stats = {"head_loss": float(heads.detach())}
    with torch.no_grad():  # share of mined candidates the user rated in train, per task
        for t, name in enumerate(tasks):
            share = (mined_labels[..., t] * valid).sum() / valid.sum().clamp_min(1)
            stats[f"mined_{name}"] = float(share)
    return HeadTerms(heads, weight, rated, stats)


def hard_negative_loss(query: Tensor, positives: Tensor, cand: Tensor, tau: Tensor,
                       terms: HeadTerms) -> Tensor:
    """Step 4 of the module docstring: softmax of the positive against the mined candidates the
    user never rated (``cand (H, K, D)``; ``query``, ``positives (>= H, D)``; ``terms`` from
    :func:`head_terms` of the same rows) -> () f32; also sets ``terms.stats["hard_loss"]``."""
    H = cand.shape[0]
    device = query.device
    scan = (query[:H, None, :] * cand).sum(-1) / tau  # (H, K): the scan's scores, with autograd
    never_rated = (~terms.rated).to(device) & (terms.weight[:, 1:] > 0)
    pos_score = (query[:H] * positives[:H]).sum(-1, keepdim=True) / tau
    hard_logits = torch.cat([pos_score, scan.masked_fill(~never_rated, float("-inf"))], dim=1)
    hard = F.cross_entropy(hard_logits, torch.zeros(H, dtype=torch.int64, device=device))
    terms.stats["hard_loss"] = float(hard.detach())
    return hard


def joint_loss(
    two: TwoTower,
    scorer: RetrievalModel,
    items: FeatureTable,
    labels: InteractionLabels,
    batch: Batch,
    inputs: JointInputs,
    *,
    head_loss_weight: float,
    hard_negative_weight: float = 0.0,
    quantize: bool = True,
    train_towers: bool = True,
    head_tower_grad: float = 1.0,
    skip_seen: bool = False,
) -> LossOutput:
    """The joint loss of ``batch`` (see the module docstring). ``scorer`` shares ``two.user_tower``
    and holds the OverArch being trained; ``items`` builds item-feature KJTs of the item tower."""
    B = batch.size
    H = min(inputs.head_rows, B)
    device = two.item_probs.device
    tasks = scorer.overarch.tasks
    neg_ids = inputs.negatives
    with torch.set_grad_enabled(train_towers):
        query = two.user_tower(batch.user_features)  # (B, D)
        mined = inputs.mine(query[:H].detach()).to(device)  # (H, K), no gradient through search
        K = mined.shape[1]
        parts = [batch.item_ids, mined.reshape(-1).clamp_min(0)]
        if neg_ids is not None:
            parts.append(neg_ids)
        vec = _item_vectors(two, items, torch.cat(parts).to(device), quantize)
        positives, cand = vec[:B], vec[B : B + H * K].reshape(H, K, -1)
        negatives = vec[B + H * K :] if neg_ids is not None else None

    terms = head_terms(
        scorer.score_candidates, query, positives, cand, mined, batch.item_ids, batch.user_ids,
        batch.labels, labels, tasks, head_tower_grad=head_tower_grad, skip_seen=skip_seen,
    )  # fmt: skip
    heads, stats = terms.heads, terms.stats
    if not train_towers:
        return LossOutput(heads, {"loss": float(heads.detach()), **stats})

    cfg = two.config.loss
    log_q = None
    if cfg.logq_correction:
        ids = batch.item_ids if neg_ids is None else torch.cat([batch.item_ids, neg_ids])
        log_q = mixed_log_q(ids, two.item_probs, B, 0 if neg_ids is None else neg_ids.numel())
    tau = two.temperature()
    retrieval = sampled_softmax_loss(
        query, positives, batch.item_ids, tau, negatives=negatives, negative_ids=neg_ids,
        log_q=log_q, mask_accidental_hits=cfg.mask_accidental_hits,
    )  # fmt: skip
    loss = retrieval.loss + head_loss_weight * heads
    stats.update({"retrieval_loss": retrieval.stats["loss"], "top1": retrieval.stats["top1"]})
    if hard_negative_weight > 0:
        hard = hard_negative_loss(query, positives, cand, tau, terms)
        loss = loss + hard_negative_weight * hard
    stats["loss"] = float(loss.detach())
    return LossOutput(loss, stats)
