"""The durable update log: kill -9 and restart loses nothing acknowledged (with a compaction
snapshot in between and a torn last record); a log of another artifact or a corrupt log is refused."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from serve.update_log import LogError, UpdateLog, read_log
from tests.conftest_serve import ServerProcess, info, item_ids, movielens_artifact

D = 64
ALL = 16


def _vec(i: int) -> list[float]:
    return [((i * 13 + j) % 17 - 8) / 10 for j in range(D)]


def test_kill_9_and_restart_restores_every_acknowledged_update(tmp_path: Path) -> None:
    art = movielens_artifact(0)
    server = ServerProcess(art, tmp_path / "state", "compaction_threshold=0").start()
    live = {"9"}
    try:
        for i in range(6):
            r = server.request("PUT", "/v1/items", json={"items": [
                {"id": f"dur-{i}", "vector": _vec(i), "title": f"Durable {i}", "attributes": {"item_id": ["9"]}}]})
            assert r.status_code == 200
            live.add(f"dur-{i}")
        assert server.request("DELETE", "/v1/items/dur-1").status_code == 200
        live.discard("dur-1")
        assert server.request("POST", "/v1/admin/compact").status_code == 200
        while info(server)["compacting"]:
            time.sleep(0.05)
        # after the snapshot: more updates that only the log holds
        assert server.request("PATCH", "/v1/items/dur-2/attributes",
                              json={"attributes": {"item_id": ["10"]}}).status_code == 200
        live.discard("dur-2")
        assert server.request("DELETE", "/v1/items/dur-3").status_code == 200
        live.discard("dur-3")
        r = server.request("PUT", "/v1/items", json={"items": [
            {"id": "dur-late", "vector": _vec(99), "attributes": {"item_id": ["9"]}, "title": "Late"}]})
        assert r.status_code == 200
        live.add("dur-late")
        before = server.retrieve(k=50, nprobe=ALL, filter="item_id:9").json()
        gen = info(server)["generation"]
    finally:
        server.kill()  # SIGKILL: no shutdown hook runs
    assert set(i["id"] for i in before["items"]) == live

    log = next((tmp_path / "state").glob("*/log.jsonl"))
    with open(log, "ab") as f:  # a torn write: half a record, no newline
        f.write(b'3fa0c2d1 {"op":"delete","raw":"dur-0","id":')

    again = ServerProcess(art, tmp_path / "state").start()
    try:
        after = again.retrieve(k=50, nprobe=ALL, filter="item_id:9").json()
        assert [i["id"] for i in after["items"]] == [i["id"] for i in before["items"]]
        assert after["generation"] == gen
        titles = {i["id"]: i["title"] for i in after["items"]}
        assert titles["dur-late"] == "Late" and titles["dur-0"] == "Durable 0"
        assert sorted(item_ids(again.retrieve(k=50, nprobe=ALL, filter="item_id:10"))) == ["10", "dur-2"]
        # the torn tail was dropped and the log still appends
        assert again.request("DELETE", "/v1/items/dur-0").status_code == 200
    finally:
        again.stop()


def test_updates_after_a_restart_on_an_emptied_log_survive_the_next_restart(tmp_path: Path) -> None:
    """Compaction empties the log; a restart then has no record to count seqs from. New records
    must still be numbered after the snapshot, or the restart after would skip them."""
    art = movielens_artifact(0)
    server = ServerProcess(art, tmp_path / "state", "compaction_threshold=0").start()
    try:
        for i in range(3):
            assert server.request("PUT", "/v1/items", json={"items": [
                {"id": f"e-{i}", "vector": _vec(i), "attributes": {"item_id": ["9"]}}]}).status_code == 200
        assert server.request("POST", "/v1/admin/compact").status_code == 200
        while info(server)["compacting"]:
            time.sleep(0.05)
    finally:
        server.stop()
    second = ServerProcess(art, tmp_path / "state").start()
    try:
        assert second.request("PUT", "/v1/items", json={"items": [
            {"id": "e-new", "vector": _vec(7), "attributes": {"item_id": ["9"]}}]}).status_code == 200
        assert second.request("DELETE", "/v1/items/e-0").status_code == 200
    finally:
        second.kill()
    third = ServerProcess(art, tmp_path / "state").start()
    try:
        ids = set(item_ids(third.retrieve(k=50, nprobe=ALL, filter="item_id:9")))
    finally:
        third.stop()
    assert {"e-new", "e-1", "e-2"} <= ids and "e-0" not in ids


def test_log_of_another_artifact_and_corrupt_logs_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = UpdateLog(path, "version-A")
    log.append([{"op": "delete", "raw": "x", "id": 1}, {"op": "delete", "raw": "y", "id": 2}])
    log.close()
    assert [r["seq"] for r in read_log(path, "version-A")[0]] == [1, 2]
    with pytest.raises(LogError, match="version-A.*version-B"):
        read_log(path, "version-B")
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1].replace(b'"x"', b'"z"') + lines[2])  # checksum now wrong
    with pytest.raises(LogError, match="corrupt"):
        read_log(path, "version-A")


def test_server_refuses_a_state_dir_with_a_corrupt_log(tmp_path: Path, capsys) -> None:
    art = movielens_artifact(0)
    from silvertorch.export import load_artifact  # noqa: PLC0415

    version = load_artifact(art, verify=False).version
    from serve.served import state_dir_for

    d = state_dir_for(tmp_path, version)
    d.mkdir(parents=True)
    (d / "log.jsonl").write_text("not a log\nat all\n")
    from launch.cmd_serve import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    code = run(parser.parse_args([str(art), "--port", "0", "--state-dir", str(tmp_path)]))
    assert code == 1
    err = capsys.readouterr().err
    assert "refusing to serve" in err and "corrupt" in err


def _run_serve(art: Path, state: Path) -> int:
    from launch.cmd_serve import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args([str(art), "--port", "0", "--state-dir", str(state)]))


def test_server_refuses_to_start_on_a_tampered_or_incompatible_artifact(tmp_path: Path, capsys) -> None:
    import json
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(movielens_artifact(0), tampered)
    data = bytearray((tampered / "tensors.pt").read_bytes())
    data[len(data) // 3] ^= 0x55
    (tampered / "tensors.pt").write_bytes(bytes(data))
    assert _run_serve(tampered, tmp_path / "s") == 1
    assert "sha256" in capsys.readouterr().err

    future = tmp_path / "future"
    shutil.copytree(movielens_artifact(0), future)
    manifest = json.loads((future / "manifest.json").read_text())
    manifest["format_version"] = 99
    (future / "manifest.json").write_text(json.dumps(manifest))
    assert _run_serve(future, tmp_path / "s") == 1
    err = capsys.readouterr().err
    assert "refusing to serve" in err and "incompatible" in err
