"""The fresh segment of an :class:`~.search.ItemIndex`: where items added after the build live.

Layout (see :mod:`.ivf`): the fresh region is a 64-aligned block of slots after the main clusters,
``[cluster_offsets[C], S)``. ``cluster_offsets`` gains one entry, so ``[off[C], off[C+1])`` is the
*fresh cluster*: the used part of the region (rounded up to 64 slots), which every IVF search scans
next to its probed clusters, with the same scan kernels, filter evaluation and verification as any
other cluster. ``[off[C+1], S)`` is headroom (dead slots, never scanned by IVF search). Fresh slots are
handed out in order and never reused (a deleted fresh item leaves a tombstone until compaction).

The region is created by the first insertion (an index with no updates keeps the build's layout
byte for byte) with ``capacity`` slots (:func:`default_capacity`), and reallocated at twice the
size (or more) when it fills up; the eligibility index grows with it.

Functions here write; callers (``silvertorch.catalog``) validate first.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .bitops import set_bits
from .ivf import IVFIndex
from .layout import SLOT_ALIGN, TOMBSTONE
from .quantize import encode

__all__ = [
    "default_capacity",
    "round_up",
    "fresh_used",
    "fresh_capacity",
    "reserve",
    "take_slots",
    "encode_rows",
    "write_rows",
    "set_live",
    "tombstone",
]


def round_up(n: int, to: int = SLOT_ALIGN) -> int:
    return (int(n) + to - 1) // to * to


def default_capacity(n_items: int) -> int:
    """``max(1024, 5% of n_items)`` rounded up to a multiple of 64."""
    return round_up(max(1024, -(-int(n_items) * 5 // 100)))


def fresh_capacity(ivf: IVFIndex) -> int:
    """Slots of the fresh region (0 when none was allocated)."""
    return ivf.num_slots - ivf.main_slots if ivf.has_fresh else 0


def fresh_used(ivf: IVFIndex) -> int:
    """Fresh slots handed out so far (live items and tombstones)."""
    if not ivf.has_fresh:
        return 0
    return int((ivf.slot_ids[ivf.main_slots :] != -1).sum())


def reserve(index: nn.Module, n_new: int, capacity: int) -> None:
    """Make room for ``n_new`` more fresh slots in ``index`` (an ``ItemIndex``): create the region
    with ``max(capacity, ...)`` slots, or reallocate it (IVF and eligibility buffers) at
    ``max(2 * current, needed)`` slots. New slots are dead padding."""
    ivf = index.ivf
    used, cap = fresh_used(ivf), fresh_capacity(ivf)
    if ivf.has_fresh and used + n_new <= cap:
        return
    need = round_up(used + n_new)
    new_cap = max(round_up(capacity), need) if not ivf.has_fresh else max(2 * cap, need)
    s_old = ivf.num_slots
    s_new = ivf.main_slots + new_cap
    dev, d = ivf.vectors.device, ivf.dim
    grow = s_new - s_old
    ivf.vectors = torch.cat([ivf.vectors, torch.zeros(grow, d, dtype=ivf.vectors.dtype, device=dev)])
    ivf.scales = torch.cat([ivf.scales, torch.ones(grow, dtype=ivf.scales.dtype, device=dev)])
    ivf.slot_ids = torch.cat([ivf.slot_ids, torch.full((grow,), -1, dtype=torch.int64, device=dev)])
    ivf.live_words = torch.cat(
        [ivf.live_words, torch.zeros(grow // SLOT_ALIGN, dtype=torch.int64, device=dev)]
    )
    if not ivf.has_fresh:
        off = ivf.cluster_offsets
        ivf.cluster_offsets = torch.cat([off, off[-1:]])
    if index.eligibility is not None:
        from .eligibility_update import resize_slots

        resize_slots(index.eligibility, s_new)


def take_slots(ivf: IVFIndex, n: int) -> Tensor:
    """The next ``n`` fresh slots ``(n,) int64`` (room must have been :func:`reserve`\\ d); extends
    the fresh cluster's span over them."""
    start = ivf.main_slots + fresh_used(ivf)
    if start + n > ivf.num_slots or not ivf.has_fresh:
        raise RuntimeError("fresh region too small: call reserve() first")
    slots = torch.arange(start, start + n, dtype=torch.int64)
    end = round_up(start + n - ivf.main_slots) + ivf.main_slots
    off = ivf.cluster_offsets.clone()
    off[-1] = max(int(off[-1]), end)
    ivf.cluster_offsets = off
    return slots


def encode_rows(ivf: IVFIndex, x: Tensor) -> tuple[Tensor, Tensor]:
    """``x (n, d) float`` -> storage ``(codes (n, d), scales (n,) f32)`` as the build encodes
    (normalized first for the cosine metric, int8 with a per-row symmetric scale)."""
    x = x.detach().to(ivf.centroids.device, torch.float32)
    if ivf.metric == "cosine":
        x = nn.functional.normalize(x, dim=1)
    return encode(x, ivf.storage_dtype)


def write_rows(
    ivf: IVFIndex, slots: Tensor, codes: Tensor, scales: Tensor, ids: Tensor | None = None
) -> None:
    """Rows ``slots (n,)`` <- ``codes (n, d)``, ``scales (n,)`` (and ``slot_ids`` <- ``ids``)."""
    dev = ivf.vectors.device
    slots = slots.to(dev)
    ivf.vectors[slots] = codes.to(dev, ivf.vectors.dtype)
    ivf.scales[slots] = scales.to(dev, ivf.scales.dtype)
    if ids is not None:
        ivf.slot_ids[slots] = ids.to(dev, torch.int64)


def set_live(ivf: IVFIndex, slots: Tensor, on: bool) -> None:
    """Live bit of ``slots (m,) int64`` on or off."""
    set_bits(ivf.live_words, slots.to(ivf.live_words.device), on)


def tombstone(ivf: IVFIndex, slots: Tensor) -> None:
    """Delete the items at ``slots``: live bit off, ``slot_ids`` = ``TOMBSTONE``."""
    set_live(ivf, slots, False)
    ivf.slot_ids[slots.to(ivf.slot_ids.device)] = TOMBSTONE
