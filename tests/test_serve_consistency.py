"""Concurrent queries during a stream of updates and a compaction: every answer is the exact
item set of one index generation (no torn reads), and each update is visible to the next query
(read-after-write)."""

from __future__ import annotations

import threading

import httpx

from tests.conftest_serve import USER, info, item_ids, shared_server

D = 64
FILTER = "item_id:7"  # catalog item 7 plus the stream's items, which all carry item_id 7
ALL = 16


def test_concurrent_queries_each_read_one_generation() -> None:
    server = shared_server()
    gen0 = info(server)["generation"]
    expected: dict[int, frozenset[str]] = {gen0: frozenset({"7"})}
    seen: list[tuple[int, frozenset[str]]] = []
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/retrieve", json={"user": USER, "k": 100, "nprobe": ALL, "filter": FILTER})
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                body = r.json()
                seen.append((body["generation"], frozenset(i["id"] for i in body["items"])))

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    live = {"7"}
    try:
        for step in range(24):
            if step % 3 == 2:  # delete an earlier one
                victim = f"cons-{step - 2}"
                r = server.request("DELETE", f"/v1/items/{victim}")
                live.discard(victim)
            else:
                new = f"cons-{step}"
                r = server.request("PUT", "/v1/items", json={"items": [
                    {"id": new, "vector": [((step * 7 + j) % 11 - 5) / 10 for j in range(D)],
                     "attributes": {"item_id": ["7"]}}]})
                live.add(new)
            assert r.status_code == 200, r.text
            expected[r.json()["generation"]] = frozenset(live)
            # read-after-write: the next query sees exactly this generation's items
            after = server.retrieve(k=100, nprobe=ALL, filter=FILTER)
            assert set(item_ids(after)) == live and after.json()["generation"] == r.json()["generation"]
            if step == 12:  # a compaction in the middle of the stream and the reads
                assert server.request("POST", "/v1/admin/compact").status_code == 200
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not errors, errors[:3]
    assert len(seen) > 20
    for generation, ids in seen:
        assert generation in expected, generation
        assert ids == expected[generation], (generation, sorted(ids), sorted(expected[generation]))
    import time

    deadline = time.monotonic() + 60
    while info(server)["compacting"] and time.monotonic() < deadline:
        time.sleep(0.1)
    metrics = server.request("GET", "/metrics").text
    done = [ln for ln in metrics.splitlines() if ln.startswith("silvertorch_compactions_total")]
    assert done and float(done[0].split()[-1]) >= 1  # the compaction swapped in under load
    assert set(item_ids(server.retrieve(k=100, nprobe=ALL, filter=FILTER))) == live
