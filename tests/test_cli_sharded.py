"""The sharded CLI end to end on a tiny MovieLens checkpoint: ``silvertorch export --shards 2`` (and
``--plan``) writes a sharded artifact; ``silvertorch serve`` of it starts the ranks itself (re-exec
under torchrun) and answers exactly as the single-process server on the unsharded export of the
same checkpoint, with and without a filter, before and after an item update."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from serve.served import Served
from silvertorch.export import load_artifact
from silvertorch.export_sharded import SHARDED_FORMAT, read_sharded_manifest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "movielens_100k.toml"
ML_OVERRIDES = ["data.max_users=100", "train.batch_size=256", "train.progress=false", "train.max_steps=4"]
USERS = [{"user_id": "1", "gender": "F", "occupation": "writer"}, {"user_id": "999999"}]
FILTERS = [None, "genre:Comedy", "NOT genre:Drama"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    from launch.cli import main
    from silvertorch.data.fetch import DataMissingError
    from train.config import load_train_config
    from train.loop import train

    tmp = tmp_path_factory.mktemp("clisharded")
    cfg = load_train_config(SHIPPED, [*ML_OVERRIDES, f"train.out_dir={tmp / 'run'}"])
    try:
        ckpt = train(cfg).checkpoint
    except DataMissingError as err:
        pytest.skip(f"MovieLens-100k not fetched: {err}")
    base = ["export", "--config", str(SHIPPED), "--checkpoint", str(ckpt)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*base, "--out", str(tmp / "sharded"), "--shards", "2", *ML_OVERRIDES]) == 0
    assert main([*base, "--out", str(tmp / "flat"), "--no-programs", *ML_OVERRIDES]) == 0
    return {"tmp": tmp, "base": base, "sharded": tmp / "sharded", "flat": tmp / "flat", "out": out.getvalue()}


def test_export_shards_and_plans(exported, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.cli import main

    m = read_sharded_manifest(exported["sharded"])
    assert m["format"] == SHARDED_FORMAT and m["shards"] == 2 and m["plan_sha256"] is None
    assert sum(m["assignment"]["items_per_shard"]) == 1682
    assert f"version    {m['version_id']}" in exported["out"] and "shards     2" in exported["out"]
    tmp, base = exported["tmp"], exported["base"]
    # an existing --out, a shard count that contradicts the plan, a plan made for another model: 2
    assert main([*base, "--out", str(exported["sharded"]), "--shards", "2", *ML_OVERRIDES]) == 2
    assert "--force" in capsys.readouterr().err
    plan = json.loads((ROOT / "sharding_plans" / "movielens_100k_cpu_1.json").read_text())
    other = tmp / "other_plan.json"
    other.write_text(json.dumps({**plan, "shards": 2, "model": {**plan["model"], "dim": 99}}))
    assert main([*base, "--out", str(tmp / "x"), "--plan", str(other), *ML_OVERRIDES]) == 2
    assert "dim: the plan was made for 99" in capsys.readouterr().err and not (tmp / "x").exists()
    assert main([*base, "--out", str(tmp / "y"), "--plan", str(tmp / "missing.json"), *ML_OVERRIDES]) == 2
    assert "plan file not found" in capsys.readouterr().err and not (tmp / "y").exists()


def test_serve_starts_the_ranks_and_answers_as_the_single_process_server(exported) -> None:
    tmp = exported["tmp"]
    port_file = tmp / "port"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "serve", str(exported["sharded"]), "--port", "0",
         "--port-file", str(port_file), "--state-dir", str(tmp / "state"), "--heartbeat-s", "1",
         "--timeout-s", "60"],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    flat = Served(load_artifact(exported["flat"]), tmp / "flat_state", max_k=1000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference runs here: leave the 2 CI cores to the ranks
    try:
        deadline = time.monotonic() + 240  # a hang guard, not a timing check
        while not port_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert port_file.exists(), (tmp / "serve.log").read_text()
        c = httpx.Client(base_url=f"http://127.0.0.1:{port_file.read_text()}", timeout=180)  # a hang guard
        info = c.get("/v1/info").json()
        assert info["shards"] == 2 and info["version"] == read_sharded_manifest(exported["sharded"])["version_id"]

        def same() -> None:
            for user in USERS:
                for f in FILTERS:
                    r = c.post("/v1/retrieve", json={"user": user, "k": 10, "filter": f})
                    assert r.status_code == 200, r.text
                    want = flat.run_queries([flat.parse_query(user, 10, f, None, None)])[0]
                    assert r.json()["items"] == want["items"], (user, f)
                    assert r.json()["generation"] == want["generation"]

        same()
        top = c.post("/v1/retrieve", json={"user": USERS[0], "k": 3}).json()["items"]
        r = c.delete(f"/v1/items/{top[0]['id']}")
        assert r.status_code == 200, r.text
        flat.apply_checked(flat.prepare_delete(top[0]["id"]))
        same()
        assert (tmp / "state").is_dir() and any((tmp / "state").rglob("log.jsonl"))
        c.close()
    finally:
        torch.set_num_threads(threads)
        flat.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the launcher forwards it to torchrun -> the ranks
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait(30)
    assert rc in (0, -signal.SIGTERM), (tmp / "serve.log").read_text()
