"""Markdown of one suite run (docs/benchmarks.md): machine, sections, targets, GPU commands.

Every section always has its heading; a section that failed or was skipped says so with the reason
in place of its tables.
"""

from __future__ import annotations

from typing import Any

from .common import fmt, md_table
from .suite import SECTIONS, SectionResult
from .targets import Target

__all__ = ["render_suite_report", "HEADINGS", "versions"]

HEADINGS = {
    "index": "## Index benchmark", "ann": "## ANN: recall vs queries/s", "filter": "## Filtering",
    "scaling": "## Scaling", "memory": "## Memory", "serve": "## Server load", "mesh": "## SilverTorch vs the mesh",
    "planner": "## Planner check",
}


def versions() -> dict[str, str]:
    """Versions of the libraries the numbers depend on (``-`` where one is not installed)."""
    from importlib import metadata

    out = {}
    for name in ("torch", "torchrec", "fbgemm-gpu-cpu", "faiss-cpu", "numpy", "fastapi", "uvicorn"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def _pm(spread: float) -> str:
    return f"±{spread:.0%}"


def _ann(d: dict) -> list[str]:
    rows = []
    for p in sorted(d["points"], key=lambda p: (p.system, p.value if p.value is not None else 10**9)):
        exhaustive = p.value is None
        rows.append([p.system, "exhaustive" if exhaustive else p.knob, "all" if exhaustive else p.value,
                     f"{p.recall:.4f}", fmt(p.qps), f"{p.timing.median_s * 1e3:.1f}", _pm(p.timing.spread / 2),
                     p.queries])
    h = d["hnsw"]
    builds = ", ".join(f"{k} {v:.1f} s" for k, v in d["build_s"].items())
    return [
        f"![recall vs queries/s]({d['plot']})", "",
        md_table(["system", "knob", "value", f"recall@{d['k']}", "queries/s", "ms / batch", "spread", "batch"],
                 rows), "",
        f"{d['items']:,} x {d['dim']} synthetic clustered vectors, IVF nlist {d['nlist']}, one batch of "
        f"{d['queries']:,} queries per call, k={d['k']}; median of {d['repeats']} timed batches after an untimed "
        f"warm-up batch of {d['warmup_queries']} queries; spread = (max - min) / 2 / median. Ground truth: exact fp32 "
        f"inner product. HNSW: `IndexHNSWFlat` M {h['M']}, efConstruction {h['efConstruction']} (built in "
        f"{h['build_s']:.1f} s), efSearch swept (never below k). IVF builds: {builds}. faiss IVF-Flat and IVF-SQ8 "
        "share one coarse quantizer; SilverTorch builds its own k-means with the same nlist.",
    ]


def _filter(d: dict) -> list[str]:
    rows = [[r["method"], r["scope"], f"{r['us_per_query']:.1f}", _pm(r["spread"]), fmt(r["qps"]),
             fmt(r["items_per_s"]), f"{r['vs_inverted']:.1f}x", "-" if r["fpr"] is None else f"{r['fpr']:.2e}"]
            for r in d["rows"]]
    sel = d["selectivity"]
    return [
        md_table(["method", "scope", "us / query", "spread", "queries/s", "items/s", "speed vs inverted index",
                  "false-positive rate"], rows), "",
        f"{d['queries']} filter expressions over {d['items']:,} items (median selectivity {sel['median']:.2%}, "
        f"p10 {sel['p10']:.3%}, p90 {sel['p90']:.2%}). `items/s` = queries/s x catalog items: each method decides "
        "which items a query may return; probe-then-filter decides it only for the probed clusters' items "
        f"(nprobe {d['nprobe']}), which is all the scan reads. *Filter-everything* = the `whole catalog` rows. The "
        "false-positive rate is (accepted - matching) / (live - matching), averaged over the queries, measured "
        "against exact attribute masks; no false negatives on the checked queries: "
        f"{d['no_false_negatives']}. Host-side compilation (parse + plan) per query, not included above: "
        + ", ".join(f"{m} {us:.1f} us" for m, us in d["compile_us_per_query"].items()) + ". "
        f"Inside a full filtered search (nprobe {d['share_nprobe']}), the probe-then-filter step costs "
        f"{d['filter_share']:.1%} of the unfiltered scan time and touches {d['words_fraction']:.2%} of the words a "
        "whole-catalog evaluation would. Hybrid modes per feature: "
        + ", ".join(f"{k}={v}" for k, v in d["modes"].items()) + ".",
    ]


def _scaling(d: dict) -> list[str]:
    cfg = d["config"]

    def row(r) -> list[Any]:
        return [f"{r.items:,}", r.nlist, r.nprobe, f"{r.k:,}", r.queries, f"{r.us_per_query:.1f}",
                _pm(r.timing.spread / 2), f"{r.bytes_per_query / 1e6:.3f}", f"{r.limit_us_per_query:.2f}",
                f"{r.fraction_of_limit * 100:.3g}%", "-" if r.recall is None else f"{r.recall:.3f}",
                "-" if r.build_s is None else f"{r.build_s:.1f}",
                "-" if r.index_bytes is None else f"{r.index_bytes / 2**20:,.0f}"]

    head = ["items", "nlist", "nprobe", "k", "batch", "us / query", "spread", "MB scanned / query",
            "limit us / query", "fraction of limit", f"recall@{cfg.base_k}", "build s", "index MiB"]
    return [
        f"![cost per query]({d['plot']})", "",
        "### Catalog size (k fixed)", "",
        md_table(head, [row(r) for r in d["rows"] if r.sweep == "catalog"]), "",
        "### k (catalog fixed)", "",
        md_table(head, [row(r) for r in d["rows"] if r.sweep == "k"]), "",
        f"{cfg.dtype} IVF, dim {cfg.dim}, nlist = power of two nearest sqrt(items); batches of {cfg.queries:,} "
        f"queries (large k: queries x k <= {cfg.max_outputs:,}); nprobe {cfg.nprobe} in the catalog sweep, and in "
        "the k sweep enough lists to hold ~2k candidates. Median of "
        f"{cfg.repeats} timed batches after a warm-up of {cfg.warmup_queries} queries. **Physical limit** = bytes "
        "scanned per query (int8 codes + 4-byte scale of every item in the probed lists) / read bandwidth "
        f"measured in this run ({d['bandwidth_first_gbs']:.1f} GB/s before, {d['bandwidth_last_gbs']:.1f} GB/s "
        f"after the sweeps; the higher bounds). Fraction of limit = limit / measured; a batch whose queries share "
        f"lists reads each list once for all of them, so it can pass 100%. {d['threads']} torch thread(s); "
        f"peak RSS of the benchmark process {d['peak_rss_gib']:.1f} GiB. Recall@{cfg.base_k} on the first "
        f"{cfg.recall_queries} queries against exact fp32 search.",
    ]


def _memory(d: dict) -> list[str]:
    groups = list(d["dtypes"][0].groups)
    rows = [[m.dtype] + [f"{m.per_item(g):.2f}" for g in groups] + [f"{m.per_item():.2f}",
                                                                     f"{m.total / 2**20:,.1f}"] for m in d["dtypes"]]
    out = [
        f"![bytes per item]({d['plot']})", "",
        md_table(["storage dtype"] + [f"{g} B/item" for g in groups] + ["total B/item", "total MiB"], rows), "",
        f"Index buffers of a {d['items']:,}-item synthetic catalog (dim 64, nlist {d['nlist']}) per storage dtype: "
        "`vectors` the item codes, `scales` the per-item int8 scale, `layout` centroids, cluster offsets, slot ids "
        "and liveness bits, `eligibility` the hybrid bitmap + Bloom filter over the slots (the same for every "
        "dtype). Bytes per item = buffer bytes / real items, so the slot padding (every cluster rounded up to 64 "
        "slots) is part of the cost.", "",
        "### Peak RSS of the server", "",
    ]
    if d["servers"]:
        srows = []
        for s in d["servers"]:
            if "error" in s:
                srows.append([s["workload"], "-", "-", "-", "-", f"failed: {s['error']}"])
                continue
            srows.append([s["workload"], f"{s['artifact_bytes'] / 2**20:,.1f}",
                          f"{s['after_load_kib']['VmHWM'] / 2**20:.2f}",
                          f"{s['after_traffic_kib']['VmHWM'] / 2**20:.2f}",
                          f"{s['after_traffic_kib']['VmRSS'] / 2**20:.2f}",
                          f"{s['requests_ok']}/{s['requests']} requests, ready in {s['ready_s']:.1f} s"])
        out += [md_table(["artifact", "artifact MiB", "VmHWM after load GiB", "VmHWM after traffic GiB",
                          "VmRSS GiB", "notes"], srows), "",
                "`python -m launch.cli serve ARTIFACT` on loopback (1 torch thread), `VmHWM` / `VmRSS` read from "
                "`/proc/PID/status` once it is ready, and again after the requests (k=100, unfiltered)."]
    else:
        out.append(d["server_note"] or "No server measurement in this run.")
    return out


def _serve(d: dict) -> list[str]:
    rows = [[r["workload"], r["concurrency"], "yes" if r["updates"] else "no", fmt(r["rps"]), f"{r['p50_ms']:.1f}",
             f"{r['p95_ms']:.1f}", f"{r['p99_ms']:.1f}", r["errors"]] for r in d["results"]]
    return [f"Detail and plot: [{d['report']}]({d['report']}) (`{d['command']}`).", "",
            md_table(["workload", "concurrency", "updates", "requests/s", "p50 ms", "p95 ms", "p99 ms", "errors"],
                     rows)]


def _mesh(d: dict) -> list[str]:
    rows = [[r["workload"], f"{r['k']:,}", "yes" if r["filter"] else "no", r["system"], fmt(r["rps"]),
             f"{r.get('p50_ms', float('nan')):.1f}", f"{r.get('p99_ms', float('nan')):.1f}", f"{r['recall']:.3f}",
             f"{r.get('speedup', float('nan')):.2f}x"] for r in d["rows"]]
    out = [f"Detail and plot: [{d['report']}]({d['report']}) (`{d['command']}`).", "",
           md_table(["workload", "k", "filter", "system", "requests/s", "p50 ms", "p99 ms", "recall",
                     "SilverTorch / this"], rows)]
    out += [""] + [f"- {n}" for n in d.get("notes", [])]
    return out


def _planner(d: dict) -> list[str]:
    return [f"From `{d['command']}` (files in `{d['out_dir']}/`):", "", d["markdown"].strip()]


def _index(d: dict) -> list[str]:
    return [f"Full tables (filtered search per selectivity class, filter throughput, top-K selection): "
            f"[{d['report']}]({d['report']}), plot [{d['plot']}]({d['plot']}). Its own targets:", "",
            md_table(["target", "goal", "measured", "ratio", "verdict"],
                     [[n, g, m, "-" if r is None else f"{r:.4g}", v] for n, g, m, r, v in d["targets"]])]


RENDER = {"index": _index, "ann": _ann, "filter": _filter, "scaling": _scaling, "memory": _memory, "serve": _serve,
          "mesh": _mesh, "planner": _planner}


def _gpu(gpu: str | None) -> list[str]:
    out = ["## GPU", ""]
    out.append(f"GPU in this run: {gpu}." if gpu else
               "**No GPU was available in this run**: every figure above is CPU-only. With a CUDA GPU (torch + "
               "triton; TorchRec is not needed), these commands produce the GPU figures:")
    out += ["", "```",
            "# Triton scan kernel vs the torch reference (same GPU) vs the CPU scan, same index and queries",
            "python -m benchmarks.gpu_bench --items 1000000 --nprobe 16 32",
            "# the Triton kernel against the reference, exactness only",
            "python -m pytest -q tests/test_index_scan.py",
            "```", "",
            "`benchmarks/gpu_bench.py` needs only `silvertorch.index` (torch + triton), so it runs on a GPU machine "
            "without TorchRec; it prints a Markdown table (queries/s and recall per path)."]
    return out


def render_suite_report(results: list[SectionResult], targets: list[Target], *, command: str, mode: str,
                        machine: dict[str, str], elapsed_s: float, load: tuple[float, float], gpu: str | None) -> str:
    """The whole ``docs/benchmarks.md``."""
    by_name = {r.name: r for r in results}
    out = [
        "# Benchmarks", "",
        f"Generated by `{command}` ({mode} mode, {elapsed_s / 60:.1f} min, 1-minute load average "
        f"{load[0]:.1f} at the start and {load[1]:.1f} at the end). Every number comes from this one run; every "
        "ratio compares numbers measured side by side in it. Timings exclude warm-ups and report the median "
        "over repeats with the spread ((max - min) / 2 / median).", "",
        "## Machine", "",
        md_table(["", ""], [[k, v] for k, v in machine.items()]
                 + [[k, v] for k, v in versions().items() if k not in machine and k != "faiss-cpu"]), "",
        "## Sections", "",
        md_table(["section", "status", "seconds", "what / why not"],
                 [[n, by_name[n].status if n in by_name else "not selected",
                   f"{by_name[n].seconds:.1f}" if n in by_name else "-",
                   (by_name[n].reason if n in by_name and by_name[n].reason else SECTIONS[n][1]).replace("|", "/")]
                  for n in SECTIONS]), "",
        "## Targets", "",
        md_table(["target", "goal", "measured", "ratio", "verdict"],
                 [[t.name, t.goal, (t.measured if not t.unavailable else t.unavailable).replace("|", "/"),
                   "-" if t.ratio is None or t.unavailable else f"{t.ratio:.4g}", t.verdict] for t in targets]), "",
    ]
    missed = [t for t in targets if not t.met and not t.unavailable]
    if missed:
        out += ["Why the missed targets were missed, and what would close them:", ""]
        out += [f"- **{t.name}** ({t.verdict}): {t.why}." for t in missed] + [""]
    for name in SECTIONS:
        out += [HEADINGS[name], ""]
        r = by_name.get(name)
        if r is None:
            out += [f"Not selected in this run (`--only`). Rerun: `python -m benchmarks --only {name}`."]
        elif r.status != "ok":
            out += [f"**{r.status}**: {r.reason}"]
        else:
            out += RENDER[name](r.data)
        out.append("")
    out += _gpu(gpu) + [
        "", "## Reproduce", "", f"```\n{command}\n```", "",
        "`make bench` = `python -m benchmarks` (full: 1M-item index sweep, catalogs up to 10M, a 1M-item server "
        "workload, 1M- and 10M-item mesh workloads); `make bench-quick` = `--quick` (minutes); `--only index,ann,...` runs a subset; "
        "`--smoke` is the seconds-sized form the test suite runs (`tests/test_bench_suite.py`); `--threads N` pins "
        "torch and faiss threads. Run the full suite on an otherwise idle machine: on shared cores every "
        "spread widens.", ""]
    return "\n".join(out)
