"""The fast retrieve path, in-process: answers built as JSON bytes per batch equal the dict answers
byte for byte, the per-item head cache follows upserts (new items, changed titles), asyncio waiters
of one batch are answered together (a cancelled one does not disturb the rest), and the plain ASGI
endpoint keeps FastAPI's errors and the request metrics' route label."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import httpx
import orjson
import pytest

from serve.app import create_app
from serve.config import ServeConfig
from serve.engine import Engine
from serve.metrics import Metrics
from serve.served import Served
from tests.conftest_serve import movielens_artifact

USERS = [{"user_id": str(u), "gender": g} for u, g in ((1, "M"), (2, "F"), (3, "M"), (99999, "F"))]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    from silvertorch.export import load_artifact

    s = Served(load_artifact(movielens_artifact(0), verify=False), tmp_path_factory.mktemp("resp"), max_k=1000)
    yield s
    s.close()


def _queries(s: Served) -> list:
    specs = [(1, None, None), (10, "genre:Comedy", None), (100, None, [0.25, 0.75]),
             (1000, "genre:Drama AND NOT decade:1990s", None), (7, "genre:NoSuchGenre", None),
             (10, "item_id:5", [1.0, 0.0])]
    return [s.parse_query(USERS[i % len(USERS)], k, f, w[:len(s.tasks)] if w else None, None)
            for i, (k, f, w) in enumerate(specs)]


def test_bytes_answers_equal_the_dict_answers(served: Served) -> None:
    queries = _queries(served)
    dicts = served.run_queries(queries)
    as_bytes = served.run_queries(queries, as_json=True)
    mixed = served.run_queries(queries, as_json=[i % 2 == 0 for i in range(len(queries))])
    assert [len(d["items"]) for d in dicts][:3] == [1, 10, 100]
    assert dicts[4]["items"] == [] and dicts[4]["warnings"]  # unknown value: no items, a warning
    for d, b, m in zip(dicts, as_bytes, mixed):
        assert isinstance(b, bytes) and b == orjson.dumps(d)
        assert (m if isinstance(m, bytes) else orjson.dumps(m)) == b
    with pytest.raises(ValueError, match="as_json"):
        served.run_queries(queries, as_json=[True])


def test_item_heads_follow_upserts(tmp_path: Path) -> None:
    from silvertorch.export import load_artifact

    s = Served(load_artifact(movielens_artifact(0), verify=False), tmp_path, max_k=100)
    try:
        nlist = int(s.model.index.ivf.nlist)
        q = s.parse_query(USERS[0], 10, "item_id:5", None, nlist)
        first = orjson.loads(s.run_queries([q], as_json=True)[0])  # caches the head of item "5"
        assert [i["id"] for i in first["items"]] == ["5"]
        old_title = first["items"][0]["title"]
        items = [SimpleNamespace(id="5", features=None, vector=[0.1] * s.dim,
                                 attributes={"item_id": ["5"]}, title="Renamed (2026)"),
                 SimpleNamespace(id="brand-new", features=None, vector=[0.1] * s.dim,
                                 attributes={"item_id": ["5"]}, title='A "quoted" title \u00e9')]
        s.apply_checked(s.prepare_upsert(items))
        second = s.run_queries([q], as_json=True)[0]
        assert second == orjson.dumps(s.run_queries([q])[0])
        titles = {i["id"]: i["title"] for i in orjson.loads(second)["items"]}
        assert titles == {"5": "Renamed (2026)", "brand-new": 'A "quoted" title \u00e9'}
        assert old_title != "Renamed (2026)"
        assert orjson.loads(second)["generation"] == first["generation"] + 1
    finally:
        s.close()


def test_async_waiters_of_one_batch_are_answered_together(tmp_path: Path) -> None:
    from silvertorch.export import load_artifact

    served = Served(load_artifact(movielens_artifact(0), verify=False), tmp_path, max_k=1000)
    queries = _queries(served)
    expected = served.run_queries(queries, as_json=True)
    engine = Engine(served, ServeConfig(max_batch_size=64, max_wait_ms=0, threads=1,
                                        state_dir=str(tmp_path)), Metrics())

    async def main() -> list:
        waiters = [engine.query_async(q) for q in queries]
        extra = engine.query_async(queries[0])
        extra.cancel()  # its client went away before the batch ran
        engine.start()  # everything is queued: one batch
        return await asyncio.gather(*waiters)

    try:
        got = asyncio.run(main())
    finally:
        engine.stop()
    assert got == expected
    count = engine.metrics.registry.get_sample_value("silvertorch_batch_size_count")
    total = engine.metrics.registry.get_sample_value("silvertorch_batch_size_sum")
    assert (count, total) == (1, len(queries) + 1)


def test_plain_endpoint_errors_and_metrics(tmp_path: Path) -> None:
    from silvertorch.export import load_artifact

    cfg = ServeConfig(max_wait_ms=0, threads=1, state_dir=str(tmp_path), max_body_bytes=4096)
    served = Served(load_artifact(movielens_artifact(0), verify=False), tmp_path, max_k=100)
    engine = Engine(served, cfg, Metrics())
    metrics = engine.metrics
    engine.start()
    app = create_app(engine, metrics, lambda p: served)

    async def main() -> dict[str, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            post = lambda content, **kw: c.post("/v1/retrieve", content=content, **kw)  # noqa: E731
            js = {"content-type": "application/json"}
            return {
                "ok": await post(orjson.dumps({"user": USERS[0], "k": 3}), headers=js),
                "bad_json": await post(b'{"user": {', headers=js),
                "empty": await post(b"", headers=js),
                "not_json_type": await post(orjson.dumps({"user": {}}), headers={"content-type": "text/plain"}),
                "bad_k_type": await post(orjson.dumps({"user": {}, "k": "x"}), headers=js),
                "unknown_field": await post(orjson.dumps({"user": {}, "kk": 1}), headers=js),
                "k_range": await post(orjson.dumps({"user": {}, "k": 0}), headers=js),
                "too_big": await post(b" " * 5000, headers=js),
                "get": await c.get("/v1/retrieve"),
            }

    try:
        r = asyncio.run(main())
        metrics_text = metrics.render().decode()
        spec = app.fastapi.openapi()
    finally:
        engine.stop()
    assert r["ok"].status_code == 200 and len(r["ok"].json()["items"]) == 3
    assert r["bad_json"].status_code == 422 and r["bad_json"].json()["detail"].startswith("body: invalid JSON at position 10")
    assert r["empty"].status_code == 422 and r["empty"].json()["errors"][0]["field"] == "body"
    assert r["not_json_type"].status_code == 422
    assert r["bad_k_type"].status_code == 422 and r["bad_k_type"].json()["errors"][0]["field"] == "k"
    assert r["unknown_field"].status_code == 422 and "kk" in r["unknown_field"].json()["detail"]
    assert r["k_range"].status_code == 400 and r["k_range"].json()["detail"].startswith("k: must lie in [1, 100]")
    assert r["too_big"].status_code == 413
    assert r["get"].status_code == 405
    assert 'silvertorch_requests_total{method="POST",route="/v1/retrieve",status="200"} 1.0' in metrics_text
    assert 'silvertorch_requests_total{method="POST",route="/v1/retrieve",status="422"} 5.0' in metrics_text
    # the route is still described (request and response schemas) in the OpenAPI spec
    post = spec["paths"]["/v1/retrieve"]["post"]
    assert "requestBody" in post and "200" in post["responses"] and "422" in post["responses"]


def test_profile_tool_measures_cpu_per_request() -> None:
    from serve.profile_retrieve import measure

    res = measure(movielens_artifact(0), k=5, requests=48, concurrency=4, owner_breakdown=True)
    assert res["ok"] == 48 and res["mean_batch"] >= 1
    assert 0 < res["event_loop_cpu_ms_per_request"] <= res["cpu_ms_per_request"]
    parts = res["owner_cpu_ms_per_query_batch16"]
    assert set(parts) == {"encode_users", "compile_filters", "forward_no_filter",
                          "run_queries_dicts_plus_orjson", "run_queries_bytes"}
    assert all(v >= 0 for v in parts.values()) and parts["forward_no_filter"] > 0


def test_gc_freeze_setting_and_heap_freeze() -> None:
    import gc

    from serve.config import load_serve_config
    from serve.server import freeze_heap
    from silvertorch.config import ConfigError

    assert load_serve_config(None).gc_freeze is True
    assert load_serve_config(None, ["gc_freeze=false"]).gc_freeze is False
    with pytest.raises(ConfigError, match="gc_freeze"):
        load_serve_config(None, ["gc_freeze=3"])
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0  # what was alive is out of the collector's reach
    finally:
        gc.unfreeze()
