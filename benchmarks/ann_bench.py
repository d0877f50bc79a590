"""ANN section: recall@k vs queries/s for SilverTorch IVF int8 / bf16 / fp32 and faiss-cpu IVF-Flat /
IVF-SQ8 / HNSW, all on the same vectors and queries.

The IVF curves come from the index benchmark's nprobe sweep (shared with the ``index`` section);
this module adds faiss ``IndexHNSWFlat`` swept over ``efSearch`` on the same catalog (regenerated
from the same seed: ``generate_catalog`` is deterministic) against the same exact ground truth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from silvertorch.data.synthetic import generate_catalog, make_queries

from .common import Timing, progress, time_call
from .faiss_baselines import build_flat, exact_topk, recall_at_k

__all__ = ["AnnPoint", "HnswConfig", "hnsw_sweep", "ann_section", "ANN_PLOT", "IVF_SYSTEMS"]

ANN_PLOT = "ann_recall_qps.png"
IVF_SYSTEMS = ("SilverTorch int8", "SilverTorch bf16", "SilverTorch fp32", "faiss IVF-Flat", "faiss IVF-SQ8")


@dataclass
class AnnPoint:
    """One point of a recall/throughput curve; ``knob`` names the swept parameter."""

    system: str
    knob: str  # "nprobe" or "efSearch"
    value: int | None  # None: exhaustive
    recall: float
    timing: Timing
    queries: int

    @property
    def qps(self) -> float:
        return self.timing.rate(self.queries)


@dataclass(kw_only=True)
class HnswConfig:
    m: int = 32
    ef_construction: int = 40  # faiss's default
    ef_search: tuple[int, ...] = (100, 128, 256, 512)  # raised to k where smaller


def hnsw_sweep(vectors: torch.Tensor, queries: torch.Tensor, gt_ids: torch.Tensor, k: int, hcfg: HnswConfig,
               repeats: int, warmup_queries: int, show: bool = True) -> tuple[list[AnnPoint], float]:
    """Build ``IndexHNSWFlat`` (inner product) on ``vectors (N, d) f32`` and time ``queries (B, d)``
    at every ``efSearch``; returns the points and the build seconds."""
    import faiss
    import numpy as np

    x = np.ascontiguousarray(vectors.numpy(), dtype=np.float32)
    q = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
    start = time.perf_counter()
    index = faiss.IndexHNSWFlat(x.shape[1], hcfg.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = hcfg.ef_construction
    index.add(x)
    build_s = time.perf_counter() - start
    points: list[AnnPoint] = []
    for ef in progress(sorted({max(e, k) for e in hcfg.ef_search}), "HNSW efSearch sweep", show):
        params = faiss.SearchParametersHNSW(efSearch=ef)
        out: list = []
        t = time_call(lambda p=params: out.append(index.search(q, k, params=p)), repeats,
                      warmup=lambda p=params: index.search(q[:warmup_queries], k, params=p))
        ids = torch.from_numpy(out[-1][1])
        points.append(AnnPoint(f"faiss HNSW{hcfg.m}", "efSearch", ef, recall_at_k(ids, gt_ids), t,
                               q.shape[0]))
    return points, build_s


def ann_section(ctx) -> dict:
    """Curves of the shared index run plus an HNSW sweep on the same vectors; writes the plot."""
    from .plots import plot_ann

    res = ctx.index_result()
    cfg = res.config
    points = [AnnPoint(r.system, "nprobe", r.nprobe, r.recall, r.timing, r.queries)
              for r in res.search if r.system in IVF_SYSTEMS and r.nprobe is not None]
    points += [AnnPoint(r.system, "nprobe", None, r.recall, r.timing, r.queries)
               for r in res.search if r.nprobe is None]
    with torch.no_grad():
        catalog = generate_catalog(cfg.num_items, cfg.dim, seed=cfg.seed)
        queries = make_queries(catalog, cfg.num_queries, seed=cfg.seed + 1)
        flat = build_flat(catalog.vectors)
        _, gt_ids = exact_topk(flat, queries, cfg.k)
        del flat
        hcfg = HnswConfig(ef_search=(100, 256) if ctx.mode == "smoke" else HnswConfig().ef_search)
        hnsw, build_s = hnsw_sweep(catalog.vectors, queries, gt_ids, cfg.k, hcfg, cfg.repeats, cfg.warmup_queries,
                                   ctx.show_progress and ctx.mode != "smoke")
    points += hnsw
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    title = (f"{cfg.num_items:,} x {cfg.dim} items, nlist {cfg.nlist}, batch {cfg.num_queries:,}, k={cfg.k} "
             "(labels: nprobe / efSearch)")
    plot_ann(points, ctx.out_dir / ANN_PLOT, cfg.k, title)
    return {"points": points, "k": cfg.k, "items": cfg.num_items, "dim": cfg.dim, "nlist": cfg.nlist,
            "queries": cfg.num_queries, "repeats": cfg.repeats, "warmup_queries": cfg.warmup_queries,
            "hnsw": {"M": hcfg.m, "efConstruction": hcfg.ef_construction, "build_s": build_s},
            "build_s": dict(res.build_s), "plot": ANN_PLOT}
