"""Filter throughput and accuracy: SilverTorch eligibility (hybrid bitmap + Bloom, and Bloom only)
on the probed clusters' words and on the whole catalog, vs exact attribute masks and an inverted
index; the Bloom false-positive rate; the filter's share of a filtered search (probe-then-filter).
"""

from __future__ import annotations

import statistics
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from silvertorch.index.bitmap import popcount
from silvertorch.index.eligibility import EligibilityConfig, EligibilityIndex
from silvertorch.index.layout import SLOT_ALIGN, unpack_words
from silvertorch.index.search import ItemIndex, SearchParams
from silvertorch.index.topk import select_topk

from .common import Timing, progress, time_call
from .filter_baselines import AttributeMaskFilter, InvertedIndex

__all__ = ["FilterRow", "FilterBench", "filtered_ground_truth", "bench_filters", "probed_words"]


@dataclass
class FilterRow:
    method: str
    scope: str
    timing: Timing
    queries: int
    fpr: float | None = None  # mean false-positive rate over the queries (None: exact method)

    @property
    def qps(self) -> float:
        return self.timing.rate(self.queries)


@dataclass
class FilterBench:
    queries: int
    probe_nprobe: int
    rows: list[FilterRow]
    selectivity: dict[str, float]
    no_false_negatives: bool
    modes: dict[str, str]
    # probe-then-filter inside a full filtered search batch (target c)
    share_nprobe: int
    share_queries: int
    probed_filter: Timing
    scan: Timing
    words_fraction: float  # words evaluated on probed clusters / words of the whole catalog
    by_threads: list[tuple[int, Timing, Timing]] = field(default_factory=list)  # (threads, filter, scan)

    @property
    def filter_share(self) -> float:
        return self.probed_filter.median_s / self.scan.median_s


def probed_words(index: ItemIndex, queries: Tensor, nprobe: int) -> Tensor:
    """``(B, P * Wc) int64`` eligibility words of each query's probed clusters (−1 = padding);
    cluster ``c`` owns words ``[off[c] // 64, off[c+1] // 64)`` (docs/architecture.md)."""
    ivf = index.ivf
    probes = ivf.probe(ivf.prepare(queries), nprobe)
    off = ivf.cluster_offsets
    first, count = off[probes] // SLOT_ALIGN, (off[probes + 1] - off[probes]) // SLOT_ALIGN
    w = torch.arange(max(int(count.max()), 1))
    return torch.where(w < count.unsqueeze(-1), first.unsqueeze(-1) + w, -1).reshape(queries.shape[0], -1)


def filtered_ground_truth(masker: AttributeMaskFilter, vectors: Tensor, queries: Tensor,
                          filters: list[str], k: int, show: bool = True,
                          chunk: int = 32) -> tuple[Tensor, Tensor]:
    """Exact fp32 top-k among the items matching each query's filter: ``(ids (B, k), matches (B,))``."""
    ids, counts = [], []
    for s in progress(range(0, queries.shape[0], chunk), "filtered ground truth", show):
        masks = torch.stack([masker.mask(e) for e in filters[s : s + chunk]])
        scores = (queries[s : s + chunk] @ vectors.T).masked_fill_(~masks, float("-inf"))
        ids.append(select_topk(scores, k)[1])
        counts.append(masks.sum(1))
    return torch.cat(ids), torch.cat(counts)


def _fpr(index: EligibilityIndex, plan, exact_counts: Tensor, live: int) -> tuple[float, Tensor]:
    approx = index.evaluate(plan)
    counts = popcount(approx).sum(1)
    fp = (counts - exact_counts).clamp(min=0).double()
    return float((fp / (live - exact_counts).clamp(min=1).double()).mean()), approx


def _superset(approx: Tensor, slot_ids: Tensor, masks: list[Tensor], rows: int) -> bool:
    """No false negative: every exactly-matching item has its slot's bit set (first ``rows``)."""
    for r in range(min(rows, len(masks))):
        bits = unpack_words(approx[r])[: slot_ids.numel()] & (slot_ids >= 0)
        covered = torch.zeros_like(masks[r])
        covered[slot_ids[bits]] = True
        if bool((masks[r] & ~covered).any()):
            return False
    return True


