"""The scan of probed clusters: a plain-torch reference and a fast cluster-major CPU path.

Both score query ``b`` against every slot of the clusters ``probes[b]`` with the storage arithmetic:
int8 storage accumulates ``<q8_item, q8_query>`` exactly (int32) and rescales by
``qscale[b] * scales[slot]``; fp storage computes in f32. A slot is a candidate when it is live
(``live_words``) and, when ``pair_words`` is given, its eligibility bit is set.

``pair_words (B, P, Wc) int64``: for query ``b`` and probe rank ``r``, the eligibility words of cluster
``probes[b, r]``, i.e. words ``cluster_offsets[c] // 64 + w`` for ``w < Wc`` (zero past the cluster).

Fast path (:func:`scan_fast`), cluster-major:
1. the ``B * P`` (query, cluster) pairs are grouped by cluster; clusters are bucketed by
   (span, queries-per-cluster) rounded up on a geometric grid, so one bucket is a batch of equal-sized
   GEMMs ``items (Lb, d) x queries (d, nb)``: every probed cluster is read once for all its queries;
2. per bucket one ``bmm`` (fp, or int8 widened to f32, exact since ``|acc| < 2**24``) or, for the
   ``"intmm"`` engine, one ``torch._int_mm`` (int8 x int8 -> int32, VNNI) per cluster of the bucket;
3. a per-query score threshold ``t_b``: the k-th best candidate of the query's nearest cluster is a
   lower bound of its k-th best overall; per pair it becomes an accumulator bound through the
   cluster's min/max item scale, so a single vectorized compare keeps only possible winners;
4. survivors are checked against liveness/eligibility bits, rescaled and packed per query.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import get_bits, unpack_words

__all__ = [
    "reference_accumulations",
    "scan_reference",
    "scan_fast",
    "fast_accumulations",
    "ScanStats",
]

_INT_MIN = -(2**31)
_INT_MAX = 2**31 - 1


# ---------------------------------------------------------------------------------- reference
def _acc_one(vec: Tensor, q: Tensor) -> Tensor:
    """``vec (L, d)``, ``q (d,)`` -> ``(L,)`` accumulations (int64 for int8, f32 otherwise)."""
    if vec.dtype == torch.int8:
        return (vec.to(torch.int64) * q.to(torch.int64)).sum(1)
    return vec.float() @ q.float()


def reference_accumulations(
    vectors: Tensor, cluster_offsets: Tensor, q: Tensor, probes: Tensor
) -> tuple[Tensor, Tensor]:
    """Raw accumulations, one loop iteration per (query, probe).

    Returns ``acc (B, P, Lmax)`` (int64 for int8 storage, f32 otherwise) and ``slots (B, P, Lmax)``
    int64 (-1 past each cluster's span), ``Lmax`` the largest probed span.
    """
    B, P = probes.shape
    off = cluster_offsets.tolist()
    spans = [off[c + 1] - off[c] for c in probes.flatten().tolist()] or [0]
    lmax = max(spans)
    adt = torch.int64 if vectors.dtype == torch.int8 else torch.float32
    acc = torch.zeros(B, P, lmax, dtype=adt)
    slots = torch.full((B, P, lmax), -1, dtype=torch.int64)
    for b in range(B):
        for r in range(P):
            c = int(probes[b, r])
            s, e = off[c], off[c + 1]
            acc[b, r, : e - s] = _acc_one(vectors[s:e].cpu(), q[b].cpu())
            slots[b, r, : e - s] = torch.arange(s, e)
    return acc.to(q.device), slots.to(q.device)


def scan_reference(
    vectors: Tensor,
    scales: Tensor,
    cluster_offsets: Tensor,
    live_words: Tensor,
    q: Tensor,
    qscale: Tensor,
    probes: Tensor,
    pair_words: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Every candidate of the probed clusters, query-major.

    Returns ``scores (B, P * Lmax) f32`` and ``slots (B, P * Lmax) int64``; non-candidates (padding,
    dead or ineligible slots, positions past a cluster) are ``-inf`` / ``-1``.
    """
    B, P = probes.shape
    acc, slots = reference_accumulations(vectors, cluster_offsets, q, probes)
    safe = slots.clamp_min(0)
    scores = acc.double() * qscale.double()[:, None, None] * scales.double()[safe]
    ok = (slots >= 0) & get_bits(live_words, safe)
    if pair_words is not None:
        lmax = slots.shape[2]
        bits = unpack_words(pair_words)
        bits = bits[..., :lmax] if bits.shape[2] >= lmax else torch.nn.functional.pad(bits, (0, lmax - bits.shape[2]))
        ok &= bits
    scores = torch.where(ok, scores.float(), float("-inf"))
    return scores.reshape(B, -1), torch.where(ok, slots, -1).reshape(B, -1)


# ------------------------------------------------------------------------------- fast (CPU)
def _round_up_geometric(x: Tensor, min_step: int, bits: int) -> Tensor:
    """Round ``x (n,) int64 >= 1`` up to a grid of ratio <= 1 + 2**-bits, steps >= ``min_step``."""
    x = x.clamp_min(1)
    lg = torch.floor(torch.log2(x.double())).to(torch.int64)
    step = torch.clamp_min(2 ** (lg - bits), min_step)
    return (x + step - 1) // step * step


@contextmanager
def _single_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class ScanStats:
    """What the fast scan did (for benchmarks and tuning)."""

    pairs: int = 0  # (query, cluster) pairs scanned
    clusters: int = 0  # distinct clusters read
    buckets: int = 0  # GEMM batches
    slots_scored: int = 0  # accumulations computed (bucket-rounded spans x padded query counts)
    survivors: int = 0  # accumulations past the threshold, before the bit check
    candidates: int = 0  # candidates handed to selection


@dataclass
class _Buckets:
    """Every bucket's accumulations live in one flat buffer; per bucket ``(G, Lb, nb)`` views."""

    flat: Tensor  # (E,) int32 or f32: all buckets' (G, Lb, nb) blocks back to back
    shapes: list[tuple[int, int, int]]  # (G, Lb, nb) per bucket
    base: Tensor  # (nbk + 1,) int64 flat offset of each bucket's block
    clusters: Tensor  # (sum G,) int64 cluster of each GEMM, bucket by bucket
    cl_base: Tensor  # (nbk,) int64 offset of each bucket in ``clusters``
    pairs: Tensor  # (sum G * nb,) int64 pair id b * P + r per GEMM column, -1 = padding
    pair_base: Tensor  # (nbk,) int64 offset of each bucket in ``pairs``
    row_scales: list[Tensor]  # per bucket (G, Lb) f32 item scales (int8 only)

    def view(self, i: int) -> Tensor:
        g, lb, nb = self.shapes[i]
        return self.flat[int(self.base[i]) : int(self.base[i + 1])].view(g, lb, nb)


def _bucket_gemms(
    vectors: Tensor, scales: Tensor, cluster_offsets: Tensor, q: Tensor, probes: Tensor, engine: str
) -> _Buckets | None:
    B, P = probes.shape
    nlist = cluster_offsets.numel() - 1
    S = vectors.shape[0]
    dev = vectors.device
    flat = probes.reshape(-1)
    order = torch.sort(flat, stable=True).indices  # pair ids, cluster-major
    counts = torch.bincount(flat, minlength=nlist)
    starts = torch.cumsum(counts, 0) - counts
    spans = cluster_offsets[1:] - cluster_offsets[:-1]
    active = torch.nonzero((counts > 0) & (spans > 0)).flatten()
    if active.numel() == 0:
        return None
    lb = _round_up_geometric(spans[active], 64, 2)
    nb = _round_up_geometric(counts[active], 1, 1)
    key = lb * (1 << 20) + nb
    ukeys, inv = torch.unique(key, return_inverse=True)
    cl_sorted = active[torch.sort(inv, stable=True).indices]
    n_per = torch.bincount(inv, minlength=ukeys.numel()).tolist()
    shapes = [(g, k >> 20, k & ((1 << 20) - 1)) for g, k in zip(n_per, ukeys.tolist())]
    sizes = [g * L * n for g, L, n in shapes]
    base = torch.zeros(len(shapes) + 1, dtype=torch.int64)
    base[1:] = torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0)
    int8 = vectors.dtype == torch.int8
    buf = torch.empty(int(base[-1]), dtype=torch.int32 if int8 else torch.float32, device=dev)
    qpad = torch.cat([q, torch.zeros(1, q.shape[1], dtype=q.dtype, device=dev)])
    pair_list, row_scales = [], []
    c0 = 0
    for i, (G, L, n) in enumerate(shapes):
        cl = cl_sorted[c0 : c0 + G]
        c0 += G
        col = torch.arange(n, device=dev)
        valid = col[None, :] < counts[cl][:, None]
        pidx = torch.where(valid, order[(starts[cl][:, None] + col).clamp_max(order.numel() - 1)], -1)
        pair_list.append(pidx.reshape(-1))
        qg = qpad[torch.where(valid, pidx // P, B)]  # (G, n, d)
        off = cluster_offsets[cl]
        acc = buf[int(base[i]) : int(base[i + 1])].view(G, L, n)
        rows = (off[:, None] + torch.arange(L, device=dev)).clamp_max(S - 1)  # past S: masked later
        if int8:
            row_scales.append(scales[rows])
        if engine == "intmm" and int8:
            qt = qg.transpose(1, 2).contiguous()  # (G, d, n)
            with _single_thread():  # tiny GEMMs: OpenMP barriers cost more than they save
                for g, o in enumerate(off.tolist()):
                    m = min(L, S - o)
                    torch._int_mm(vectors[o : o + m], qt[g], out=acc[g, :m])
                    if m < L:
                        acc[g, m:] = 0
        elif int8:  # exact: |acc| <= d * 127**2 < 2**24 for d <= 1040
            acc.copy_(torch.bmm(vectors[rows].float(), qg.float().transpose(1, 2)))
        else:
            torch.bmm(vectors[rows].float(), qg.float().transpose(1, 2), out=acc)
    cl_base = torch.tensor([0] + [g for g, _, _ in shapes[:-1]], dtype=torch.int64).cumsum(0)
    pair_base = torch.tensor([0] + [g * n for g, _, n in shapes[:-1]], dtype=torch.int64).cumsum(0)
    return _Buckets(buf, shapes, base, cl_sorted, cl_base, torch.cat(pair_list), pair_base, row_scales)


def _decode(bk: _Buckets, e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flat element indices ``e (n,)`` -> ``(pair, cluster, local slot l)``, each ``(n,) int64``."""
    dev = e.device
    i = torch.searchsorted(bk.base[1:].to(dev), e, right=True)
    lbs = torch.tensor([L for _, L, _ in bk.shapes], dtype=torch.int64, device=dev)[i]
    nbs = torch.tensor([n for _, _, n in bk.shapes], dtype=torch.int64, device=dev)[i]
    local = e - bk.base.to(dev)[i]
    g = local // (lbs * nbs)
    r = local - g * lbs * nbs
    l = r // nbs
    j = r - l * nbs
    pair = bk.pairs[bk.pair_base.to(dev)[i] + g * nbs + j]
    cluster = bk.clusters[bk.cl_base.to(dev)[i] + g]
    return pair, cluster, l


def _pair_positions(bk: _Buckets, num_pairs: int) -> tuple[Tensor, Tensor, Tensor]:
    """For every pair id: flat offset of its column start, column stride and bucket span Lb."""
    dev = bk.flat.device
    start = torch.zeros(num_pairs, dtype=torch.int64, device=dev)
    stride = torch.ones(num_pairs, dtype=torch.int64, device=dev)
    length = torch.zeros(num_pairs, dtype=torch.int64, device=dev)
    for i, (G, L, n) in enumerate(bk.shapes):
        pr = bk.pairs[int(bk.pair_base[i]) : int(bk.pair_base[i]) + G * n]
        idx = torch.arange(G * n, device=dev)
        ok = pr >= 0
        g, j = idx // n, idx % n
        start[pr[ok]] = int(bk.base[i]) + (g * L * n + j)[ok]
        stride[pr[ok]] = n
        length[pr[ok]] = L
    return start, stride, length


def fast_accumulations(
    vectors: Tensor, cluster_offsets: Tensor, q: Tensor, probes: Tensor, engine: str = "intmm"
) -> Tensor:
    """The fast path's raw accumulations re-assembled as ``(B, P, Lmax)`` (for tests).

    int8 storage gives int64 (equal to :func:`reference_accumulations`), fp gives f32.
    """
    B, P = probes.shape
    spans = (cluster_offsets[1:] - cluster_offsets[:-1])[probes].reshape(-1)
    lmax = int(spans.max()) if spans.numel() else 0
    adt = torch.int64 if vectors.dtype == torch.int8 else torch.float32
    scales = torch.ones(vectors.shape[0], device=vectors.device)
    bk = _bucket_gemms(vectors, scales, cluster_offsets, q, probes, engine)
    out = torch.zeros(B * P, lmax, dtype=adt, device=vectors.device)
    if bk is None:
        return out.view(B, P, lmax)
    start, stride, _ = _pair_positions(bk, B * P)
    l = torch.arange(lmax, device=vectors.device)
    keep = l[None, :] < spans[:, None]
    idx = torch.where(keep, start[:, None] + l[None, :] * stride[:, None], 0)
    out = torch.where(keep, bk.flat[idx].to(adt), torch.zeros((), dtype=adt, device=out.device))
    return out.view(B, P, lmax)


def _candidate_ok(
    live_words: Tensor, pair_words: Tensor | None, pair: Tensor, slot: Tensor, l: Tensor, P: int
) -> Tensor:
    """Live and (if ``pair_words``) eligible: all args ``(...) int64`` -> ``(...) bool``."""
    ok = get_bits(live_words, slot)
    if pair_words is not None:
        wc = pair_words.shape[2]
        w = l >> 6
        word = pair_words.reshape(-1, wc)[pair.clamp_min(0), w.clamp_max(wc - 1)]
        ok &= (w < wc) & (((word >> (l & 63)) & 1) == 1)
    return ok


def scan_fast(
    vectors: Tensor,
    scales: Tensor,
    cluster_offsets: Tensor,
    live_words: Tensor,
    q: Tensor,
    qscale: Tensor,
    probes: Tensor,
    k: Tensor,
    pair_words: Tensor | None = None,
    engine: str = "intmm",
    stats: ScanStats | None = None,
) -> tuple[Tensor, Tensor]:
    """Candidates that contain each query's best ``k[b]`` of :func:`scan_reference`.

    Args:
        k: ``(B,) int64`` per-query number of results wanted (drives the threshold).
        engine: ``"intmm"`` (int8: one single-threaded ``torch._int_mm`` per probed cluster, the
            fastest exact int8 GEMM torch has on CPU) or ``"bmm"`` (one batched GEMM per bucket;
            int8 widened to f32, exact). fp storage always uses ``"bmm"``.
    Returns:
        ``scores (B, M) f32`` and ``slots (B, M) int64`` padded with ``-inf`` / ``-1``, where every
        candidate at least as good as the query's ``k[b]``-th best of the reference is present.
    """
    B, P = probes.shape
    dev = vectors.device
    S = vectors.shape[0]
    spans = cluster_offsets[1:] - cluster_offsets[:-1]
    int8 = vectors.dtype == torch.int8
    bk = _bucket_gemms(vectors, scales, cluster_offsets, q, probes, engine)
    empty = (torch.full((B, 1), float("-inf"), device=dev), torch.full((B, 1), -1, dtype=torch.int64, device=dev))
    if bk is None:
        return empty
    if stats is not None:
        stats.pairs, stats.clusters, stats.buckets = B * P, bk.clusters.numel(), len(bk.shapes)
        stats.slots_scored = int(bk.base[-1])

    # --- threshold t_b: the k[b]-th best candidate of query b's nearest cluster (probe rank 0)
    start, stride, length = _pair_positions(bk, B * P)
    p0 = torch.arange(B, device=dev) * P
    c0 = probes[:, 0]
    l0 = int(spans[c0].max())
    l = torch.arange(l0, device=dev)[None, :]
    inside = l < spans[c0][:, None]
    slot = (cluster_offsets[c0][:, None] + l).clamp_max(S - 1)
    v = bk.flat[torch.where(inside, start[p0][:, None] + l * stride[p0][:, None], 0)].float()
    if int8:
        v = v * qscale[:, None] * scales[slot]
    ok = inside & _candidate_ok(live_words, pair_words, p0[:, None].expand(-1, l0), slot, l.expand(B, -1), P)
    v = v.masked_fill(~ok, float("-inf"))
    kk = k.clamp(1, l0)
    top = torch.topk(v, int(kk.max()), dim=1).values
    t = top.gather(1, (kk - 1)[:, None]).squeeze(1)
    t = torch.where(k > l0, float("-inf"), t)  # (B,)

    # --- one vectorized compare per bucket into one flat mask, then one nonzero
    thr_q = t / qscale if int8 else t
    thr_q = thr_q - thr_q.abs() * 1e-5
    mask = torch.empty(bk.flat.numel(), dtype=torch.bool, device=dev)
    for i, (G, L, n) in enumerate(bk.shapes):
        pr = bk.pairs[int(bk.pair_base[i]) : int(bk.pair_base[i]) + G * n].view(G, n)
        thr = torch.where(pr >= 0, thr_q[pr.clamp_min(0) // P], float("inf"))[:, None, :]
        acc = bk.view(i)
        m = mask[int(bk.base[i]) : int(bk.base[i + 1])].view(G, L, n)
        if int8:
            torch.ge(acc * bk.row_scales[i][:, :, None], thr, out=m)
        else:
            torch.ge(acc, thr, out=m)
    e = torch.nonzero(mask).squeeze(1)
    if stats is not None:
        stats.survivors = e.numel()
    pair, cluster, l = _decode(bk, e)
    slot = cluster_offsets[cluster] + l
    ok = (l < spans[cluster]) & (slot < S)
    slot = torch.where(ok, slot, 0)
    ok &= _candidate_ok(live_words, pair_words, pair, slot, l, P)
    e, pair, slot = e[ok], pair[ok], slot[ok]
    qb = pair // P
    v = bk.flat[e].float()
    if int8:
        v = v * qscale[qb] * scales[slot]
    if stats is not None:
        stats.candidates = qb.numel()
    if qb.numel() == 0:
        return empty
    return _pack_by_query(qb, v, slot, B)


def _pack_by_query(qb: Tensor, v: Tensor, slot: Tensor, B: int) -> tuple[Tensor, Tensor]:
    """Scatter flat candidates into ``(B, max count)`` rows padded with -inf / -1."""
    dev = v.device
    counts = torch.bincount(qb, minlength=B)
    m = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.sort(qb, stable=False).indices
    qs = qb[order]
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(qs.numel(), device=dev) - starts[qs]
    scores = torch.full((B, m), float("-inf"), device=dev)
    slots = torch.full((B, m), -1, dtype=torch.int64, device=dev)
    scores[qs, pos] = v[order]
    slots[qs, pos] = slot[order]
    return scores, slots
