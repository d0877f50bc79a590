"""The sharded server: 2 worker processes (gloo) on a sharded artifact behind one HTTP leader.

Answers equal the unsharded model's (ids and scores, with and without filters); bad requests get
400 and never reach the follower; update routes answer 501; after the follower is SIGKILLed the
next request fails fast with 503 naming the cause (no hang) and ``/healthz`` reports it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from silvertorch.export import encode_user_features
from tests.test_export import USER_VOCAB, build
from tests.test_export_sharded import write

ROOT = Path(__file__).resolve().parents[1]
USERS = [{"user_id": "u3", "gender": "F"}, {"user_id": "u7", "gender": "M"}, {"user_id": "nobody"}]
FILTERS = [None, "genre:comedy OR decade:1990", "NOT genre:drama"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    model, tower, items = build()
    tmp = tmp_path_factory.mktemp("sserve")
    art = write(tmp / "art", model, tower, items, num_shards=2)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    port_file = tmp / "port"
    procs = []
    for rank in range(2):
        log = open(tmp / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "serve.sharded.worker", str(art), "--port", "0", "--port-file",
             str(port_file), "--timeout-s", "10", "--heartbeat-s", "1"],
            cwd=ROOT, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 180  # a hang guard, not a timing check
    while not port_file.exists() and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.1)
    if not port_file.exists():
        for p in procs:
            p.kill()
        logs = "\n".join((tmp / f"rank{r}.log").read_text() for r in range(2))
        pytest.fail(f"the sharded server did not start:\n{logs}")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port_file.read_text()}", timeout=60)
    yield {"client": client, "procs": procs, "model": model, "tmp": tmp}
    client.close()
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


@torch.no_grad()
def test_answers_equal_the_unsharded_model_and_bad_requests_are_refused(server) -> None:
    c, model = server["client"], server["model"]
    keys = list(model.user_tower.feature_names)
    assert c.get("/healthz").json()["status"] == "ok"
    assert c.get("/v1/info").json()["shards"] == 2
    for user in USERS:
        for f in FILTERS:
            r = c.post("/v1/retrieve", json={"user": user, "k": 15, "filter": f})
            assert r.status_code == 200, r.text
            got = r.json()["items"]
            want = model.retrieve(encode_user_features(USER_VOCAB, [user], keys), 15, [f] if f else None)
            n = int((want.ids[0] >= 0).sum())
            assert [it["id"] for it in got] == [f"m{i}" for i in want.ids[0, :n].tolist()], (user, f)
            assert [it["score"] for it in got] == want.scores[0, :n].tolist()
            assert [it["retrieval_score"] for it in got] == want.retrieval_scores[0, :n].tolist()
    bad = [({"user": USERS[0], "k": 0}, "k"), ({"user": USERS[0], "filter": "genre:("}, "filter"),
           ({"user": {"shoe": "x"}}, "user"), ({"user": USERS[0], "value_weights": [1.0]}, "value_weights")]
    for body, field in bad:
        r = c.post("/v1/retrieve", json=body)
        assert r.status_code == 400 and r.json()["detail"].startswith(field), r.text
    assert c.put("/v1/items", json={"items": []}).status_code == 501
    assert c.post("/v1/retrieve", json={"user": USERS[1], "k": 3}).status_code == 200  # still in step


def test_a_killed_follower_fails_requests_fast_and_healthz_reports_it(server) -> None:
    c, procs = server["client"], server["procs"]
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait(30)
    r = c.post("/v1/retrieve", json={"user": USERS[0], "k": 5})  # httpx timeout = the hang guard
    assert r.status_code == 503, r.text
    assert "unavailable" in r.json()["detail"] and "restart all ranks" in r.json()["detail"]
    h = c.get("/healthz")
    assert h.status_code == 503 and "rank" in h.json()["detail"]
    assert c.get("/readyz").status_code == 503
    assert procs[0].poll() is None  # the leader stays up to report it
