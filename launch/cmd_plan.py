"""``silvertorch plan``: place the model's tensors on a topology and print / write the plan.

    silvertorch plan --config configs/movielens_100k.toml --topology configs/topologies/cpu_1.toml
    silvertorch plan --config configs/synthetic_80m.toml --topology configs/topologies/h100_8.toml \\
        [--items N] [--tune] [--out sharding_plans/NAME.json]

Catalog facts come from the config's data set (MovieLens) or its ``[planner]`` section (synthetic);
``--items`` overrides the catalog size. Exit codes: 0 plan written, 1 no plan fits (``PlanError``;
the refusal is still written with ``--out``), 2 bad config / topology / arguments.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

__all__ = ["add_arguments", "run", "format_plan"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config (configs/*.toml)")
    parser.add_argument("--topology", required=True, help="configs/topologies/*.toml")
    parser.add_argument("--items", type=int, default=None, help="catalog size (overrides the config)")
    parser.add_argument("--tune", action="store_true",
                        help="search nprobe / dtype / shards / replicas for the best throughput")
    parser.add_argument("--out", default=None, help="write the plan JSON here (sharding_plans/...)")


def _gib(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (``1.50 GiB``, ``12.0 KiB``)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):,.2f} {unit}"
    return f"{int(n)} B"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_steps(steps: list) -> str:
    rows = [[str(s.step), s.name, str(s.shards), _gib(s.device_bytes), _gib(s.host_bytes),
             str(s.batch), f"{s.latency_s * 1e3:.2f}", f"{s.throughput_qps:,.0f}",
             "yes" if s.feasible else "no", s.reason] for s in steps]
    return _table(rows, ["step", "policy", "shards", "device/dev", "host/host", "batch",
                         "ms", "q/s", "ok", "why"])


def format_plan(plan) -> str:  # noqa: ANN001 - silvertorch.planner.types.Plan
    """The plan as text: one row per tensor with the reason, the steps tried, the estimates."""
    e = plan.estimates
    head = (f"plan: {plan.model['name']} ({plan.model['num_items']:,} items, dim {plan.model['dim']}, "
            f"{plan.knobs['index_dtype']}, nprobe {plan.knobs['nprobe']}/{plan.model['nlist']}) on "
            f"{plan.topology['name']}\n"
            f"step {plan.step} ({plan.step_name}): {plan.shards} shard(s) x {plan.replicas} "
            f"replica(s) = world size {plan.world_size}")
    rows = [[p.name, p.tier, p.sharding, _gib(p.bytes_per_device), p.reason]
            for p in plan.placements]
    tensors = _table(rows, ["tensor", "tier", "sharding", "bytes/device", "reason"])
    est = (f"device memory {_gib(e['device_bytes_per_device'])} of {_gib(e['device_bytes_usable'])} "
           f"per device; host memory {_gib(e['host_bytes_per_host'])} per host\n"
           f"batch {e['batch']} in {e['latency_ms']:.2f} ms (budget "
           f"{plan.topology['latency_budget_ms']:g} ms); throughput {e['throughput_qps']:,.0f} q/s "
           f"(all replicas); cost model: docs/planner.md")
    top = sorted(e["per_query_us"].items(), key=lambda kv: -kv[1])[:4]
    est += "\nper query: " + ", ".join(f"{k} {v:.2f} us" for k, v in top)
    return "\n\n".join([head, tensors, "steps tried:\n" + format_steps(plan.steps), est])


def _format_tune(rows: list) -> str:
    body = [[r.index_dtype, str(r.nprobe), str(r.step), str(r.shards), str(r.replicas),
             f"{r.throughput_qps:,.0f}", f"{r.latency_ms:.2f}", "yes" if r.feasible else "no",
             r.host_tensors]
            for r in rows if r.step != 2 or r.feasible]
    return _table(body, ["dtype", "nprobe", "step", "shards", "replicas", "q/s", "ms", "ok",
                         "index tensors in host memory"])


def run(args: argparse.Namespace) -> int:
    from silvertorch.config import ConfigError
    from silvertorch.planner.data_facts import data_facts
    from silvertorch.planner.model_specs import load_description
    from silvertorch.planner.planner import Planner
    from silvertorch.planner.shipped import render_error
    from silvertorch.planner.topology import load_topology
    from silvertorch.planner.tune import tune
    from silvertorch.planner.types import PlanError

    try:
        if not Path(args.topology).is_file():
            raise ConfigError("--topology", f"topology file not found: {args.topology} "
                              f"(shipped ones: configs/topologies/*.toml)")
        topology = load_topology(args.topology)
        if not Path(args.config).is_file():
            raise ConfigError("", f"config file not found: {args.config}")
        if args.items is not None and args.items < 1:
            raise ConfigError("--items", f">= 1, got {args.items}")
        try:
            facts = data_facts(args.config)
        except FileNotFoundError as err:
            print(f"note: data set not available ({err}); using [planner] and --items only",
                  file=sys.stderr)
            from silvertorch.planner.data_facts import DataFacts

            facts = DataFacts()
        desc = load_description(args.config, num_items=args.items or facts.num_items,
                                 cardinalities=facts.cardinalities, attributes=facts.attributes)
        if args.items:
            desc = replace(desc, name=f"{desc.name}@{args.items}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if args.tune:
            plan, rows = tune(desc, topology)
            print("tuning (recall floor: nprobe >= "
                  f"{desc.min_nprobe}, dtypes {desc.tune_dtypes}):\n" + _format_tune(rows) + "\n")
        else:
            plan = Planner().plan(desc, topology)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        if err.steps:
            print("steps tried:\n" + format_steps(err.steps), file=sys.stderr)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(render_error(err, desc.name, topology.name))
            print(f"wrote the refusal to {args.out}", file=sys.stderr)
        return 1
    print(format_plan(plan))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(plan.to_json())
        print(f"\nwrote {args.out}")
    return 0
