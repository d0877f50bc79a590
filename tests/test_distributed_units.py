"""Single-process pieces of sharded training: constraints, rank slicing of batches, KJT row
concatenation, table optimizer choice, topology, environment checks, checkpoint discovery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from silvertorch.data.batching import FeatureTable, InteractionLoader
from silvertorch.distributed.dcp import find_latest
from silvertorch.distributed.process_group import env_world, init_distributed
from silvertorch.distributed.sharding import default_sharding_types, sharding_constraints
from silvertorch.distributed.topology import build_topology
from silvertorch.distributed.two_tower import cat_rows
from tests.test_distributed_train import grouped_dataset, make_config
from train.builders import build_model
from train.dist_data import RankSlicedLoader
from train.dist_optim import fuse_embedding_optimizer, table_optimizer_name

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(make_config(Path("unused"), 1), grouped_dataset())


def test_constraints_restrict_types_to_the_device(model: torch.nn.Module) -> None:
    cons = sharding_constraints(model, "cpu")
    assert sorted(cons) == ["genre", "item_id", "segment", "user_id"]
    assert cons["user_id"].sharding_types == list(default_sharding_types("cpu"))
    assert "data_parallel" not in cons["user_id"].sharding_types
    assert cons["user_id"].compute_kernels == ["fused"]
    with pytest.raises(ValueError, match="row_wise.*not available on cpu.*CUDA"):
        sharding_constraints(model, "cpu", ["table_wise", "row_wise"])
    assert "row_wise" in sharding_constraints(model, "cuda", ["row_wise"])["item_id"].sharding_types
    dp = sharding_constraints(model, "cpu", ["table_wise"], per_table={"genre": ["data_parallel"]})
    assert dp["genre"].compute_kernels == ["dense"] and dp["item_id"].sharding_types == ["table_wise"]
    with pytest.raises(ValueError, match="unknown table"):
        sharding_constraints(model, "cpu", per_table={"nope": ["table_wise"]})


def test_rank_slices_rebuild_the_single_process_batches() -> None:
    ds = grouped_dataset()
    keys = {"user_keys": ["user_id", "segment"], "item_keys": ["item_id", "genre"]}
    single = InteractionLoader(ds, 32, seed=5, drop_last=True, **keys)
    ranks = [RankSlicedLoader(ds, 32, rank=r, world_size=4, seed=5, **keys) for r in range(4)]
    assert len(ranks[0]) == len(single) and ranks[0].state_dict() == single.state_dict()
    for batch, *parts in zip(single, *ranks):
        assert torch.equal(batch.user_ids, torch.cat([p.user_ids for p in parts]))
        assert torch.equal(batch.item_ids, torch.cat([p.item_ids for p in parts]))
        assert all(p.size == 8 for p in parts)
    assert ranks[0].state_dict() == single.state_dict()  # the cursor is world-size independent
    with pytest.raises(ValueError, match="divisible by the world size 3"):
        RankSlicedLoader(ds, 32, rank=0, world_size=3, **keys)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        RankSlicedLoader(ds, 32, rank=2, world_size=2, **keys)


def test_cat_rows_equals_the_kjt_of_the_concatenated_rows() -> None:
    ds = grouped_dataset()
    table = FeatureTable(ds.items.features.features, ["item_id", "genre"])
    a, b = torch.tensor([3, 1, 4]), torch.tensor([1, 5])
    got, want = cat_rows(table.kjt(a), table.kjt(b)), table.kjt(torch.cat([a, b]))
    assert got.keys() == want.keys() and got.stride() == 5
    assert torch.equal(got.lengths(), want.lengths()) and torch.equal(got.values(), want.values())


def test_table_optimizer_follows_what_fbgemm_has_on_the_device() -> None:
    cfg = make_config(Path("unused"), 1)
    assert table_optimizer_name(cfg.optim, "cpu") == "adagrad"  # the config says adagrad
    cfg.optim.name = "adam"
    with pytest.warns(UserWarning, match="no fused adam for embedding tables on cpu"):
        assert table_optimizer_name(cfg.optim, "cpu") == "adagrad"
    assert table_optimizer_name(cfg.optim, "cuda") == "adam"
    with pytest.raises(ValueError, match="'adam' is not available for fused tables on cpu"):
        table_optimizer_name(cfg.optim, "cpu", "adam")
    assert table_optimizer_name(cfg.optim, "cpu", "rowwise_adagrad") == "rowwise_adagrad"


def test_gradient_clipping_is_refused(model: torch.nn.Module) -> None:
    cfg = make_config(Path("unused"), 1)
    cfg.optim.grad_clip_norm = 1.0
    with pytest.raises(ValueError, match="grad_clip_norm is not supported by sharded training"):
        fuse_embedding_optimizer(cfg.optim, model, "adagrad")


def test_topology_from_the_placement_planner_file() -> None:
    topo = build_topology(2, "cpu", ROOT / "configs" / "topologies" / "cpu_2proc.toml")
    assert topo.world_size == 2 and topo.compute_device == "cpu"
    assert build_topology(4, "cpu").world_size == 4
    with pytest.raises(FileNotFoundError, match="topology file not found"):
        build_topology(2, "cpu", ROOT / "configs" / "topologies" / "nope.toml")
    with pytest.raises(ValueError, match="compute_device"):
        build_topology(2, "tpu")


def test_environment_is_checked_before_any_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match=r"\['RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'\]"):
        env_world()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(RuntimeError, match="0 <= RANK < WORLD_SIZE"):
        env_world()
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        init_distributed("cpu", timeout_s=0)


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    d = root / f"step_{step:09d}"
    d.mkdir(parents=True)
    (d / ".metadata").write_bytes(b"x")
    if complete:
        (d / "meta.json").write_text(json.dumps({"step": step}))
    return d


def test_find_latest_trusts_only_complete_checkpoints(tmp_path: Path) -> None:
    assert find_latest(tmp_path) is None
    good = _fake_checkpoint(tmp_path, 4)
    assert find_latest(tmp_path) == good  # no pointer: the highest complete step
    (tmp_path / "latest").write_text("step_000000008")
    _fake_checkpoint(tmp_path, 8, complete=False)  # pointer to an incomplete directory
    assert find_latest(tmp_path) == good
    (tmp_path / ".step_000000012.partial").mkdir()  # a killed save
    assert find_latest(tmp_path) == good
