"""The end of ``make demo``: export the demo's checkpoint as an artifact, serve it, query it over
HTTP (with and without a filter), add a new movie and show it is retrievable at once, stop.

    python -m serve.demo --config configs/movielens_100k.toml [--checkpoint C] [--artifact DIR]

The export runs as ``silvertorch export`` in a subprocess and the server as ``silvertorch serve``
in another (this module imports neither ``train`` nor the server: it is a client).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
USER = {"user_id": "196", "age_bucket": "45-49", "gender": "M", "occupation": "writer", "zip_prefix": "55"}
FILTER = "genre:Comedy AND NOT decade:1990s"
NEW_MOVIE = {"id": "st-2026-1", "title": "Silver Torch: Index as Model (2026)",
             "features": {"genre": ["Sci-Fi", "Adventure"], "year": "1995-1999", "decade": "1990s"},
             "attributes": {"genre": ["Sci-Fi", "Adventure"], "decade": ["1990s"]}}
NEW_FILTER = "genre:Sci-Fi AND genre:Adventure AND decade:1990s"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "launch.cli", *args]


def _row(rank: int, it: dict[str, Any], mark: str | None) -> str:
    tasks = " ".join(f"{t}={p:.3f}" for t, p in it["task_scores"].items())
    star = "NEW " if it["id"] == mark else "    "
    return f"    {rank:>2}. {star}{it['title'][:48]:<48} score {it['score']:.3f}  {tasks}"


def _show(title: str, body: dict[str, Any], mark: str | None = None, top: int = 10) -> None:
    """Print the first ``top`` items of a retrieve answer; an item ``mark`` ranked below them is
    printed too, after an ellipsis, at its true rank (the answer must hold more than ``top``)."""
    print(f"  {title}  (artifact {body['version'][:24]}..., generation {body['generation']})")
    items = body["items"]
    if not items:
        print("      (no results)")
    for rank, it in enumerate(items[:top], 1):
        print(_row(rank, it, mark))
    below = [(rank, it) for rank, it in enumerate(items, 1) if rank > top and it["id"] == mark]
    for rank, it in below:
        if rank > top + 1:
            print(f"        ... ranks {top + 1}-{rank - 1} not shown ...")
        print(_row(rank, it, mark))


def start_server(artifact: Path, state_dir: Path, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """``silvertorch serve`` on a free loopback port; returns (process, base URL) once ready."""
    port_file = Path(tempfile.mkdtemp(prefix="st-demo-")) / "port"
    proc = subprocess.Popen(_cli("serve", str(artifact), "--host", "127.0.0.1", "--port", "0",
                                 "--state-dir", str(state_dir), "--port-file", str(port_file)),
                            cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start (exit code {proc.poll()})")
        time.sleep(0.1)
    url = f"http://127.0.0.1:{port_file.read_text().strip()}"
    shutil.rmtree(port_file.parent, ignore_errors=True)
    while httpx.get(f"{url}/readyz").status_code != 200:
        time.sleep(0.05)
    return proc, url


def run(config: str, checkpoint: str, artifact: str, state_dir: str) -> int:
    art = Path(artifact)
    print(f"\n== serving: export {checkpoint} -> {art}")
    code = subprocess.call(_cli("export", "--config", config, "--checkpoint", checkpoint, "--out",
                                str(art), "--force"), cwd=ROOT)
    if code != 0:
        print(f"export failed (exit code {code})", file=sys.stderr)
        return code
    shutil.rmtree(state_dir, ignore_errors=True)  # demo scratch: start from the artifact alone
    start = time.perf_counter()
    proc, url = start_server(art, Path(state_dir))
    print(f"server ready at {url} in {time.perf_counter() - start:.1f}s (state in {state_dir})")
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            def retrieve(**body: Any) -> dict[str, Any]:
                r = c.post("/v1/retrieve", json={"user": USER, **body})
                r.raise_for_status()
                return r.json()

            print(f"POST /v1/retrieve for user {USER['user_id']} ({json.dumps(USER)}):")
            _show("top-10, no filter", retrieve(k=10))
            _show(f"top-10, filter {FILTER!r}", retrieve(k=10, filter=FILTER))
            nlist = c.get("/v1/info").json()["nlist"]  # probe every cluster: exact filtered lists
            before = retrieve(k=10, filter=NEW_FILTER, nprobe=nlist)
            _show(f"top-10, filter {NEW_FILTER!r} (before the upsert)", before)
            r = c.put("/v1/items", json={"items": [NEW_MOVIE]})
            r.raise_for_status()
            print(f"PUT /v1/items {NEW_MOVIE['title']!r} -> {r.json()} (durable in the update log)")
            after = retrieve(k=100, filter=NEW_FILTER, nprobe=nlist)
            ranked = [it["id"] for it in after["items"]]
            found = NEW_MOVIE["id"] in ranked
            _show("top-10 (and the new movie wherever it ranks), same filter, right after the upsert",
                  after, mark=NEW_MOVIE["id"])
            where = f"rank {ranked.index(NEW_MOVIE['id']) + 1} of {len(ranked)} eligible" if found else "absent"
            print(f"  the new movie is retrievable at once: {found} ({where})")
            r = c.delete(f"/v1/items/{NEW_MOVIE['id']}")
            gone = NEW_MOVIE["id"] not in [it["id"] for it in retrieve(k=10, filter=NEW_FILTER, nprobe=nlist)["items"]]
            print(f"DELETE /v1/items/{NEW_MOVIE['id']} -> {r.status_code}; gone from the next answer: {gone}")
            bad = c.post("/v1/retrieve", json={"user": USER, "filter": "genre:Comedy AND (decade:1990s"})
            print(f"a malformed filter -> {bad.status_code}: {bad.json()['detail'].splitlines()[0]}")
            if not found or not gone:
                return 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        print("server stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/movielens_100k.toml")
    p.add_argument("--checkpoint", default="runs/movielens_100k/checkpoint.pt")
    p.add_argument("--artifact", default="runs/movielens_100k/artifact")
    p.add_argument("--state-dir", default="runs/movielens_100k/serve_state")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    return run(a.config, a.checkpoint, a.artifact, a.state_dir)


if __name__ == "__main__":
    sys.exit(main())
