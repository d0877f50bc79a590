"""The sharded serving artifact: write -> load every rank's part -> the merged answer equals the
unsharded model; world-size / plan mismatches and damaged parts are refused with the cause named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from silvertorch.catalog import CatalogUpdater
from silvertorch.distributed.sharded_index import assign_clusters, shard_index
from silvertorch.export import ArtifactError
from silvertorch.export_sharded import (
    load_sharded_part, plan_sha256, read_sharded_manifest, write_sharded_artifact,
)
from tests.test_distributed_sharded_retrieval import FILTERS, USERS, assert_same_output, simulated
from tests.test_export import USER_VOCAB, build, item_vocab
from tests.test_retrieval_model import DIM, user_kjt

PLAN = {"shards": 2, "replicas": 2, "world_size": 4, "model": {"dim": DIM, "nlist": 6, "index_dtype": "int8"},
        "step": 3, "step_name": "items sharded over the devices of one host"}


def write(out: Path, model, tower, items, **kw) -> Path:
    return write_sharded_artifact(out, model, tower, config={"note": "test"}, user_vocab=USER_VOCAB,
                                  item_vocab=item_vocab(items),
                                  item_raw_ids=[f"m{i}" for i in range(model.num_items)], **kw)


@pytest.fixture(scope="module")
def built():
    model, tower, items = build()
    up = CatalogUpdater(model)  # a fresh segment and a tombstone travel too
    up.upsert(torch.tensor([300, 301]), torch.randn(2, DIM, generator=torch.Generator().manual_seed(3)) * 3,
              [{"genre": ["comedy"]}, None])
    up.delete(torch.tensor([4]))
    return model, tower, items


@pytest.fixture(scope="module")
def art(built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tower, items = built
    plan_file = tmp_path_factory.mktemp("plan") / "plan.json"
    plan_file.write_text(json.dumps(PLAN))
    return write(tmp_path_factory.mktemp("sart") / "s1", model, tower, items, plan=plan_file)


@torch.no_grad()
def test_round_trip_each_rank_loads_its_part_and_the_merge_equals_unsharded(built, art: Path) -> None:
    model, tower, items = built
    m = read_sharded_manifest(art)
    assert m["shards"] == 2 and m["replicas"] == 2 and m["plan_sha256"] == plan_sha256(PLAN)
    assert sorted(m["files"]) == ["common.pt", "items.json", "part-00000.pt", "part-00001.pt",
                                  "plan.json", "vocab.json"]
    parts = [load_sharded_part(art, rank=r, world_size=2) for r in range(2)]
    a = assign_clusters(model.index, 2)
    for r, p in enumerate(parts):
        assert (p.shard, p.replica, p.version) == (r, 0, m["version_id"])
        want = shard_index(model.index, a, r).state_dict()
        got = p.model.index.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want if isinstance(want[k], torch.Tensor))
        assert p.model.generation == model.generation and p.item_raw_ids[:2] == ["m0", "m1"]
        for k, v in tower.state_dict().items():
            assert torch.equal(p.item_tower.state_dict()[k], v)
    kjt = user_kjt(USERS)
    for f in FILTERS:
        assert_same_output(simulated([p.model for p in parts], kjt, 12, f), model.retrieve(kjt, 12, f), str(f))
    # world of 4 = 2 shards x 2 replicas: rank 3 holds shard 1 of replica 1
    p3 = load_sharded_part(art, rank=3, world_size=4, verify=False)
    assert (p3.shard, p3.replica) == (1, 1)


def test_mismatches_are_refused_with_the_cause_named(built, art: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="world size 3 .*2 shard"):
        load_sharded_part(art, rank=0, world_size=3)
    with pytest.raises(ArtifactError, match="world size 6"):  # 3 replicas > the plan's 2
        load_sharded_part(art, rank=0, world_size=6)
    other = dict(PLAN, shards=4)
    with pytest.raises(ArtifactError, match=r"plan mismatch.*\(2 shards\).*\(4 shards\)"):
        load_sharded_part(art, rank=0, world_size=2, plan=other)
    load_sharded_part(art, rank=0, world_size=2, plan=PLAN)  # the same plan is accepted
    model, tower, items = built
    with pytest.raises(ValueError, match="num_shards=3 but the plan has 2"):
        write(tmp_path / "x", model, tower, items, plan=PLAN, num_shards=3)
    with pytest.raises(ValueError, match="dim: the plan was made for 99"):
        write(tmp_path / "y", model, tower, items, plan=dict(PLAN, model={"dim": 99}))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(ArtifactError, match="not a 'silvertorch-sharded-artifact'"):
        (tmp_path / "z").mkdir()
        (tmp_path / "z" / "manifest.json").write_text(json.dumps({"format": "silvertorch-artifact"}))
        load_sharded_part(tmp_path / "z", rank=0, world_size=1)


def test_a_damaged_part_is_refused_only_by_the_rank_that_loads_it(art: Path, tmp_path: Path) -> None:
    dst = tmp_path / "copy"
    shutil.copytree(art, dst)
    data = bytearray((dst / "part-00001.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dst / "part-00001.pt").write_bytes(bytes(data))
    load_sharded_part(dst, rank=0, world_size=2)  # rank 0 never reads part 1
    with pytest.raises(ArtifactError, match="part-00001.pt: sha256 mismatch"):
        load_sharded_part(dst, rank=1, world_size=2)
    m = json.loads((dst / "manifest.json").read_text())
    m["pairing_id"] = "0" * 64
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="pairing mismatch"):
        load_sharded_part(dst, rank=0, world_size=2)
