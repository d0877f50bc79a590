"""Topology files, their TorchRec translation, and the model specs (no materialisation)."""

from __future__ import annotations

from pathlib import Path

import pytest

from silvertorch.config import ConfigError
from silvertorch.planner.model_specs import load_description, model_specs
from silvertorch.planner.topology import load_topology, to_torchrec_topology
from silvertorch.planner.types import GIB

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGIES = sorted((ROOT / "configs" / "topologies").glob("*.toml"))


def test_shipped_topologies_load_and_translate() -> None:
    names = {p.stem for p in TOPOLOGIES}
    assert {"cpu_1", "cpu_2proc", "h100_1", "h100_8", "h100_2x8"} <= names
    for path in TOPOLOGIES:
        t = load_topology(path)
        assert t.name == path.stem
        tr = to_torchrec_topology(t)
        assert tr.world_size == t.world_size and tr.compute_device == t.compute_device
        assert tr.local_world_size == t.devices_per_host
        hbm = {d.storage.hbm for d in tr.devices}
        assert hbm == ({t.device_bytes} if t.compute_device == "cuda" else {0})
        assert tr.hbm_mem_bw == pytest.approx(t.device_bandwidth_gbps * 1e9 / 1e3)  # bytes/ms


def test_h100_2x8_ranks_fill_hosts() -> None:
    t = load_topology(ROOT / "configs/topologies/h100_2x8.toml")
    assert (t.hosts, t.devices_per_host, t.world_size) == (2, 8, 16)
    sub = to_torchrec_topology(t, world_size=4, compute_device="cpu")  # a CPU gloo test run
    assert (sub.world_size, sub.local_world_size, sub.compute_device) == (4, 4, "cpu")
    assert all(d.storage.hbm == 0 and d.storage.ddr > 100 * GIB for d in sub.devices)
    with pytest.raises(ConfigError, match="at most 16 ranks"):
        to_torchrec_topology(t, world_size=17)


def test_bad_topology_names_the_key(tmp_path: Path) -> None:
    text = (ROOT / "configs/topologies/cpu_1.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("device_memory_gib = 24.0", "device_memory_gib = -1.0"))
    with pytest.raises(ConfigError, match="device_memory_gib"):
        load_topology(bad)
    bad.write_text(text + "\nhbm_gib = 3\n")
    with pytest.raises(ConfigError, match="hbm_gib"):
        load_topology(bad)


def test_80m_specs_are_arithmetic() -> None:
    """80M items, never materialised (the meta towers and arithmetic hold no 80M-row tensor)."""
    desc = load_description(ROOT / "configs/synthetic_80m.toml")
    specs = {s.name: s for s in model_specs(desc)}
    assert desc.num_items == 80_000_000 and desc.dim == 512
    # vectors: slots (items + half a 64-slot alignment per cluster + 5% fresh) x (512 bf16 + scale)
    slots = desc.num_slots
    assert 80_000_000 * 1.05 < slots < 80_000_000 * 1.05 + 16384 * 32 + 64
    assert specs["index.vectors"].bytes == slots * (512 * 2 + 4)
    assert specs["user_tower.user_id"].bytes == 50_000_000 * 128 * 4
    int8 = {s.name: s for s in model_specs(desc.with_knobs(index_dtype="int8"))}
    assert int8["index.vectors"].bytes == slots * (512 + 4)


def test_config_without_catalog_size_is_refused() -> None:
    with pytest.raises(ConfigError, match="planner.num_items"):
        load_description(ROOT / "configs/movielens_100k.toml")  # no data facts, no --items
