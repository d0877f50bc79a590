"""The multi-service baseline (benchmarks/mesh): same ids as SilverTorch where the algorithms
coincide, clean 4xx on bad input at every service (which keeps serving), binary framing, faiss
SQ8 mode, and a launcher that leaves no process behind."""

from __future__ import annotations

import math
import os

import numpy as np
import orjson
import pytest
import torch

from benchmarks.mesh.artifacts import tiny_artifact, user_requests
from benchmarks.mesh.client import post_json
from benchmarks.mesh.protocol import CONTENT_TYPE, ProtocolError, decode, encode, pack_strings, unpack_strings

FILTERS = [None, "genre:comedy AND NOT decade:1990s", "genre:drama OR (genre:horror AND decade:1980s)"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory):
    from silvertorch.export import load_artifact

    path = tiny_artifact(tmp_path_factory.mktemp("mesh") / "tiny", dtype="fp32")
    return path, load_artifact(path)


@pytest.fixture(scope="module")
def mesh(artifact):
    from benchmarks.mesh.launcher import Mesh
    from benchmarks.mesh.settings import MeshSettings

    with Mesh(artifact[0], MeshSettings.like_server(threads=1)) as m:
        yield m


def silvertorch_ids(art, user: dict, k: int, flt: str | None, nprobe: int) -> list[str]:
    """The in-process RetrievalModel's answer (raw ids), the reference for the mesh."""
    from silvertorch.export import encode_user_features

    out = art.model.retrieve(encode_user_features(art, [user]), k, [flt] if flt else None, nprobe=nprobe)
    return [art.item_raw_ids[i] for i in out.ids[0].tolist() if i >= 0]


def mesh_items(url: str, body: dict) -> list[dict]:
    status, data = post_json(url + "/v1/retrieve", orjson.dumps(body))
    assert status == 200, data
    return orjson.loads(data)["items"]


@torch.no_grad()
def test_exact_and_ivf_modes_return_silvertorch_ids(mesh, artifact) -> None:
    _, art = artifact
    nlist = art.model.index.ivf.nlist
    checked = 0
    for user in user_requests(4, seed=3):
        for flt in FILTERS:
            for k in (10, 60):
                items = mesh_items(mesh.url, {"user": user, "k": k, "filter": flt, "exact": True})
                assert [i["id"] for i in items] == silvertorch_ids(art, user, k, flt, nprobe=nlist)
                checked += len(items)
            # IVF mode: same centroids, same assignment, same probing -> the same candidates
            items = mesh_items(mesh.url, {"user": user, "k": 20, "filter": flt, "nprobe": 2})
            assert [i["id"] for i in items] == silvertorch_ids(art, user, 20, flt, nprobe=2)
    assert checked > 100
    # the filter holds on every answer (genre:comedy AND NOT decade:1990s)
    attrs = art.model.feature_tables()
    for it in mesh_items(mesh.url, {"user": user_requests(1)[0], "k": 50, "filter": FILTERS[1], "exact": True}):
        i = art.item_raw_ids.index(it["id"])
        assert 2 in attrs["genre"][i].tolist() and attrs["decade"][i, 0] != 3


def _svc(mesh, role: str) -> str:
    return mesh.service(role).url


def _post(url: str, arrays_or_bytes) -> tuple[int, bytes]:
    body = arrays_or_bytes if isinstance(arrays_or_bytes, bytes) else encode(arrays_or_bytes)
    return post_json(url, body, CONTENT_TYPE)


