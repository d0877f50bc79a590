"""Integer hashing in plain int64 torch ops (vectorized, identical on CPU and CUDA).

torch has no uint64 arithmetic on every backend, so the 64-bit mixer works on int64 with
two's-complement wrap-around: additions and multiplications wrap modulo 2**64 exactly like the
unsigned reference, XOR is sign-agnostic, and right shifts are made *logical* by masking off the
sign-extended bits (:func:`shr`). The mixer is the splitmix64 finalizer (Steele, Lea & Flood,
"Fast splittable pseudorandom number generators", 2014): every input bit affects every output bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["as_int64", "shr", "splitmix64", "pair_key", "hash_positions"]


def as_int64(x: int) -> int:
    """Reinterpret an unsigned 64-bit Python int as the signed int64 with the same bits."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


GOLDEN = as_int64(0x9E3779B97F4A7C15)
_M1 = as_int64(0xBF58476D1CE4E5B9)
_M2 = as_int64(0x94D049BB133111EB)
_FEATURE_SALT = as_int64(0xD6E8FEB86659FD93)


def shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 ``x`` by ``0 < k < 64`` bits (no sign extension)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: Tensor) -> Tensor:
    """splitmix64 of every element of an int64 tensor (any shape) -> same shape, int64."""
    z = x + GOLDEN
    z = (z ^ shr(z, 30)) * _M1
    z = (z ^ shr(z, 27)) * _M2
    return z ^ shr(z, 31)


def pair_key(feature_ids: Tensor, value_ids: Tensor) -> Tensor:
    """One well-mixed int64 key per ``(feature_id, value_id)`` pair; inputs broadcast, int64."""
    return splitmix64(splitmix64(feature_ids * _FEATURE_SALT) ^ value_ids)


def hash_positions(feature_ids: Tensor, value_ids: Tensor, num_hashes: int, width: int) -> Tensor:
    """The ``num_hashes`` signature bit positions of each pair.

    ``feature_ids, value_ids (n,) int64`` -> ``(n, num_hashes) int64`` in ``[0, width)``.
    Hash ``i`` of a pair is ``splitmix64(key + i * GOLDEN)``, reduced by the top 63 bits mod width.
    """
    key = pair_key(feature_ids.to(torch.int64), value_ids.to(torch.int64))
    i = torch.arange(num_hashes, dtype=torch.int64, device=key.device)
    h = splitmix64(key[:, None] + i[None, :] * GOLDEN)
    return shr(h, 1) % width
