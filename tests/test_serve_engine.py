"""The model-owner thread in-process (deterministic: jobs are queued before it starts): queued
queries form one batch = one forward pass, an update splits the queue in order (queries before it
read the old generation, queries after it the new one), and a batch answers like single queries."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from serve.config import ServeConfig
from serve.engine import Engine
from serve.metrics import Metrics
from serve.served import Served
from tests.conftest_serve import movielens_artifact


@pytest.fixture()
def engine(tmp_path: Path):
    from silvertorch.export import load_artifact

    served = Served(load_artifact(movielens_artifact(0), verify=False), tmp_path, max_k=100)
    eng = Engine(served, ServeConfig(max_batch_size=64, max_wait_ms=0, threads=1, state_dir=str(tmp_path)),
                 Metrics())
    yield eng
    eng.stop()


def _batches(metrics: Metrics) -> tuple[float, float]:
    count = metrics.registry.get_sample_value("silvertorch_batch_size_count") or 0.0
    total = metrics.registry.get_sample_value("silvertorch_batch_size_sum") or 0.0
    return count, total


def test_queued_queries_share_one_forward_pass_and_updates_split_them_in_order(engine: Engine) -> None:
    s = engine.served
    users = [{"user_id": str(u)} for u in (1, 2, 3, 4, 5)]
    queries = [s.parse_query(u, 10, "item_id:5" if i % 2 else None, None, 16) for i, u in enumerate(users)]
    singles = [s.run_queries([q])[0] for q in queries]  # reference answers, one by one
    gen0 = s.generation
    before = [engine.query(q) for q in queries[:3]]
    item = SimpleNamespace(id="eng-new", features=None, vector=[0.2] * s.dim,
                           attributes={"item_id": ["5"]}, title="E")
    update = engine.update(lambda served: served.prepare_upsert([item]))
    after = [engine.query(q) for q in queries[3:]]
    engine.start()
    got_before = [f.result(timeout=60) for f in before]
    record, seq, generation = update.result(timeout=60)
    got_after = [f.result(timeout=60) for f in after]

    assert generation == gen0 + 1 and seq == 1
    assert [r["generation"] for r in got_before] == [gen0] * 3
    assert [r["generation"] for r in got_after] == [gen0 + 1] * 2
    assert got_before == singles[:3]  # batched answers equal unbatched ones
    assert "eng-new" in [i["id"] for i in got_after[0]["items"]]  # filtered row: item_id:5 + new
    count, total = _batches(engine.metrics)
    assert (count, total) == (2, 5)  # 3 queries in one pass, then 2 in another


def test_a_refused_update_in_a_run_fails_alone(engine: Engine) -> None:
    s = engine.served
    good = SimpleNamespace(id="ok", features=None, vector=[0.1] * s.dim, attributes=None, title=None)
    bad = SimpleNamespace(id="bad", features=None, vector=[0.1] * (s.dim - 1), attributes=None, title=None)
    f1 = engine.update(lambda sv: sv.prepare_upsert([good]))
    f2 = engine.update(lambda sv: sv.prepare_upsert([bad]))
    f3 = engine.update(lambda sv: sv.prepare_delete("ok"))
    engine.start()
    assert f1.result(timeout=60)[1] == 1
    with pytest.raises(Exception, match="items\\[0\\].vector"):
        f2.result(timeout=60)
    assert f3.result(timeout=60)[1] == 2  # the refused one took no log seq
    assert s.log.last_seq == 2


def test_automatic_compaction_past_the_threshold_folds_the_fresh_segment(tmp_path: Path) -> None:
    import time

    from silvertorch.export import load_artifact

    served = Served(load_artifact(movielens_artifact(0), verify=False), tmp_path, max_k=100)
    eng = Engine(served, ServeConfig(compaction_threshold=3, threads=1, state_dir=str(tmp_path)), Metrics())
    eng.start()
    try:
        for i in range(3):
            item = SimpleNamespace(id=f"auto-{i}", features=None, vector=[0.1 * (i + 1)] * served.dim,
                                   attributes={"item_id": ["5"]}, title=None)
            eng.update(lambda sv, item=item: sv.prepare_upsert([item])).result(timeout=60)
        deadline = time.monotonic() + 120
        while eng.metrics.registry.get_sample_value("silvertorch_compactions_total") < 1:
            assert time.monotonic() < deadline, eng.last_compaction_error
            time.sleep(0.05)
        stats = eng.call(served.stats).result(timeout=60)
        assert stats["fresh_items"] == 0 and stats["live_items"] == 1682 + 3
        q = served.parse_query({"user_id": "1"}, 10, "item_id:5", None, 16)
        ids = {i["id"] for i in eng.query(q).result(timeout=60)["items"]}
        assert ids == {"5", "auto-0", "auto-1", "auto-2"}
        assert (served.dir / "snapshot.pt").exists() and served.snapshot_seq == 3
    finally:
        eng.stop()
