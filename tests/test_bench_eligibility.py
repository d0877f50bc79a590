"""Smoke test of the eligibility benchmark script (benchmarks/eligibility_bench.py): shapes, never speed."""

from __future__ import annotations

from benchmarks.eligibility_bench import probe_words, run_fpr, run_speed
from silvertorch.index.bitmap import num_words


def test_bench_smoke() -> None:
    res = run_speed(5000, 8, 128, 3, repeat=1)
    assert res["bloom creator: full_ms"] > 0
    rows = run_fpr(3000, [64], [2], n_terms=4)
    assert 0 <= rows[0][2] <= 1 and rows[0][3] > 0
    assert probe_words(2, num_words(100_000)).shape[0] == 2
