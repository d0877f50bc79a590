"""``silvertorch plan --tune``: search the knobs for the best estimated throughput.

Knobs: ``nprobe`` (from ``planner.tune_nprobe``, never below ``planner.min_nprobe``: the recall floor
the config states), index dtype (only those listed in ``planner.tune_dtypes``: a dtype is listed once
its recall has been checked), number of shards (every policy step of the topology) and replicas (the
devices left over). Every combination that fits memory, the latency budget and the demand is a
candidate; the tuner takes the highest throughput, and among candidates within ``tolerance`` of it
prefers more probes (recall), then the earlier policy step, then fewer shards. It never trades
recall for speed silently: the chosen ``nprobe`` and dtype are in the plan's ``knobs`` and the table.
"""

from __future__ import annotations

from dataclasses import dataclass

from silvertorch.planner.model_specs import ModelDescription
from silvertorch.planner.planner import Candidate, Planner, build_plan, plan_error, step_report
from silvertorch.planner.types import Plan, PlanError, StepReport, Topology

__all__ = ["TuneRow", "tune"]


@dataclass(frozen=True)
class TuneRow:
    """One knob combination and its outcome (the table ``--tune`` prints)."""

    index_dtype: str
    nprobe: int
    step: int
    shards: int
    replicas: int
    feasible: bool
    throughput_qps: float
    latency_ms: float
    batch: int
    device_bytes: int
    host_tensors: str  # index tensors in host memory (step 2), "-" for none
    reason: str


def tune(desc: ModelDescription, topology: Topology, planner: Planner | None = None,
         tolerance: float = 0.05) -> tuple[Plan, list[TuneRow]]:
    """The best plan over the knobs and every row tried; :class:`PlanError` if none is feasible."""
    planner = planner or Planner()
    rows: list[TuneRow] = []
    best: list[tuple[ModelDescription, Candidate, list[StepReport]]] = []
    first_error: PlanError | None = None
    for dtype in desc.tune_dtypes:
        for nprobe in desc.tune_nprobe:
            knob = desc.with_knobs(nprobe=nprobe, index_dtype=dtype)
            tried: list[Candidate] = []
            reports: list[StepReport] = []
            for cand in planner.candidates(knob, topology):
                tried.append(cand)
                rep = step_report(cand, topology)
                reports.append(rep)
                p = cand.partition.proposal
                rows.append(TuneRow(
                    index_dtype=dtype, nprobe=nprobe, step=p.step, shards=p.shards,
                    replicas=topology.world_size // p.shards, feasible=cand.feasible,
                    throughput_qps=rep.throughput_qps, latency_ms=rep.latency_s * 1e3,
                    batch=rep.batch, device_bytes=rep.device_bytes,
                    host_tensors=",".join(p.cold) or "-", reason=rep.reason,
                ))
                if cand.feasible:
                    best.append((knob, cand, reports))
            if first_error is None and not any(c.feasible for c in tried):
                first_error = plan_error(knob, topology, tried, reports)
    if not best:
        assert first_error is not None
        raise first_error
    top = max(c.estimate.throughput_qps for _, c, _ in best)  # type: ignore[union-attr]
    near = [b for b in best if b[1].estimate.throughput_qps >= (1 - tolerance) * top]  # type: ignore[union-attr]
    order = {d: i for i, d in enumerate(desc.tune_dtypes)}
    knob, cand, reports = max(near, key=lambda b: (
        b[0].nprobe, -b[1].partition.proposal.step, -b[1].partition.proposal.shards,
        -order[b[0].index_dtype]))
    specs, _ = planner.specs(knob)
    steps = {}
    for r in reports:
        key = (r.step, r.shards)
        if key not in steps or not steps[key].feasible:
            steps[key] = r
    plan = build_plan(knob, topology, cand, specs, list(steps.values()))
    plan.knobs["tuned"] = True
    plan.knobs["tolerance"] = tolerance
    return plan, rows
