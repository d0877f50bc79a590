"""Stage 3: lay a proposal out on devices — the index by us, the embedding tables by TorchRec.

Index tensors: shardable ones split evenly by items over the ``shards`` devices of a group (cluster
boundaries make real shards uneven by at most one cluster; the estimate ignores that), the rest
replicated on each device; step-2 "cold" tensors live once per host in pinned host memory.
Tables: TorchRec's ``EmbeddingShardingPlanner.plan`` (the non-collective path; the towers are
``meta`` modules) on a TorchRec ``Topology`` of ``shards`` ranks whose capacity per rank is what the
index left free, so both share one memory budget. On CPU topologies TorchRec may use data-parallel,
table-wise and column-wise sharding (what gloo runs); on CUDA, row-wise too; on one rank, table-wise
only (the types are equivalent there and TorchRec's tie-break is not reproducible). Outside step 2 tables
must stay in HBM (``fused`` / ``dense`` kernels); in step 2 TorchRec may choose UVM kernels.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from torch import nn

from silvertorch.planner.model_specs import ModelDescription, build_tower_tables
from silvertorch.planner.topology import to_torchrec_topology
from silvertorch.planner.types import (
    Partition,
    Partitioner,
    Placement,
    Proposal,
    TensorSpec,
    Topology,
)

__all__ = ["TorchRecPartitioner", "CPU_SHARDING_TYPES", "DEVICE_KERNELS"]

CPU_SHARDING_TYPES = ("data_parallel", "table_wise", "column_wise")
DEVICE_KERNELS = ("fused", "dense")


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def _largest_unplaceable_shard(message: str, cuda: bool) -> int | None:
    """Bytes of the shard TorchRec's ``PlannerError`` says fits on no rank, if it says so."""
    found = re.findall(r"Shard of size Storage\(hbm=(\d+), ddr=(\d+)", message)
    if not found:
        return None
    hbm, ddr = (int(x) for x in found[-1])
    return hbm if cuda else ddr


