"""Smoke test of the whole benchmark suite (``python -m benchmarks --smoke``): the report is produced
and well-formed -- every section present, tables parse, numbers finite -- and a failing section is
reported as failed instead of aborting the run. Never speed."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

pytest.importorskip("faiss")
pytest.importorskip("matplotlib")

from benchmarks.__main__ import main, run_and_write  # noqa: E402
from benchmarks.suite import SECTIONS, SuiteContext, parse_only, run_suite  # noqa: E402
from benchmarks.suite_report import HEADINGS  # noqa: E402

NUMBER = re.compile(r"^[±]?-?[\d,]*\.?\d+(e[+-]\d+)?(%|x)?$")


def _tables(text: str, heading: str) -> list[list[list[str]]]:
    """Every Markdown table between ``heading`` and the next ``## `` heading, as rows of cells
    (header first, separator dropped)."""
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    body = text[start:end if end >= 0 else None].splitlines()
    tables, cur = [], []
    for line in body + [""]:
        if line.startswith("|"):
            cur.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif cur:
            assert len(cur) >= 2 and set("".join(cur[1])) <= set("-"), f"bad table under {heading}: {cur[:2]}"
            assert all(len(r) == len(cur[0]) for r in cur), f"ragged table under {heading}"
            tables.append([cur[0]] + cur[2:])
            cur = []
    return tables


def _num(cell: str) -> float:
    assert NUMBER.match(cell), f"not a number: {cell!r}"
    return float(cell.lstrip("±").rstrip("%x").replace(",", ""))


def _column(table: list[list[str]], name: str) -> list[float]:
    i = table[0].index(name)
    return [_num(r[i]) for r in table[1:]]


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench")
    # everything but the index section's own report (the ann/filter sections run the index
    # benchmark through the shared cache); servers are skipped in smoke mode
    path = run_and_write("smoke", out, "ann,filter,scaling,memory,serve", show_progress=False,
                         command="python -m benchmarks --smoke", log=lambda *_: None)
    return out, path.read_text()


def test_report_has_every_section_and_plot(smoke_report) -> None:
    out, text = smoke_report
    for heading in ["## Machine", "## Sections", "## Targets", "## GPU", "## Reproduce", *HEADINGS.values()]:
        assert heading + "\n" in text, heading
    for png in ("ann_recall_qps.png", "scaling_cost_per_query.png", "memory_bytes_per_item.png"):
        assert (out / png).stat().st_size > 1000, png
        assert f"]({png})" in text
    machine = dict(r[:2] for r in _tables(text, "## Machine")[0][1:])
    assert {"cpu", "cores", "torch", "faiss", "date"} <= set(machine)
    status = {r[0]: r[1] for r in _tables(text, "## Sections")[0][1:]}
    assert status == {"index": "not selected", "ann": "ok", "filter": "ok", "scaling": "ok", "memory": "ok",
                      "serve": "skipped", "mesh": "not selected", "planner": "not selected"}
    import torch

    if not torch.cuda.is_available():
        assert "No GPU was available in this run" in text


def test_targets_are_ratios_or_say_why_not(smoke_report) -> None:
    _, text = smoke_report
    table = _tables(text, "## Targets")[0]
    assert [r[0] for r in table[1:]] == ["SilverTorch vs mesh", "int8 IVF vs faiss IVF-SQ8",
                                         "scan vs memory-bandwidth limit", "Bloom vs inverted index"]
    verdicts = {r[0]: (r[3], r[4]) for r in table[1:]}
    assert verdicts["SilverTorch vs mesh"] == ("-", "not measured")  # mesh not selected
    for name in ("scan vs memory-bandwidth limit", "Bloom vs inverted index"):
        ratio, verdict = verdicts[name]
        assert math.isfinite(_num(ratio)) and _num(ratio) > 0
        assert verdict == "met" or verdict.startswith("missed by")
    for name, (ratio, verdict) in verdicts.items():
        if verdict.startswith("missed by"):
            assert f"**{name}** ({verdict})" in text  # every miss is explained


def test_ann_table(smoke_report) -> None:
    _, text = smoke_report
    table = _tables(text, "## ANN: recall vs queries/s")[0]
    systems = {r[0] for r in table[1:]}
    assert {"SilverTorch int8", "SilverTorch bf16", "SilverTorch fp32", "faiss IVF-Flat", "faiss IVF-SQ8",
            "faiss HNSW32"} <= systems
    assert all(0.0 <= x <= 1.0 for x in _column(table, "recall@100"))
    assert all(x > 0 and math.isfinite(x) for x in _column(table, "queries/s"))
    hnsw = [r for r in table[1:] if r[0] == "faiss HNSW32"]
    assert all(r[1] == "efSearch" and int(r[2]) >= 100 for r in hnsw)


def test_filter_scaling_memory_tables(smoke_report) -> None:
    _, text = smoke_report
    filt = _tables(text, "## Filtering")[0]
    methods = " ".join(r[0] for r in filt[1:])
    assert "Bloom" in methods and "inverted index" in methods
    scopes = {r[1] for r in filt[1:]}
    assert "whole catalog" in scopes and any("probed" in s for s in scopes)
    assert all(x > 0 for x in _column(filt, "items/s"))
    fpr = [r[filt[0].index("false-positive rate")] for r in filt[1:]]
    assert all(0.0 <= _num(f) <= 1.0 for f in fpr)

    catalog, by_k = _tables(text, "## Scaling")[:2]
    items = _column(catalog, "items")
    assert items == sorted(items) and len(items) >= 2
    assert all(x > 0 and math.isfinite(x) for x in _column(catalog, "us / query") + _column(by_k, "us / query"))
    assert all(x > 0 for x in _column(catalog, "fraction of limit"))
    assert len(set(_column(by_k, "k"))) == len(by_k) - 1 >= 2
    # more bytes per query for more candidates: the k sweep probes more lists as k grows
    mb = _column(by_k, "MB scanned / query")
    assert mb[-1] > mb[0]

    mem = _tables(text, "## Memory")[0]
    per_item = {r[0]: _num(r[mem[0].index("total B/item")]) for r in mem[1:]}
    assert set(per_item) == {"int8", "fp16", "bf16", "fp32"}
    vec = {r[0]: _num(r[1]) for r in mem[1:]}
    # 64-dim codes: int8 is 1 byte/dim, 16-bit 2, fp32 4 (plus slot padding, the same for all)
    assert vec["fp16"] == pytest.approx(2 * vec["int8"], rel=1e-3)
    assert vec["fp32"] == pytest.approx(4 * vec["int8"], rel=1e-3)
    assert per_item["int8"] < per_item["bf16"] < per_item["fp32"]


def test_failing_section_is_reported_not_fatal(tmp_path: Path) -> None:
    calls = []

    def broken(ctx: SuiteContext):
        raise RuntimeError("boom: disk on fire")

    def fine(ctx: SuiteContext):
        calls.append(ctx.mode)
        return {"x": 1}

    ctx = SuiteContext("smoke", tmp_path, log=lambda *_: None)
    results = run_suite(ctx, ["a", "b"], {"a": (broken, "breaks"), "b": (fine, "works")})
    assert [(r.name, r.status) for r in results] == [("a", "failed"), ("b", "ok")]
    assert "RuntimeError: boom: disk on fire" in results[0].reason and calls == ["smoke"]

    # in the written report: the section says why, the targets it feeds say "not measured"
    path = run_and_write("smoke", tmp_path, sections={"scaling": (broken, "breaks")}, log=lambda *_: None)
    text = path.read_text()
    assert "## Scaling\n\n**failed**: RuntimeError: boom: disk on fire" in text
    rows = {r[0]: r for r in _tables(text, "## Targets")[0][1:]}
    assert rows["scan vs memory-bandwidth limit"][4] == "not measured"
    assert "section `scaling` failed" in rows["scan vs memory-bandwidth limit"][2]


def test_cli_rejects_unknown_section(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--smoke", "--only", "ann,nonsense", "--out", str(tmp_path)])
    assert "nonsense" in capsys.readouterr().err
    assert parse_only("mesh,ann") == ["ann", "mesh"] and parse_only(None) == list(SECTIONS)
    with pytest.raises(ValueError, match="unknown benchmark mode"):
        SuiteContext("huge", tmp_path)


def test_gpu_bench_runs_its_cpu_rows_without_a_gpu(capsys) -> None:
    """The command the GPU section lists works on any machine (CPU rows only when there is no CUDA)."""
    from benchmarks import gpu_bench

    gpu_bench.main(["--items", "3000", "--nlist", "16", "--queries", "32", "--nprobe", "4", "--repeats", "1",
                    "--dtype", "fp32", "--k", "10"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[1:]]
    cpu = [r for r in rows if r["device"] == "cpu"]
    assert len(cpu) == 1 and _num(cpu[0]["queries/s"]) > 0
    assert 0.5 <= _num(cpu[0]["recall@k"]) <= 1.0  # nprobe 4 of 16 lists on clustered data


def _fake_mesh_child(monkeypatch, *, returncode: int, rows: list[dict] | None) -> list[list[str]]:
    """Replace the mesh benchmark's child process by one that writes ``rows`` (None: nothing) to the
    JSON path it is given and exits with ``returncode``; returns the commands it was called with."""
    import json
    import subprocess

    calls: list[list[str]] = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        if rows is not None:
            out = cmd[cmd.index("--json") + 1]
            Path(out).write_text(json.dumps({"command": "python -m benchmarks.mesh_bench", "md": "x/benchmarks_mesh.md",
                                             "png": "x/benchmarks_mesh.png", "rows": rows, "notes": ["n1"],
                                             "load_avg_at_start": [0.1, 0.2, 0.3]}))
        return subprocess.CompletedProcess(cmd, returncode)

    monkeypatch.setattr(subprocess, "run", fake_run)
    return calls


MESH_ROW = {"workload": "synthetic 1M", "items": 1_000_000, "k": 1000, "filter": True, "system": "SilverTorch",
            "recall": 0.9, "agree": 1.0, "rps": 400.0, "rps_spread": float("nan"), "p50_ms": 70.0, "p99_ms": 90.0,
            "errors": 0, "speedup": 1.0, "cpu_ms": {"server": 3.0, "client": 1.0}}


def test_mesh_section_runs_in_a_child_and_keeps_rows_of_a_child_that_died(tmp_path: Path, monkeypatch) -> None:
    from benchmarks.suite_sections import mesh_section

    calls = _fake_mesh_child(monkeypatch, returncode=0, rows=[MESH_ROW])
    data = mesh_section(SuiteContext("full", tmp_path, log=lambda *_: None, show_progress=False))
    assert calls[0][1:3] == ["-m", "benchmarks.mesh_bench"] and "--quick" not in calls[0]
    assert data["rows"][0]["rps"] == 400.0 and math.isnan(data["rows"][0]["rps_spread"])
    assert data["notes"] == ["n1"] and data["report"] == "benchmarks_mesh.md"

    # killed (e.g. out of memory in the 10M workload) after one workload: rows kept, the end named
    calls = _fake_mesh_child(monkeypatch, returncode=-9, rows=[MESH_ROW])
    data = mesh_section(SuiteContext("quick", tmp_path, log=lambda *_: None, show_progress=False))
    assert "--quick" in calls[0] and len(data["rows"]) == 1
    assert "killed by signal 9" in data["notes"][-1]

    # died before any workload: the section fails with the status
    _fake_mesh_child(monkeypatch, returncode=3, rows=None)
    with pytest.raises(RuntimeError, match="status 3 before measuring any workload"):
        mesh_section(SuiteContext("quick", tmp_path, log=lambda *_: None, show_progress=False))


def test_mesh_bench_writes_report_and_json_as_it_goes(tmp_path: Path) -> None:
    """The mesh benchmark's partial result (what the suite reads back) survives NaN and renders."""
    import json
    import time

    from benchmarks import mesh_bench
    from benchmarks.mesh.settings import MeshSettings

    mesh_row = {**MESH_ROW, "system": "mesh IVF-Flat", "rps": 100.0,
                "cpu_ms": {"user_tower": 1.0, "ann": 6.0, "scoring": 4.0, "orchestrator": 3.0, "client": 2.0}}
    res = mesh_bench._result(False, True, False, MeshSettings.like_server(), (0.1, 0.2, 0.3),
                             [dict(MESH_ROW), mesh_row], ["a note"], time.perf_counter())
    assert res["command"] == "python -m benchmarks.mesh_bench --no-10m"
    mesh_bench._write(res, tmp_path, tmp_path / "m.json")
    back = json.loads((tmp_path / "m.json").read_text())
    assert back["rows"][1]["speedup"] == pytest.approx(4.0) and math.isnan(back["rows"][0]["rps_spread"])
    md = (tmp_path / "benchmarks_mesh.md").read_text()
    assert "mesh IVF-Flat: 4.00x (recall 0.900)" in md and "- a note" in md
    # where the CPU goes: per process, the serving total and the total with the load generator
    cpu = _tables(md, "## Where the CPU goes")[0]
    mesh = next(r for r in cpu[1:] if r[3] == "mesh IVF-Flat")
    assert mesh[4] == "user_tower 1.00 + ann 6.00 + scoring 4.00 + orchestrator 3.00"
    assert _num(mesh[5]) == 14 and _num(mesh[6]) == 2 and _num(mesh[7]) == 16
    assert (tmp_path / "benchmarks_mesh.png").stat().st_size > 1000


def test_mesh_target_explains_a_miss_with_the_measured_cpu_per_request() -> None:
    from benchmarks.suite import SectionResult
    from benchmarks.targets import suite_targets

    st = {**MESH_ROW, "rps": 450.0, "cpu_ms": {"server": 3.0, "client": 1.0}}
    mesh = {**MESH_ROW, "system": "mesh IVF-Flat", "rps": 300.0,
            "cpu_ms": {"user_tower": 0.5, "ann": 2.0, "scoring": 1.5, "orchestrator": 1.0, "client": 1.0}}
    results = {"mesh": SectionResult("mesh", "ok", 1.0, {"rows": [st, mesh]})}
    target = suite_targets(results)[0]
    assert target.name == "SilverTorch vs mesh" and target.ratio == pytest.approx(1.5) and not target.met
    assert "SilverTorch 4.00 ms, the mesh 6.00 ms" in target.why and "their ratio, 1.50x" in target.why
