"""The HTTP API on a real server process: retrieve, filters, value weights, item updates visible
at once, health / readiness / metrics / OpenAPI, and every bad-input case of issue 5."""

from __future__ import annotations

import json

import pytest

from tests.conftest_serve import USER, info, item_ids, shared_server

D = 64  # the MovieLens config's tower output width
ALL = 16  # the test artifact's nlist: probing every cluster makes filtered results exact


@pytest.fixture(scope="module")
def server():
    return shared_server()


def test_retrieve_answers_k_items_with_scores_version_and_generation(server) -> None:
    r = server.retrieve(k=7)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == 7 and len(set(item_ids(r))) == 7
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert all(set(it["task_scores"]) == {"liked", "rated"} for it in body["items"])
    assert all(it["title"] for it in body["items"])  # MovieLens titles travel in the artifact
    assert body["version"] == info(server)["version"]
    assert isinstance(body["generation"], int)
    # unknown users / values map to OOV instead of failing
    r2 = server.request("POST", "/v1/retrieve", json={"user": {"user_id": "no-such-user", "gender": "?"}})
    assert r2.status_code == 200 and len(r2.json()["items"]) == 10


def test_value_weights_reweight_the_composite(server) -> None:
    liked_only = server.retrieve(k=5, value_weights={"liked": 1.0, "rated": 0.0}).json()
    for it in liked_only["items"]:
        assert it["score"] == pytest.approx(it["task_scores"]["liked"], abs=1e-5)
    as_list = server.retrieve(k=5, value_weights=[1.0, 0.0]).json()
    assert [i["id"] for i in as_list["items"]] == [i["id"] for i in liked_only["items"]]


def test_filters_restrict_results_and_unknown_values_warn(server) -> None:
    got = item_ids(server.retrieve(k=20, nprobe=ALL, filter="item_id:1 OR item_id:50 OR item_id:181"))
    assert sorted(got) == ["1", "181", "50"]
    got = item_ids(server.retrieve(k=20, nprobe=ALL, filter="(item_id:1 OR item_id:50) AND NOT item_id:50"))
    assert got == ["1"]
    r = server.retrieve(k=5, nprobe=ALL, filter="genre:NoSuchGenre")
    assert r.status_code == 200 and r.json()["items"] == [] and r.json()["warnings"]


def test_upsert_delete_patch_are_visible_at_once(server) -> None:
    gen0 = info(server)["generation"]
    put = server.request("PUT", "/v1/items", json={"items": [
        {"id": "api-new-1", "title": "A Brand New Movie (2026)",
         "features": {"genre": ["Comedy"], "year": "1995-1999", "decade": "1990s"},
         "attributes": {"item_id": ["1"], "genre": ["Comedy"]}},
        {"id": "api-new-2", "vector": [0.1] * D, "attributes": {"item_id": ["1"]}}]})
    assert put.status_code == 200, put.text
    assert put.json()["ids"] == ["api-new-1", "api-new-2"] and put.json()["generation"] > gen0
    r = server.retrieve(k=10, nprobe=ALL, filter="item_id:1")
    assert sorted(item_ids(r)) == ["1", "api-new-1", "api-new-2"]
    titles = {it["id"]: it["title"] for it in r.json()["items"]}
    assert titles["api-new-1"] == "A Brand New Movie (2026)"
    assert r.json()["generation"] == put.json()["generation"]

    patch = server.request("PATCH", "/v1/items/api-new-2/attributes", json={"attributes": {"item_id": ["2"]}})
    assert patch.status_code == 200, patch.text
    assert sorted(item_ids(server.retrieve(k=10, nprobe=ALL, filter="item_id:1"))) == ["1", "api-new-1"]
    assert sorted(item_ids(server.retrieve(k=10, nprobe=ALL, filter="item_id:2"))) == ["2", "api-new-2"]

    assert server.request("DELETE", "/v1/items/api-new-1").status_code == 200
    assert item_ids(server.retrieve(k=10, nprobe=ALL, filter="item_id:1")) == ["1"]
    assert server.request("DELETE", "/v1/items/api-new-1").status_code == 404  # already gone
    # updating an existing catalog item in place keeps it retrievable under its new attributes
    patch = server.request("PATCH", "/v1/items/3/attributes", json={"attributes": {"genre": ["Documentary"]}})
    assert patch.status_code == 200
    assert "3" in item_ids(server.retrieve(k=10, nprobe=ALL, filter="item_id:3 AND genre:Documentary"))


def test_health_ready_openapi_and_metrics(server) -> None:
    assert server.request("GET", "/healthz").json() == {"status": "ok"}
    assert server.request("GET", "/readyz").status_code == 200
    spec = server.request("GET", "/openapi.json").json()
    assert {"/v1/retrieve", "/v1/items", "/v1/items/{item_id}", "/v1/admin/load"} <= set(spec["paths"])
    server.retrieve(k=3)
    text = server.request("GET", "/metrics").text
    for series in ('silvertorch_requests_total{method="POST",route="/v1/retrieve",status="200"}',
                   "silvertorch_request_seconds_bucket", "silvertorch_batch_size_bucket",
                   "silvertorch_index_generation", "silvertorch_items ", "silvertorch_fresh_items"):
        assert series in text, series


