"""Scaling section: cost per query as the catalog grows (100k -> 1M, -> 10M in full mode) and as k
grows (100 -> 100,000), each beside this machine's physical limit.

The limit of one query is ``bytes it scans / memory read bandwidth``: the int8 codes (+ 4-byte scale)
of the items in the lists it probes, streamed once, at the bandwidth measured in this same run
(:func:`benchmarks.bandwidth.measure_bandwidth`). ``fraction of limit`` = limit time / measured
time per query (a batched scan that shares a list among the queries probing it can pass 100%).

    python -m benchmarks --only scaling [--quick]
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from silvertorch.data.synthetic import generate_catalog, make_queries
from silvertorch.index.search import ItemIndex, SearchParams

from .bandwidth import Bandwidth, measure_bandwidth
from .common import Timing, progress, time_call
from .faiss_baselines import build_flat, exact_topk, recall_at_k

__all__ = ["ScalingConfig", "ScalingRow", "scanned_bytes_per_query", "run_scaling", "scaling_section",
           "SCALING_PLOT"]

SCALING_PLOT = "scaling_cost_per_query.png"


@dataclass(kw_only=True)
class ScalingConfig:
    sizes: tuple[int, ...]
    ks: tuple[int, ...]
    k_catalog: int  # catalog the k sweep runs on (one of ``sizes``)
    dim: int = 64
    nprobe: int = 16
    base_k: int = 100
    queries: int = 1000
    recall_queries: int = 200  # recall@base_k against exact search on the first queries
    max_outputs: int = 4_000_000  # batch for large k: queries * k <= this (memory of the result)
    repeats: int = 3
    warmup_queries: int = 200
    bandwidth_bytes: int = 256 << 20
    dtype: str = "int8"
    seed: int = 0

    @classmethod
    def make(cls, mode: str) -> ScalingConfig:
        if mode == "smoke":
            return cls(sizes=(4_000, 16_000), ks=(10, 100, 1_000), k_catalog=16_000, nprobe=4, base_k=10,
                       queries=64, recall_queries=32, repeats=1, warmup_queries=8, bandwidth_bytes=16 << 20)
        if mode == "quick":
            return cls(sizes=(100_000, 1_000_000), ks=(100, 1_000, 10_000, 100_000), k_catalog=1_000_000)
        return cls(sizes=(100_000, 1_000_000, 10_000_000), ks=(100, 1_000, 10_000, 100_000),
                   k_catalog=1_000_000, queries=2000, repeats=5, bandwidth_bytes=512 << 20)


@dataclass
class ScalingRow:
    sweep: str  # "catalog" or "k"
    items: int
    nlist: int
    nprobe: int
    k: int
    queries: int
    timing: Timing
    bytes_per_query: float
    bandwidth_gbs: float
    recall: float | None = None
    build_s: float | None = None
    index_bytes: int | None = None

    @property
    def us_per_query(self) -> float:
        return self.timing.median_s / self.queries * 1e6

    @property
    def limit_us_per_query(self) -> float:
        return self.bytes_per_query / (self.bandwidth_gbs * 1e9) * 1e6

    @property
    def fraction_of_limit(self) -> float:
        return self.limit_us_per_query / self.us_per_query


def nlist_for(items: int) -> int:
    """Power of two nearest ``sqrt(items)``, in [16, 4096] (1M -> 1024, 10M -> 4096)."""
    return int(min(4096, max(16, 2 ** round(math.log2(math.sqrt(items))))))


def scanned_bytes_per_query(index: ItemIndex, queries: Tensor, nprobe: int) -> float:
    """Mean bytes of item codes (+ per-item scale for int8) in the lists each of ``queries (B, d)`` probes."""
    ivf = index.ivf
    probes = ivf.probe(ivf.prepare(queries), nprobe)
    per_item = ivf.dim * ivf.vectors.element_size() + (4 if ivf.vectors.dtype == torch.int8 else 0)
    return float(ivf.spans()[probes].sum(1).double().mean()) * per_item


def _index_bytes(index: ItemIndex) -> int:
    return sum(b.numel() * b.element_size() for b in index.buffers())


def _time(index: ItemIndex, q: Tensor, k: int, nprobe: int, cfg: ScalingConfig) -> tuple[Timing, Tensor]:
    params = SearchParams(nprobe=nprobe)
    out: list[Tensor] = []
    t = time_call(lambda: out.append(index.search(q, k, params)[1]), cfg.repeats,
                  warmup=lambda: index.search(q[: cfg.warmup_queries], k, params))
    return t, out[-1]


def run_scaling(cfg: ScalingConfig, log=print, show: bool = True) -> tuple[list[ScalingRow], Bandwidth, Bandwidth]:
    """Catalog sweep at ``base_k`` / ``nprobe``, then the k sweep on ``k_catalog``; bandwidth is
    measured before and after (the higher one bounds every row)."""
    bw_first = measure_bandwidth(cfg.bandwidth_bytes)
    rows: list[ScalingRow] = []
    kept: tuple[ItemIndex, Tensor] | None = None
    for n in progress(cfg.sizes, "scaling: catalog sizes", show):
        catalog = generate_catalog(n, cfg.dim, seed=cfg.seed)
        queries = make_queries(catalog, cfg.queries, seed=cfg.seed + 1)
        nlist = nlist_for(n)
        start = time.perf_counter()
        index = ItemIndex.build(catalog.vectors, nlist=nlist, dtype=cfg.dtype, seed=cfg.seed)
        build_s = time.perf_counter() - start
        flat = build_flat(catalog.vectors)
        _, gt = exact_topk(flat, queries[: cfg.recall_queries], cfg.base_k)
        del flat, catalog
        t, ids = _time(index, queries, cfg.base_k, cfg.nprobe, cfg)
        rows.append(ScalingRow("catalog", n, nlist, cfg.nprobe, cfg.base_k, queries.shape[0], t,
                               scanned_bytes_per_query(index, queries, cfg.nprobe), bw_first.read_gbs,
                               recall_at_k(ids[: cfg.recall_queries], gt), build_s, _index_bytes(index)))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        log(f"scaling {n:,} items: build {build_s:.1f} s, {rows[-1].us_per_query:.0f} us/query, "
            f"{rows[-1].fraction_of_limit:.0%} of the bandwidth limit, peak RSS {peak:.1f} GiB")
        if n == cfg.k_catalog:
            kept = (index, queries)
        del index
    if kept is None:
        raise ValueError(f"k_catalog {cfg.k_catalog} is not one of the catalog sizes {cfg.sizes}")
    index, queries = kept
    mean_list = index.ivf.num_slots / index.ivf.nlist
    for k in progress([k for k in cfg.ks if k <= cfg.k_catalog // 2], "scaling: k", show):
        # enough lists that the probed clusters hold ~2k candidates; fewer queries for large k
        nprobe = min(index.ivf.nlist, max(cfg.nprobe, math.ceil(2 * k / mean_list)))
        b = max(8, min(queries.shape[0], cfg.max_outputs // k))
        q = queries[:b]
        t, _ = _time(index, q, k, nprobe, cfg)
        rows.append(ScalingRow("k", cfg.k_catalog, index.ivf.nlist, nprobe, k, b, t,
                               scanned_bytes_per_query(index, q, nprobe), bw_first.read_gbs))
        log(f"scaling k={k:,}: nprobe {nprobe}, batch {b}, {rows[-1].us_per_query:.0f} us/query")
    bw_last = measure_bandwidth(cfg.bandwidth_bytes)
    best = max(bw_first, bw_last, key=lambda b: b.read_gbs)
    for r in rows:
        r.bandwidth_gbs = best.read_gbs
    return rows, bw_first, bw_last


def scaling_section(ctx) -> dict:
    """Run the sweeps for ``ctx.mode`` and plot them."""
    from .plots import plot_scaling

    cfg = ScalingConfig.make(ctx.mode)
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    with torch.no_grad():
        rows, bw_first, bw_last = run_scaling(cfg, ctx.log, ctx.show_progress and ctx.mode != "smoke")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    plot_scaling(rows, ctx.out_dir / SCALING_PLOT)
    return {"config": cfg, "rows": rows, "bandwidth_first_gbs": bw_first.read_gbs,
            "bandwidth_last_gbs": bw_last.read_gbs, "bandwidth_gbs": max(bw_first.read_gbs, bw_last.read_gbs),
            "threads": torch.get_num_threads(), "plot": SCALING_PLOT,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
