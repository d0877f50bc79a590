"""Memory bandwidth measured in the same process as the scans it bounds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import Timing, time_call

__all__ = ["Bandwidth", "measure_bandwidth"]


@dataclass
class Bandwidth:
    """Sustained read and copy bandwidth in GB/s (10^9 bytes) of a buffer larger than the caches."""

    bytes: int
    read: Timing  # int8 buffer summed as int64 words: pure streaming read
    copy: Timing  # int8 buffer copied: read + write

    # the fastest repeat: the bandwidth the machine can sustain (noise only ever slows a repeat down)
    @property
    def read_gbs(self) -> float:
        return self.bytes / self.read.min_s / 1e9

    @property
    def copy_gbs(self) -> float:
        return 2 * self.bytes / self.copy.min_s / 1e9


def measure_bandwidth(num_bytes: int = 512 << 20, repeats: int = 5) -> Bandwidth:
    """Time a streaming sum and a copy of a ``num_bytes`` int8 tensor (all torch threads)."""
    num_bytes -= num_bytes % 8
    buf = torch.randint(-128, 128, (num_bytes,), dtype=torch.int8)
    words = buf.view(torch.int64)  # summing 8-byte words keeps the reduction memory-bound
    dst = torch.empty_like(buf)
    read = time_call(lambda: words.sum(), repeats)
    copy = time_call(lambda: dst.copy_(buf), repeats)
    return Bandwidth(num_bytes, read, copy)