def bench_filters(masker: AttributeMaskFilter, catalog, index: ItemIndex, queries: Tensor,
                  filters: list[str], cfg, share_nprobe: int) -> FilterBench:
    """Every method on the first ``cfg.filter_queries`` filters; the share at ``share_nprobe``."""
    B = min(cfg.filter_queries, len(filters))
    exprs, q = filters[:B], queries[:B]
    hybrid = index.eligibility
    slot_ids = index.ivf.slot_ids
    bloom = EligibilityIndex.build(catalog.attributes.take(slot_ids), EligibilityConfig(default_mode="bloom"),
                                   live=slot_ids >= 0)
    inverted = InvertedIndex(catalog.attributes)
    masks = [masker.mask(e) for e in exprs]
    exact_counts = torch.stack([m.sum() for m in masks])
    n = catalog.num_items
    rows: list[FilterRow] = []
    words = probed_words(index, q, cfg.filter_nprobe)
    probes = index.ivf.probe(index.ivf.prepare(q), cfg.filter_nprobe)
    no_fn = True
    for name, elig in progress([("SilverTorch hybrid (bitmap + Bloom)", hybrid), ("SilverTorch Bloom only", bloom)],
                               "filters", cfg.show_progress):
        compile_t = time_call(lambda elig=elig: elig.compile(exprs), cfg.repeats)
        plan = elig.compile(exprs)
        rows.append(FilterRow(name, "compile (host: parse + plan)", compile_t, B))
        fpr, approx = _fpr(elig, plan, exact_counts, n)
        no_fn &= _superset(approx, slot_ids, masks, 8)
        rows.append(FilterRow(name, f"probed clusters, per query (nprobe={cfg.filter_nprobe}, padded words)",
                              time_call(lambda e=elig, p=plan: e.evaluate(p, words), cfg.repeats), B, fpr))
        view = ItemIndex(index.ivf, elig)  # the search path: distinct (expression, cluster) runs
        rows.append(FilterRow(name, f"probed clusters, search path (nprobe={cfg.filter_nprobe})",
                              time_call(lambda v=view, p=plan: v._probed_words(p, probes), cfg.repeats), B, fpr))
        rows.append(FilterRow(name, "whole catalog",
                              time_call(lambda e=elig, p=plan: e.evaluate(p), cfg.repeats), B, fpr))
    rows.append(FilterRow("attribute masks (torch, per query)", "whole catalog",
                          time_call(lambda: [masker.mask(e) for e in exprs], cfg.repeats), B, 0.0))
    rows.append(FilterRow("inverted index (numpy posting lists)", "whole catalog",
                          time_call(lambda: [inverted.ids(e) for e in exprs], cfg.repeats), B, 0.0))
    sel = (exact_counts.double() / n).tolist()
    q_sorted = sorted(sel)
    selectivity = {
        "median": statistics.median(sel), "p10": q_sorted[len(q_sorted) // 10],
        "p90": q_sorted[(9 * len(q_sorted)) // 10],
        "fraction with < k matches": sum(c < cfg.k for c in exact_counts.tolist()) / B,
    }
    # the filter inside a full filtered-search batch: the search's own probe-then-filter step
    # (ItemIndex._probed_words) vs the unfiltered scan of the same batch, at 1 thread and at all
    full_plan = hybrid.compile(filters)
    full_probes = index.ivf.probe(index.ivf.prepare(queries), share_nprobe)
    words_fraction = float(index.ivf.spans()[full_probes].sum() // SLOT_ALIGN) / (queries.shape[0] * hybrid.num_words)

    def measure() -> tuple[Timing, Timing]:
        probed = time_call(lambda: index._probed_words(full_plan, full_probes), cfg.repeats)
        scan = time_call(lambda: index.search(queries, cfg.k, SearchParams(nprobe=share_nprobe)), cfg.repeats,
                         warmup=lambda: index.search(queries[: cfg.warmup_queries], cfg.k,
                                                     SearchParams(nprobe=share_nprobe)))
        return probed, scan

    probed_t, scan_t = measure()
    by_threads = [(torch.get_num_threads(), probed_t, scan_t)]
    prev = torch.get_num_threads()
    for n in sorted({1, os.cpu_count() or 1} - {prev}):
        torch.set_num_threads(n)
        try:
            by_threads.append((n, *measure()))
        finally:
            torch.set_num_threads(prev)
    return FilterBench(B, cfg.filter_nprobe, rows, selectivity, no_fn, dict(hybrid.modes),
                       share_nprobe, queries.shape[0], probed_t, scan_t, words_fraction, sorted(by_threads))
