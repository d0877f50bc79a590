"""Bit-sliced Bloom signatures of item attribute sets.

Every item's set of ``(feature_id, value_id)`` pairs (over the Bloom-mode features) is hashed
``num_hashes`` (K) times into a signature of ``width`` bits. Signatures are stored **bit-sliced**:
``(width, n_words) int64``, row ``j`` holds bit position ``j`` of the signatures of 64 items per
word. A term test is the AND of the term's K rows: an item that has the pair has all K bits set
(never a false negative); an item without it passes only if all K bits were set by its other pairs
(a false positive). Under negation that guarantee flips, which is why :mod:`.plan` never negates a
Bloom test (negated Bloom terms are evaluated on exact compile-time rows).

FPR of one term for an item carrying ``m`` Bloom pairs: ``(1 - (1 - 1/width) ** (K*m)) ** K``;
it is minimized near ``K = width/m * ln 2``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .bitmap import scatter_bits
from .hashing import hash_positions

__all__ = ["term_rows", "build_signatures", "term_fpr", "expected_fpr", "optimal_num_hashes"]


def term_rows(feature_ids: Tensor, value_ids: Tensor, num_hashes: int, width: int) -> Tensor:
    """Signature rows tested by each term: ``(n,), (n,) int64`` -> ``(n, K) int64``."""
    return hash_positions(feature_ids, value_ids, num_hashes, width)


def build_signatures(
    slots: Tensor,
    feature_ids: Tensor,
    value_ids: Tensor,
    n_words: int,
    num_hashes: int,
    width: int,
) -> Tensor:
    """Bit-sliced signatures from the flat list of every item's pairs.

    ``slots, feature_ids, value_ids (nnz,) int64`` (pair ``j`` belongs to item ``slots[j]``)
    -> ``(width, n_words) int64``. Fully vectorized: hash all pairs at once, then one bit scatter.
    """
    if width % 64 != 0 or width <= 0:
        raise ValueError(f"bloom width must be a positive multiple of 64, got {width}")
    if num_hashes < 1:
        raise ValueError(f"bloom num_hashes must be >= 1, got {num_hashes}")
    pos = term_rows(feature_ids, value_ids, num_hashes, width)  # (nnz, K)
    rows = pos.reshape(-1)
    item_slots = slots.to(torch.int64).repeat_interleave(num_hashes)
    return scatter_bits(width, n_words, rows, item_slots)


def term_fpr(pairs_per_item: float, num_hashes: int, width: int) -> float:
    """Analytical false-positive probability of one term for an item with ``m`` pairs."""
    fill = 1.0 - (1.0 - 1.0 / width) ** (num_hashes * pairs_per_item)
    return fill**num_hashes


def expected_fpr(pairs_per_item: Tensor, num_hashes: int, width: int) -> float:
    """Mean analytical term FPR over items: ``pairs_per_item (n,) int64/float`` -> float.

    Averages the per-item probability (items differ in how many pairs fill their signature),
    which is more accurate than plugging the mean pair count into :func:`term_fpr`.
    """
    if pairs_per_item.numel() == 0:
        return 0.0
    m = pairs_per_item.to(torch.float64)
    fill = 1.0 - (1.0 - 1.0 / width) ** (num_hashes * m)
    return float((fill**num_hashes).mean())


def optimal_num_hashes(pairs_per_item: float, width: int) -> int:
    """K minimizing :func:`term_fpr` for a typical item (``width/m * ln 2``, at least 1)."""
    if pairs_per_item <= 0:
        return 1
    return max(1, round(width / pairs_per_item * math.log(2)))
