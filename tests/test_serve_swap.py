"""Hot swap under load: ``POST /v1/admin/load`` switches artifacts atomically while queries keep
flowing (no errors, no answer from the old artifact after the switch); a corrupt, tampered or
missing artifact is refused with the reason and the old one keeps serving."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx

from tests.conftest_serve import USER, ServerProcess, info, movielens_artifact


def test_hot_swap_under_load_and_refused_loads(tmp_path: Path) -> None:
    art_a, art_b = movielens_artifact(0), movielens_artifact(1)
    server = ServerProcess(art_a, tmp_path / "state").start()
    try:
        version_a = info(server)["version"]
        results: list[list[tuple[int, str]]] = [[] for _ in range(3)]
        stop = threading.Event()

        def reader(out: list[tuple[int, str]]) -> None:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                while not stop.is_set():
                    r = c.post("/v1/retrieve", json={"user": USER, "k": 10})
                    out.append((r.status_code, r.json().get("version", r.text)))

        threads = [threading.Thread(target=reader, args=(out,)) for out in results]
        for t in threads:
            t.start()
        try:
            while sum(map(len, results)) < 10:
                time.sleep(0.01)
            r = server.request("POST", "/v1/admin/load", json={"path": str(art_b)})
            assert r.status_code == 200, r.text
            version_b = r.json()["version"]
            assert r.json()["previous_version"] == version_a and version_b != version_a
            assert server.retrieve(k=5).json()["version"] == version_b  # read-after-swap
            n = sum(map(len, results))
            while sum(map(len, results)) < n + 10:
                time.sleep(0.01)
        finally:
            stop.set()
            for t in threads:
                t.join()
        for out in results:
            assert all(status == 200 for status, _ in out), out[:3]
            versions = [v for _, v in out]
            assert set(versions) <= {version_a, version_b}
            first_b = versions.index(version_b) if version_b in versions else len(versions)
            assert all(v == version_b for v in versions[first_b:])  # never back to the old one

        # refused loads: the old artifact keeps serving
        tampered = tmp_path / "tampered"
        shutil.copytree(art_a, tampered)
        data = bytearray((tampered / "tensors.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (tampered / "tensors.pt").write_bytes(bytes(data))
        truncated = tmp_path / "truncated"
        shutil.copytree(art_a, truncated)
        (truncated / "manifest.json").write_text("{")
        for path, reason in ((tampered, "sha256"), (truncated, "manifest"), (tmp_path / "nope", "no artifact")):
            r = server.request("POST", "/v1/admin/load", json={"path": str(path)})
            assert r.status_code == 400 and reason in r.json()["detail"], r.text
            assert server.retrieve(k=3).json()["version"] == version_b
        r = server.request("POST", "/v1/admin/load", json={"path": str(art_b)})
        assert r.status_code == 409  # already serving that version
        assert server.request("GET", "/readyz").json()["version"] == version_b
    finally:
        server.stop()
