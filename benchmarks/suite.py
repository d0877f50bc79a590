"""The benchmark suite: every section run in one process, each one isolated.

A section is a function ``(ctx: SuiteContext) -> data``. :func:`run_suite` calls the selected ones in
order and wraps each call: an exception becomes a ``failed`` :class:`SectionResult` carrying the
reason, so one broken section never aborts the run (the report says what failed and why). Sections
that share work (index, ann, filter all read one index-benchmark run) go through the context cache.
"""

from __future__ import annotations

import importlib
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MODES", "SECTIONS", "SectionResult", "SuiteContext", "run_suite", "parse_only"]

MODES = ("smoke", "quick", "full")


@dataclass
class SectionResult:
    """Outcome of one section: ``status`` is ``ok``, ``failed`` or ``skipped`` (then ``reason`` says why)."""

    name: str
    status: str
    seconds: float
    data: Any = None
    reason: str = ""


@dataclass
class SuiteContext:
    """What every section gets: the mode (``smoke`` / ``quick`` / ``full``), the report directory,
    a logger, the progress-bar switch, and a cache shared between sections of one run."""

    mode: str
    out_dir: Path
    log: Callable[[str], None] = print
    show_progress: bool = True
    threads: int | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown benchmark mode {self.mode!r}, expected one of {MODES}")

    @property
    def quick(self) -> bool:
        """What the sub-benchmarks that only know quick / full get (smoke counts as quick)."""
        return self.mode != "full"

    def index_config(self):
        from .index_bench import IndexBenchConfig

        cfg = {"smoke": IndexBenchConfig.tiny, "quick": IndexBenchConfig.quick, "full": IndexBenchConfig.full}[
            self.mode]()
        cfg.show_progress = self.show_progress and self.mode != "smoke"
        cfg.threads = self.threads
        return cfg

    def index_result(self):
        """The index-benchmark run (ANN sweep, filtered search, filter throughput, top-k), run once
        per suite and shared by the ``index``, ``ann`` and ``filter`` sections."""
        if "index" not in self.cache:
            from .index_bench import run

            self.cache["index"] = run(self.index_config(), log=self.log)
        return self.cache["index"]


def _import_section(module: str, attr: str) -> Callable[[SuiteContext], Any]:
    """A section whose module is imported only when it runs (a missing or broken module fails
    that section alone)."""
    def section(ctx: SuiteContext) -> Any:
        return getattr(importlib.import_module(f"benchmarks.{module}"), attr)(ctx)

    section.__name__ = f"{module}.{attr}"
    return section


# name -> (runner, what it measures); the order is the report's order
SECTIONS: dict[str, tuple[Callable[[SuiteContext], Any], str]] = {
    "index": (_import_section("suite_sections", "index_section"),
              "the index benchmark (docs/benchmarks_index.md): IVF sweep, filtered search, top-k"),
    "ann": (_import_section("ann_bench", "ann_section"),
            "recall@100 vs queries/s: SilverTorch IVF int8/bf16/fp32, faiss IVF-Flat/IVF-SQ8/HNSW"),
    "filter": (_import_section("suite_sections", "filter_section"),
               "Bloom probe-then-filter vs filter-everything vs an inverted index"),
    "scaling": (_import_section("scaling_bench", "scaling_section"),
                "cost per query vs catalog size and k, against the memory-bandwidth limit"),
    "memory": (_import_section("memory_bench", "memory_section"),
               "bytes per item per storage dtype; peak RSS of the server"),
    "serve": (_import_section("suite_sections", "serve_section"),
              "server load: requests/s and latency percentiles by concurrency"),
    "mesh": (_import_section("suite_sections", "mesh_section"),
             "end-to-end SilverTorch vs the multi-service mesh"),
    "planner": (_import_section("suite_sections", "planner_section"),
                "the planner's estimate vs the measured index"),
}


def parse_only(spec: str | None) -> list[str]:
    """``"ann,filter"`` -> ``["ann", "filter"]`` in report order; ``None`` / ``""`` -> all sections."""
    if not spec:
        return list(SECTIONS)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown} in --only, expected a comma list of {list(SECTIONS)}")
    return [s for s in SECTIONS if s in wanted]


class SectionSkipped(Exception):
    """Raised by a section that does not apply to this mode or machine (reported as ``skipped``)."""


def run_suite(ctx: SuiteContext, names: list[str],
              sections: dict[str, tuple[Callable[[SuiteContext], Any], str]] | None = None) -> list[SectionResult]:
    """Run ``names`` in order; a section that raises is recorded as failed and the run goes on."""
    table = SECTIONS if sections is None else sections
    results: list[SectionResult] = []
    for name in names:
        runner, _ = table[name]
        ctx.log(f"== section {name} ({ctx.mode}) ==")
        start = time.perf_counter()
        try:
            data = runner(ctx)
            results.append(SectionResult(name, "ok", time.perf_counter() - start, data))
        except SectionSkipped as skip:
            results.append(SectionResult(name, "skipped", time.perf_counter() - start, reason=str(skip)))
        except (Exception, SystemExit) as err:  # noqa: BLE001 - one section must not abort the suite
            tb = traceback.extract_tb(err.__traceback__)
            where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
            reason = f"{type(err).__name__}: {str(err).strip()[:400]}{where}"
            results.append(SectionResult(name, "failed", time.perf_counter() - start, reason=reason))
            ctx.log(f"section {name} FAILED: {reason}")
        ctx.log(f"section {name}: {results[-1].status} in {results[-1].seconds:.1f} s")
    return results
