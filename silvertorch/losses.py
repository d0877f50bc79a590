"""Sampled softmax for two-tower retrieval: in-batch negatives, logQ correction, mixed uniform
negatives, accidental-hit masking. Pure functions on embeddings; no model or data imports.

For query ``i`` with positive item ``p_i`` the candidates are the ``B`` in-batch positives
(drawn, in effect, from the training item distribution ``q``) plus ``M`` items drawn uniformly
from the ``N``-item catalog. Logit of candidate ``j``::

    s_ij = <u_i, v_j> / tau - log E[count of item j in the candidate set]
         = <u_i, v_j> / tau - log(B * q_j + M / N)

The subtracted term is the logQ correction (Yi et al., RecSys 2019; Yang et al., WWW 2020 for the
mixture): without it, popular items appear as negatives more often than their share and are pushed
down too hard. With ``M = 0`` it is ``log q_j + log B`` and the constant cancels in the softmax.
Candidates (other than ``i``'s own column) whose item id equals ``p_i`` are *accidental hits*: they
are the positive itself, so their logits are masked to ``-inf``. The loss is the cross-entropy of
the row against its own column ``i``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from silvertorch.config import check

__all__ = ["LossConfig", "LossOutput", "mixed_log_q", "sampled_softmax_loss"]


@dataclass(kw_only=True)
class LossConfig:
    """Sampled-softmax options (``[model.loss]``)."""

    logq_correction: bool = True
    num_uniform_negatives: int = 0  # M extra negatives per batch, uniform over the catalog
    mask_accidental_hits: bool = True

    def validate(self) -> None:
        check(
            self.num_uniform_negatives >= 0,
            "num_uniform_negatives",
            f">= 0, got {self.num_uniform_negatives}",
        )


@dataclass
class LossOutput:
    """``loss``: () float32 with grad; ``stats``: detached python floats for logging."""

    loss: Tensor
    stats: dict[str, float]


def mixed_log_q(
    item_ids: Tensor, item_probs: Tensor, batch_size: int, num_uniform: int
) -> Tensor:
    """Log expected count of each candidate in a candidate set of ``batch_size`` draws from
    ``item_probs`` plus ``num_uniform`` uniform draws.

    Args:
        item_ids: ``(C,) int64`` candidate item ids.
        item_probs: ``(N,) float32`` training sampling distribution (sums to 1).
    Returns:
        ``(C,) float32`` ``log(batch_size * q[id] + num_uniform / N)``, floored at ``log(1e-30)``.
    """
    n = item_probs.numel()
    expected = batch_size * item_probs[item_ids] + num_uniform / n
    return expected.clamp_min(1e-30).log()


def sampled_softmax_loss(
    query: Tensor,
    positives: Tensor,
    positive_ids: Tensor,
    temperature: Tensor | float,
    *,
    negatives: Tensor | None = None,
    negative_ids: Tensor | None = None,
    log_q: Tensor | None = None,
    mask_accidental_hits: bool = True,
) -> LossOutput:
    """In-batch (+ extra negatives) sampled softmax.

    Args:
        query: ``(B, D) float32`` user embeddings.
        positives: ``(B, D) float32`` embeddings of each row's positive item.
        positive_ids: ``(B,) int64`` item ids of the positives.
        temperature: scalar ``tau > 0``.
        negatives: ``(M, D) float32`` extra negative embeddings shared by all rows, or None.
        negative_ids: ``(M,) int64`` their item ids (required with ``negatives``).
        log_q: ``(B + M,) float32`` log sampling weight of every candidate column (see
            :func:`mixed_log_q`), subtracted from the logits; None = no correction.
        mask_accidental_hits: mask columns ``j != i`` whose id equals ``positive_ids[i]``.
    Returns:
        :class:`LossOutput` with the mean cross-entropy and stats ``loss``, ``pos_logit``
        (mean raw similarity / tau of the positives), ``accidental_hits`` (masked entries per row),
        ``top1`` (fraction of rows whose positive wins).
    """
    b = query.shape[0]
    if positives.shape != query.shape or positive_ids.shape != (b,):
        raise ValueError(
            f"shapes: query {tuple(query.shape)}, positives {tuple(positives.shape)}, "
            f"positive_ids {tuple(positive_ids.shape)}; expected (B, D), (B, D), (B,)"
        )
    candidates, cand_ids = positives, positive_ids
    if negatives is not None:
        if negative_ids is None or negative_ids.shape != (negatives.shape[0],):
            raise ValueError("negative_ids (M,) is required with negatives (M, D)")
        candidates = torch.cat([positives, negatives], 0)
        cand_ids = torch.cat([positive_ids, negative_ids], 0)
    c = candidates.shape[0]
    sim = query @ candidates.T / temperature  # (B, C)
    logits = sim
    if log_q is not None:
        if log_q.shape != (c,):
            raise ValueError(f"log_q must be ({c},) for {c} candidates, got {tuple(log_q.shape)}")
        logits = logits - log_q.unsqueeze(0)
    target = torch.arange(b, device=query.device)
    hits = 0.0
    if mask_accidental_hits:
        same = cand_ids.unsqueeze(0) == positive_ids.unsqueeze(1)  # (B, C)
        same[target, target] = False
        logits = logits.masked_fill(same, -math.inf)
        hits = float(same.sum()) / b
    loss = F.cross_entropy(logits, target)
    with torch.no_grad():
        stats = {
            "loss": float(loss),
            "pos_logit": float(sim[target, target].mean()),
            "accidental_hits": hits,
            "top1": float((logits.argmax(1) == target).float().mean()),
        }
    return LossOutput(loss, stats)
