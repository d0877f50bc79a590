"""Sampled softmax: logQ correction, mixed uniform negatives, accidental-hit masking."""

from __future__ import annotations

import math

import pytest
import torch

from silvertorch.losses import mixed_log_q, sampled_softmax_loss


def sims_grad(sims: torch.Tensor, ids: torch.Tensor, log_q: torch.Tensor | None, mask: bool = True):
    """Loss and d loss / d sims for a given (B, B) similarity matrix (query = identity)."""
    b = sims.shape[0]
    cand = sims.T.clone().requires_grad_(True)  # positives (B, B): sims = I @ cand.T
    out = sampled_softmax_loss(torch.eye(b), cand, ids, 1.0, log_q=log_q, mask_accidental_hits=mask)
    out.loss.backward()
    return out, cand.grad.T  # grad w.r.t. sims[i, j]


def test_logq_gradient_matches_analytic_softmax() -> None:
    # three in-batch items; item 0 is eight times as frequent as the others
    q = torch.tensor([0.8, 0.1, 0.1])
    ids = torch.tensor([0, 1, 2])
    sims = torch.zeros(3, 3)
    log_q = mixed_log_q(ids, q, batch_size=3, num_uniform=0)
    torch.testing.assert_close(log_q, torch.log(3 * q))
    _, grad = sims_grad(sims, ids, log_q)
    # analytic: d CE_i / d s_ij = softmax_j(s_i - log q) - [j == i], averaged over B rows
    p = torch.softmax(-(torch.log(q)).expand(3, 3), dim=1)
    expected = (p - torch.eye(3)) / 3
    torch.testing.assert_close(grad, expected)
    # the frequent item, as a negative of row 1, is pushed down 8x less than the rare item 2
    assert grad[1, 0] * 8 == pytest.approx(float(grad[1, 2]), rel=1e-5)
    # without correction both negatives are pushed equally
    _, plain = sims_grad(sims, ids, None)
    assert float(plain[1, 0]) == pytest.approx(float(plain[1, 2]))
    torch.testing.assert_close(plain, (torch.full((3, 3), 1 / 3) - torch.eye(3)) / 3)


def test_logq_with_uniform_mixture() -> None:
    q = torch.tensor([0.5, 0.5, 0.0, 0.0])
    ids = torch.tensor([0, 1, 2])
    got = mixed_log_q(ids, q, batch_size=4, num_uniform=8)
    # expected count: 4 * q + 8 / 4
    torch.testing.assert_close(got, torch.log(torch.tensor([4.0, 4.0, 2.0])))
    assert torch.isfinite(mixed_log_q(torch.tensor([3]), q, 4, 0)).all()  # floored, not -inf


def test_accidental_hits_are_masked() -> None:
    torch.manual_seed(0)
    ids = torch.tensor([7, 7, 3])
    sims = torch.randn(3, 3)
    out, grad = sims_grad(sims, ids, None, mask=True)
    # row 0's column 1 is the same item as its positive: no gradient, not a negative
    assert float(grad[0, 1]) == 0.0 and float(grad[1, 0]) == 0.0
    assert out.stats["accidental_hits"] == pytest.approx(2 / 3)
    # loss equals a manual softmax that drops the masked entries
    manual = []
    keep = [[0, 2], [1, 2], [0, 1, 2]]
    for i, cols in enumerate(keep):
        row = sims[i, cols]
        manual.append(-(row[cols.index(i)] - torch.logsumexp(row, 0)))
    assert float(out.loss) == pytest.approx(float(torch.stack(manual).mean()), rel=1e-5)
    # without masking the duplicate column receives gradient
    _, grad_nomask = sims_grad(sims, ids, None, mask=False)
    assert float(grad_nomask[0, 1]) > 0


def test_uniform_negatives_join_the_softmax_and_hits_are_masked() -> None:
    torch.manual_seed(0)
    d = 4
    query = torch.nn.functional.normalize(torch.randn(2, d), dim=1)
    pos = torch.nn.functional.normalize(torch.randn(2, d), dim=1)
    neg = torch.nn.functional.normalize(torch.randn(3, d), dim=1)
    pos_ids = torch.tensor([0, 1])
    neg_ids = torch.tensor([1, 5, 6])  # item 1 is row 1's positive: masked for row 1 only
    out = sampled_softmax_loss(
        query, pos, pos_ids, 0.5, negatives=neg, negative_ids=neg_ids, mask_accidental_hits=True
    )
    logits = query @ torch.cat([pos, neg]).T / 0.5
    logits[1, 2] = -math.inf
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="negative_ids"):
        sampled_softmax_loss(query, pos, pos_ids, 0.5, negatives=neg)
    with pytest.raises(ValueError, match="log_q"):
        sampled_softmax_loss(query, pos, pos_ids, 0.5, log_q=torch.zeros(3))


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="shapes"):
        sampled_softmax_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 1.0)
