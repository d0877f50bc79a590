"""The TorchRec ``Topology`` the embedding planner shards against.

The placement planner (``silvertorch.planner.topology``) describes hosts, devices, HBM / DRAM and
bandwidths in a file; :func:`build_topology` converts that description with
``to_torchrec_topology`` so training shards tables against the same hardware model as the planner.
Without a topology file, TorchRec's defaults for ``world_size`` devices of ``compute_device`` are used.
"""

from __future__ import annotations

from pathlib import Path

from torchrec.distributed.planner import Topology

__all__ = ["build_topology"]


def build_topology(
    world_size: int,
    compute_device: str,
    topology_path: str | Path | None = None,
) -> Topology:
    """A ``torchrec.distributed.planner.Topology`` for ``world_size`` ranks on ``compute_device``
    ("cpu" / "cuda").

    ``topology_path``: a topology file of the placement planner (``silvertorch.planner``); None =
    TorchRec's default capacities for the device type.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if compute_device not in ("cpu", "cuda"):
        raise ValueError(f"compute_device must be 'cpu' or 'cuda', got {compute_device!r}")
    if topology_path is None:
        return Topology(world_size=world_size, compute_device=compute_device)
    path = Path(topology_path)
    if not path.is_file():
        raise FileNotFoundError(f"topology file not found: {path}")
    try:
        from silvertorch.planner.topology import load_topology, to_torchrec_topology
    except ImportError as err:
        raise RuntimeError(
            f"--topology {path} needs silvertorch.planner.topology (load_topology, "
            f"to_torchrec_topology), which is not available: {err}"
        ) from None
    return to_torchrec_topology(load_topology(path), world_size, compute_device)
