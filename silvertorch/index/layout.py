"""The slot layout shared by every bit-sliced structure (see docs/architecture.md).

Items are stored cluster by cluster; every cluster starts at a multiple of ``SLOT_ALIGN = 64`` slots and
padding slots carry id -1, so cluster ``c`` owns the int64 words
``[cluster_offsets[c] // 64, cluster_offsets[c + 1] // 64)``. Slot ``s`` is bit ``s & 63`` of word
``s >> 6`` (least significant first).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SLOT_ALIGN", "TOMBSTONE", "build_layout", "live_words_from_ids", "unpack_words", "get_bits"]

SLOT_ALIGN = 64
TOMBSTONE = -2  # slot_ids value of a deleted item's slot (padding is -1); its live bit is 0


def build_layout(assign: Tensor, nlist: int) -> tuple[Tensor, Tensor, Tensor]:
    """Slot layout from cluster assignments.

    Args:
        assign: ``(N,) int64`` cluster of each item, in ``[0, nlist)``.
    Returns:
        ``order (N,) int64`` item rows in slot order (cluster-major, stable),
        ``cluster_offsets (nlist + 1,) int64`` 64-aligned slot starts,
        ``slot_of_item (N,) int64`` the slot of each item of ``order`` (same length as ``order``).
    """
    counts = torch.bincount(assign, minlength=nlist)
    spans = (counts + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN
    offsets = torch.zeros(nlist + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(spans, 0)
    order = torch.sort(assign, stable=True).indices
    sorted_c = assign[order]
    starts = torch.zeros(nlist + 1, dtype=torch.int64)
    starts[1:] = torch.cumsum(counts, 0)
    rank = torch.arange(assign.numel()) - starts[sorted_c]
    return order, offsets, offsets[sorted_c] + rank


def live_words_from_ids(slot_ids: Tensor) -> Tensor:
    """``slot_ids (S,) int64 -> (S / 64,) int64`` words with bit 1 where the slot holds an item."""
    bits = (slot_ids >= 0).view(-1, SLOT_ALIGN).to(torch.int64)
    shifts = torch.arange(SLOT_ALIGN, dtype=torch.int64, device=slot_ids.device)
    return (bits << shifts).sum(dim=1)  # bits are disjoint, so the sum is the OR (wraps into bit 63)


def unpack_words(words: Tensor) -> Tensor:
    """``(..., W) int64 -> (..., W * 64) bool``, bit ``j`` of word ``w`` at position ``64 w + j``."""
    shifts = torch.arange(SLOT_ALIGN, dtype=torch.int64, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)


def get_bits(words: Tensor, pos: Tensor) -> Tensor:
    """Bit ``pos`` of a 1-D word array: ``words (W,) int64, pos (...) int64 -> (...) bool``."""
    return ((words[pos >> 6] >> (pos & 63)) & 1).bool()
