"""Selectivity-aware probing: enough eligible items in the probed clusters for a filtered query.

With a filter that keeps a fraction ``s`` of the items, the ``nprobe`` nearest clusters hold about
``s * (their size)`` eligible items, often fewer than ``k``: recall collapses. This module estimates
the eligible items of every cluster for a compiled filter and probes more clusters (in centroid
order) until the estimate reaches ``min_candidates_factor * k``.

:class:`ClusterHistogram` (an ``nn.Module``, registered buffers only, so it is in ``state_dict``
and exports with the index):

- ``counts (C + 1, T) int32``: ``counts[c, col_base[f] + v]`` = live items of cluster ``c`` whose
  set of feature ``f`` contains value ``v``; row ``C`` is the fresh cluster (streaming inserts);
- ``col_base (F,) int64``: first column of feature ``f`` (``-1`` = no histogram for it: features
  are taken by ascending cardinality while ``(C + 1) * T * 4`` bytes fit ``budget_bytes``).

Estimate (:func:`eligible_fraction`): the filter's exact verification program (the plan's
``vbit_*`` / ``v_*`` / ``vreg_*`` steps, one leaf per ``feature:value`` term) is run in *fraction
space* per cluster: a term's fraction is ``counts[c, term] / live[c]`` (exact: the fraction of the
cluster's live items having the value), ``NOT`` is ``1 - f``, ``AND`` multiplies, ``OR`` is
``1 - prod(1 - f)``. Combining terms assumes they are independent inside a cluster: exact for one
term, an estimate for several (correlated terms, e.g. ``language:en AND country:us``, are
under-estimated, which probes more, never fewer, clusters than an exact count would). A term of a
feature without a histogram counts as fraction 1 (no information: no extra probes for it).

Probing (:func:`select_probes`), per query, so a request's answer never depends on its batch:
clusters in order of centroid score, at least ``nprobe``, then more until the estimated eligible
items of the probed clusters (the fresh cluster, always scanned, included) reach
``min_candidates_factor * k``, at most ``max_nprobe``. Rows are padded with ``-1`` to the longest.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .bitmap import popcount
from .layout import SLOT_ALIGN

__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "ClusterHistogram",
    "cluster_live_counts",
    "eligible_fraction",
    "estimate_eligible",
    "select_probes",
    "probe_for_filter",
]

DEFAULT_BUDGET_BYTES = 64 << 20


def _cluster_of(cluster_offsets: Tensor, slots: Tensor, nlist: int) -> Tensor:
    """Cluster of each slot ``(m,) int64`` (fresh-region slots -> ``nlist``)."""
    c = torch.searchsorted(cluster_offsets[1:].contiguous(), slots, right=True)
    return c.clamp_max(nlist)


def cluster_live_counts(cluster_offsets: Tensor, live_words: Tensor, nlist: int) -> Tensor:
    """``(nlist + 1,) int64`` live items per cluster, the fresh cluster last (0 when none)."""
    words = popcount(live_words).to(torch.int64)
    cum = torch.zeros(words.numel() + 1, dtype=torch.int64, device=words.device)
    cum[1:] = torch.cumsum(words, 0)
    bounds = (cluster_offsets // SLOT_ALIGN).clamp_max(words.numel())
    per = cum[bounds[1:]] - cum[bounds[:-1]]
    out = torch.zeros(nlist + 1, dtype=torch.int64, device=words.device)
    out[: per.numel()] = per[: nlist + 1]
    return out


class ClusterHistogram(nn.Module):
    """Per-cluster counts of attribute values (see module docstring)."""

    counts: Tensor
    col_base: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("counts", torch.zeros(0, 0, dtype=torch.int32))
        self.register_buffer("col_base", torch.zeros(0, dtype=torch.int64))

    @classmethod
    def build(cls, cluster_offsets: Tensor, live_words: Tensor, eligibility: nn.Module, nlist: int,
              *, budget_bytes: int = DEFAULT_BUDGET_BYTES,
              col_base: Tensor | None = None) -> ClusterHistogram:
        """Count the live slots' values from ``eligibility``'s exact sets (``csr_*``, slot order)
        under the layout ``cluster_offsets`` (``(C + 1,)`` or ``(C + 2,)`` with a fresh cluster).

        Features get columns by ascending cardinality while ``(C + 1) * columns * 4`` bytes fit
        ``budget_bytes``; ``col_base (F,)`` instead fixes the columns (compaction keeps them)."""
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        info = eligibility.feat_info.cpu()
        n_feat = info.shape[0]
        cards = info[:, 1].tolist() if n_feat else []
        if col_base is not None:
            if col_base.shape != (n_feat,):
                raise ValueError(f"col_base must be ({n_feat},) int64, got {tuple(col_base.shape)}")
            col_base = col_base.cpu().tolist()
            total = max([b + cards[f] for f, b in enumerate(col_base) if b >= 0], default=0)
        else:
            col_base = [-1] * n_feat
            total = 0
            for f in sorted(range(n_feat), key=lambda i: cards[i]):
                if (nlist + 1) * (total + cards[f]) * 4 <= budget_bytes:
                    col_base[f], total = total, total + cards[f]
        hist = cls()
        hist.col_base = torch.tensor(col_base, dtype=torch.int64)
        hist.counts = torch.zeros(nlist + 1, total, dtype=torch.int32)
        n_slots = min(int(cluster_offsets[-1]), eligibility.csr_offsets.shape[1] - 1 if n_feat else 0)
        hist.add_slots(torch.arange(n_slots), cluster_offsets.cpu(), live_words.cpu(), eligibility, 1)
        return hist.to(live_words.device)

    @property
    def nlist(self) -> int:
        return self.counts.shape[0] - 1

    def add_slots(self, slots: Tensor, cluster_offsets: Tensor, live_words: Tensor,
                  eligibility: nn.Module, sign: int) -> None:
        """``counts += sign`` for every value of every *live* slot of ``slots (m,) int64``.

        Streaming updates call it with ``-1`` before changing a live slot (its sets, or deleting it)
        and with ``+1`` once the slot is written and live, so the counts follow the catalog."""
        if self.counts.numel() == 0 or slots.numel() == 0:
            return
        dev = self.counts.device
        slots = slots.to(live_words.device, torch.int64)
        alive = ((live_words[slots >> 6] >> (slots & 63)) & 1) != 0
        slots = slots[alive]
        if slots.numel() == 0:
            return
        cluster = _cluster_of(cluster_offsets.to(slots.device), slots, self.nlist)
        off = eligibility.csr_offsets
        vals = eligibility.csr_values
        keys = []
        for f, base in enumerate(self.col_base.tolist()):
            if base < 0:
                continue
            s_dev = slots.to(off.device)
            start, end = off[f, s_dev], off[f, s_dev + 1]
            lengths = end - start
            n = int(lengths.sum())
            if n == 0:
                continue
            rep = torch.repeat_interleave(torch.arange(slots.numel(), device=off.device), lengths,
                                          output_size=n)
            first = torch.cumsum(lengths, 0) - lengths
            pos = start[rep] + (torch.arange(n, device=off.device) - first[rep])
            keys.append(cluster.to(off.device)[rep] * self.counts.shape[1] + base + vals[pos])
        if not keys:
            return
        key = torch.cat(keys).to(dev)
        step = torch.full((key.numel(),), 1 if sign > 0 else -1, dtype=torch.int32, device=dev)
        self.counts.view(-1).index_add_(0, key, step)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:  # type: ignore[no-untyped-def]
        for name in ("counts", "col_base"):  # sizes depend on the catalog: adopt the incoming ones
            if prefix + name in state_dict:
                src = state_dict[prefix + name]
                self._buffers[name] = torch.empty(src.shape, dtype=src.dtype,
                                                  device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, *args)


def eligible_fraction(plan: object, counts: Tensor, col_base: Tensor, live: Tensor,
                      feat_info: Tensor) -> tuple[Tensor, Tensor]:
    """Estimated eligible fraction of each cluster for each unique program of ``plan``.

    ``counts (C', T) int32``, ``col_base (F,)``, ``live (C',) int64`` live items per cluster,
    ``feat_info (F, 5) int64`` (the eligibility index's: column 1 the cardinality, column 2 the table
    row of value 0 of a bitmap feature, -1 for Bloom) -> ``(U, C') f32`` in ``[0, 1]`` (see the
    module docstring for the estimate) and ``filtered (U,) bool``: the program tests at least one
    term (a constant program, e.g. no filter or ``NOT unknown:x``, is not a filter to probe for).
    """
    dev = counts.device
    U = plan.v_root_xor.numel()
    Cp = counts.shape[0]
    denom = live.to(dev, torch.float32).clamp_min(1.0)
    ones = torch.ones(U, Cp, device=dev)

    def term(feat: Tensor, val: Tensor) -> Tensor:
        """(U,) feature and value ids -> (U, C') fractions (1 without histogram, 0 for value -1)."""
        base = col_base.to(dev)[feat.clamp_min(0)]
        ok = (base >= 0) & (val >= 0) & (feat >= 0)
        col = (base + val).clamp(0, max(counts.shape[1] - 1, 0))
        # only the U columns asked for are turned into fractions (the table has ~10k columns)
        f = counts[:, col].T.to(torch.float32) / denom[None, :] if counts.shape[1] else ones.clone()
        f = torch.where(ok[:, None], f, ones)
        return torch.where((val < 0)[:, None], torch.zeros_like(f), f)

    regs = torch.ones(plan.v_n_regs, U, Cp, device=dev)
    ar = torch.arange(U, device=dev)
    filtered = torch.zeros(U, dtype=torch.bool, device=dev)

    def step(f: Tensor, dst: Tensor, xor: Tensor) -> None:
        f = torch.where((xor != 0)[:, None], 1.0 - f, f)
        regs[dst, ar] = regs[dst, ar] * f

    if plan.vbit_src.shape[1]:  # bitmap leaves: table row -> (feature, value)
        info = feat_info.to(dev)
        bb, card = info[:, 2], info[:, 1]
        for t in range(plan.vbit_src.shape[1]):
            row = plan.vbit_src[:, t].to(dev)
            # the bitmap feature whose rows [base, base + card) hold ``row`` (none: the ones row)
            hit = (bb[None, :] >= 0) & (bb[None, :] <= row[:, None]) & (row[:, None] < (bb + card)[None, :])
            feat = hit.to(torch.int8).argmax(1)
            is_bit = hit.any(1)
            f = term(torch.where(is_bit, feat, -1), row - bb[feat])
            f = torch.where(is_bit[:, None], f, ones)  # the padding (all-ones row) is TRUE
            filtered |= is_bit
            step(f, plan.vbit_dst[:, t].to(dev), plan.vbit_xor[:, t].to(dev))
    for t in range(plan.v_feat.shape[1]):
        val = plan.v_val[:, t].to(dev)
        filtered |= val >= 0  # padding steps test value -1
        step(term(plan.v_feat[:, t].to(dev), val), plan.v_dst[:, t].to(dev),
             plan.v_xor[:, t].to(dev))
    for t in range(plan.vreg_src.shape[1]):
        step(regs[plan.vreg_src[:, t].to(dev), ar].clone(), plan.vreg_dst[:, t].to(dev),
             plan.vreg_xor[:, t].to(dev))
    out = regs[0]
    out = torch.where((plan.v_root_xor.to(dev) != 0)[:, None], 1.0 - out, out).clamp(0.0, 1.0)
    return out, filtered


def estimate_eligible(plan: object, hist: ClusterHistogram, cluster_offsets: Tensor,
                      live_words: Tensor, feat_info: Tensor) -> tuple[Tensor, Tensor]:
    """``(U, C + 1) f32`` estimated eligible live items per cluster (fresh last) per program, and
    ``filtered (U,) bool`` (:func:`eligible_fraction`)."""
    live = cluster_live_counts(cluster_offsets, live_words, hist.nlist).to(hist.counts.device)
    frac, filtered = eligible_fraction(plan, hist.counts, hist.col_base, live, feat_info)
    return frac * live.to(torch.float32)[None, :], filtered


def select_probes(sims: Tensor, nprobe: int, eligible: Tensor, target: Tensor,
                  max_nprobe: int, fresh_eligible: Tensor | None = None) -> Tensor:
    """Clusters to probe per query.

    ``sims (B, C) f32`` centroid scores, ``eligible (B, C) f32`` estimated eligible items per
    cluster, ``target (B,) f32`` eligible items wanted, ``fresh_eligible (B,)`` the estimate of
    the always-scanned fresh cluster -> ``(B, P) int64`` clusters best first, ``-1`` padded: row
    ``b`` takes the smallest ``n`` in ``[nprobe, max_nprobe]`` (clamped to ``C``) whose first ``n``
    clusters reach ``target[b]``. ``P`` is the largest ``n`` of the batch.
    """
    B, C = sims.shape
    lo = max(1, min(int(nprobe), C))
    hi = max(lo, min(int(max_nprobe), C))
    if hi == C:
        order = torch.sort(sims, dim=1, descending=True).indices
    else:
        order = torch.topk(sims, hi, dim=1).indices
    have = torch.cumsum(eligible.gather(1, order), 1)  # (B, hi)
    if fresh_eligible is not None:
        have = have + fresh_eligible[:, None]
    short = (have < target.to(have.dtype)[:, None]).sum(1)  # prefixes still short of the target
    n = (short + 1).clamp(lo, hi)
    P = int(n.max()) if B else lo
    probes = order[:, :P]
    return torch.where(torch.arange(P, device=sims.device)[None, :] < n[:, None], probes, -1)


def probe_for_filter(q: Tensor, centroids: Tensor, cluster_offsets: Tensor, live_words: Tensor,
                     hist: ClusterHistogram, feat_info: Tensor, plan: object, nprobe: int,
                     k_rows: Tensor, min_candidates_factor: float, max_nprobe: int) -> Tensor:
    """Selectivity-aware probes of a filtered batch (SilverTorch's search and the mesh's ANN).

    ``q (B, d) f32`` (prepared: normalized for cosine), ``centroids (C, d)``, ``k_rows (B,)`` the
    candidates wanted per row, ``plan`` the compiled filter (``plan.row_map``; rows whose program
    tests no term probe ``nprobe``, as without a filter) ->
    ``(B, P) int64`` clusters, ``-1`` padded (:func:`select_probes`); ``max_nprobe <= 0`` = ``C``.
    """
    C = centroids.shape[0]
    sims = q.float() @ centroids.T
    est, filtered = estimate_eligible(plan, hist, cluster_offsets, live_words, feat_info)  # (U, C + 1)
    row_map = plan.row_map.to(est.device)
    rows = est.index_select(0, row_map)  # (B, C + 1)
    target = min_candidates_factor * k_rows.to(rows.device, torch.float32)
    target = torch.where(filtered[row_map], target, torch.zeros_like(target))  # unfiltered: nprobe
    cap = C if max_nprobe <= 0 else max_nprobe
    fresh = rows[:, C] if cluster_offsets.numel() == C + 2 else None  # the fresh cluster: scanned
    return select_probes(sims, nprobe, rows[:, :C].to(sims.device), target.to(sims.device), cap,
                         None if fresh is None else fresh.to(sims.device))
