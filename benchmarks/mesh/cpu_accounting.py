"""CPU seconds of processes, read from ``/proc``: where a closed-loop load's CPU goes.

On a machine whose cores the load saturates, requests/s is about ``cores / CPU seconds per
request`` summed over every process that touches a request (server(s) and load generator), so the
per-process CPU per request explains a throughput ratio between two systems in the run that
measured it. Linux only; elsewhere :func:`process_cpu_seconds` returns NaN (shown as such in the table).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

__all__ = ["process_cpu_seconds", "measure_cpu"]

T = TypeVar("T")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of ``pid`` so far (NaN where ``/proc`` is missing
    or the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return float("nan")
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = raw[raw.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15 of stat)


def measure_cpu(pids: Mapping[str, int], fn: Callable[[], T]) -> tuple[T, dict[str, float]]:
    """Run ``fn`` and return its result with the CPU seconds each named process spent meanwhile,
    plus ``"client"``: this process's own CPU (``fn`` is the load generator)."""
    before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
    own = time.process_time()
    out = fn()
    own = time.process_time() - own
    spent = {name: process_cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    spent["client"] = own
    return out, spent
