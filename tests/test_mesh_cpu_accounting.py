"""CPU accounting of the mesh benchmark (benchmarks/mesh/cpu_accounting.py): per-process CPU from
/proc, attributed to the processes that spent it."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest

from benchmarks.mesh.cpu_accounting import measure_cpu, process_cpu_seconds

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_own_cpu_grows_by_what_was_burnt_and_a_gone_process_is_nan() -> None:
    before = process_cpu_seconds(os.getpid())
    _burn(0.3)
    grown = process_cpu_seconds(os.getpid()) - before
    assert 0.2 <= grown <= 1.0  # clock ticks are 10 ms
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert math.isnan(process_cpu_seconds(proc.pid))


def test_measure_cpu_attributes_a_child_busy_loop_to_the_child() -> None:
    busy = subprocess.Popen([sys.executable, "-c",
                             "import time\nend = time.process_time() + 30\nwhile time.process_time() < end: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)  # both started
        out, cpu = measure_cpu({"busy": busy.pid, "idle": idle.pid}, lambda: time.sleep(0.5) or "done")
    finally:
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()
    assert out == "done" and set(cpu) == {"busy", "idle", "client"}
    assert cpu["busy"] >= 0.2  # up to one core for 0.5 s (less when the machine is shared)
    assert cpu["idle"] <= 0.05 and cpu["client"] <= 0.1  # sleeping costs (almost) nothing
