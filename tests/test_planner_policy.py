"""Placement planner on meta-device / arithmetic models, for topologies with known answers."""

from __future__ import annotations

import math

import pytest

from silvertorch.planner.model_specs import ModelDescription, describe, model_specs
from silvertorch.planner.partition import CPU_SHARDING_TYPES, DEVICE_KERNELS
from silvertorch.planner.planner import plan_model
from silvertorch.planner.types import GIB, Plan, PlanError, PlanMismatchError, Topology

ITEMS = 1_000_000


def small_model(items: int = ITEMS, *, user_rows: int = 1000, demand: float = 0.0,
                dtype: str = "fp32") -> ModelDescription:
    """1M items, dim 64: ~0.3 GB, mostly the fp32 item vectors."""
    tower = lambda feats, rows: {  # noqa: E731
        "features": feats, "mlp_dims": [64],
        "tables": [{"name": f, "features": [f], "embedding_dim": 32, "num_embeddings": rows}
                   for f in feats],
    }
    data = {
        "model": {"user_tower": tower(["user_id"], user_rows), "item_tower": tower(["genre"], 10)},
        "retrieval": {"k_prime": 100, "nprobe": 8,
                      "overarch": {"tasks": ["a"], "item_features": ["genre"], "hidden_dims": [32]},
                      "value_model": {"tasks": ["a"], "weights": [1.0]}},
        "joint": {"nlist": 256, "index_dtype": dtype},
        "planner": {"num_items": items, "min_throughput_qps": demand,
                    "attributes": [{"name": "genre", "cardinality": 10}]},
    }
    return describe(data, name="small")


def topo(*, hosts: int = 1, devices: int = 1, device_gib: float, host_gib: float = 4.0,
         device: str = "cuda", budget_ms: float = 50.0) -> Topology:
    return Topology(
        name=f"t{hosts}x{devices}", compute_device=device, hosts=hosts, devices_per_host=devices,
        device_memory_gib=device_gib, device_reserved_fraction=0.0, host_memory_gib=host_gib,
        host_reserved_fraction=0.0, device_bandwidth_gbps=2000.0, host_bandwidth_gbps=100.0,
        host_to_device_gbps=50.0, intra_host_gbps=400.0, inter_host_gbps=50.0,
        device_tflops=100.0, latency_budget_ms=budget_ms, max_batch=256,
    )


def need_per_device(desc: ModelDescription, shards: int) -> int:
    """Independent arithmetic: replicated + item-sharded share + tables spread over the shards."""
    specs = model_specs(desc)
    rep = sum(s.bytes for s in specs if s.kind != "table" and not s.shardable)
    shard = sum(math.ceil(s.bytes / shards) for s in specs
                if s.kind != "table" and s.shardable and not (shards > 1 and s.sharded_drops))
    return rep + shard + sum(s.bytes for s in specs if s.kind == "table") // shards


def test_fits_one_device() -> None:
    plan = plan_model(small_model(), topo(device_gib=1.0))
    assert (plan.step, plan.shards, plan.replicas) == (1, 1, 1)
    assert all(p.tier == "device" for p in plan.placements)
    assert plan.estimates["device_bytes_per_device"] <= 1 * GIB
    assert plan.estimates["throughput_qps"] > 0 and plan.estimates["latency_ms"] <= 50.0


def test_needs_host_memory_offloads_coldest_first() -> None:
    desc = small_model()
    plan = plan_model(desc, topo(device_gib=0.2))
    assert plan.step == 2, [s.reason for s in plan.steps]
    one = next(s for s in plan.steps if s.step == 1)
    assert not one.feasible and one.missing_bytes == need_per_device(desc, 1) - int(0.2 * GIB)
    tiers = {p.name: p.tier for p in plan.placements}
    assert tiers["index.vectors"] == "host"  # 0.27 GB of vectors cannot stay in 0.2 GiB
    assert tiers["eligibility.csr"] == "host"  # colder than the vectors, offloaded before them
    assert tiers["index.centroids"] == "device"  # hot tensors never leave the device
    assert plan.estimates["device_bytes_per_device"] <= int(0.2 * GIB)
    assert plan.estimates["per_query_us"]["index.vectors"] > 0


def test_needs_eight_devices() -> None:
    desc = small_model()
    t = topo(devices=8, device_gib=0.05, host_gib=0.1)  # host too small for step 2
    assert need_per_device(desc, 4) > t.device_bytes >= need_per_device(desc, 8)
    plan = plan_model(desc, t)
    assert (plan.step, plan.shards, plan.replicas, plan.world_size) == (3, 8, 1, 8)
    assert {p.sharding for p in plan.placements if p.name == "index.vectors"} == {"item_sharded"}
    assert plan.estimates["per_query_us"]["merge"] > 0


def test_needs_two_hosts() -> None:
    desc = small_model()
    t = topo(hosts=2, devices=8, device_gib=0.03, host_gib=0.1)
    assert need_per_device(desc, 8) > t.device_bytes >= need_per_device(desc, 16)
    plan = plan_model(desc, t)
    assert (plan.step, plan.shards, plan.world_size) == (4, 16, 16)
    assert [s.step for s in plan.steps][-1] == 4


def test_cannot_fit_names_missing_bytes() -> None:
    desc = small_model()
    t = topo(devices=2, device_gib=0.05, host_gib=0.1)
    with pytest.raises(PlanError) as info:
        plan_model(desc, t)
    expected = 2 * (need_per_device(desc, 2) - t.device_bytes)
    assert info.value.missing_bytes == expected
    assert str(expected) in str(info.value) and "device memory" in info.value.where
    assert "host memory" in str(info.value)  # step 2 was tried and is reported


