"""Compaction and hot swap on the sharded server: 2 worker processes (gloo) behind one HTTP leader.

- compaction: every answer (ids, titles, composite / task / retrieval scores, generation) equals the
  single-process server's after the same updates and ``compact_state`` (fresh items folded into
  clusters owned by either rank, tombstones dropped); the log is truncated to the snapshot; a
  restart loads the per-rank snapshots, replays only the log tail and answers the same; a second
  compaction (clusters held by two ranks) still matches;
- a mismatched artifact (another shard count, a corrupt part that only rank 1 loads, another plan,
  the version already served) is refused with the mismatch named, and the old model keeps serving;
- hot swap: concurrent requests during the swap each read entirely the old or entirely the new
  model (their answer equals that model's), and after it every answer is the new model's.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from serve.schemas import ItemUpsert
from serve.served import Served
from silvertorch.catalog import CatalogUpdater, compact_state
from silvertorch.export import encode_user_features, load_artifact, write_artifact
from tests.test_distributed_sharded_serve import FILTERS, USERS, _same_as_flat, _start, _stop
from tests.test_export import USER_VOCAB, build, item_vocab
from serve.sharded.admin import global_offsets_for
from tests.test_export_sharded import write


def _flat(tmp: Path, name: str, model, tower, items) -> Served:
    art = write_artifact(tmp / name, model, tower, config={"note": "test"}, user_vocab=USER_VOCAB,
                         item_vocab=item_vocab(items), item_raw_ids=[f"m{i}" for i in range(items.num_items)],
                         export_programs=False)
    return Served(load_artifact(art), tmp / f"{name}_state", max_k=1000)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("sadmin")
    model, tower, items = build()
    model2, tower2, items2 = build(seed=1)
    art = write(tmp / "art", model, tower, items, num_shards=2)
    art2 = write(tmp / "art2", model2, tower2, items2, num_shards=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the references run here: leave the 2 CI cores to the ranks
    srv = {"tmp": tmp, "art": art, "art2": art2, "model2": (model2, tower2, items2),
           "flat": _flat(tmp, "flat", model, tower, items), "flat2": _flat(tmp, "flat2", model2, tower2, items2)}
    srv["procs"], srv["client"] = _start(art, tmp, tmp / "state", "a")
    yield srv
    srv["client"].close()
    srv["flat"].close()
    srv["flat2"].close()
    _stop(srv["procs"])
    torch.set_num_threads(threads)


def _apply(c, flat: Served, method: str, path: str, body, record) -> None:
    r = c.request(method, path, json=body)
    assert r.status_code == 200, r.text
    flat.apply_checked(record)
    assert r.json()["generation"] == flat.generation


def _compact_flat(flat: Served) -> None:
    flat.model.load_state_dict(compact_state(flat.model.state_dict()))
    flat.updater = CatalogUpdater(flat.model)


@torch.no_grad()
def test_compaction_keeps_answers_and_a_restart_after_it_replays(server) -> None:
    c, flat, tmp = server["client"], server["flat"], server["tmp"]
    keys = list(flat.model.user_tower.feature_names)
    query = flat.model.user_tower(encode_user_features(USER_VOCAB, [USERS[0]], keys))[0]
    # one new item at every centroid: they fold into clusters of both ranks; one near the query
    cents = flat.model.index.ivf.centroids
    items = [{"id": f"c{j}", "vector": (cents[j] * 1.5).tolist(),
              "attributes": {"genre": ["comedy"]} if j % 2 else None} for j in range(cents.shape[0])]
    items.append({"id": "near", "vector": query.tolist(), "attributes": {"decade": ["1990"]}})
    _apply(c, flat, "PUT", "/v1/items", {"items": items},
           flat.prepare_upsert([ItemUpsert(**i) for i in items]))
    top = [it["id"] for it in c.post("/v1/retrieve", json={"user": USERS[0], "k": 12}).json()["items"]]
    top = [t for t in top if t.startswith("m")]
    for raw in top[:3]:  # tombstones (the answers hold items of both ranks)
        _apply(c, flat, "DELETE", f"/v1/items/{raw}", None, flat.prepare_delete(raw))
    _apply(c, flat, "DELETE", "/v1/items/c1", None, flat.prepare_delete("c1"))  # a fresh tombstone
    _same_as_flat(c, flat)
    before = c.get("/v1/info").json()
    sdir = tmp / "state" / before["version"]

    # rank 1 cannot write its snapshot (a directory sits at its path): the vote fails, every rank
    # keeps its state, the answer names the rank, nothing is committed
    (sdir / "snapshot-shard-00001-5.pt").mkdir()
    r = c.post("/v1/admin/compact")
    assert r.status_code == 500 and "rank 1: snapshot write failed" in r.json()["detail"], r.text
    assert "rank 0" not in r.json()["detail"] and not (sdir / "snapshot.json").exists()
    assert not (sdir / "snapshot-shard-00000-5.pt").exists()  # rank 0 dropped its new file
    _same_as_flat(c, flat)  # not compacted anywhere: still the uncompacted reference's answers
    (sdir / "snapshot-shard-00001-5.pt").rmdir()

    r = c.post("/v1/admin/compact")
    assert r.status_code == 200, r.text
    assert r.json()["started"] is True and r.json()["seq"] == 5
    _compact_flat(flat)
    _same_as_flat(c, flat)  # the single-process compaction's answers, bit for bit
    info = c.get("/v1/info").json()
    assert info["generation"] == before["generation"] and info["snapshot_seq"] == 5
    assert info["stats"]["shard_tombstones"] == 0 and info["stats"]["shard_fresh_items"] == 0
    assert (sdir / "snapshot-shard-00000-5.pt").exists() and (sdir / "snapshot-shard-00001-5.pt").exists()
    assert json.loads((sdir / "snapshot.json").read_text()) == {"seq": 5}
    assert len((sdir / "log.jsonl").read_text().splitlines()) == 1  # the header only

    # updates after the compaction, then a restart: snapshots + the log tail give the same state
    more = [{"id": "late", "vector": (-query).tolist()}, {"id": "c2", "vector": (0.5 * query).tolist()}]
    _apply(c, flat, "PUT", "/v1/items", {"items": more}, flat.prepare_upsert([ItemUpsert(**i) for i in more]))
    _apply(c, flat, "DELETE", f"/v1/items/{top[3]}", None, flat.prepare_delete(top[3]))
    _same_as_flat(c, flat)
    _stop(server["procs"])
    c.close()
    server["procs"], server["client"] = _start(server["art"], tmp, tmp / "state", "b",
                                               ("--compaction-threshold", "3"))
    c = server["client"]
    info = c.get("/v1/info").json()
    assert info["snapshot_seq"] == 5 and info["replayed"] == 2 and info["generation"] == flat.generation
    _same_as_flat(c, flat)

    # the third record since the snapshot starts an automatic compaction (threshold 3); clusters
    # now held by two ranks fold again in the unsharded order
    _apply(c, flat, "PATCH", "/v1/items/near/attributes", {"attributes": {"genre": ["drama"]}},
           flat.prepare_patch("near", {"genre": ["drama"]}))
    _compact_flat(flat)
    _same_as_flat(c, flat)
    info = c.get("/v1/info").json()
    assert info["snapshot_seq"] == 8 and info["compactions"] == 1
    assert not (sdir / "snapshot-shard-00000-5.pt").exists()  # the leader keeps only the committed set


def _client(tmp: Path, tag: str):
    import httpx

    return httpx.Client(base_url=f"http://127.0.0.1:{(tmp / f'port-{tag}').read_text()}", timeout=180)


def test_a_mismatched_artifact_is_refused_and_the_old_model_keeps_serving(server) -> None:
    c, flat, tmp = server["client"], server["flat"], server["tmp"]
    version = c.get("/v1/info").json()["version"]
    model2, tower2, items2 = server["model2"]
    three = write(tmp / "art3", model2, tower2, items2, num_shards=3)
    r = c.post("/v1/admin/load", json={"path": str(three)})
    assert r.status_code == 400 and "world size 2 does not fit" in r.json()["detail"], r.text
    bad = tmp / "art2-bad"
    shutil.copytree(server["art2"], bad)
    part1 = bad / "part-00001.pt"
    data = bytearray(part1.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part1.write_bytes(bytes(data))
    r = c.post("/v1/admin/load", json={"path": str(bad)})  # only rank 1 loads that part
    assert r.status_code == 400, r.text
    assert "rank 1" in r.json()["detail"] and "sha256" in r.json()["detail"] and "rank 0:" not in r.json()["detail"]
    plan = tmp / "other-plan.json"
    plan.write_text(json.dumps({"shards": 2, "replicas": 1, "model": {}}))
    r = c.post("/v1/admin/load", json={"path": str(server["art2"]), "plan": str(plan)})
    assert r.status_code == 400 and "plan" in r.json()["detail"], r.text
    assert c.post("/v1/admin/load", json={"path": str(tmp / "nowhere")}).status_code == 400
    assert c.post("/v1/admin/load", json={"path": str(server["art"])}).status_code == 409
    assert c.get("/v1/info").json()["version"] == version
    _same_as_flat(c, flat)  # both ranks still serve the old model, in step


def test_hot_swap_switches_every_rank_at_one_batch_boundary(server) -> None:
    c, flat, flat2 = server["client"], server["flat"], server["flat2"]
    old = c.get("/v1/info").json()["version"]
    new = json.loads((server["art2"] / "manifest.json").read_text())["version_id"]
    cases = [(u, f) for u in USERS for f in FILTERS]
    want = {version: {i: ref.run_queries([ref.parse_query(u, 20, f, None, None)])[0]["items"]
                      for i, (u, f) in enumerate(cases)} for version, ref in ((old, flat), (new, flat2))}
    assert want[old] != want[new]
    seen: list[tuple[str, int, list]] = []
    stop, going = threading.Event(), threading.Event()

    def traffic() -> None:
        with _client(server["tmp"], "b") as cl:
            i = 0
            while not stop.is_set() or i < len(cases):
                u, f = cases[i % len(cases)]
                r = cl.post("/v1/retrieve", json={"user": u, "k": 20, "filter": f})
                assert r.status_code == 200, r.text
                seen.append((r.json()["version"], i % len(cases), r.json()["items"]))
                i += 1
                if i == len(cases):
                    going.set()  # the swap starts while this traffic goes on

    t = threading.Thread(target=traffic)
    t.start()
    assert going.wait(300)
    r = c.post("/v1/admin/load", json={"path": str(server["art2"])})
    stop.set()
    t.join(300)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == new and r.json()["previous_version"] == old and r.json()["generation"] == 0
    assert {v for v, _, _ in seen} == {old, new} and seen[0][0] == old and seen[-1][0] == new
    for version, i, items in seen:  # never a mix: each answer is entirely one model's
        assert items == want[version][i], (version, cases[i])
    _same_as_flat(c, flat2)
    info = c.get("/v1/info").json()
    assert info["version"] == new and c.get("/readyz").json()["version"] == new


def test_global_offsets_put_the_owner_first_within_a_cluster() -> None:
    counts = torch.tensor([[70, 0, 3], [5, 64, 0]])  # (R=2, C=3): cluster 0 held by both ranks
    owner = torch.tensor([0, 1, 0])
    # cluster starts: 64-aligned spans of the totals 75, 64, 3 -> 0, 128, 192 (end 256); a rank's
    # start in a cluster is after the items of the ranks before it there (owner first)
    assert global_offsets_for(counts, owner, 0).tolist() == [0, 128 + 64, 192, 256]
    assert global_offsets_for(counts, owner, 1).tolist() == [70, 128, 192 + 3, 256]
    assert global_offsets_for(counts, torch.tensor([1, 1, 0]), 0).tolist() == [5, 192, 192, 256]
