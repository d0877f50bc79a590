"""Planner-checked on this hardware: the planner's cpu_1 estimate vs a measured index.

    python -m benchmarks.planner_check [--quick] [--out-dir runs/planner_check] [--docs]

Builds a synthetic catalog (``--quick``: 200k items, else 1M; dim 64, int8, with the Bloom/bitmap
eligibility index) in this one CPU process, measures

- memory: the index's buffer bytes (what the planner sizes) and the RSS growth of the build;
- latency of one batch of ``max_batch`` queries (the topology's batch) and throughput over all
  queries, unfiltered, at the configured nprobe and k;

and puts them beside the planner's estimates for ``configs/topologies/cpu_1.toml`` on the same
catalog (index tensors only: the towers and OverArch are not in this measurement). ``run(quick,
out_dir) -> dict`` is the entry point for ``make bench``; ``--docs`` also rewrites the figures block
of ``docs/planner.md``.

The 2-process measurement (``cpu_2proc``) needs the sharded serving model (issue #6 part 3, not built
yet): :func:`measure_two_process` is the hook; the result carries the planner's cpu_2proc estimate
and ``"measured": "pending"`` until then.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine_info, md_table, time_call
from silvertorch.data.synthetic import generate_catalog, make_queries
from silvertorch.index.search import ItemIndex, SearchParams
from silvertorch.planner.model_specs import ModelDescription, describe, model_specs
from silvertorch.planner.planner import plan_model
from silvertorch.planner.topology import load_topology
from silvertorch.planner.types import Plan, Topology

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "planner.md"
BEGIN, END = "<!-- planner_check:begin -->", "<!-- planner_check:end -->"
INDEX_TERMS = ("index.vectors", "index.slot_ids", "scores", "eligibility.table", "eligibility.csr")


@dataclass(kw_only=True)
class CheckConfig:
    num_items: int
    dim: int = 64
    nlist: int = 1024
    nprobe: int = 16
    k: int = 100
    num_queries: int = 2048
    repeats: int = 3
    seed: int = 0

    @classmethod
    def make(cls, quick: bool) -> "CheckConfig":
        if quick:
            return cls(num_items=200_000, nlist=512, num_queries=1024)
        return cls(num_items=1_000_000)


def _rss_bytes() -> int:
    """Current resident set size (not the peak) from /proc; 0 where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def describe_catalog(cfg: CheckConfig, attributes: dict[str, tuple[int, float]]) -> ModelDescription:
    """The planner's view of the benchmark index: same items, dim, nlist, dtype, attributes;
    no fresh segment, no filter, no verification (the measured searches are unfiltered)."""
    tower = lambda f: {"features": [f], "mlp_dims": [cfg.dim],  # noqa: E731
                       "tables": [{"name": f, "features": [f], "embedding_dim": 8,
                                   "num_embeddings": 16}]}
    data = {
        "model": {"user_tower": tower("u"), "item_tower": tower("i")},
        "retrieval": {"k_prime": cfg.k, "nprobe": cfg.nprobe, "verify": False,
                      "overarch": {"tasks": ["t"], "hidden_dims": [8]},
                      "value_model": {"tasks": ["t"], "weights": [1.0]}},
        "joint": {"nlist": cfg.nlist, "index_dtype": "int8"},
        "planner": {"num_items": cfg.num_items, "fresh_fraction": 0.0, "filter_terms": 0,
                    "attributes": [{"name": n, "cardinality": c, "values_per_item": v}
                                   for n, (c, v) in sorted(attributes.items())]},
    }
    return describe(data, name=f"planner_check_{cfg.num_items}")


def predicted_index(plan: Plan, desc: ModelDescription, topology: Topology, batch: int) -> dict:
    """The planner's numbers restricted to the index: tensor bytes, batch latency, throughput."""
    specs = model_specs(desc)
    index_bytes = sum(s.bytes for s in specs if s.name.startswith(("index.", "eligibility.")))
    per_query = sum(v for k, v in plan.estimates["per_query_us"].items() if k in INDEX_TERMS)
    frac = min(1.0, desc.nprobe / desc.nlist)
    flops = 2.0 * desc.nlist * desc.dim + 2.0 * frac * desc.num_slots * desc.dim
    per_query += flops / (topology.device_tflops * 1e12) * 1e6
    per_batch = plan.estimates["per_batch_us"].get("index.centroids", 0.0) + \
        topology.batch_overhead_us
    latency_us = per_batch + batch * per_query
    return {"index_bytes": index_bytes, "per_query_us": per_query, "per_batch_us": per_batch,
            "batch_latency_ms": latency_us / 1e3, "throughput_qps": batch / (latency_us * 1e-6)}


def measure_two_process(*_: Any) -> dict:
    """HOOK (issue #6 part 3): launch 2 gloo ranks with the item-sharded index, time the merged
    search. Needs ``silvertorch/distributed``'s sharded serving model, which does not exist yet."""
    return {"measured": "pending: needs the sharded serving model (issue #6 part 3)"}