def test_every_service_rejects_bad_input_and_keeps_serving(mesh, artifact) -> None:
    _, art = artifact
    D = art.model.index.ivf.dim
    q = np.random.default_rng(0).standard_normal((2, D)).astype(np.float32)
    nan_q = q.copy()
    nan_q[1, 3] = np.nan
    ut, ann, sc = (_svc(mesh, r) for r in ("user_tower", "ann", "scoring"))
    user_ok = {"lengths": np.array([1, 1, 1, 1], np.int64), "values": np.array([1, 2, 1, 2], np.int64)}
    search_ok = {"query": q, "params": np.array([40, 2, 0], np.int64)}
    ids = np.arange(80, dtype=np.int64).reshape(2, 40)
    score_ok = {"query": q, "ids": ids, "retrieval": np.zeros((2, 40), np.float32),
                "params": np.array([10], np.int64)}
    blob, off = pack_strings(["genre:comedy", "nope:1"])
    blob2, off2 = pack_strings(["genre:comedy AND (", ""])
    bad = {
        f"{ut}/v1/embed": [b"garbage", {"lengths": np.array([1, 1, 1], np.int64), "values": np.ones(3, np.int64)},
                           {"lengths": np.array([1, 1, 1, 1], np.int64), "values": np.array([1, 2, 10**6, 2], np.int64)},
                           {"lengths": np.array([1.0, 1, 1, 1], np.float32), "values": np.ones(4, np.int64)}],
        f"{ann}/v1/search": [b"STM1\x05\x00", {**search_ok, "query": q[:, :-1].copy()},
                             {**search_ok, "query": nan_q},
                             {**search_ok, "filter_blob": blob, "filter_offsets": off},
                             {**search_ok, "filter_blob": blob2, "filter_offsets": off2},
                             {**search_ok, "params": np.array([0, 2, 0], np.int64)}],
        f"{sc}/v1/score": [encode(score_ok)[:-5], {**score_ok, "query": nan_q},
                           {**score_ok, "query": q[:, :-2].copy()},
                           {**score_ok, "ids": ids + 10**6}],
    }
    ok = {f"{ut}/v1/embed": user_ok, f"{ann}/v1/search": search_ok, f"{sc}/v1/score": score_ok}
    for url, cases in bad.items():
        for case in cases:
            status, data = _post(url, case)
            assert 400 <= status < 500, (url, status, data)
            assert data, "a 4xx names what was wrong"
        status, data = _post(url, ok[url])
        assert status == 200, (url, data)
        assert decode(data)
    unknown = _post(f"{ann}/v1/search", {**search_ok, "filter_blob": blob, "filter_offsets": off})[1]
    assert b"unknown filter feature 'nope'" in unknown
    # the orchestrator: malformed JSON, wrong types, out-of-range values, bad / unknown filters
    user = user_requests(1)[0]
    for body, want in [(b"{not json", 400), (orjson.dumps({"user": user, "k": "ten"}), 422),
                       (orjson.dumps({"user": user, "k": 0}), 400),
                       (orjson.dumps({"user": user, "k": 5, "filter": "genre:comedy AND"}), 400),
                       (orjson.dumps({"user": user, "k": 5, "filter": "color:red"}), 400),
                       (orjson.dumps({"user": user, "k": 5, "value_weights": [1.0]}), 400),
                       (orjson.dumps({"user": user, "k": 5, "extra": 1}), 422)]:
        status, data = post_json(mesh.url + "/v1/retrieve", body)
        assert status == want, (body, status, data)
        assert "detail" in orjson.loads(data)
    assert len(mesh_items(mesh.url, {"user": user, "k": 5})) == 5


def test_protocol_round_trip_and_malformed_frames() -> None:
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([7, -1], np.int64),
              "s": np.frombuffer(b"xyz", np.uint8)}
    out = decode(encode(arrays))
    assert list(out) == ["a", "b", "s"]
    for name, a in arrays.items():
        assert out[name].dtype == a.dtype and np.array_equal(out[name], a)
    frame = encode(arrays)
    for broken in (frame[:-1], frame + b"\0", b"XXXX" + frame[4:], frame[:9]):
        with pytest.raises(ProtocolError):
            decode(broken)
    with pytest.raises(ProtocolError):
        encode({"c": np.zeros(2, np.complex64)})
    assert unpack_strings(*pack_strings(["genre:a", None, "é"])) == ["genre:a", "", "é"]


def test_sq8_mode_recall_against_exact(artifact) -> None:
    from benchmarks.mesh.ann import AnnService

    _, art = artifact
    idx = art.model.index
    q = np.random.default_rng(1).standard_normal((32, idx.ivf.dim)).astype(np.float32)
    flat = AnnService(idx, art.model.num_items, "flat", 200)
    sq8 = AnnService(idx, art.model.num_items, "sq8", 200)
    truth, _ = flat.search(q, 20, idx.ivf.nlist, [""] * 32)
    got, _ = sq8.search(q, 20, idx.ivf.nlist, [""] * 32)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(got.tolist(), truth.tolist())])
    assert 0.8 <= recall <= 1.0
    ivf, _ = flat.search(q, 20, 1, [""] * 32)  # one probe of 8 lists loses some neighbours
    assert np.mean([len(set(a) & set(b)) / 20 for a, b in zip(ivf.tolist(), truth.tolist())]) < 1.0


