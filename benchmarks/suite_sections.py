"""Suite sections that wrap benchmarks living elsewhere: the index benchmark, the filter comparison
(read from the index run), the server load test, the mesh comparison and the planner check.

Each ``*_section(ctx) -> dict`` returns plain data for :mod:`benchmarks.suite_report`; the server,
mesh and planner benchmarks write their own detailed reports, the suite links to them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .suite import SectionSkipped, SuiteContext

__all__ = ["index_section", "filter_section", "serve_section", "mesh_section", "planner_section",
           "INDEX_REPORT", "INDEX_PLOT"]

INDEX_REPORT = "benchmarks_index.md"
INDEX_PLOT = "index_recall_qps.png"


def index_section(ctx: SuiteContext) -> dict[str, Any]:
    """Run (or reuse) the index benchmark and write ``benchmarks_index.md`` + its plot, as
    ``python -m benchmarks`` always did."""
    from .plots import plot_recall_qps
    from .report import render_index_report
    from .targets import check_targets

    res = ctx.index_result()
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    plot_recall_qps(res, ctx.out_dir / INDEX_PLOT)
    command = ctx.cache.get("command", "python -m benchmarks")
    (ctx.out_dir / INDEX_REPORT).write_text(render_index_report(res, command, INDEX_PLOT))
    targets = check_targets(res)
    return {"report": INDEX_REPORT, "plot": INDEX_PLOT, "elapsed_s": res.elapsed_s,
            "targets": [(t.name, t.goal, t.measured, t.ratio, t.verdict) for t in targets]}


BLOOM = "SilverTorch Bloom only"
INVERTED = "inverted index"


def filter_section(ctx: SuiteContext) -> dict[str, Any]:
    """Filtering methods of the index run, per query and per item: Bloom probe-then-filter (the
    search path), Bloom / hybrid over the whole catalog (filter-everything), exact attribute masks and
    an inverted index; the measured false-positive rate of each approximate method."""
    res = ctx.index_result()
    f = res.filters
    n_items = res.config.num_items
    inverted = next(r for r in f.rows if r.method.startswith(INVERTED))
    rows = []
    for r in f.rows:
        if r.scope.startswith("compile"):
            continue
        per_query = r.timing.median_s / r.queries
        rows.append({
            "method": r.method, "scope": r.scope, "us_per_query": per_query * 1e6, "spread": r.timing.spread / 2,
            "qps": r.qps, "items_per_s": r.qps * n_items,
            "vs_inverted": inverted.timing.median_s / r.timing.median_s, "fpr": r.fpr,
        })
    compile_rows = {r.method: r.timing.median_s / r.queries * 1e6 for r in f.rows if r.scope.startswith("compile")}
    return {"queries": f.queries, "items": n_items, "nprobe": f.probe_nprobe, "rows": rows,
            "compile_us_per_query": compile_rows, "no_false_negatives": f.no_false_negatives,
            "selectivity": f.selectivity, "filter_share": f.filter_share, "share_nprobe": f.share_nprobe,
            "words_fraction": f.words_fraction, "modes": dict(f.modes)}


def _require_full_stack(ctx: SuiteContext, what: str) -> None:
    if ctx.mode == "smoke":
        raise SectionSkipped(f"{what} starts servers and builds artifacts: not part of --smoke "
                             "(run --quick or the full suite)")


def serve_section(ctx: SuiteContext) -> dict[str, Any]:
    """``benchmarks.serve_bench.run`` (writes ``benchmarks_serving.md``); the suite keeps its rows."""
    _require_full_stack(ctx, "the server load test")
    from . import serve_bench

    out = serve_bench.run(ctx.quick, ctx.out_dir, log=ctx.log)
    return {"command": out["command"], "report": serve_bench.REPORT, "plot": serve_bench.PLOT,
            "results": out["results"]}


def mesh_section(ctx: SuiteContext) -> dict[str, Any]:
    """``python -m benchmarks.mesh_bench`` in a child process (writes ``benchmarks_mesh.md``); the
    suite keeps its rows.

    A child of its own gives the mesh run (which builds the 10M catalog in full mode, ~12 GiB at its
    peak) a fresh heap: in the suite process, after the scaling section's 10M index, the same build
    ran a 24 GiB machine out of memory. The child rewrites its JSON after every workload, so a child
    that dies in a late workload still reports the rows it measured, with a note saying how it ended.
    """
    _require_full_stack(ctx, "the mesh comparison")
    import subprocess
    import sys
    import json
    import tempfile

    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    _return_free_memory()
    with tempfile.TemporaryDirectory(prefix="mesh_bench_") as tmp:
        json_path = Path(tmp) / "mesh.json"
        cmd = [sys.executable, "-m", "benchmarks.mesh_bench", "--out", str(ctx.out_dir), "--json", str(json_path)]
        if ctx.quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], check=False,
                              stdout=None if ctx.show_progress else subprocess.DEVNULL,
                              stderr=None if ctx.show_progress else subprocess.DEVNULL)
        if not json_path.exists():
            raise RuntimeError(f"the mesh benchmark ({' '.join(cmd[1:3])}) exited with status {proc.returncode} "
                               "before measuring any workload")
        out = json.loads(json_path.read_text())
    notes = list(out.get("notes", []))
    if proc.returncode != 0:
        notes.append(f"the mesh benchmark's process ended with status {proc.returncode} "
                     f"({'killed by signal ' + str(-proc.returncode) if proc.returncode < 0 else 'an error'}) "
                     "after the workloads above; the rest was not measured")
    return {"command": out["command"], "report": Path(out["md"]).name, "plot": Path(out["png"]).name,
            "rows": out["rows"], "notes": notes, "load_avg_at_start": out.get("load_avg_at_start")}


def _return_free_memory() -> None:
    """Collect garbage and hand the freed heap back to the OS (glibc ``malloc_trim``), so that what
    earlier sections allocated does not sit beside a child's peak."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def planner_section(ctx: SuiteContext) -> dict[str, Any]:
    """``benchmarks.planner_check.run`` (writes ``runs/planner_check/planner_check.{json,md}``)."""
    _require_full_stack(ctx, "the planner check")
    from . import planner_check

    out_dir = Path(os.environ.get("SILVERTORCH_PLANNER_CHECK_DIR", "runs/planner_check"))
    res = planner_check.run(ctx.quick, out_dir, log=lambda *_: None)
    return {"command": "python -m benchmarks.planner_check" + (" --quick" if ctx.quick else ""),
            "out_dir": str(out_dir), "markdown": planner_check.render_markdown(res, ctx.quick),
            "ratios": res["ratio_measured_over_predicted"]}
