"""The sharded server: 2 worker processes (gloo) on a sharded artifact behind one HTTP leader.

Answers equal the unsharded model's (ids and scores, with and without filters); bad requests get
400 and never reach the follower; a compaction before any update works (its snapshot, seq 0, is
what the restart starts from; more in ``tests/test_sharded_admin.py``); item upserts (new, in place, by
features), deletes and attribute patches are visible at once and every answer equals the
single-process server's (``serve.served.Served``) after the same updates, generation included; a
restart replays the leader's update log; after the follower is SIGKILLed the next request fails
fast with 503 naming the cause (no hang) and ``/healthz`` reports it.
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

from serve.schemas import ItemUpsert
from serve.served import Served
from silvertorch.export import encode_user_features, load_artifact, write_artifact
from silvertorch.export_sharded import load_sharded_part
from tests.test_export import USER_VOCAB, build, item_vocab
from tests.test_export_sharded import write

ROOT = Path(__file__).resolve().parents[1]
USERS = [{"user_id": "u3", "gender": "F"}, {"user_id": "u7", "gender": "M"}, {"user_id": "nobody"}]
FILTERS = [None, "genre:comedy OR decade:1990", "NOT genre:drama"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(art: Path, tmp: Path, state: Path, tag: str, extra: tuple[str, ...] = ()
           ) -> tuple[list[subprocess.Popen], httpx.Client]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    port_file = tmp / f"port-{tag}"
    procs = []
    for rank in range(2):
        log = open(tmp / f"rank{rank}-{tag}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "serve.sharded.worker", str(art), "--port", "0", "--port-file",
             str(port_file), "--timeout-s", "60", "--heartbeat-s", "1", "--state-dir", str(state), *extra],
            cwd=ROOT, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 180  # a hang guard, not a timing check
    while not port_file.exists() and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.1)
    if not port_file.exists():
        for p in procs:
            p.kill()
        logs = "\n".join((tmp / f"rank{r}-{tag}.log").read_text() for r in range(2))
        pytest.fail(f"the sharded server did not start:\n{logs}")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port_file.read_text()}", timeout=180)  # hang guard
    return procs, client


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    model, tower, items = build()
    tmp = tmp_path_factory.mktemp("sserve")
    art = write(tmp / "art", model, tower, items, num_shards=2)
    # the single-process reference: the same model as an unsharded artifact behind `Served`
    flat = write_artifact(tmp / "flat", model, tower, config={"note": "test"}, user_vocab=USER_VOCAB,
                          item_vocab=item_vocab(items), item_raw_ids=[f"m{i}" for i in range(items.num_items)],
                          export_programs=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference runs here: leave the 2 CI cores to the ranks
    procs, client = _start(art, tmp, tmp / "state", "a")
    srv = {"client": client, "procs": procs, "model": model, "tmp": tmp, "art": art,
           "flat": Served(load_artifact(flat), tmp / "flat_state", max_k=1000)}
    yield srv
    srv["client"].close()
    srv["flat"].close()
    _stop(srv["procs"])
    torch.set_num_threads(threads)


def _same_as_flat(c: httpx.Client, flat: Served, k: int = 40) -> None:
    """Every user x filter answer of the sharded server equals the single-process server's."""
    for user in USERS:
        for f in FILTERS:
            r = c.post("/v1/retrieve", json={"user": user, "k": k, "filter": f})
            assert r.status_code == 200, r.text
            want = flat.run_queries([flat.parse_query(user, k, f, None, None)])[0]
            got = r.json()
            assert got["items"] == want["items"], (user, f)
            assert got["generation"] == want["generation"]


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
    assert c.put("/v1/items", json={"items": []}).status_code == 400  # validated on the leader
    r = c.post("/v1/admin/compact")  # before any update: snapshot seq 0 (the restart test loads it)
    assert r.status_code == 200 and r.json()["seq"] == 0, r.text
    assert c.post("/v1/retrieve", json={"user": USERS[1], "k": 3}).status_code == 200  # still in step


