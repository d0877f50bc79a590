"""``benchmarks.planner_check``: the 2-process measurement runs end to end at a tiny size.

Spawns 2 real gloo ranks (127.0.0.1, a free port) on a 3,000-item index, as 2 shards and as 2
replicas; checks the figures are well-formed, finite and consistent with the shards (never their
speed), and the planner's 2-shard estimate.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.planner_check import (
    ROOT, CheckConfig, describe_catalog, measure_two_process, predicted_for_shards,
)
from silvertorch.data.synthetic import generate_catalog, make_queries
from silvertorch.distributed.sharded_index import split_index
from silvertorch.index.search import ItemIndex
from silvertorch.planner.topology import load_topology

CFG = CheckConfig(num_items=3000, dim=16, nlist=16, nprobe=4, k=10, num_queries=96, repeats=2)


@pytest.fixture(scope="module")
def small() -> tuple[ItemIndex, torch.Tensor, dict[str, tuple[int, float]]]:
    catalog = generate_catalog(CFG.num_items, CFG.dim, seed=3)
    index = ItemIndex.build(catalog.vectors, attributes=catalog.attributes, nlist=CFG.nlist,
                            dtype="int8", seed=3)
    attrs = {n: (a.cardinality, a.values.numel() / max(1, a.offsets.numel() - 1))
             for n, a in catalog.attributes.features.items()}
    return index, make_queries(catalog, CFG.num_queries, seed=4), attrs


def test_measure_two_process_tiny(small: tuple, tmp_path) -> None:
    index, queries, _ = small
    m = measure_two_process(index, queries, CFG, batch=32, timeout_s=120, workdir=tmp_path,
                            log=lambda *_: None)
    assert m["world"] == 2 and len(m["ranks"]) == 2
    assert [r["rank"] for r in m["ranks"]] == [0, 1]
    shards, a = split_index(index, 2)
    assert m["items_per_shard"] == list(a.items_per_shard)
    assert sum(r["items"] for r in m["ranks"]) == index.ivf.ntotal
    for r, shard in zip(m["ranks"], shards):
        assert r["threads"] == 1
        assert r["index_bytes"] == sum(b.numel() * b.element_size() for _, b in shard.named_buffers())
        assert r["rss_loaded_bytes"] >= r["rss_start_bytes"] > 0
        assert len(r["batch_s"]) == len(r["all_queries_s"]) == CFG.repeats
        assert all(math.isfinite(t) and t > 0 for t in r["batch_s"] + r["all_queries_s"])
    assert m["index_bytes_max"] == max(r["index_bytes"] for r in m["ranks"])
    for key in ("batch_latency_ms", "throughput_qps", "batch_latency_spread", "throughput_spread"):
        assert math.isfinite(m[key]) and m[key] >= 0, key
    assert m["batch_latency_ms"] > 0 and m["throughput_qps"] > 0
    assert not list(tmp_path.iterdir()), "the bundles of the ranks are removed afterwards"


def test_measure_two_process_replicas_tiny(small: tuple, tmp_path) -> None:
    index, queries, _ = small
    m = measure_two_process(index, queries, CFG, batch=32, mode="replicas", timeout_s=120,
                            workdir=tmp_path, log=lambda *_: None)
    full = sum(b.numel() * b.element_size() for _, b in index.named_buffers())
    assert m["mode"] == "replicas" and m["items_per_shard"] == [index.ivf.ntotal] * 2
    assert [r["index_bytes"] for r in m["ranks"]] == [full, full]
    assert all(r["all_gather_s"] == [] for r in m["ranks"])  # no collective per batch
    assert math.isfinite(m["throughput_qps"]) and m["throughput_qps"] > 0
    assert math.isfinite(m["batch_latency_ms"]) and m["batch_latency_ms"] > 0


def test_measure_two_process_rejects_bad_input(small: tuple) -> None:
    index, queries, _ = small
    with pytest.raises(ValueError, match="world >= 2"):
        measure_two_process(index, queries, CFG, batch=32, world=1)
    with pytest.raises(ValueError, match="mode"):
        measure_two_process(index, queries, CFG, batch=32, mode="mirrors")
    with pytest.raises(ValueError, match="batch >= 1"):
        measure_two_process(index, queries, CFG, batch=0)
    with pytest.raises(ValueError, match="8 dims, the index holds 16"):
        measure_two_process(index, queries[:, :8], CFG, batch=32)


def test_two_shard_estimate_halves_the_sharded_bytes(small: tuple) -> None:
    _, _, attrs = small
    desc = describe_catalog(CFG, attrs)
    two = load_topology(ROOT / "configs/topologies/cpu_2proc.toml")
    p1 = predicted_for_shards(desc, two, 1, 64)
    p2 = predicted_for_shards(desc, two, 2, 64)
    assert p2["shards"] == 2 and p2["step"] == 3
    assert p2["index_bytes"] < p1["index_bytes"]  # the item-sharded tensors split, centroids stay
    assert p2["per_batch_us"] > p1["per_batch_us"]  # + one all-gather per batch
    assert p1["merge_ms"] == 0 < p2["merge_ms"]
    for p in (p1, p2):
        figures = {k: v for k, v in p.items() if k not in ("step", "shards", "merge_ms")}
        assert all(math.isfinite(v) and v > 0 for v in figures.values()), figures
        assert p["batch_latency_ms"] == pytest.approx((p["per_batch_us"] + 64 * p["per_query_us"]) / 1e3)


def test_two_shard_estimate_counts_what_the_shards_hold() -> None:
    """The planner's bytes per shard against the shards split_index makes: item-proportional tensors
    halve, the centroids stay, and the selectivity histograms are not carried (the sharded model
    refuses selectivity-aware probing), so they count 0 on a shard but in full unsharded. 60,000
    items: at a few thousand the replicated vocabularies, which the model counts as item-sharded,
    would dominate."""
    cfg = CheckConfig(num_items=60_000, dim=16, nlist=256, nprobe=4, k=10, num_queries=8, repeats=1)
    catalog = generate_catalog(cfg.num_items, cfg.dim, seed=5)
    index = ItemIndex.build(catalog.vectors, attributes=catalog.attributes, nlist=cfg.nlist, dtype="int8", seed=5)
    attrs = {n: (a.cardinality, a.values.numel() / max(1, a.offsets.numel() - 1))
             for n, a in catalog.attributes.features.items()}
    desc = describe_catalog(cfg, attrs)
    two = load_topology(ROOT / "configs/topologies/cpu_2proc.toml")
    shards, _ = split_index(index, 2)
    assert index.selectivity is not None and all(s.selectivity is None for s in shards)
    held = max(sum(b.numel() * b.element_size() for _, b in s.named_buffers()) for s in shards)
    whole = sum(b.numel() * b.element_size() for _, b in index.named_buffers())
    hist = sum(b.numel() * b.element_size() for _, b in index.selectivity.named_buffers())
    p1, p2 = predicted_for_shards(desc, two, 1, 64), predicted_for_shards(desc, two, 2, 64)
    assert p1["index_bytes"] == pytest.approx(whole, rel=0.05)
    assert p2["index_bytes"] == pytest.approx(held, rel=0.05)
    # the test has teeth: counting half the histograms on each shard would miss by more than 5%
    assert hist / 2 > 0.1 * held
