"""Smoke test of the index benchmark: a tiny run produces a well-formed report (never speed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("faiss")
pytest.importorskip("matplotlib")

from benchmarks.__main__ import PLOT_NAME, write_index_report  # noqa: E402
from benchmarks.index_bench import IndexBenchConfig  # noqa: E402

SECTIONS = [
    "## Machine", "## Targets", "## Recall vs throughput (no filter)", "## Filtered search",
    "## Filter throughput", "## Top-K selection", "## Reproduce",
]


def _table_after(text: str, heading: str) -> list[list[str]]:
    """Rows (cells) of the first Markdown table after ``heading``."""
    rest = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(rest) if line.startswith("| "))
    rows = []
    for line in rest[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    assert set(rows[1][0]) <= set("-"), "second line of a table is the separator"
    return [rows[0]] + rows[2:]


def test_tiny_index_benchmark_report(tmp_path: Path) -> None:
    path = write_index_report(IndexBenchConfig.tiny(), tmp_path, "python -m benchmarks --tiny",
                              log=lambda *_: None)
    text = path.read_text()
    assert (tmp_path / PLOT_NAME).stat().st_size > 1000
    for section in SECTIONS:
        assert section in text, section
    assert "cpu" in text and "torch" in text and "faiss" in text

    search = _table_after(text, "## Recall vs throughput")
    header, body = search[0], search[1:]
    recall_col = header.index("recall@100")
    systems = {row[0] for row in body}
    assert {"SilverTorch int8", "SilverTorch bf16", "SilverTorch fp32", "faiss IVF-Flat",
            "faiss IVF-SQ8", "SilverTorch int8 exact scan"} <= systems
    for row in body:
        assert 0.0 <= float(row[recall_col]) <= 1.0
        assert float(row[header.index("q/s")].replace(",", "")) > 0

    filtered = _table_after(text, "## Filtered search")
    fheader = filtered[0]
    assert any("faiss" in h for h in fheader)
    for row in filtered[1:]:
        assert row[0].split()[0] in ("broad", "medium", "selective")
        for col in (2, 5):  # SilverTorch and faiss recall
            if row[col] != "-":
                assert 0.0 <= float(row[col]) <= 1.0

    targets = _table_after(text, "## Targets")
    assert [r[0][:3] for r in targets[1:]] == ["(a)", "(b)", "(c)", "(d)"]
    for row in targets[1:]:
        assert re.match(r"met|missed", row[-1])

    filters = _table_after(text, "## Filter throughput")
    methods = {row[0] for row in filters[1:]}
    assert any("inverted index" in m for m in methods) and any("attribute masks" in m for m in methods)
    assert len(_table_after(text, "## Top-K selection")) == 1 + len(IndexBenchConfig.tiny().topk_shapes)
