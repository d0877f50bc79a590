"""Streaming writes into an :class:`~.eligibility.EligibilityIndex` (in place, no rebuild).

- :func:`resize_slots`: grow the slot count (new slots are dead and have empty attribute sets);
- :func:`rewrite_sets`: replace the attribute sets of some features of some slots — the exact CSR
  (``csr_*``), the Bloom postings (``csc_*``), the bitmap rows and the Bloom signature bits of
  ``table`` all follow, so bitmap evaluation, Bloom evaluation, negated-Bloom exact rows and
  verification stay consistent;
- :func:`set_live`: mark slots live or dead (tombstones).

Callers validate first (:func:`check_sets`); the functions here write. The variable-length CSR and
postings cannot grow in place, so :func:`rewrite_sets` splices the changed rows into new
``csr_values`` / ``csr_offsets`` / ``csc_*`` tensors (a few vectorized ``O(nnz + F * S)`` passes, no
sort of the index) and swaps them in; ``table`` bits are flipped in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .bitmap import num_words
from .bitops import set_bits, set_table_bits
from .bloom import term_rows
from .eligibility import EligibilityIndex

__all__ = ["resize_slots", "rewrite_sets", "set_live", "check_sets", "slot_values"]


def resize_slots(elig: EligibilityIndex, n_slots: int) -> None:
    """Grow to ``n_slots`` (a multiple of 64, >= the current count); new slots are dead and empty."""
    s_old, w_old = elig.num_slots, elig.num_words
    if n_slots < s_old or n_slots % 64:
        raise ValueError(f"can only grow to a multiple of 64 >= {s_old} slots, got {n_slots}")
    w_new = num_words(n_slots)
    table = torch.zeros(elig.table.shape[0], w_new, dtype=torch.int64, device=elig.table.device)
    table[:, :w_old] = elig.table
    ones_row = int(elig.meta[5])
    table[ones_row] = -1
    off = elig.csr_offsets
    pad = off[:, -1:].expand(-1, n_slots - s_old)
    live = torch.zeros(w_new, dtype=torch.int64, device=elig.live_words.device)
    live[:w_old] = elig.live_words
    meta = elig.meta.clone()
    meta[0], meta[1] = n_slots, w_new
    elig.table, elig.csr_offsets, elig.live_words = table, torch.cat([off, pad], 1).contiguous(), live
    elig.meta = meta
    elig._schema = None


def set_live(elig: EligibilityIndex, slots: Tensor, on: bool) -> None:
    """Live bit of ``slots (m,) int64`` on or off (dead slots never match a filter)."""
    set_bits(elig.live_words, slots, on)


def check_sets(elig: EligibilityIndex, sets: dict[int, list[list[int]]], m: int) -> None:
    """``ValueError`` unless every feature id exists, every list has ``m`` rows and every value id
    lies in ``[0, cardinality)`` (nothing is written)."""
    info = elig.feat_info.tolist()
    for f, rows in sets.items():
        if not 0 <= f < len(info):
            raise ValueError(f"feature id {f} out of range [0, {len(info)})")
        if len(rows) != m:
            raise ValueError(f"feature {f}: {len(rows)} attribute sets for {m} slots")
        card = info[f][1]
        for vals in rows:
            for v in vals:
                if not 0 <= int(v) < card:
                    name = elig.schema().names[f]
                    raise ValueError(f"attribute '{name}': value id {v} out of range [0, {card})")


def _pairs(off: Tensor, vals: Tensor, f: int, slots: Tensor) -> tuple[Tensor, Tensor]:
    """Current ``(slot, value)`` pairs of feature ``f`` for ``slots (m,)`` from the CSR."""
    starts, ends = off[f, slots], off[f, slots + 1]
    lens = ends - starts
    total = int(lens.sum())
    rep = torch.repeat_interleave(torch.arange(slots.numel()), lens, output_size=total)
    first = torch.cumsum(lens, 0) - lens
    pos = starts[rep] + (torch.arange(total) - first[rep])
    return slots[rep], vals[pos]


def slot_values(elig: EligibilityIndex, f: int, slot: int) -> list[int]:
    """Sorted value ids of feature ``f`` at ``slot``."""
    a, b = int(elig.csr_offsets[f, slot]), int(elig.csr_offsets[f, slot + 1])
    return elig.csr_values[a:b].tolist()


def _splice(old: Tensor, starts: Tensor, ends: Tensor, new_lens: Tensor, new_vals: Tensor) -> Tensor:
    """Replace the sorted, disjoint ranges ``[starts[i], ends[i])`` of ``old (n,)`` by consecutive
    chunks of ``new_vals`` (chunk ``i`` has ``new_lens[i]`` values) -> new 1-D tensor.

    One ``torch.cat`` of the untouched slices and the new chunks: ``O(n)`` copy plus ``O(m)`` views.
    """
    pieces, prev, q = [], 0, 0
    for a, b, n in zip(starts.tolist(), ends.tolist(), new_lens.tolist()):
        if a > prev:
            pieces.append(old[prev:a])
        if n:
            pieces.append(new_vals[q : q + n])
            q += n
        prev = b
    pieces.append(old[prev:])
    return torch.cat(pieces)


def _lower_bound(values: Tensor, lo: Tensor, hi: Tensor, target: Tensor) -> Tensor:
    """Per query, the first position in the sorted segment ``values[lo:hi]`` with value >= target."""
    lo, hi = lo.clone(), hi.clone()
    n = max(values.numel() - 1, 0)
    while True:
        active = lo < hi
        if not bool(active.any()):
            return lo
        mid = (lo + hi) // 2
        go = active & (values[mid.clamp(0, n)] < target)
        lo = torch.where(go, mid + 1, lo)
        hi = torch.where(active & ~go, mid, hi)


def rewrite_sets(elig: EligibilityIndex, slots: Tensor, sets: dict[int, list[list[int]]]) -> None:
    """Replace feature ``f``'s set of every slot ``slots[i]`` by ``sets[f][i]`` (value ids).

    ``slots (m,) int64`` distinct; features not in ``sets`` keep their sets. Call
    :func:`check_sets` first: this function writes. Cost: ``O(nnz + F * S)`` memory traffic in a few
    vectorized passes plus ``O(m log)`` for the changed rows (no sort of the whole index).
    """
    if slots.numel() == 0 or not sets:
        return
    if elig.csr_offsets.device.type != "cpu":
        raise NotImplementedError("streaming eligibility updates run on a CPU index")
    slots = slots.to(torch.int64).cpu()
    S = elig.num_slots
    meta = elig.meta.tolist()
    info = elig.feat_info.tolist()
    K, width, bloom_base = meta[2], meta[3], meta[4]
    F = len(info)
    fids = sorted(sets)
    old_off, old_vals = elig.csr_offsets, elig.csr_values

    # ---- the changed (feature, slot) rows in flat row order f * S + s, with their new sets
    rows_l, chunks = [], []
    for f in fids:
        for s_, row in zip(slots.tolist(), sets[f]):
            rows_l.append(f * S + s_)
            chunks.append(sorted(set(int(v) for v in row)))
    order = sorted(range(len(rows_l)), key=rows_l.__getitem__)
    rows = torch.tensor([rows_l[i] for i in order], dtype=torch.int64)
    chunks = [chunks[i] for i in order]
    new_lens = torch.tensor([len(c) for c in chunks], dtype=torch.int64)
    new_flat = torch.tensor([v for c in chunks for v in c], dtype=torch.int64)
    f_of, s_of = rows // S, rows % S
    o_start, o_end = old_off[f_of, s_of], old_off[f_of, s_of + 1]

    # ---- the exact CSR: splice the changed rows, shift the offsets after them
    vals = _splice(old_vals, o_start, o_end, new_lens, new_flat)
    delta = torch.zeros(F * S + 1, dtype=torch.int64)
    delta.index_add_(0, rows + 1, new_lens - (o_end - o_start))
    cum = torch.cumsum(delta, 0)
    shift = torch.cat([cum[:-1].view(F, S), cum[S::S].view(F, 1)], 1) if F else cum[:0].view(0, S + 1)
    new_off = old_off + shift

    # ---- bitmap rows: clear the old values' bits, set the new ones
    table = elig.table
    for f in fids:
        is_bloom, _, base, _, _ = info[f]
        if is_bloom:
            continue
        s_old, v_old = _pairs(old_off, old_vals, f, slots)
        set_table_bits(table, v_old + base, s_old, on=False)
        s_new, v_new = _pairs(new_off, vals, f, slots)
        set_table_bits(table, v_new + base, s_new, on=True)

    # ---- Bloom signatures (shared by every Bloom feature): re-hash the slots' whole Bloom sets
    csc_offsets, csc_slots = elig.csc_offsets, elig.csc_slots
    if any(info[f][0] for f in fids):
        bloom_f = [f for f in range(F) if info[f][0]]
        for off, vv, on in ((old_off, old_vals, False), (new_off, vals, True)):
            for f in bloom_f:
                s_, v_ = _pairs(off, vv, f, slots)
                pos = term_rows(torch.full_like(v_, f), v_, K, width) + bloom_base  # (n, K)
                set_table_bits(table, pos.reshape(-1), s_.repeat_interleave(K), on=on)
        csc_offsets, csc_slots = _rewrite_postings(elig, info, slots, fids, (old_off, old_vals),
                                                   (new_off, vals))

    meta[6] = max(meta[6], int(new_lens.max()) if new_lens.numel() else 0)
    elig.csr_offsets, elig.csr_values = new_off, vals
    elig.csc_offsets, elig.csc_slots = csc_offsets, csc_slots
    elig.meta = torch.tensor(meta, dtype=torch.int64)
    elig._schema = None


def _rewrite_postings(elig: EligibilityIndex, info: list[list[int]], slots: Tensor, fids: list[int],
                      old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """New ``csc_offsets`` / ``csc_slots`` after the Bloom features ``fids`` of ``slots`` changed:
    the slots leave the postings of their old values and join those of their new values."""
    off, post = elig.csc_offsets, elig.csc_slots
    R = off.numel() - 1
    rm_rows, rm_slots, add_rows, add_slots = [], [], [], []
    for f in fids:
        if not info[f][0]:
            continue
        base = info[f][3]
        s_, v_ = _pairs(*old, f, slots)
        rm_rows.append(base + v_)
        rm_slots.append(s_)
        s_, v_ = _pairs(*new, f, slots)
        add_rows.append(base + v_)
        add_slots.append(s_)
    rm_r, rm_s = torch.cat(rm_rows), torch.cat(rm_slots)
    add_r, add_s = torch.cat(add_rows), torch.cat(add_slots)
    rm_pos = torch.sort(_lower_bound(post, off[rm_r], off[rm_r + 1], rm_s)).values
    key_order = torch.argsort(add_r * elig.num_slots + add_s)  # (row, slot) order
    add_r, add_s = add_r[key_order], add_s[key_order]
    ins = _lower_bound(post, off[add_r], off[add_r + 1], add_s)
    # splice: every removal is a range of length 1, every insertion an empty range of one value
    starts = torch.cat([rm_pos, ins])
    ends = torch.cat([rm_pos + 1, ins])
    lens = torch.cat([torch.zeros_like(rm_pos), torch.ones_like(ins)])
    vals = torch.cat([torch.zeros_like(rm_pos), add_s])
    # order: by position; at equal positions the removal (non-empty range) comes after insertions
    # that precede it in key order, which is what a lower bound gives -> sort by (start, is_removal)
    o = torch.argsort(starts * 2 + (ends > starts).to(torch.int64), stable=True)
    new_vals_order = o[lens[o] > 0]
    slots_new = _splice(post, starts[o], ends[o], lens[o], vals[new_vals_order])
    delta = torch.zeros(R + 1, dtype=torch.int64)
    delta.index_add_(0, add_r + 1, torch.ones_like(add_r))
    delta.index_add_(0, rm_r + 1, -torch.ones_like(rm_r))
    return off + torch.cumsum(delta, 0), slots_new