@torch.no_grad()
def test_item_updates_are_visible_at_once_and_equal_the_single_process_server(server) -> None:
    c, flat = server["client"], server["flat"]
    keys = list(flat.model.user_tower.feature_names)
    query = flat.model.user_tower(encode_user_features(USER_VOCAB, [USERS[0]], keys))  # (1, D)
    top = [it["id"] for it in c.post("/v1/retrieve", json={"user": USERS[0], "k": 30}).json()["items"]]
    # the leader (shard 0) answers: updates of items on shard 1 must reach its replicated tables
    on1 = {f"m{i}" for i in torch.nonzero(load_sharded_part(server["art"], rank=1, world_size=2)
                                          .model.item_slot >= 0).flatten().tolist()}
    top = [next(t for t in top if t not in on1), *[t for t in top if t in on1][:2]]
    updates = [  # (HTTP method, path, body, the same update on the single-process server)
        ("PUT", "/v1/items", {"items": [{"id": "new1", "vector": query[0].tolist(),
                                         "attributes": {"genre": ["comedy"], "decade": ["1990"]}, "title": "N1"},
                                        {"id": "new2", "vector": (-query[0]).tolist()}]},
         lambda b: flat.prepare_upsert([ItemUpsert(**i) for i in b["items"]])),
        ("PUT", "/v1/items", {"items": [{"id": "new3", "features": {"genre": ["drama"]}},
                                        {"id": top[2], "vector": (0.5 * query[0]).tolist()}]},
         lambda b: flat.prepare_upsert([ItemUpsert(**i) for i in b["items"]])),
        ("DELETE", f"/v1/items/{top[0]}", None, lambda b: flat.prepare_delete(top[0])),
        ("PATCH", f"/v1/items/{top[1]}/attributes", {"attributes": {"genre": ["comedy", "drama"]}},
         lambda b: flat.prepare_patch(top[1], b["attributes"])),
        ("PUT", "/v1/items", {"items": [{"id": top[1], "vector": (0.9 * query[0]).tolist(),
                                         "attributes": {"decade": ["1970"]}}]},
         lambda b: flat.prepare_upsert([ItemUpsert(**i) for i in b["items"]])),
        ("PATCH", "/v1/items/new1/attributes", {"attributes": {"decade": ["1980"]}},
         lambda b: flat.prepare_patch("new1", b["attributes"])),
    ]
    for method, path, body, same in updates:
        r = c.request(method, path, json=body)
        assert r.status_code == 200, r.text
        record = same(body)
        flat.apply_checked(record)
        assert r.json()["generation"] == flat.generation and r.json()["seq"] >= 1
        _same_as_flat(c, flat)  # read-after-write: the very next answers see the update
    got = {it["id"] for it in c.post("/v1/retrieve", json={"user": USERS[0], "k": 40}).json()["items"]}
    assert "new1" in got and top[0] not in got
    comedy = c.post("/v1/retrieve", json={"user": USERS[0], "k": 40, "filter": "decade:1980"}).json()["items"]
    assert "new1" in {it["id"] for it in comedy}
    # refusals: named, nothing written on any rank (the generation stays)
    gen = flat.generation
    for method, path, body, status in [("DELETE", f"/v1/items/{top[0]}", None, 404),
                                       ("DELETE", "/v1/items/nope", None, 404),
                                       ("PATCH", "/v1/items/new1/attributes", {"attributes": {"shoe": ["x"]}}, 400),
                                       ("PUT", "/v1/items", {"items": [{"id": "x", "vector": [1.0]}]}, 400),
                                       ("PUT", "/v1/items", {"items": [{"id": "y", "vector": [0.0] * 8,
                                                                        "attributes": {"decade": ["1990"]},
                                                                        "features": {"genre": ["x"]}}]}, 400)]:
        r = c.request(method, path, json=body)
        assert r.status_code == status, r.text
    assert c.get("/v1/info").json()["generation"] == gen
    _same_as_flat(c, flat)


def test_a_restart_replays_the_update_log(server) -> None:
    _stop(server["procs"])
    server["client"].close()
    server["procs"], server["client"] = _start(server["art"], server["tmp"], server["tmp"] / "state", "b")
    c, flat = server["client"], server["flat"]
    info = c.get("/v1/info").json()
    assert info["replayed"] == 6 and info["generation"] == flat.generation and info["snapshot_seq"] == 0
    assert info["stats"]["live_items"] == flat.stats()["live_items"]
    _same_as_flat(c, flat)


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
