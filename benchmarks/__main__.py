"""``python -m benchmarks [--quick]``: the index benchmark -> docs/benchmarks_index.md + plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .index_bench import IndexBenchConfig, run
from .plots import plot_recall_qps
from .report import render_index_report
from .targets import check_targets

PLOT_NAME = "index_recall_qps.png"


def write_index_report(cfg: IndexBenchConfig, out_dir: Path, command: str, log=print) -> Path:
    """Run the index benchmark and write ``benchmarks_index.md`` and the plot into ``out_dir``."""
    result = run(cfg, log=log)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_recall_qps(result, out_dir / PLOT_NAME)
    path = out_dir / "benchmarks_index.md"
    path.write_text(render_index_report(result, command, PLOT_NAME))
    for t in check_targets(result):
        log(f"{t.name}: {t.verdict} (ratio {'-' if t.ratio is None else f'{t.ratio:.3f}'}; {t.measured})")
    log(f"wrote {path} and {out_dir / PLOT_NAME}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100k items, fewer queries (minutes)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="report directory (default docs/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and faiss threads (default: torch's default, all cores)")
    args = parser.parse_args(argv)
    cfg = IndexBenchConfig.quick() if args.quick else IndexBenchConfig.full()
    cfg.show_progress = not args.no_progress
    cfg.threads = args.threads
    command = "python -m benchmarks" + (" --quick" if args.quick else "") + (
        f" --threads {args.threads}" if args.threads else "")
    write_index_report(cfg, args.out, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
