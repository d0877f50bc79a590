"""Stage 2: proposals in policy order — scale up first, then out.

1. ``one device``: everything in one device's memory.
2. ``one device + host memory`` (GPU topologies only): hot tensors in HBM, the coldest index tensors
   (fewest bytes read per query per byte held: CSC postings, exact CSR, slot ids, filter words,
   then the item vectors) in pinned host memory read over PCIe, one more at a time; TorchRec may
   put table rows in UVM (cached) memory.
3. ``devices of one host``: items sharded over 2, 4, ... (divisors of) ``devices_per_host``.
4. ``hosts``: items sharded over the devices of 2, 3, ... hosts.
"""

from __future__ import annotations

from silvertorch.planner.types import Proposal, Proposer, TensorSpec, Topology

__all__ = ["StepProposer", "STEP_NAMES"]

STEP_NAMES = {
    1: "one device",
    2: "one device + host memory",
    3: "items sharded over the devices of one host",
    4: "items sharded over hosts",
}


def coldness_order(specs: list[TensorSpec]) -> list[str]:
    """Shardable index tensors, coldest first (bytes read per query / bytes held, ascending)."""
    index = [s for s in specs if s.kind == "index" and s.bytes > 0]
    return [s.name for s in sorted(index, key=lambda s: (s.bytes_per_query / s.bytes, s.name))]


class StepProposer(Proposer):
    """The scale-up-first-then-scale-out policy as an ordered list of proposals."""

    def propose(self, specs: list[TensorSpec], topology: Topology) -> list[Proposal]:
        out = [Proposal(step=1, name=STEP_NAMES[1], shards=1)]
        if topology.has_host_tier:
            cold = coldness_order(specs)
            for n in range(len(cold) + 1):
                out.append(Proposal(step=2, name=STEP_NAMES[2], shards=1, cold=tuple(cold[:n]),
                                    tables_may_use_host=True))
        dph = topology.devices_per_host
        for s in range(2, dph + 1):
            if dph % s == 0:
                out.append(Proposal(step=3, name=STEP_NAMES[3], shards=s))
        for h in range(2, topology.hosts + 1):
            out.append(Proposal(step=4, name=STEP_NAMES[4], shards=h * dph))
        return out
