"""Helpers of the server tests (imported by tests/test_serve_*.py; not a pytest conftest).

- :func:`movielens_artifact`: a MovieLens-100k artifact (untrained towers, seeded: a real catalog,
  real vocabularies and titles, built in seconds), cached per process and seed;
- :class:`ServerProcess`: ``silvertorch serve`` in a real subprocess on a free loopback port,
  with a keep-alive ``httpx.Client``; ``kill()`` sends SIGKILL (crash), ``stop()`` SIGTERM.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "movielens_100k.toml"
USER = {"user_id": "196", "age_bucket": "45-49", "gender": "M", "occupation": "writer",
        "zip_prefix": "55"}


@lru_cache(maxsize=4)
def movielens_artifact(seed: int = 0) -> Path:
    """Artifact directory of a seeded, untrained MovieLens two-tower + IVF index (nlist 16)."""
    from silvertorch.export import write_artifact
    from train.build_index import assemble, build_item_index, embed_catalog
    from train.builders import build_model, load_dataset
    from train.config import load_train_config

    cfg = load_train_config(CONFIG, [f"train.seed={seed}", "joint.nlist=16"])
    ds = load_dataset(cfg.data)
    torch.manual_seed(seed)
    two = build_model(cfg, ds, "cpu").eval()
    index = build_item_index(embed_catalog(two, ds), cfg, ds.items.features)
    model = assemble(cfg.retrieval, two, index, ds)
    vocab = lambda feats: {n: list(a.vocab) for n, a in feats.features.items() if a.vocab is not None}  # noqa: E731
    root = Path(tempfile.mkdtemp(prefix=f"st-serve-art{seed}-"))
    atexit.register(shutil.rmtree, root, True)
    out = root / "artifact"
    write_artifact(out, model, two.item_tower, config={"test": True, "seed": seed},
                   user_vocab=vocab(ds.users.features), item_vocab=vocab(ds.items.features),
                   item_raw_ids=list(ds.items.raw_ids), item_titles=list(ds.items.titles or []),
                   export_programs=False)
    return out


class ServerProcess:
    """A ``silvertorch serve`` subprocess bound to 127.0.0.1 on a free port."""

    def __init__(self, artifact: Path, state_dir: Path, *overrides: str) -> None:
        self.artifact, self.state_dir, self.overrides = artifact, state_dir, list(overrides)
        self.proc: subprocess.Popen | None = None
        self.client: httpx.Client | None = None
        self.url = ""

    def start(self, timeout: float = 120.0) -> ServerProcess:
        port_dir = Path(tempfile.mkdtemp(prefix="st-port-"))
        atexit.register(shutil.rmtree, port_dir, True)
        port_file = port_dir / "port"
        cmd = [sys.executable, "-m", "launch.cli", "serve", str(self.artifact), "--host", "127.0.0.1",
               "--port", "0", "--state-dir", str(self.state_dir), "--port-file", str(port_file),
               "--set", "threads=1", *[a for o in self.overrides for a in ("--set", o)]]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("server did not start in time")
            time.sleep(0.1)
        self.url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        self.client = httpx.Client(base_url=self.url, timeout=60.0)
        while self.client.get("/readyz").status_code != 200:
            time.sleep(0.05)
        return self

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        assert self.client is not None
        return self.client.request(method, path, **kw)

    def retrieve(self, **body: Any) -> httpx.Response:
        return self.request("POST", "/v1/retrieve", json={"user": USER, **body})

    def kill(self) -> None:
        """SIGKILL: a crash (nothing flushed beyond what was fsynced)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._close()

    def stop(self) -> str:
        """SIGTERM and wait; returns the server's output."""
        out = ""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                out = self.proc.communicate(timeout=30)[0] or ""
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out = self.proc.communicate()[0] or ""
        self._close()
        return out

    def _close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


_SHARED: dict[str, ServerProcess] = {}


def shared_server() -> ServerProcess:
    """One server on the seed-0 artifact shared by the API and consistency test modules
    (they use distinct item ids); small limits so the 413 cases are cheap to trigger."""
    if "main" not in _SHARED:
        state = Path(tempfile.mkdtemp(prefix="st-serve-state-"))
        atexit.register(shutil.rmtree, state, True)
        server = ServerProcess(movielens_artifact(0), state, "max_body_bytes=65536",
                               "max_upsert_batch=8", "max_k=500", "compaction_threshold=0").start()
        atexit.register(server.stop)
        _SHARED["main"] = server
    return _SHARED["main"]


def item_ids(resp: httpx.Response) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [it["id"] for it in resp.json()["items"]]


def info(server: ServerProcess) -> dict[str, Any]:
    r = server.request("GET", "/v1/info")
    assert r.status_code == 200, r.text
    return r.json()