def run(quick: bool = True, out_dir: str | Path = "runs/planner_check", log=print) -> dict:
    """Measure, compare with the planner, write ``out_dir/planner_check.{json,md}``; returns the dict."""
    cfg = CheckConfig.make(quick)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    topology = load_topology(ROOT / "configs/topologies/cpu_1.toml")
    batch = topology.max_batch
    log(f"planner_check: catalog {cfg.num_items:,} x {cfg.dim}, nlist {cfg.nlist}, nprobe {cfg.nprobe}")
    catalog = generate_catalog(cfg.num_items, cfg.dim, seed=cfg.seed)
    queries = make_queries(catalog, cfg.num_queries, seed=cfg.seed + 1)
    gc.collect()
    rss0 = _rss_bytes()
    start = time.perf_counter()
    index = ItemIndex.build(catalog.vectors, attributes=catalog.attributes, nlist=cfg.nlist,
                            dtype="int8", seed=cfg.seed)
    build_s = time.perf_counter() - start
    gc.collect()
    rss_delta = _rss_bytes() - rss0
    measured_bytes = sum(b.numel() * b.element_size() for _, b in index.named_buffers())
    log(f"built in {build_s:.1f}s: buffers {measured_bytes / 2**20:.1f} MiB, "
        f"RSS +{rss_delta / 2**20:.1f} MiB")

    params = SearchParams(nprobe=cfg.nprobe)
    batches = list(queries.split(batch))
    one = time_call(lambda: index.search(batches[0], cfg.k, params), repeats=cfg.repeats)
    everything = time_call(lambda: [index.search(b, cfg.k, params) for b in batches],
                           repeats=cfg.repeats)
    measured = {"index_bytes": measured_bytes, "rss_delta_bytes": rss_delta,
                "batch_latency_ms": one.median_s * 1e3,
                "throughput_qps": everything.rate(cfg.num_queries), "build_s": build_s}

    attrs = {n: (a.cardinality, a.values.numel() / max(1, a.offsets.numel() - 1))
             for n, a in catalog.attributes.features.items()}
    desc = describe_catalog(cfg, attrs)
    plan = plan_model(desc, topology)
    predicted = predicted_index(plan, desc, topology, batch)
    two = load_topology(ROOT / "configs/topologies/cpu_2proc.toml")
    plan2 = plan_model(desc, two)
    result = {
        "config": asdict(cfg),
        "topology": topology.name,
        "batch": batch,
        "machine": machine_info(),
        "measured": measured,
        "predicted": predicted,
        "ratio_measured_over_predicted": {
            k: measured[k] / predicted[k] for k in ("index_bytes", "batch_latency_ms", "throughput_qps")
        },
        "cpu_2proc": {"predicted_step": plan2.step, "predicted_shards": plan2.shards,
                      "predicted": predicted_index(plan2, desc, two, two.max_batch),
                      **measure_two_process(desc, two)},
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    (out / "planner_check.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (out / "planner_check.md").write_text(render_markdown(result, quick))
    log(render_markdown(result, quick))
    return result


def render_markdown(r: dict, quick: bool) -> str:
    m, p, q = r["measured"], r["predicted"], r["ratio_measured_over_predicted"]
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    rows = [
        ["index tensor bytes", mib(p["index_bytes"]), mib(m["index_bytes"]), f"{q['index_bytes']:.2f}"],
        ["RSS growth of the build", "-", mib(m["rss_delta_bytes"]), "-"],
        [f"latency of a batch of {r['batch']}", f"{p['batch_latency_ms']:.1f} ms",
         f"{m['batch_latency_ms']:.1f} ms", f"{q['batch_latency_ms']:.2f}"],
        ["throughput", f"{p['throughput_qps']:,.0f} q/s", f"{m['throughput_qps']:,.0f} q/s",
         f"{q['throughput_qps']:.2f}"],
    ]
    c = r["config"]
    cmd = "python -m benchmarks.planner_check" + (" --quick" if quick else "")
    return (f"Catalog {c['num_items']:,} x {c['dim']} int8, nlist {c['nlist']}, nprobe {c['nprobe']}, "
            f"k {c['k']}, unfiltered; topology `{r['topology']}`; {r['threads']} torch threads, "
            f"load average {r['load_average']:.1f} while measuring; "
            f"{r['machine'].get('cpu', '')}. Command: `{cmd} --docs`.\n\n"
            + md_table(["quantity", "planner (cpu_1)", "measured", "measured / planner"], rows)
            + f"\n\n2 processes (`cpu_2proc`): the planner picks step {r['cpu_2proc']['predicted_step']} "
            f"({r['cpu_2proc']['predicted_shards']} shard(s)), estimating "
            f"{r['cpu_2proc']['predicted']['throughput_qps']:,.0f} q/s for the index; measured: "
            f"{r['cpu_2proc']['measured']}.\n")


def write_docs(markdown: str, doc: Path = DOC) -> None:
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} lacks the {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{markdown}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200k items instead of 1M")
    parser.add_argument("--out-dir", default="runs/planner_check")
    parser.add_argument("--docs", action="store_true", help="rewrite the figures in docs/planner.md")
    args = parser.parse_args(argv)
    result = run(args.quick, args.out_dir)
    if args.docs:
        write_docs(render_markdown(result, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
