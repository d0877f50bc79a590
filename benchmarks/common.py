"""Shared benchmark helpers: timing (warm-up excluded, median and spread), machine facts, tables."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

__all__ = ["Timing", "time_call", "machine_info", "md_table", "progress", "fmt"]


@dataclass
class Timing:
    """Wall-clock seconds of ``repeats`` timed calls (warm-up excluded)."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repeats were."""
        return (self.max_s - self.min_s) / self.median_s if self.median_s > 0 else 0.0

    def rate(self, items: int) -> float:
        """Items per second at the median time."""
        return items / self.median_s if self.median_s > 0 else float("inf")


def time_call(fn: Callable[[], object], repeats: int = 3, warmup: Callable[[], object] | None = None) -> Timing:
    """Run ``warmup`` (default: ``fn``) once untimed, then ``fn`` ``repeats`` times."""
    (warmup or fn)()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), len(times))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("nan")


def machine_info() -> dict[str, str]:
    """Facts that make a number reproducible: CPU, cores, memory, library versions, date."""
    import faiss
    import numpy
    import torch

    return {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "memory": f"{_mem_gib():.0f} GiB",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": getattr(faiss, "__version__", "unknown"),
        "numpy": numpy.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def fmt(x: float, digits: int = 3) -> str:
    """Compact number: 12,345 / 123 / 1.23 / 0.0123."""
    if x != x:  # NaN
        return "n/a"
    if x == float("inf"):
        return "inf"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 1 or ax == 0:
        return f"{x:.{max(0, digits - 1)}f}".rstrip("0").rstrip(".") if ax < 10 else f"{x:.1f}"
    return f"{x:.{digits}g}"


def md_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured Markdown table; floats go through :func:`fmt`."""
    def cell(v: object) -> str:
        return fmt(v) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def progress(items: Iterable[T], desc: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """A tqdm progress bar on stderr (plain iteration when disabled or tqdm is missing)."""
    if enabled:
        try:
            from tqdm import tqdm

            yield from tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False)
            return
        except ImportError:
            pass
    yield from items
