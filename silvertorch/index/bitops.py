"""In-place bit writes on bit-sliced word arrays (streaming updates).

Slot ``s`` is bit ``s & 63`` of word ``s >> 6`` (see :mod:`.layout`). Several slots can share a word,
so the single-bit masks are first combined per word (distinct powers of two: their sum is their OR),
then every touched word is written once.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["word_masks", "set_bits", "set_table_bits"]


def word_masks(flat_bits: Tensor) -> tuple[Tensor, Tensor]:
    """``flat_bits (m,) int64`` bit positions (duplicates allowed) -> ``words (u,) int64`` (the
    distinct word indices touched) and ``masks (u,) int64`` (per word, the OR of its bits)."""
    bits = torch.unique(flat_bits.to(torch.int64))
    words, inverse = torch.unique(bits >> 6, return_inverse=True)
    masks = torch.zeros(words.numel(), dtype=torch.int64, device=bits.device)
    masks.index_add_(0, inverse, torch.ones_like(bits) << (bits & 63))
    return words, masks


def set_bits(words: Tensor, slots: Tensor, on: bool) -> None:
    """Set (``on``) or clear bits ``slots (m,) int64`` of ``words (W,) int64`` in place."""
    if slots.numel() == 0:
        return
    idx, masks = word_masks(slots.to(words.device))
    if on:
        words[idx] |= masks
    else:
        words[idx] &= ~masks


def set_table_bits(table: Tensor, rows: Tensor, slots: Tensor, on: bool) -> None:
    """Set or clear bit ``slots[j]`` of row ``rows[j]`` of ``table (R, W) int64`` in place."""
    if rows.numel() == 0:
        return
    n_words = table.shape[1]
    flat = rows.to(torch.int64) * (n_words * 64) + slots.to(torch.int64)
    idx, masks = word_masks(flat.to(table.device))
    view = table.view(-1)
    if on:
        view[idx] |= masks
    else:
        view[idx] &= ~masks
