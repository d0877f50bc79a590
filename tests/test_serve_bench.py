"""The serving load generator against a real server: a short closed loop with an update stream
answers without errors, and its report renders the verdict from the measured rows."""

from __future__ import annotations

import asyncio

from benchmarks.serve_bench import LevelResult, Workload, _level, _report
from tests.conftest_serve import shared_server


def test_load_generator_runs_clean_against_the_server() -> None:
    server = shared_server()
    users = [{"user_id": str(u)} for u in range(1, 30)]
    wl = Workload("ml", server.artifact, users, ["genre:Comedy", "NOT decade:1990s"], 64)
    lat, n, errors, upd, wall = asyncio.run(_level(server.url, wl, 2, 0.6, True, 0.1, seed=7))
    assert n > 0 and errors == 0 and len(lat) == n and wall > 0
    assert upd  # the update stream ran and was acknowledged
    row = LevelResult("ml", 2, True, n, errors, wall, n / wall, 1.0, 2.0, 3.0, 1.5, len(upd), 4.0)
    text = _report([row, LevelResult("ml", 2, False, n, 0, wall, n / wall, 1.0, 2.0, 300.0, 1.5, 0, 0.0)],
                   "python -m benchmarks.serve_bench --quick", True, [2], 0.6, {"ml": [(1, 2.0)]})
    assert "| ml | 2 | yes |" in text and "meets the target" in text and "misses the target" in text
