"""Placement planner: where every tensor of the retrieval model lives on a :class:`Topology`.

Stages (TorchRec planner style, one small abstract class each, one file per implementation):
``model_specs`` (tensor specs without materialising) -> ``estimate`` (cost model) ->
``propose`` (policy steps: one device, + host memory, devices of one host, hosts) ->
``partition`` (per-device bytes, TorchRec places the embedding tables) -> :class:`Plan`.
Entry point: :func:`silvertorch.planner.planner.plan_model`. Cost model: ``docs/planner.md``.
"""

from silvertorch.planner.topology import load_topology, to_torchrec_topology
from silvertorch.planner.types import (
    Placement,
    Plan,
    PlanError,
    PlanMismatchError,
    StepReport,
    TensorSpec,
    Topology,
)

__all__ = [
    "Topology",
    "TensorSpec",
    "Placement",
    "StepReport",
    "Plan",
    "PlanError",
    "PlanMismatchError",
    "load_topology",
    "to_torchrec_topology",
]