def test_unsplittable_table_refusal_names_the_shard() -> None:
    """A 256 MB table that column-wise cannot split (dim 32 < 128) fits on no CPU rank."""
    t = topo(devices=2, device_gib=0.35, device="cpu")
    with pytest.raises(PlanError) as info:
        plan_model(small_model(user_rows=2_000_000), t)
    assert "fits on no rank" in str(info.value) and info.value.missing_bytes > 0


def test_latency_budget_refusal_has_no_missing_memory() -> None:
    with pytest.raises(PlanError) as info:
        plan_model(small_model(), topo(device_gib=1.0, budget_ms=0.01))
    assert info.value.missing_bytes == 0 and info.value.where == "latency"
    assert "budget" in str(info.value)


def test_demand_pushes_past_host_memory() -> None:
    """Step 2 serves few queries over PCIe; a demand it cannot meet moves the plan to sharding."""
    t = topo(devices=8, device_gib=0.2)
    offload = plan_model(small_model(), t)
    assert (offload.step, offload.shards, offload.replicas) == (2, 1, 8)
    offload.check(model_specs(small_model()), world_size=3)  # 3 of the 8 replicas: accepted
    plan = plan_model(small_model(demand=200_000.0), t)
    assert plan.step == 3 and plan.estimates["throughput_qps"] >= 200_000.0
    step2 = next(s for s in plan.steps if s.step == 2)
    assert "demand" in step2.reason and not step2.feasible


def test_tables_placed_by_torchrec_cuda_step1_in_hbm() -> None:
    plan = plan_model(small_model(user_rows=200_000), topo(devices=2, device_gib=1.0))
    tables = [p for p in plan.placements if p.sharding == "torchrec"]
    assert {p.name for p in tables} == {"user_tower.user_id", "item_tower.genre"}
    for p in tables:
        assert p.torchrec is not None and p.torchrec["compute_kernel"] in DEVICE_KERNELS


def test_tables_on_cpu_use_gloo_sharding_types() -> None:
    desc = small_model(user_rows=2_000_000)  # 256 MB table: goes to the other process's memory
    t = topo(devices=2, device_gib=0.45, device="cpu")
    plan = plan_model(desc, t)
    assert plan.step == 3
    kinds = {p.torchrec["sharding_type"] for p in plan.placements if p.torchrec}
    assert kinds <= set(CPU_SHARDING_TYPES)
    assert all(p.tier == "device" for p in plan.placements)  # no host tier on CPU


def test_json_round_trip_and_check() -> None:
    desc = small_model()
    plan = plan_model(desc, topo(devices=8, device_gib=0.05, host_gib=0.1))
    again = Plan.from_json(plan.to_json())
    assert again.to_json() == plan.to_json()
    assert '"timestamp"' not in plan.to_json()
    again.check(model_specs(desc), world_size=8)  # matches: no error
    with pytest.raises(PlanMismatchError, match="world size: the plan is for 8"):
        again.check(model_specs(desc), world_size=4)  # 8 shards cannot run on 4 ranks
    with pytest.raises(PlanMismatchError, match="got 16"):
        again.check(model_specs(desc), world_size=16)  # no room for a second replica
    with pytest.raises(PlanMismatchError, match="index.vectors"):
        again.check(model_specs(small_model(items=2 * ITEMS)), world_size=8)
    with pytest.raises(PlanMismatchError, match="not a SilverTorch plan"):
        Plan.from_json('{"step": 1}')


def test_merge_and_candidate_terms_follow_what_the_sharded_model_sends() -> None:
    """The merge term counts `wire.candidate_bytes(T)` per candidate from each other shard (plus the
    reranker's vector fetch), and each shard reads its own K' candidates' vectors in full."""
    from silvertorch.distributed.wire import candidate_bytes, fetch_bytes
    from silvertorch.planner.model_specs import DTYPE_BYTES

    desc = small_model()
    t = topo(devices=8, device_gib=0.05, host_gib=0.1)
    plan = plan_model(desc, t)
    assert plan.shards == 8
    kp, link = desc.retrieval.k_prime, t.intra_host_gbps * 1e9
    est = plan.estimates
    want = (8 - 1) * kp * candidate_bytes(1) / link * 1e6
    assert est["per_query_us"]["merge"] == pytest.approx(want, rel=1e-5)
    assert est["per_batch_us"]["merge"] == pytest.approx(t.collective_intra_us, rel=1e-5)
    frac = desc.nprobe / desc.nlist
    b = DTYPE_BYTES[desc.index_dtype]
    vectors = frac * desc.num_slots * (desc.dim * b + 4) / 8 + kp * desc.dim * b
    assert est["per_query_us"]["index.vectors"] == pytest.approx(vectors / (t.device_bandwidth_gbps * 1e9) * 1e6,
                                                                 rel=1e-5)
    # a reranker adds one all-reduce of the top-n winners' vectors (ring: 2 (s-1)/s of the block)
    desc.retrieval.reranker.enabled = True
    desc.retrieval.reranker.top_n = 30
    from silvertorch.modules.reranker import Reranker

    real = Reranker(desc.retrieval.reranker, desc.dim, len(desc.retrieval.overarch.tasks))
    specs = {sp.name: sp.bytes for sp in model_specs(desc)}
    assert specs["reranker"] == 4 * sum(p.numel() for p in real.parameters())
    est = plan_model(desc, t).estimates
    want += 2 * 7 / 8 * 30 * fetch_bytes(desc.dim) / link * 1e6
    assert est["per_query_us"]["merge"] == pytest.approx(want, rel=1e-5)
    assert est["per_batch_us"]["merge"] == pytest.approx(2 * t.collective_intra_us, rel=1e-5)
