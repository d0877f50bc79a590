"""The planner: model specs -> estimate -> propose -> partition -> one :class:`Plan`.

``plan_model(desc, topology)`` walks the policy steps in order (``propose.py``) and returns the first
proposal that fits in memory (index by us, tables by TorchRec, one budget) and whose batch of at least
one query meets the latency budget. Every step tried is reported with its estimates; when nothing
fits, :class:`PlanError` names the missing bytes and where they are missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from silvertorch.planner.estimate import CostModel
from silvertorch.planner.model_specs import ModelDescription, build_tower_tables, model_specs
from silvertorch.planner.partition import TorchRecPartitioner
from silvertorch.planner.propose import StepProposer
from silvertorch.planner.types import (
    Estimate,
    Estimator,
    Partition,
    Partitioner,
    Plan,
    PlanError,
    Proposer,
    StepReport,
    TensorSpec,
    Topology,
)

__all__ = ["Planner", "plan_model", "Candidate"]

COST_MODEL_VERSION = 1


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


@dataclass
class Candidate:
    """One proposal, laid out and estimated (``estimate`` is None when it does not fit)."""

    partition: Partition
    estimate: Estimate | None
    demand_qps: float = 0.0

    @property
    def meets_latency(self) -> bool:
        return self.partition.fits and self.estimate is not None and self.estimate.batch > 0

    @property
    def feasible(self) -> bool:
        return self.meets_latency and self.estimate.throughput_qps >= self.demand_qps  # type: ignore[union-attr]


class Planner:
    """Stages wired together; each stage can be replaced (TorchRec planner style)."""

    def __init__(self, estimator: Estimator | None = None, proposer: Proposer | None = None,
                 partitioner: Partitioner | None = None) -> None:
        self.estimator = estimator or CostModel()
        self.proposer = proposer or StepProposer()
        self.partitioner = partitioner

    def specs(self, desc: ModelDescription) -> tuple[list[TensorSpec], TorchRecPartitioner | Partitioner]:
        towers = build_tower_tables(desc)
        specs = self.estimator.annotate(model_specs(desc, towers), desc)
        return specs, self.partitioner or TorchRecPartitioner(towers)

    def candidates(self, desc: ModelDescription, topology: Topology) -> Iterator[Candidate]:
        """Every proposal in policy order, laid out and (when it fits) estimated."""
        specs, partitioner = self.specs(desc)
        for proposal in self.proposer.propose(specs, topology):
            part = partitioner.partition(proposal, specs, desc, topology)
            est = self.estimator.estimate(part, specs, desc, topology) if part.fits else None
            yield Candidate(part, est, desc.min_throughput_qps)

    def plan(self, desc: ModelDescription, topology: Topology) -> Plan:
        """The first feasible step of the policy; raises :class:`PlanError` when none is."""
        reports: dict[tuple[int, int], StepReport] = {}
        tried: list[Candidate] = []
        specs, _ = self.specs(desc)
        for cand in self.candidates(desc, topology):
            tried.append(cand)
            rep = step_report(cand, topology)
            key = (cand.partition.proposal.step, cand.partition.proposal.shards)
            if key not in reports or not reports[key].feasible:
                reports[key] = rep
            if cand.feasible:
                return build_plan(desc, topology, cand, specs, list(reports.values()))
        raise plan_error(desc, topology, tried, list(reports.values()))


def step_report(cand: Candidate, topology: Topology) -> StepReport:
    part, est = cand.partition, cand.estimate
    p = part.proposal
    if not part.fits:
        reason = part.reason
    elif est is None or est.batch == 0:
        lat = est.latency_s * 1e3 if est else float("nan")
        reason = (f"memory fits, but one query takes {lat:.2f} ms > budget "
                  f"{topology.latency_budget_ms:g} ms")
    elif not cand.feasible:
        reason = (f"memory and latency fit, but {est.throughput_qps:,.0f} q/s < demand "
                  f"{cand.demand_qps:,.0f} q/s")
    else:
        reason = (f"fits; batch {est.batch} in {est.latency_s * 1e3:.2f} ms "
                  f"<= {topology.latency_budget_ms:g} ms")
    if p.cold:
        reason += f" [host: {', '.join(p.cold)}]"
    return StepReport(
        step=p.step, name=p.name, feasible=cand.feasible, reason=reason, shards=p.shards,
        device_bytes=part.device_bytes, host_bytes=part.host_bytes,
        latency_s=est.latency_s if est else 0.0, batch=est.batch if est else 0,
        throughput_qps=est.throughput_qps if est else 0.0,
        missing_bytes=part.missing_bytes, missing_where=part.missing_where,
    )


def model_summary(desc: ModelDescription, specs: list[TensorSpec]) -> dict:
    return {
        "name": desc.name,
        "num_items": desc.num_items,
        "num_slots": desc.num_slots,
        "dim": desc.dim,
        "nlist": desc.nlist,
        "index_dtype": desc.index_dtype,
        "k_prime": desc.retrieval.k_prime,
        "min_nprobe": desc.min_nprobe,
        "tensors": {s.name: int(s.bytes) for s in specs},
        "total_bytes": int(sum(s.bytes for s in specs)),
    }


def build_plan(desc: ModelDescription, topology: Topology, cand: Candidate,
               specs: list[TensorSpec], reports: list[StepReport]) -> Plan:
    part, est = cand.partition, cand.estimate
    assert est is not None
    shards = part.proposal.shards
    replicas = topology.world_size // shards
    return Plan(
        topology=topology.to_dict(),
        model=model_summary(desc, specs),
        step=part.proposal.step,
        step_name=part.proposal.name,
        shards=shards,
        replicas=replicas,
        world_size=shards * replicas,
        knobs={"nprobe": desc.nprobe, "index_dtype": desc.index_dtype, "batch": est.batch},
        placements=sorted(part.placements, key=lambda p: p.name),
        estimates={
            "device_bytes_per_device": part.device_bytes,
            "device_bytes_usable": topology.device_bytes,
            "host_bytes_per_host": part.host_bytes,
            "latency_ms": est.latency_s * 1e3,
            "batch": est.batch,
            "throughput_qps": est.throughput_qps,
            "per_query_us": {k: v * 1e6 for k, v in sorted(est.per_query_s.items())},
            "per_batch_us": {k: v * 1e6 for k, v in sorted(est.per_batch_s.items())},
        },
        steps=sorted(reports, key=lambda r: (r.step, r.shards)),
        cost_model={"version": COST_MODEL_VERSION, "doc": "docs/planner.md"},
    )


def plan_error(desc: ModelDescription, topology: Topology, tried: list[Candidate],
               reports: list[StepReport]) -> PlanError:
    """Why nothing was accepted. Memory shortfall is measured on the largest all-in-device-memory
    proposal (items over every device of the topology); host memory (step 2) is reported beside it."""
    in_device = [c for c in tried if c.partition.proposal.step != 2]
    widest = in_device[-1]
    part = widest.partition
    S = part.proposal.shards
    step2 = [c for c in tried if c.partition.proposal.step == 2]
    if step2:
        ok = [c for c in step2 if c.meets_latency]
        if ok:
            best = max(ok, key=lambda c: c.estimate.throughput_qps if c.estimate else 0.0)
            qps = best.estimate.throughput_qps if best.estimate else 0.0
            host_note = (f"; host memory (step 2) holds it with "
                         f"{', '.join(best.partition.proposal.cold) or 'table rows'} offloaded but "
                         f"serves {qps:,.0f} q/s < demand {desc.min_throughput_qps:,.0f} q/s")
        else:
            host_note = f"; with host memory (step 2): {step_report(step2[-1], topology).reason}"
    else:
        host_note = ""
    head = (f"model '{desc.name}' ({desc.num_items} items) on topology '{topology.name}' "
            f"({topology.hosts} host(s) x {topology.devices_per_host} device(s), "
            f"{_gib(topology.device_bytes)} usable each)")
    if part.fits:
        est = widest.estimate
        if widest.meets_latency:
            qps = max((c.estimate.throughput_qps for c in tried if c.meets_latency and c.estimate),
                      default=0.0)
            why = (f"serves at most {qps:,.0f} q/s < demand {desc.min_throughput_qps:,.0f} q/s; "
                   f"add devices or lower planner.min_throughput_qps")
            where = "throughput"
        else:
            lat = est.latency_s * 1e3 if est else float("nan")
            why = (f"one query takes {lat:.2f} ms with items over {S} device(s), over the "
                   f"{topology.latency_budget_ms:g} ms budget; lower nprobe / k' or raise the budget")
            where = "latency"
        return PlanError(f"{head}: fits in memory but {why}; no memory is missing (0 bytes)"
                         f"{host_note}", missing_bytes=0, where=where, steps=reports)
    per_dev = part.missing_bytes // max(S, 1)
    msg = (f"{head} does not fit: with items sharded over {S} device(s) the {part.missing_where} "
           f"is short by {part.missing_bytes} bytes ({_gib(part.missing_bytes)} in all, "
           f"{_gib(per_dev)} per device) — {part.reason}{host_note}")
    return PlanError(msg, missing_bytes=part.missing_bytes, where=part.missing_where, steps=reports)


def plan_model(desc: ModelDescription, topology: Topology) -> Plan:
    """Plan ``desc`` on ``topology`` with the default stages (see module docstring)."""
    return Planner().plan(desc, topology)