# ------------------------------------------------------------------------------ bad input
def _unchanged(server, before: dict) -> None:
    after = info(server)
    assert after["generation"] == before["generation"] and after["stats"] == before["stats"]


@pytest.mark.parametrize("body, field", [
    ({"k": 5}, "user"),                                     # missing field
    ({"user": USER, "k": "many"}, "k"),                     # wrong type
    ({"user": "alice"}, "user"),                            # wrong type
    ({"user": USER, "nprobe": 1.5}, "nprobe"),
    ({"user": USER, "surprise": 1}, "surprise"),            # unknown field
])
def test_malformed_requests_answer_422_naming_the_field(server, body, field) -> None:
    r = server.request("POST", "/v1/retrieve", json=body)
    assert r.status_code == 422 and field in r.json()["detail"], r.text


def test_malformed_json_answers_422(server) -> None:
    r = server.request("POST", "/v1/retrieve", content=b'{"user": {', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "body" in r.json()["detail"]


@pytest.mark.parametrize("extra, field", [
    ({"k": 0}, "k"), ({"k": -3}, "k"), ({"k": 501}, "k"),          # server max_k is 500
    ({"nprobe": 0}, "nprobe"),
    ({"value_weights": [1.0]}, "value_weights"), ({"value_weights": {"liked": 1.0}}, "value_weights"),
    ({"user": {"shoe_size": "42"}}, "user"),                        # unknown user feature
])
def test_out_of_range_values_answer_400_naming_the_field(server, extra, field) -> None:
    r = server.request("POST", "/v1/retrieve", json={"user": USER, **extra})
    assert r.status_code == 400 and r.json()["detail"].startswith(field), r.text


def test_invalid_filter_answers_400_with_the_position(server) -> None:
    for expr, pos in (("genre:Comedy AND (decade:1990s OR", 33), ("genre:Comedy AND AND decade:1990s", 17)):
        r = server.retrieve(filter=expr)
        assert r.status_code == 400
        assert f"position {pos}" in r.json()["detail"] and r.json()["detail"].startswith("filter")


def test_nan_inf_and_wrong_dim_vectors_answer_400_and_write_nothing(server) -> None:
    before = info(server)
    for vector, field in (([0.1] * (D - 1), "vector"), ([float("nan")] * D, "finite"),
                          ([float("inf")] + [0.0] * (D - 1), "finite")):
        body = json.dumps({"items": [{"id": "ok-item", "vector": [0.1] * D},
                                     {"id": "bad-item", "vector": vector}]}, allow_nan=True)
        r = server.request("PUT", "/v1/items", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "items[1]" in r.json()["detail"] and field in r.json()["detail"], r.text
    for items in ([{"id": "x"}], [{"id": "x", "vector": [0.0] * D, "features": {"genre": "Drama"}}],
                  [{"id": "x", "vector": [0.0] * D, "attributes": {"colour": ["red"]}}],
                  [{"id": "x", "vector": [0.0] * D}, {"id": "x", "vector": [0.0] * D}]):
        r = server.request("PUT", "/v1/items", json={"items": items})
        assert r.status_code == 400, r.text
    _unchanged(server, before)
    assert "ok-item" not in item_ids(server.retrieve(k=500, nprobe=16))


def test_oversized_body_and_batch_answer_413(server) -> None:
    before = info(server)
    big = {"items": [{"id": f"big-{i}", "vector": [0.5] * D} for i in range(9)]}  # 9 > max_upsert_batch
    r = server.request("PUT", "/v1/items", json=big)
    assert r.status_code == 413 and "max_upsert_batch" in r.json()["detail"]
    r = server.request("POST", "/v1/retrieve", json={"user": USER, "filter": "x" * 70_000})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]

    def chunks():  # no content-length: the limit applies while reading
        yield b'{"user": {"user_id": "1"}, "filter": "'
        for _ in range(20):
            yield b"y" * 4096
        yield b'"}'
    r = server.request("POST", "/v1/retrieve", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    _unchanged(server, before)


def test_unknown_item_delete_or_patch_answers_404(server) -> None:
    before = info(server)
    assert server.request("DELETE", "/v1/items/no-such-item").status_code == 404
    r = server.request("PATCH", "/v1/items/no-such-item/attributes", json={"attributes": {"genre": ["Drama"]}})
    assert r.status_code == 404
    r = server.request("PATCH", "/v1/items/1/attributes", json={"attributes": {"colour": ["red"]}})
    assert r.status_code == 400 and "colour" in r.json()["detail"]
    _unchanged(server, before)
    assert server.request("GET", "/healthz").status_code == 200  # still alive after all of it


def test_example_client_runs_against_the_server(server, capsys) -> None:
    import importlib.util

    from tests.conftest_serve import ROOT

    spec = importlib.util.spec_from_file_location("st_example_client", ROOT / "examples" / "client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["client.py", server.url]) == 0
    out = capsys.readouterr().out
    assert "refused as expected: HTTP 400: k:" in out and "'ids': ['example-1']" in out