class TorchRecPartitioner(Partitioner):
    """Index placement arithmetic plus TorchRec's planner for the towers' tables."""

    def __init__(self, towers: nn.Module | None = None) -> None:
        self._towers = towers

    def _index_layout(self, proposal: Proposal, specs: list[TensorSpec]
                      ) -> tuple[list[Placement], int, int]:
        placements, dev, host = [], 0, 0
        for s in specs:
            if s.kind == "table":
                continue
            share = s.bytes_per_device(proposal.shards)
            if not s.carried(proposal.shards):
                placements.append(Placement(
                    name=s.name, tier="device", sharding="not_carried", bytes_per_device=share,
                    reason="not carried by the shards: the sharded model refuses what reads it "
                           "(selectivity-aware probing, retrieval.min_candidates_factor > 0)"))
                continue
            cold = s.name in proposal.cold
            if cold:
                host += s.bytes if proposal.shards == 1 else share
                reason = (f"host memory: {s.bytes_per_query / max(s.bytes, 1):.2e} of its bytes "
                          f"read per query (cold); read over PCIe")
            elif s.per_batch:
                reason = "device: weights read once per batch (hot)"
            elif s.bytes_per_query > 0:
                scope = " (whole catalog)" if s.shardable else ""
                reason = f"device: {s.bytes_per_query / 1e6:.3g} MB read per query{scope}"
            elif s.name == "index.selectivity":
                reason = "device: read per filtered query only with retrieval.min_candidates_factor > 0"
            elif s.kind == "dense":
                reason = "device: used by item updates (the item tower), not by queries"
            else:
                reason = "device: read when a filter is compiled (exact negation), not per query"
            if s.shardable and proposal.shards > 1 and not cold:
                reason += f"; 1/{proposal.shards} of the items per device"
            elif not s.shardable and proposal.shards > 1:
                reason += "; replicated on every device"
            if not cold:
                dev += share
            placements.append(Placement(
                name=s.name, tier="host" if cold else "device",
                sharding="item_sharded" if s.shardable and proposal.shards > 1 else "replicated",
                bytes_per_device=0 if cold else share, reason=reason,
            ))
        return placements, dev, host

    def _torchrec_plan(self, proposal: Proposal, desc: ModelDescription, topology: Topology,
                       free_per_rank: int) -> Any:
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.planner import EmbeddingShardingPlanner
        from torchrec.distributed.planner.storage_reservations import (
            FixedPercentageStorageReservation,
        )
        from torchrec.distributed.planner.types import ParameterConstraints

        towers = self._towers if self._towers is not None else build_tower_tables(desc)
        self._towers = towers
        cuda = topology.compute_device == "cuda"
        caps = {"hbm_cap": free_per_rank} if cuda else {"ddr_cap": free_per_rank}
        tr_topology = to_torchrec_topology(topology, proposal.shards, **caps)
        constraints = {}
        for tower_name in ("user_tower", "item_tower"):
            for cfg in getattr(towers, tower_name).ebc.embedding_bag_configs():
                kw: dict[str, Any] = {}
                if proposal.shards == 1:
                    # one rank: every sharding type is the same placement; TorchRec breaks the tie
                    # between them arbitrarily, so pin table-wise to keep plans reproducible
                    kw["sharding_types"] = ["table_wise"]
                elif not cuda:
                    kw["sharding_types"] = list(CPU_SHARDING_TYPES)
                elif not proposal.tables_may_use_host:
                    kw["compute_kernels"] = list(DEVICE_KERNELS)
                constraints[cfg.name] = ParameterConstraints(**kw)
        planner = EmbeddingShardingPlanner(
            topology=tr_topology,
            batch_size=topology.max_batch,
            # the topology's capacities are already net of reserved memory and of the index
            storage_reservation=FixedPercentageStorageReservation(0.0),
            constraints=constraints,
            debug=False,
        )
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # meta-module dry-run warnings are expected here
        try:
            return planner.plan(towers, [EmbeddingBagCollectionSharder()])
        finally:
            logging.disable(previous)

    def partition(self, proposal: Proposal, specs: list[TensorSpec], desc: ModelDescription,
                  topology: Topology) -> Partition:
        from torchrec.distributed.planner.constants import UVM_CACHING_RATIO
        from torchrec.distributed.planner.types import PlannerError

        placements, dev, host = self._index_layout(proposal, specs)
        cap = topology.device_bytes
        tables = {s.name: s for s in specs if s.kind == "table"}
        table_total = sum(s.bytes for s in tables.values())
        S = proposal.shards
        where_dev = f"device memory of each of {S} devices" if S > 1 else "device memory"

        def failed(reason: str, need_per_device: int) -> Partition:
            missing = max(0, need_per_device - cap)
            return Partition(proposal=proposal, placements=placements, device_bytes=need_per_device,
                             host_bytes=host, fits=False, reason=reason,
                             missing_bytes=missing * S, missing_where=where_dev)

        if dev >= cap:
            need = dev + table_total // S
            return failed(f"index + dense need {_gib(dev)} per device (+ {_gib(table_total // S)} "
                          f"of tables), {_gib(cap)} usable", need)
        try:
            plan = self._torchrec_plan(proposal, desc, topology, cap - dev)
        except PlannerError as err:
            text = str(err)
            first = text.strip().splitlines()[0]
            need = dev + (table_total // S if not proposal.tables_may_use_host
                          else int(table_total * UVM_CACHING_RATIO) // S)
            shard = _largest_unplaceable_shard(text, cuda=topology.compute_device == "cuda")
            if shard is not None:  # TorchRec names the shard that fits on no rank
                need = max(need, dev + shard)
                first += f" (a table shard of {_gib(shard)} fits on no rank)"
            return failed(f"TorchRec found no table placement in the {_gib(cap - dev)} the index "
                          f"left per device: {first}", need)
        rank_dev = [0] * S
        table_host = 0
        kernels: dict[str, str] = {}
        spans: dict[str, int] = {}
        for module_path, params in sorted(plan.plan.items()):
            tower_name = module_path.split(".")[0]
            for tname, ps in sorted(params.items()):
                name = f"{tower_name}.{tname}"
                spec = tables[name]
                kernels[name] = ps.compute_kernel
                ranks = list(ps.ranks or [0])
                spans[name] = len(set(ranks))
                if ps.sharding_spec is not None:
                    shard_bytes = [(sh.shard_sizes[0] * sh.shard_sizes[1] * 4, sh.placement.rank())
                                   for sh in ps.sharding_spec.shards]
                else:  # data parallel: the whole table on every rank
                    shard_bytes = [(spec.bytes, r) for r in ranks]
                uvm = ps.compute_kernel.startswith("fused_uvm")
                ratio = UVM_CACHING_RATIO if ps.compute_kernel == "fused_uvm_caching" else 0.0
                for nbytes, r in shard_bytes:
                    rank_dev[r] += int(nbytes * ratio) if uvm else nbytes
                    table_host += nbytes if uvm else 0
                on_dev = max(int(b * ratio) if uvm else b for b, _ in shard_bytes)
                tier = "host" if uvm and ratio == 0 else "device"
                reason = (f"TorchRec: {ps.sharding_type} over rank(s) {sorted(set(ranks))}, "
                          f"kernel {ps.compute_kernel}")
                if ps.compute_kernel == "fused_uvm_caching":
                    reason += f" (rows in host memory, {UVM_CACHING_RATIO:.0%} cached in HBM)"
                placements.append(Placement(
                    name=name, tier=tier, sharding="torchrec", bytes_per_device=on_dev,
                    reason=reason,
                    torchrec={"sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel,
                              "ranks": sorted(set(ranks))},
                ))
        # offloaded index tensors: one pinned copy per host, mapped into every device of the host;
        # UVM table rows belong to one replica's TorchRec shards: one copy per replica on the host
        host += table_host * max(1, topology.devices_per_host // S)
        device_bytes = dev + max(rank_dev)
        if topology.has_host_tier and host > topology.host_bytes:
            return Partition(
                proposal=proposal, placements=placements, device_bytes=device_bytes, host_bytes=host,
                fits=False, reason=f"host memory: {_gib(host)} offloaded, {_gib(topology.host_bytes)} "
                f"usable per host", missing_bytes=host - topology.host_bytes,
                missing_where="host memory (per host)", table_kernels=kernels, table_ranks=spans)
        return Partition(proposal=proposal, placements=placements, device_bytes=device_bytes,
                         host_bytes=host, fits=device_bytes <= cap,
                         reason="fits" if device_bytes <= cap else "tables overflow the device",
                         missing_bytes=max(0, device_bytes - cap) * S, missing_where=where_dev,
                         table_kernels=kernels, table_ranks=spans)
