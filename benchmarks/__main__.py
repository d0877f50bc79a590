"""``python -m benchmarks [--quick | --smoke] [--only SECTION,...] [--out docs]``: every benchmark in one
run -> ``docs/benchmarks.md`` + PNG plots (and ``docs/benchmarks_index.md``, ``benchmarks_serving.md``,
``benchmarks_mesh.md`` from the sections that own them).

Sections, in order: index, ann, filter, scaling, memory, serve, mesh, planner (see
:mod:`benchmarks.suite`). A section that fails is reported as failed with its reason; the run goes on.
Modes: full (``make bench``), ``--quick`` (``make bench-quick``: minutes, CI-sized) and ``--smoke``
(seconds-sized shapes for the test suite; numbers meaningless, servers skipped).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .index_bench import IndexBenchConfig, run
from .plots import plot_recall_qps
from .report import render_index_report
from .targets import check_targets

PLOT_NAME = "index_recall_qps.png"
REPORT_NAME = "benchmarks.md"


def write_index_report(cfg: IndexBenchConfig, out_dir: Path, command: str, log=print) -> Path:
    """Run the index benchmark alone and write ``benchmarks_index.md`` and the plot into ``out_dir``."""
    result = run(cfg, log=log)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_recall_qps(result, out_dir / PLOT_NAME)
    path = out_dir / "benchmarks_index.md"
    path.write_text(render_index_report(result, command, PLOT_NAME))
    for t in check_targets(result):
        log(f"{t.name}: {t.verdict} (ratio {'-' if t.ratio is None else f'{t.ratio:.3f}'}; {t.measured})")
    log(f"wrote {path} and {out_dir / PLOT_NAME}")
    return path


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def run_and_write(mode: str, out_dir: Path, only: str | None = None, *, threads: int | None = None,
                  show_progress: bool = True, command: str = "python -m benchmarks", log=print,
                  sections=None) -> Path:
    """Run the selected sections and write ``out_dir/benchmarks.md``; returns its path.
    ``sections`` replaces the section table (tests)."""
    from .common import machine_info
    from .suite import SuiteContext, parse_only, run_suite
    from .suite_report import render_suite_report
    from .targets import suite_targets

    names = parse_only(only) if sections is None else [n for n in sections if not only or n in only.split(",")]
    if threads:
        import faiss
        import torch

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    ctx = SuiteContext(mode, out_dir, log=log, show_progress=show_progress, threads=threads)
    ctx.cache["command"] = command
    load0 = os.getloadavg()[0]
    start = time.perf_counter()
    results = run_suite(ctx, names, sections)
    elapsed = time.perf_counter() - start
    by_name = {r.name: r for r in results}
    targets = suite_targets(by_name, ctx.cache.get("index"))
    for t in targets:
        log(f"target {t.name}: {t.verdict} ({t.unavailable or t.measured})")
    text = render_suite_report(results, targets, command=command, mode=mode, machine=machine_info(),
                               elapsed_s=elapsed, load=(load0, os.getloadavg()[0]), gpu=_gpu_name())
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_NAME
    path.write_text(text)
    log(f"wrote {path} ({sum(r.status == 'ok' for r in results)}/{len(results)} sections ok)")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Run every benchmark section in one "
                                     "go and write docs/benchmarks.md + PNG plots (see benchmarks/suite.py).")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI-sized: 100k-item index sweep, short windows (minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny shapes, no servers (seconds; for tests)")
    parser.add_argument("--only", default=None, metavar="SECTION,...",
                        help="comma list of: index, ann, filter, scaling, memory, serve, mesh, planner (default: all)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="report directory (default docs/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and faiss threads (default: torch's default, all cores)")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    command = "python -m benchmarks" + (f" --{mode}" if mode != "full" else "") + (
        f" --only {args.only}" if args.only else "") + (f" --threads {args.threads}" if args.threads else "")
    try:
        from .suite import parse_only

        parse_only(args.only)
    except ValueError as err:
        parser.error(str(err))
    run_and_write(mode, args.out, args.only, threads=args.threads, show_progress=not args.no_progress,
                  command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
