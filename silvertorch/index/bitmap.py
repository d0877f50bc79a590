"""Bit-sliced bitmaps: slot ``s`` is bit ``s & 63`` of int64 word ``s >> 6`` (LSB first).

A bit-sliced table ``(rows, n_words) int64`` holds one bitmap per row; row ``r`` of an exact
per-value table is the set of slots whose attribute contains value ``r``, so a filter term is one
row gather and ``& | ~`` combine 64 items per machine op. Helpers here are shared by the exact
bitmaps, the Bloom signatures (:mod:`.bloom`) and the compile-time exact rows of negated Bloom
terms.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "num_words",
    "scatter_bits",
    "pack_bits",
    "unpack_bits",
    "popcount",
    "value_bitmaps",
    "bit_weights",
]


def num_words(n_slots: int) -> int:
    """Number of int64 words covering ``n_slots`` bits."""
    return (n_slots + 63) // 64


def bit_weights(device: torch.device | str | None = None) -> Tensor:
    """``(64,) int64``: entry ``b`` is the int64 whose only set bit is ``b`` (b=63: negative)."""
    w = torch.ones(64, dtype=torch.int64, device=device) << torch.arange(64, device=device)
    return w


def scatter_bits(n_rows: int, n_words: int, rows: Tensor, slots: Tensor) -> Tensor:
    """Set bit ``slots[j]`` of row ``rows[j]`` for every ``j``; duplicates allowed.

    ``rows, slots (m,) int64`` -> ``(n_rows, n_words) int64``. Duplicate pairs are removed first so
    that an ``index_add_`` of distinct single-bit words equals their OR (no carries; the sign bit
    of bit 63 cannot overflow because every partial sum is a sum of distinct powers of two).
    """
    device = rows.device
    out = torch.zeros(n_rows * n_words, dtype=torch.int64, device=device)
    if rows.numel() == 0:
        return out.view(n_rows, n_words)
    n_bits = n_words * 64
    key = torch.unique(rows.to(torch.int64) * n_bits + slots.to(torch.int64))
    r, s = key // n_bits, key % n_bits
    out.index_add_(0, r * n_words + (s >> 6), torch.ones_like(s) << (s & 63))
    return out.view(n_rows, n_words)


def pack_bits(mask: Tensor) -> Tensor:
    """``(..., n) bool`` -> ``(..., ceil(n/64)) int64`` bit-words (padding bits are 0)."""
    n = mask.shape[-1]
    w = num_words(n)
    padded = torch.zeros(*mask.shape[:-1], w * 64, dtype=torch.int64, device=mask.device)
    padded[..., :n] = mask.to(torch.int64)
    bits = padded.view(*mask.shape[:-1], w, 64) * bit_weights(mask.device)
    return bits.sum(-1)  # distinct powers of two: the sum is the OR, and never overflows


def unpack_bits(words: Tensor, n: int | None = None) -> Tensor:
    """``(..., W) int64`` -> ``(..., W*64) bool`` (or the first ``n`` bits)."""
    bits = (words.unsqueeze(-1) & bit_weights(words.device)) != 0
    flat = bits.flatten(-2)
    return flat if n is None else flat[..., :n]


_POP8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def popcount(words: Tensor) -> Tensor:
    """Number of set bits of each int64 word: ``(...) int64`` -> ``(...) int64``."""
    table = _POP8.to(words.device)
    as_bytes = words.contiguous().view(torch.uint8).view(*words.shape, 8)
    return table[as_bytes.to(torch.int64)].to(torch.int64).sum(-1)


def value_bitmaps(offsets: Tensor, values: Tensor, cardinality: int, n_words: int) -> Tensor:
    """Exact per-value bitmaps of one CSR feature.

    ``offsets (n+1,) int64``, ``values (nnz,) int64`` -> ``(cardinality, n_words) int64`` where bit
    ``s`` of row ``v`` is set iff value ``v`` is among item ``s``'s values.
    """
    n = offsets.numel() - 1
    lengths = offsets[1:] - offsets[:-1]
    slots = torch.repeat_interleave(
        torch.arange(n, device=offsets.device), lengths, output_size=values.numel()
    )
    return scatter_bits(cardinality, n_words, values, slots)
