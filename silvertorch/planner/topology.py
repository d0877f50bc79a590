"""Load a :class:`Topology` from TOML and translate it into TorchRec's planner ``Topology``.

``to_torchrec_topology`` is the one bridge: the placement planner (tables) and sharded training
(``silvertorch/distributed``) both give TorchRec's ``EmbeddingShardingPlanner`` the same hardware.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from silvertorch.config import ConfigError, load_config
from silvertorch.planner.types import GB, Topology

if TYPE_CHECKING:  # TorchRec is imported lazily: loading a topology needs only tomllib
    from torchrec.distributed.planner.types import Topology as TorchRecTopology

__all__ = ["Topology", "load_topology", "to_torchrec_topology"]


def load_topology(path: str | Path) -> Topology:
    """Read ``configs/topologies/NAME.toml``; raises ``ConfigError`` naming the bad key.

    Example file: ``configs/topologies/h100_8.toml`` (keys and units: :class:`Topology`).
    """
    return load_config(Topology, path)


def _bytes_per_ms(gbps: float) -> float:
    """TorchRec bandwidths are bytes per millisecond."""
    return gbps * GB / 1000.0


def to_torchrec_topology(
    topology: Topology, world_size: int | None = None, compute_device: str | None = None,
    **overrides: Any,
) -> "TorchRecTopology":
    """TorchRec ``Topology`` for ``world_size`` ranks of ``topology`` (default: all its devices).

    Ranks fill hosts in order (``local_world_size = min(devices_per_host, world_size)``).
    Capacities: ``hbm_cap`` = usable device memory (0 on CPU, where TorchRec plans into DDR);
    ``ddr_cap`` per rank = the host's usable DRAM split over its devices (on a CPU topology: the
    process's memory). Bandwidths are converted from GB/s to TorchRec's bytes/ms. ``compute_device``
    overrides the topology's (e.g. plan a CUDA topology's tables for a CPU gloo test run).
    ``overrides`` go to TorchRec's ``Topology`` as they are (e.g. ``pod_size``).
    """
    from torchrec.distributed.planner.types import (
        HardwareConfig,
        KernelConfig,
        TopologyFactory,
        TrainerConfig,
    )

    world = topology.world_size if world_size is None else int(world_size)
    if world < 1:
        raise ConfigError("world_size", f">= 1, got {world}")
    if world > topology.world_size:
        raise ConfigError(
            "world_size",
            f"at most {topology.world_size} ranks on topology '{topology.name}' "
            f"({topology.hosts} host(s) x {topology.devices_per_host} device(s)), got {world}",
        )
    device = compute_device or topology.compute_device
    if device not in ("cpu", "cuda"):
        raise ConfigError("compute_device", f"'cpu' or 'cuda', got {device!r}")
    local = min(topology.devices_per_host, world)
    hbm = topology.device_bytes if device == "cuda" else 0
    if topology.compute_device == "cpu":
        ddr = topology.device_bytes  # a CPU "device" is a process computing from DRAM
    else:
        host_share = topology.host_memory_gib * (1.0 - topology.host_reserved_fraction)
        ddr = int(host_share * (1 << 30) / topology.devices_per_host)
    hardware = HardwareConfig(
        hbm_cap_bytes=hbm if device == "cuda" else None,
        ddr_cap_bytes=ddr,
        hbm_mem_bw=_bytes_per_ms(topology.device_bandwidth_gbps),
        ddr_mem_bw=_bytes_per_ms(topology.host_bandwidth_gbps),
        hbm_to_ddr_mem_bw=_bytes_per_ms(topology.host_to_device_gbps),
        intra_host_bw=_bytes_per_ms(topology.intra_host_gbps),
        inter_host_bw=_bytes_per_ms(min(topology.inter_host_gbps, topology.intra_host_gbps)),
    )
    trainer = TrainerConfig(world_size=world, local_world_size=local)
    kernel = KernelConfig(compute_device=device, use_hardware_based_bandwidth=True)
    tr_topology = TopologyFactory.create_topology(
        trainer_config=trainer, hardware_config=hardware, kernel_config=kernel
    )
    if overrides:  # rare knobs TorchRec's factory does not expose: rebuild directly
        from torchrec.distributed.planner.types import Topology as _TRTopology

        kwargs = dict(
            world_size=world, compute_device=device, hbm_cap=hbm if device == "cuda" else None,
            ddr_cap=ddr, local_world_size=local, hbm_mem_bw=hardware.hbm_mem_bw,
            ddr_mem_bw=hardware.ddr_mem_bw, hbm_to_ddr_mem_bw=hardware.hbm_to_ddr_mem_bw,
            intra_host_bw=hardware.intra_host_bw, inter_host_bw=hardware.inter_host_bw,
            created_by_factory=True,
        )
        kwargs.update(overrides)
        tr_topology = _TRTopology(**kwargs)
    return tr_topology
