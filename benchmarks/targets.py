"""Targets, each a ratio of two numbers measured in the same run.

:func:`check_targets` -- the index benchmark's four (docs/benchmarks_index.md);
:func:`suite_targets` -- the four of issue #7 over the whole suite (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from .common import fmt

__all__ = ["Target", "check_targets", "suite_targets"]

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
    unavailable: str = ""  # the section that measures it did not run / failed: why

    @property
    def met(self) -> bool:
        if self.ratio is None or self.unavailable:
            return False
        return self.ratio >= self.threshold if self.higher_is_better else self.ratio < self.threshold

    @property
    def verdict(self) -> str:
        if self.unavailable:
            return "not measured"
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


# ------------------------------------------------------------------------------------ suite targets
MESH_GOAL = 10.0
BLOOM_GOAL = 100.0


def _section(results: dict, name: str):
    """``(data, None)`` when section ``name`` ran, else ``(None, reason)``."""
    r = results.get(name)
    if r is None:
        return None, f"section `{name}` was not selected (--only)"
    if r.status != "ok":
        return None, f"section `{name}` {r.status}: {r.reason}"
    return r.data, None


def _suite_mesh(results: dict) -> Target:
    name, goal = "SilverTorch vs mesh", (f"SilverTorch requests/s >= {MESH_GOAL:.0f}x the mesh's on CPU at equal "
                                         "recall, k=1000, 1M catalog, with filters")
    data, why_not = _section(results, "mesh")
    if data is None:
        return Target(name, goal, "-", None, MESH_GOAL, True, unavailable=why_not)
    rows = [r for r in data["rows"] if r["filter"]]
    if not rows:
        return Target(name, goal, "-", None, MESH_GOAL, True, unavailable="the mesh run has no filtered rows")
    sizes = {r["items"] for r in rows}
    items = 1_000_000 if 1_000_000 in sizes else max(sizes)  # the target's catalog, else the largest
    rows = [r for r in rows if r["items"] == items]
    k = 1000 if any(r["k"] == 1000 for r in rows) else max(r["k"] for r in rows)
    rows = [r for r in rows if r["k"] == k]
    st = next((r for r in rows if r["system"].startswith("SilverTorch") and "mesh HTTP" not in r["system"]), None)
    meshes = [r for r in rows if r["system"].startswith("mesh")]
    if st is None or not meshes:
        return Target(name, goal, "-", None, MESH_GOAL, True,
                      unavailable="the mesh run lacks a SilverTorch or a mesh row at this k")
    equal = [m for m in meshes if m["recall"] >= st["recall"] - 0.01] or [max(meshes, key=lambda m: m["recall"])]
    mesh = max(equal, key=lambda m: m["rps"])
    scope = ("" if items >= 1_000_000 else
             f" (on {rows[0]['workload']}, {items:,} items: the 1M catalog is not in this run)")
    t = Target(name, goal,
               f"{fmt(st['rps'])} req/s (recall {st['recall']:.3f}, {st['system']}) / {fmt(mesh['rps'])} req/s "
               f"({mesh['system']}, recall {mesh['recall']:.3f}), k={k}, filtered{scope}",
               st["rps"] / mesh["rps"] if mesh["rps"] else None, MESH_GOAL, True)
    if not t.met:
        same = next((r for r in rows if "mesh HTTP" in r["system"]), None)
        parts = []
        if t.ratio is not None and t.ratio < 1:
            parts.append(f"SilverTorch served fewer requests/s than the mesh in this run ({t.ratio:.2f}x)")
        if same is not None and same["rps"] > 1.1 * st["rps"]:
            parts.append(f"the same model behind the mesh's own HTTP stack did {fmt(same['rps'])} req/s, i.e. "
                         f"{same['rps'] / st['rps']:.2f}x the `silvertorch serve` number: that part of the gap is the "
                         "server wrapper (request parsing, micro-batching, response encoding), not the architecture")
        elif same is not None:
            parts.append(f"the same model behind the mesh's own HTTP stack did {fmt(same['rps'])} req/s "
                         f"({same['rps'] / st['rps']:.2f}x `silvertorch serve`), so the server wrapper is not what "
                         "limits it")
        if st.get("cpu_ms") and mesh.get("cpu_ms"):
            a, b = sum(st["cpu_ms"].values()), sum(mesh["cpu_ms"].values())
            gen = st["cpu_ms"].get("client", float("nan")), mesh["cpu_ms"].get("client", float("nan"))
            parts.append(f"measured CPU per request (benchmarks_mesh.md, \"Where the CPU goes\"): SilverTorch "
                         f"{a:.2f} ms, the mesh {b:.2f} ms, load generator included ({gen[0]:.2f} and {gen[1]:.2f} ms); "
                         f"on saturated cores requests/s follow their ratio, {b / a:.2f}x: a 10x gap would need the "
                         "mesh to spend 10x SilverTorch's CPU on a request")
        wrapper = same is not None and same["rps"] > 1.1 * st["rps"]
        parts.append("both systems run the same tower, scan and scoring on the same cores, so the mesh's extra "
                     "hops (three loopback calls, binary (de)serialization, process switches) can only cost what "
                     "they add on top of the model's own work, which dominates on CPU; the reference's 23.7x is a "
                     "GPU model against a CPU mesh at 80M items. Closing it on CPU: "
                     + ("cut the server's per-request overhead to the stand-in's level, then " if wrapper else "")
                     + "shrink the model's per-request work (larger micro-batches, compiled towers) while the "
                     "mesh's hop costs stay fixed")
        if items < 1_000_000:
            parts.append("this run did not include the 1M catalog (quick mode), where the scan is a larger share")
        t.why = "; ".join(parts)
    return t


def _suite_int8_vs_sq8(results: dict, index_result) -> Target:
    name = "int8 IVF vs faiss IVF-SQ8"
    goal = f"SilverTorch int8 IVF q/s >= faiss IVF-SQ8 q/s, both at recall@100 >= {RECALL}"
    if index_result is None:
        _, why_not = _section(results, "ann")
        return Target(name, goal, "-", None, 1.0, True, unavailable=why_not or "no index run")
    ours = _first_at_recall(index_result.search, "SilverTorch int8")
    sq8 = _first_at_recall(index_result.search, "faiss IVF-SQ8")
    if ours is None or sq8 is None:
        miss = "SilverTorch int8" if ours is None else "faiss IVF-SQ8"
        return Target(name, goal, f"{miss} did not reach recall {RECALL} in the nprobe sweep", None, 1.0, True,
                      why=f"{miss} never reached recall {RECALL} at the swept nprobe values")
    t = Target(name, goal, f"{fmt(ours.qps)} q/s (nprobe {ours.nprobe}, recall {ours.recall:.3f}) / "
               f"{fmt(sq8.qps)} q/s (nprobe {sq8.nprobe}, recall {sq8.recall:.3f}); best q/s of each at the recall",
               ours.qps / sq8.qps, 1.0, True)
    if not t.met:
        t.why = ("faiss IVF-SQ8 scans each query's lists with SIMD code per query and keeps a k-heap; ours groups "
                 "queries by cluster and runs int8 GEMMs, which pays off only when many queries of the batch share "
                 "lists; with few queries per list the per-(query, cluster) overhead and the candidate selection "
                 "dominate. Closing it: a larger batch per call, or a per-list kernel that keeps a running top-k")
    return t


def _suite_bandwidth(results: dict, index_result) -> Target:
    name = "scan vs memory-bandwidth limit"
    goal = "int8 IVF scan >= 50% of the physical limit (bytes scanned per query / measured read bandwidth)"
    if index_result is not None:
        t = _target_b(index_result)
        t.name, t.goal = name, goal + " at recall@100 >= 0.95"
        return t
    data, why_not = _section(results, "scaling")
    if data is None:
        return Target(name, goal, "-", None, 0.5, True, unavailable=why_not)
    row = max((r for r in data["rows"] if r.sweep == "catalog"), key=lambda r: r.items)
    t = Target(name, goal, f"{row.limit_us_per_query:.1f} us limit / {row.us_per_query:.1f} us measured per query "
               f"({row.items:,} items, nprobe {row.nprobe}, {row.bytes_per_query / 1e6:.2f} MB at "
               f"{row.bandwidth_gbs:.1f} GB/s)", row.fraction_of_limit, 0.5, True)
    if not t.met:
        t.why = ("the CPU scan is compute- and overhead-bound, not bandwidth-bound (probe, int8 GEMMs, rescale, "
                 "candidate selection)")
    return t


def _suite_bloom(results: dict) -> Target:
    name = "Bloom vs inverted index"
    goal = (f"Bloom-filter eligibility (probe-then-filter, the search path) >= {BLOOM_GOAL:.0f}x faster per query "
            "than an inverted index")
    data, why_not = _section(results, "filter")
    if data is None:
        return Target(name, goal, "-", None, BLOOM_GOAL, True, unavailable=why_not)
    inv = next(r for r in data["rows"] if r["method"].startswith("inverted index"))
    ours = [r for r in data["rows"] if r["method"].startswith("SilverTorch")]
    # the index as built (hybrid: exact bitmaps for small vocabularies, Bloom signatures for large ones)
    path = next(r for r in ours if r["method"].startswith("SilverTorch hybrid") and "search path" in r["scope"])
    others = "; ".join(f"{r['method']}, {r['scope']}: {r['vs_inverted']:.1f}x" for r in ours if r is not path)
    t = Target(name, goal,
               f"{inv['us_per_query']:.1f} us (inverted index, whole catalog) / {path['us_per_query']:.1f} us "
               f"({path['method']}, {path['scope']}) per query. Other paths vs the inverted index: {others}",
               inv["us_per_query"] / path["us_per_query"], BLOOM_GOAL, True)
    if not t.met:
        t.why = ("the inverted index here is numpy posting lists whose AND/OR/NOT cost scales with the posting "
                 "lengths of the query's terms, while the Bloom path evaluates every word of the probed clusters "
                 "plus per-call host work (plan dispatch, gathering the probed clusters' word runs); on a CPU the "
                 "word-wide evaluation runs at memory speed of one core, not a GPU's, and a small catalog keeps the "
                 "posting lists short. The gap grows with the catalog size and with broad terms; a GPU (or the "
                 "evaluation fused into the scan kernel) is what the reference's 291-523x assumes")
    return t


def suite_targets(results: dict, index_result=None) -> list[Target]:
    """The four issue-#7 targets from the suite's section results (``name -> SectionResult``);
    ``index_result`` is the shared index-benchmark run when one happened."""
    return [_suite_mesh(results), _suite_int8_vs_sq8(results, index_result),
            _suite_bandwidth(results, index_result), _suite_bloom(results)]
