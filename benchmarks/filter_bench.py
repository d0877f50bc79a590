"""Filter throughput and accuracy: SilverTorch eligibility (hybrid bitmap + Bloom, and Bloom only)
on the probed clusters' words and on the whole catalog, vs exact attribute masks and an inverted
index; the Bloom false-positive rate; the filter's share of a filtered search (probe-then-filter).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

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
    no_fn = True
    for name, elig in progress([("SilverTorch hybrid (bitmap + Bloom)", hybrid), ("SilverTorch Bloom only", bloom)],
                               "filters", cfg.show_progress):
        compile_t = time_call(lambda elig=elig: elig.compile(exprs), cfg.repeats)
        plan = elig.compile(exprs)
        rows.append(FilterRow(name, "compile (host: parse + plan)", compile_t, B))
        fpr, approx = _fpr(elig, plan, exact_counts, n)
        no_fn &= _superset(approx, slot_ids, masks, 8)
        rows.append(FilterRow(name, f"probed clusters (nprobe={cfg.filter_nprobe})",
                              time_call(lambda e=elig, p=plan: e.evaluate(p, words), cfg.repeats), B, fpr))
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
    # the filter inside a full filtered-search batch: evaluate on probed words vs the scan
    full_plan = hybrid.compile(filters)
    full_words = probed_words(index, queries, share_nprobe)
    probed_t = time_call(lambda: hybrid.evaluate(full_plan, full_words), cfg.repeats)
    scan_t = time_call(lambda: index.search(queries, cfg.k, SearchParams(nprobe=share_nprobe)), cfg.repeats,
                       warmup=lambda: index.search(queries[: cfg.warmup_queries], cfg.k,
                                                   SearchParams(nprobe=share_nprobe)))
    words_fraction = float((full_words >= 0).sum()) / (queries.shape[0] * hybrid.num_words)
    return FilterBench(B, cfg.filter_nprobe, rows, selectivity, no_fn, dict(hybrid.modes),
                       share_nprobe, queries.shape[0], probed_t, scan_t, words_fraction)
