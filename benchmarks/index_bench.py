"""The index benchmark: SilverTorch IVF (int8 / bf16 / fp32) and exact scan vs faiss-cpu IVF,
filtered search, filter throughput, top-K cost and the memory-bandwidth bound, in one run.

``run(config) -> IndexBenchResult``; :mod:`benchmarks.report` turns the result into Markdown.
Every number comes from this run; nothing is a constant copied from elsewhere.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from silvertorch.data.synthetic import generate_catalog, make_queries, random_filter_expressions
from silvertorch.index.search import ItemIndex, SearchParams

from .bandwidth import Bandwidth, measure_bandwidth
from .common import Timing, machine_info, progress, time_call
from .faiss_baselines import (
    build_faiss_ivf, build_flat, exact_topk, faiss_filtered_search, faiss_search, filter_bitmaps, per_query_recall,
    recall_at_k,
)
from .filter_baselines import AttributeMaskFilter
from .filter_bench import FilterBench, bench_filters, filtered_ground_truth
from .topk_bench import TopKRow, bench_topk

__all__ = ["IndexBenchConfig", "IndexBenchResult", "SearchRow", "run"]

ST_DTYPES = ("int8", "bf16", "fp32")


@dataclass(kw_only=True)
class IndexBenchConfig:
    """Sizes of one benchmark run. :meth:`full` is ``make bench``, :meth:`quick` ``--quick``."""

    mode: str = "full"
    num_items: int = 1_000_000
    dim: int = 64
    nlist: int = 1024
    nprobes: tuple[int, ...] = (4, 8, 16, 32, 64)
    filtered_nprobes: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)
    filtered_repeats: int = 2
    filtered_budget_s: float = 120.0  # stop the filtered nprobe sweep after a batch slower than this
    exact_queries: int = 500  # exhaustive scans are timed (and scored) on the first queries only
    broad_filter: float = 0.10  # selectivity classes: broad >= 10% of the items match, medium 1-10%,
    medium_filter: float = 0.01  # selective < 1%
    threads: int | None = None  # torch and faiss threads (None: torch's default, all cores)
    num_queries: int = 2000
    k: int = 100
    filter_queries: int = 256  # batch for the filter-throughput comparison
    filter_nprobe: int = 16  # probe-then-filter scope in the throughput comparison
    topk_shapes: tuple[tuple[int, int, int], ...] = (
        (2000, 16_000, 100),
        (32, 1_000_000, 100), (32, 1_000_000, 1_000), (32, 1_000_000, 10_000), (32, 1_000_000, 100_000),
    )  # fmt: skip
    repeats: int = 3
    warmup_queries: int = 200  # warm-up batch (untimed) before each timed configuration
    bandwidth_bytes: int = 512 << 20
    seed: int = 0
    show_progress: bool = True

    @classmethod
    def full(cls) -> IndexBenchConfig:
        return cls()

    @classmethod
    def quick(cls) -> IndexBenchConfig:
        return cls(mode="quick", num_items=100_000, nlist=256, nprobes=(2, 4, 8, 16, 32),
                   filtered_nprobes=(2, 4, 8, 16, 32, 64, 128), num_queries=500, exact_queries=250,
                   filtered_budget_s=30.0, filter_queries=128,
                   filter_nprobe=8, repeats=3, bandwidth_bytes=256 << 20,
                   topk_shapes=((2000, 16_000, 100), (32, 1_000_000, 1_000), (32, 1_000_000, 100_000)))

    @classmethod
    def tiny(cls) -> IndexBenchConfig:
        """Seconds: for the smoke test (shapes only, never speed)."""
        return cls(mode="tiny", num_items=5_000, nlist=32, nprobes=(2, 8), filtered_nprobes=(4, 32),
                   num_queries=64, exact_queries=32, filter_queries=16, filter_nprobe=4, repeats=1, warmup_queries=8,
                   bandwidth_bytes=8 << 20, topk_shapes=((8, 4_000, 10), (4, 50_000, 100), (4, 50_000, 20_000)),
                   show_progress=False)


@dataclass
class SearchRow:
    system: str  # "SilverTorch int8", "faiss IVF-SQ8", ...
    nprobe: int | None  # None: exhaustive scan
    recall: float
    timing: Timing
    queries: int
    bytes_per_query: float | None = None  # item bytes streamed per query (IVF lists probed)
    filtered: bool = False
    cls: str | None = None  # filtered: selectivity class of the queries ("broad", "medium", "selective")

    @property
    def qps(self) -> float:
        return self.timing.rate(self.queries)


@dataclass
class IndexBenchResult:
    config: IndexBenchConfig
    machine: dict[str, str]
    dataset: dict[str, str]
    build_s: dict[str, float]
    bandwidth: Bandwidth
    search: list[SearchRow]
    filtered: list[SearchRow]
    filters: FilterBench
    topk: list[TopKRow]
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


def _timed_search(fn, queries: Tensor, cfg: IndexBenchConfig) -> tuple[tuple[Tensor, Tensor], Timing]:
    """Warm up on a small batch, time ``cfg.repeats`` full batches, return the last result."""
    out: list[tuple[Tensor, Tensor]] = []
    t = time_call(lambda: out.append(fn(queries)), cfg.repeats,
                  warmup=lambda: fn(queries[: cfg.warmup_queries]))
    return out[-1], t


def _ivf_bytes_per_query(index: ItemIndex, queries: Tensor, nprobe: int) -> float:
    """Mean bytes of item codes (+ per-item scale for int8) in the lists a query probes."""
    ivf = index.ivf
    probes = ivf.probe(ivf.prepare(queries), nprobe)
    per_item = ivf.dim * ivf.vectors.element_size() + (4 if ivf.vectors.dtype == torch.int8 else 0)
    return float(ivf.spans()[probes].sum(1).double().mean()) * per_item


def _faiss_bytes_per_query(index, queries: Tensor, nprobe: int) -> float:
    import numpy as np

    invlists = index.invlists
    sizes = torch.tensor([invlists.list_size(c) for c in range(index.nlist)], dtype=torch.float64)
    _, lists = index.quantizer.search(np.ascontiguousarray(queries.numpy()), nprobe)
    return float(sizes[torch.from_numpy(lists)].sum(1).mean()) * index.code_size


def _build(cfg: IndexBenchConfig, catalog, log) -> tuple[dict[str, ItemIndex], dict, dict[str, float]]:
    st: dict[str, ItemIndex] = {}
    build_s: dict[str, float] = {}
    for dtype in progress(ST_DTYPES, "build SilverTorch", cfg.show_progress):
        start = time.perf_counter()
        attrs = catalog.attributes if dtype == "int8" else None  # the filtered index
        st[dtype] = ItemIndex.build(catalog.vectors, attributes=attrs, nlist=cfg.nlist, dtype=dtype,
                                    seed=cfg.seed)
        build_s[f"SilverTorch {dtype}" + (" + eligibility" if attrs else "")] = time.perf_counter() - start
    start = time.perf_counter()
    fa = build_faiss_ivf(catalog.vectors, cfg.nlist, seed=cfg.seed)
    build_s["faiss IVF-Flat + IVF-SQ8 (shared quantizer)"] = time.perf_counter() - start
    log(f"built indexes: {', '.join(f'{k} {v:.1f}s' for k, v in build_s.items())}")
    return st, fa, build_s


def _search_sweep(cfg, st, fa, queries, gt_ids) -> list[SearchRow]:
    rows: list[SearchRow] = []
    jobs = [(f"SilverTorch {d}", p) for p in cfg.nprobes for d in ST_DTYPES]
    jobs += [(f"faiss {kind}", p) for p in cfg.nprobes for kind in ("IVF-Flat", "IVF-SQ8")]
    jobs += [("SilverTorch int8 exact scan", None)]
    for system, p in progress(jobs, "search sweep", cfg.show_progress):
        if system.startswith("faiss"):
            index = fa[system.split(" ", 1)[1]]
            fn = lambda q, index=index, p=p: faiss_search(index, q, cfg.k, p)  # noqa: E731
            nbytes = _faiss_bytes_per_query(index, queries, p)
        else:
            index = st[system.split()[1]]
            params = SearchParams(nprobe=p or 1, exact=p is None)
            fn = lambda q, index=index, params=params: index.search(q, cfg.k, params)  # noqa: E731
            nbytes = _ivf_bytes_per_query(index, queries, p if p else index.ivf.nlist)
        if p is None:  # exhaustive: fewer queries, one timed batch
            n = min(cfg.exact_queries, queries.shape[0])
            (_, ids), t = _timed_search(fn, queries[:n], replace(cfg, repeats=1))
            rows.append(SearchRow(system, p, recall_at_k(ids, gt_ids[:n]), t, n, nbytes))
            continue
        (_, ids), t = _timed_search(fn, queries, cfg)
        rows.append(SearchRow(system, p, recall_at_k(ids, gt_ids), t, queries.shape[0], nbytes))
    return rows


CLASSES = ("broad", "medium", "selective")
ST_FILTERED = "SilverTorch int8 + filter"
FAISS_FILTERED = "faiss IVF-SQ8 + IDSelectorBitmap"


def selectivity_classes(counts: Tensor, cfg: IndexBenchConfig) -> dict[str, Tensor]:
    """Query indices per class: broad (>= broad_filter of the items match), medium, selective."""
    frac = counts.double() / cfg.num_items
    masks = {"broad": frac >= cfg.broad_filter, "medium": (frac >= cfg.medium_filter) & (frac < cfg.broad_filter),
             "selective": frac < cfg.medium_filter}
    return {c: torch.nonzero(m).flatten() for c, m in masks.items()}


def _filtered_sweep(cfg, index: ItemIndex, sq8, masker, queries, filters, gt_ids, gt_counts,
                    log=print) -> list[SearchRow]:
    """Per selectivity class: int8 IVF with one filter string per query (compiled inside every timed
    call) and faiss IVF-SQ8 with an ``IDSelectorBitmap`` of the same filter, same nprobe."""
    rows: list[SearchRow] = []
    for cls, idx in selectivity_classes(gt_counts, cfg).items():
        if idx.numel() == 0:
            continue
        q, f = queries[idx], [filters[i] for i in idx.tolist()]
        bitmaps = filter_bitmaps(masker, f)  # built once, untimed (faiss has no filter language)
        done: dict[str, bool] = {ST_FILTERED: False, FAISS_FILTERED: False}
        for p in progress(cfg.filtered_nprobes, f"filtered search ({cls})", cfg.show_progress):
            for system in done:
                if done[system]:
                    continue
                if system == ST_FILTERED:
                    def fn(qq: Tensor, p: int = p) -> tuple[Tensor, Tensor]:
                        return index.search(qq, cfg.k, SearchParams(nprobe=p, filter=f[: qq.shape[0]]))
                    nbytes = _ivf_bytes_per_query(index, q, p)
                else:
                    def fn(qq: Tensor, p: int = p) -> tuple[Tensor, Tensor]:
                        return faiss_filtered_search(sq8, qq, f[: qq.shape[0]], bitmaps, cfg.k, p)
                    nbytes = _faiss_bytes_per_query(sq8, q, p)
                (_, ids), t = _timed_search(fn, q, replace(cfg, repeats=cfg.filtered_repeats))
                rec = float(per_query_recall(ids, gt_ids[idx], gt_counts[idx]).mean())
                rows.append(SearchRow(system, p, rec, t, q.shape[0], nbytes, filtered=True, cls=cls))
                # recall reached (larger nprobe only costs more) or a batch is too slow
                done[system] = rec >= 0.95 or t.median_s > cfg.filtered_budget_s
            if all(done.values()):
                break
        log(f"filtered {cls}: {idx.numel()} queries; " + ", ".join(
            f"{r.system.split()[0]} p{r.nprobe} r{r.recall:.3f} {r.qps:.0f}q/s" for r in rows if r.cls == cls))
    return rows


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(cfg: IndexBenchConfig, log=print) -> IndexBenchResult:
    """Run every section of the index benchmark; ``log`` receives one line per milestone."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        import faiss

        torch.set_num_threads(cfg.threads)
        faiss.omp_set_num_threads(cfg.threads)
    with torch.no_grad():
        bw_first = measure_bandwidth(cfg.bandwidth_bytes)
        catalog = generate_catalog(cfg.num_items, cfg.dim, seed=cfg.seed)
        queries = make_queries(catalog, cfg.num_queries, seed=cfg.seed + 1)
        filters = random_filter_expressions(catalog, cfg.num_queries, seed=cfg.seed + 2)
        log(f"catalog: {cfg.num_items:,} items x {cfg.dim}, {catalog.num_clusters} generator clusters")

        flat = build_flat(catalog.vectors)
        (_, gt_ids), flat_t = _timed_search(lambda q: exact_topk(flat, q, cfg.k), queries,
                                            replace(cfg, repeats=1))
        del flat
        st, fa, build_s = _build(cfg, catalog, log)

        search = _search_sweep(cfg, st, fa, queries, gt_ids)
        search.append(SearchRow("faiss Flat (exact, fp32)", None, 1.0, flat_t, cfg.num_queries))
        log(f"search sweep done (peak RSS {_rss_gb():.1f} GB)")

        masker = AttributeMaskFilter(catalog.attributes)
        gt_f_ids, gt_f_counts = filtered_ground_truth(masker, catalog.vectors, queries, filters, cfg.k,
                                                      cfg.show_progress)
        log(f"filtered ground truth done (peak RSS {_rss_gb():.1f} GB)")
        filtered = _filtered_sweep(cfg, st["int8"], fa["IVF-SQ8"], masker, queries, filters, gt_f_ids,
                                   gt_f_counts, log)
        log(f"filtered search done (peak RSS {_rss_gb():.1f} GB)")

        target_p = next((r.nprobe for r in filtered if r.system == ST_FILTERED and r.cls == "broad"
                         and r.recall >= 0.95), cfg.filter_nprobe)
        filters_result = bench_filters(masker, catalog, st["int8"], queries, filters, cfg, target_p)
        log(f"filter throughput done (peak RSS {_rss_gb():.1f} GB)")

        topk = bench_topk(list(cfg.topk_shapes), cfg.repeats, cfg.show_progress, cfg.seed)
        log("top-k done")
        bw_last = measure_bandwidth(cfg.bandwidth_bytes)
    bandwidth = max(bw_first, bw_last, key=lambda b: b.read_gbs)  # the higher one: stricter bound
    dataset = {
        "items": f"{cfg.num_items:,}", "dim": str(cfg.dim), "nlist": str(cfg.nlist),
        "queries per batch": f"{cfg.num_queries:,}", "k": str(cfg.k),
        "generator clusters": str(catalog.num_clusters),
        "filter expressions": "random_filter_expressions (mixed AND/OR/NOT over 6 features)",
        "filter classes": ", ".join(
            f"{c} {v.numel()} ({v.numel() / cfg.num_queries:.0%})" for c, v in
            selectivity_classes(gt_f_counts, cfg).items()) +
            f" of {cfg.num_queries:,} filters (broad: >= {cfg.broad_filter:.0%} of the items match, medium "
            f"{cfg.medium_filter:.0%}-{cfg.broad_filter:.0%}, selective < {cfg.medium_filter:.0%})",
        "threads": f"{torch.get_num_threads()} (torch and faiss)",
        "peak RSS": f"{_rss_gb():.1f} GB",
    }
    notes = [f"bandwidth measured at start {bw_first.read_gbs:.1f} GB/s and end "
             f"{bw_last.read_gbs:.1f} GB/s (read); the higher is used for the bound"]
    if cfg.threads:
        notes.append(f"torch and faiss both ran on {cfg.threads} thread(s) (--threads), bandwidth included: on a "
                     "shared machine, multi-threaded torch ops stall whenever another process holds a core, so a "
                     "fixed small thread count keeps SilverTorch and faiss comparable within the run")
    return IndexBenchResult(replace(cfg), machine_info(), dataset, build_s, bandwidth, search,
                            filtered, filters_result, topk, notes, time.perf_counter() - start)
