"""The four index targets, each a ratio of two numbers measured in the same run."""

from __future__ import annotations

from dataclasses import dataclass

from .common import fmt

__all__ = ["Target", "check_targets"]

RECALL = 0.95


@dataclass
class Target:
    name: str
    goal: str
    measured: str  # how the ratio was formed, with the two numbers
    ratio: float | None  # None: could not be formed (e.g. recall never reached)
    threshold: float
    higher_is_better: bool
    why: str = ""  # filled in when missed

    @property
    def met(self) -> bool:
        if self.ratio is None:
            return False
        return self.ratio >= self.threshold if self.higher_is_better else self.ratio < self.threshold

    @property
    def verdict(self) -> str:
        if self.ratio is None:
            return "missed (not reached)"
        if self.met:
            return "met"
        factor = self.threshold / self.ratio if self.higher_is_better else self.ratio / self.threshold
        return f"missed by {factor:.2f}x"


def _first_at_recall(rows, system: str):
    ok = [r for r in rows if r.system == system and r.nprobe is not None and r.recall >= RECALL]
    return max(ok, key=lambda r: r.qps) if ok else None


def _target_a(res) -> Target:
    broad = [r for r in res.filtered if r.cls == "broad"]
    ours = _first_at_recall(broad, "SilverTorch int8 + filter")
    sq8 = _first_at_recall(res.search, "faiss IVF-SQ8")
    goal = (f"int8 IVF with filter q/s (broad filters, >= {res.config.broad_filter:.0%} of the items match) >= "
            f"faiss IVF-SQ8 q/s (no filter), both at recall@{res.config.k} >= {RECALL}")
    name = "(a) filtered int8 vs faiss SQ8"
    if ours is None or sq8 is None:
        mine = [r for r in broad if r.system == "SilverTorch int8 + filter"] or [r for r in res.filtered]
        best = max(mine, key=lambda r: r.recall)
        return Target(name, goal, f"best broad-filter recall {best.recall:.3f} at nprobe {best.nprobe}", None, 1.0,
                      True, "recall 0.95 was not reached within the nprobe sweep / time budget")
    fa = next((r for r in broad if r.system.startswith("faiss") and r.nprobe == ours.nprobe), None)
    t = Target(name, goal,
               f"{fmt(ours.qps)} q/s (nprobe {ours.nprobe}, recall {ours.recall:.3f}) / "
               f"{fmt(sq8.qps)} q/s (nprobe {sq8.nprobe}, recall {sq8.recall:.3f})"
               + (f"; faiss SQ8 + bitmap on the same broad filters: {fmt(fa.qps)} q/s at nprobe {fa.nprobe}"
                  if fa else ""),
               ours.qps / sq8.qps, 1.0, True)
    if not t.met:
        t.why = (f"the filtered search needs nprobe {ours.nprobe} (vs {sq8.nprobe} for faiss without a filter), and "
                 "each call adds host-side compilation of the per-query filter strings, the probe-then-filter "
                 "bit-word evaluation (see (c)), twice the candidates (2k+32) for the exact verification "
                 "of Bloom terms, and the verification itself")
    return t


def _target_b(res) -> Target:
    row = _first_at_recall(res.search, "SilverTorch int8") or next(
        r for r in res.search if r.system == "SilverTorch int8")
    bound = res.bandwidth.read_gbs * 1e9 / row.bytes_per_query
    t = Target("(b) int8 IVF vs memory-bandwidth bound", "int8 IVF q/s >= 50% of the per-query streaming bound",
               f"{fmt(row.qps)} q/s / {fmt(bound)} q/s bound (nprobe {row.nprobe}: "
               f"{row.bytes_per_query / 1e6:.2f} MB per query at {res.bandwidth.read_gbs:.1f} GB/s)",
               row.qps / bound, 0.5, True)
    if not t.met:
        t.why = ("the CPU scan is compute- and overhead-bound, not bandwidth-bound: grouping queries by "
                 "probed cluster, int8 GEMMs with int32 accumulation, rescaling and per-query candidate "
                 "selection cost more than streaming the lists once")
    return t


def _target_c(res) -> Target:
    f = res.filters
    t = Target("(c) probe-then-filter share", "filter evaluation on the probed clusters < 10% of the scan time",
               f"{f.probed_filter.median_s * 1e3:.1f} ms / {f.scan.median_s * 1e3:.1f} ms "
               f"({f.share_queries} queries, nprobe {f.share_nprobe}, {f.words_fraction:.2%} of all words)",
               f.filter_share, 0.10, False)
    if not t.met:
        t.why = ("the filter is a separate pass before the scan: every distinct (expression, probed cluster) word run "
                 "is evaluated by a fused C++ loop of the register machine (ItemIndex._probed_words), and its bits are "
                 "written out padded to the largest probed cluster ((queries, nprobe, Wc) words, several times the "
                 "mean cluster) for the scan kernel to read back. The scan itself is one fused kernel over int8 "
                 "codes that shares each list among the queries probing it. < 10% needs the evaluation moved into "
                 "the scan kernel (evaluate a cluster's words right before scanning it, no padded tensor)")
    return t


def _target_d(res) -> Target:
    big = max(res.topk, key=lambda r: (r.cols, r.rows))
    same = [r for r in res.topk if (r.rows, r.cols) == (big.rows, big.cols)]
    large = max(same, key=lambda r: r.k)
    small = min(same, key=lambda r: abs(r.k - 1000))
    t = Target("(d) large-k top-K", f"k={large.k:,} costs < 2x k={small.k:,} ({big.rows} x {big.cols:,} candidates)",
               f"{large.ours.median_s * 1e3:.1f} ms / {small.ours.median_s * 1e3:.1f} ms "
               f"(torch.topk: {large.torch_topk.median_s * 1e3:.1f} / {small.torch_topk.median_s * 1e3:.1f} ms; "
               f"ours k={large.k:,} vs torch.topk k={small.k:,}: "
               f"{large.ours.median_s / small.torch_topk.median_s:.2f}x)",
               large.ours.median_s / small.ours.median_s, 2.0, False)
    if not t.met:
        t.why = (f"k={small.k:,} ({small.method}) reads the {big.rows} x {big.cols:,} scores once and sorts only "
                 f"~k entries per row ({small.speedup:.2f}x torch.topk); k={large.k:,} ({large.method}) must also read "
                 f"every score once, but then has to produce and sort {big.rows} x {large.k:,} = "
                 f"{big.rows * large.k / 1e6:.1f}M outputs (compaction of the survivors above a sampled threshold "
                 f"and an int64 radix sort of them, {large.speedup:.2f}x torch.topk): the output sort, not the "
                 "scan, sets the cost, and it grows linearly with k. Below 2x would need the survivors of a large k "
                 "left unsorted (or sorted lazily), which the sorted Faiss-style contract does not allow")
    return t


def check_targets(res) -> list[Target]:
    return [_target_a(res), _target_b(res), _target_c(res), _target_d(res)]