def test_faiss_index_filled_in_chunks_equals_one_fill(artifact) -> None:
    """The ANN service decodes and adds the catalog chunk by chunk (its start-up memory): the lists
    hold the same items, so the answers equal a single fill's; an SQ8 catalog larger than a chunk
    trains its ranges on a sample and still answers close to the exhaustive search."""
    from benchmarks.mesh.ann import build_faiss_index

    _, art = artifact
    idx = art.model.index
    n = int(idx.ivf.ntotal)
    q = np.random.default_rng(2).standard_normal((16, idx.ivf.dim)).astype(np.float32)
    answers = {}
    for kind in ("flat", "sq8"):
        for chunk in (n, 37):
            fx = build_faiss_index(idx, kind, chunk=chunk)
            assert fx.ntotal == n
            fx.nprobe = idx.ivf.nlist
            answers[kind, chunk] = fx.search(q, 20)
    assert all(np.array_equal(a, b) for a, b in zip(answers["flat", n], answers["flat", 37]))
    truth, sampled = answers["flat", n][1], answers["sq8", 37][1]
    assert np.mean([len(set(a) & set(b)) / 20 for a, b in zip(sampled.tolist(), truth.tolist())]) >= 0.8


@torch.no_grad()
def test_ann_service_probes_filtered_rows_as_silvertorch(artifact) -> None:
    """Selectivity-aware probing: the ANN service calls SilverTorch's probe selection, so with the
    same factor both return the same ids, filtered and unfiltered, in IVF and in exact mode."""
    from benchmarks.mesh.ann import AnnService
    from silvertorch.index import SearchParams

    _, art = artifact
    idx = art.model.index
    assert idx.has_histograms
    q = np.random.default_rng(2).standard_normal((12, idx.ivf.dim)).astype(np.float32)
    filters = [f or "" for f in FILTERS] * 4
    ann = AnnService(idx, art.model.num_items, "flat", 200, min_candidates_factor=3.0, max_nprobe=6)
    adaptive_differs = False
    for nprobe in (1, idx.ivf.nlist):
        got, _ = ann.search(q, 30, nprobe, filters)
        p = SearchParams(nprobe=nprobe, filter=[f or None for f in filters], min_candidates_factor=3.0,
                         max_nprobe=6)
        want = idx.search(torch.from_numpy(q), 30, p)[1].numpy()
        assert np.array_equal(got, want), nprobe
        fixed = idx.search(torch.from_numpy(q), 30, SearchParams(nprobe=nprobe, filter=p.filter))[1]
        adaptive_differs |= not np.array_equal(fixed.numpy(), want)
    assert adaptive_differs  # the factor made a difference at nprobe 1


def test_load_window_attributes_cpu_to_every_service(mesh) -> None:
    """The benchmark's load window: every service of the mesh spends CPU on the requests, and the
    load generator's own CPU is counted apart."""
    from benchmarks.mesh_bench import _window

    reqs = [orjson.dumps({"user": u, "k": 10, **({"filter": FILTERS[i % 3]} if FILTERS[i % 3] else {})})
            for i, u in enumerate(user_requests(64))]
    w = _window(mesh, reqs, duration=0.6, warmup=0.2, concurrency=4)
    assert w["errors"] == 0 and w["rps"] > 0 and w["requests"] > 0
    assert set(w["cpu_ms"]) == {"user_tower", "ann", "scoring", "orchestrator", "client"}
    assert all(math.isfinite(v) and v >= 0 for v in w["cpu_ms"].values())
    # the orchestrator handles every request (HTTP, three calls, the answer): it cannot be free
    assert w["cpu_ms"]["orchestrator"] > 0 and w["cpu_ms"]["client"] > 0


def test_launcher_stops_every_process(mesh) -> None:
    pids = list(mesh.pids)
    assert len(pids) == 4
    mesh.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _children_running_services() -> list[int]:
    """Live child processes of this test process that run a mesh service."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z" and b"benchmarks.mesh.run_service" in cmd:
            found.append(int(entry))
    return found


def test_failed_start_names_the_service_and_leaves_no_process(tmp_path) -> None:
    from benchmarks.mesh.launcher import Mesh, MeshStartError
    from benchmarks.mesh.settings import MeshSettings

    with pytest.raises(MeshStartError, match="exited with status"):
        Mesh(tmp_path / "no-such-artifact", MeshSettings.like_server(threads=1))
    assert _children_running_services() == []
