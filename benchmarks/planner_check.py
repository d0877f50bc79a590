"""Planner-checked on this hardware: the planner's estimates vs a measured index, 1 and 2 processes.

    python -m benchmarks.planner_check [--quick] [--out-dir runs/planner_check] [--docs] [--one-process]

Builds a synthetic catalog (``--quick``: 200k items, else 1M; dim 64, int8, with the Bloom/bitmap
eligibility index) in this CPU process and measures

- memory: the index's buffer bytes (what the planner sizes) and the RSS growth of the build;
- latency of one batch of ``max_batch`` queries (the topology's batch) and throughput over all
  queries, unfiltered, at the configured nprobe and k (warm-up excluded, median and spread);

then (:func:`measure_two_process`, topology ``configs/topologies/cpu_2proc.toml``) splits the same
index into 2 item shards, spawns 2 gloo ranks on 127.0.0.1 (1 torch thread each) and measures per
rank the shard's buffer bytes and RSS, and the latency / throughput of the index part of sharded
retrieval (each rank's ``silvertorch::ivf_search``, one all-gather, the global merge; the code of
``ShardedRetrievalModel``). Both are put beside the planner's estimates on the same catalog: cpu_1
as planned, cpu_2proc for its 2-shard step (index tensors only: the towers and OverArch are not in
this measurement). ``run(quick, out_dir) -> dict`` is the entry point for ``make bench``; ``--docs``
also rewrites the figures block of ``docs/planner.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import machine_info, md_table, time_call
from silvertorch.data.synthetic import generate_catalog, make_queries
from silvertorch.distributed.sharded_index import split_index
from silvertorch.distributed.sharded_retrieval import (
    ShardedRetrievalModel, merge_candidates, unpack_candidates,
)
from silvertorch.distributed.wire import candidate_bytes
from silvertorch.index.search import ItemIndex, SearchParams
from silvertorch.planner.model_specs import ModelDescription, describe, model_specs
from silvertorch.model import RetrievalConfig
from silvertorch.planner.planner import Planner, plan_model
from silvertorch.planner.topology import load_topology
from silvertorch.planner.types import Plan, Topology

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "planner.md"
BEGIN, END = "<!-- planner_check:begin -->", "<!-- planner_check:end -->"
NUM_TASKS = 1  # the OverArch tasks of describe_catalog (the all-gather carries one logit each)
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
                      "overarch": {"tasks": ["t"] * NUM_TASKS, "hidden_dims": [8]},
                      "value_model": {"tasks": ["t"], "weights": [1.0]}},
        "joint": {"nlist": cfg.nlist, "index_dtype": "int8"},
        "planner": {"num_items": cfg.num_items, "fresh_fraction": 0.0, "filter_terms": 0,
                    "attributes": [{"name": n, "cardinality": c, "values_per_item": v}
                                   for n, (c, v) in sorted(attributes.items())]},
    }
    return describe(data, name=f"planner_check_{cfg.num_items}")


def index_prediction(per_query_us: dict[str, float], per_batch_us: dict[str, float],
                     desc: ModelDescription, topology: Topology, batch: int, shards: int) -> dict:
    """The cost model's terms restricted to the index part of one group of ``shards`` devices:
    tensor bytes per device, per-query and per-batch microseconds (scan, scores, ids, filter words,
    the scan / probe math and, for ``shards > 1``, the all-gather merge), the latency of a batch of
    ``batch`` and that group's throughput (one replica)."""
    specs = model_specs(desc)
    index_bytes = sum(s.bytes_per_device(shards) for s in specs if s.name.startswith(("index.", "eligibility.")))
    per_query = sum(v for k, v in per_query_us.items() if k in INDEX_TERMS + ("merge",))
    frac = min(1.0, desc.nprobe / desc.nlist)
    flops = 2.0 * desc.nlist * desc.dim + 2.0 * frac * desc.num_slots / shards * desc.dim
    per_query += flops / (topology.device_tflops * 1e12) * 1e6
    per_batch = per_batch_us.get("index.centroids", 0.0) + per_batch_us.get("merge", 0.0) + \
        topology.batch_overhead_us
    latency_us = per_batch + batch * per_query
    merge_us = per_batch_us.get("merge", 0.0) + batch * per_query_us.get("merge", 0.0)
    return {"index_bytes": index_bytes, "per_query_us": per_query, "per_batch_us": per_batch,
            "batch_latency_ms": latency_us / 1e3, "throughput_qps": batch / (latency_us * 1e-6),
            "merge_ms": merge_us / 1e3}


def predicted_index(plan: Plan, desc: ModelDescription, topology: Topology, batch: int) -> dict:
    """The planner's numbers for ``plan`` restricted to the index (:func:`index_prediction`)."""
    return index_prediction(plan.estimates["per_query_us"], plan.estimates["per_batch_us"], desc,
                            topology, batch, plan.shards)


def predicted_for_shards(desc: ModelDescription, topology: Topology, shards: int, batch: int) -> dict:
    """The cost model's index figures for the first policy step of ``topology`` that splits the
    items over ``shards`` devices and fits memory (whether or not the planner would pick it; on
    ``cpu_2proc`` it picks 1 shard x 2 replicas). Raises ``ValueError`` when no such step fits."""
    for cand in Planner().candidates(desc, topology):
        p = cand.partition.proposal
        if p.shards == shards and cand.partition.fits and cand.estimate is not None:
            est = cand.estimate
            out = index_prediction({k: v * 1e6 for k, v in est.per_query_s.items()},
                                   {k: v * 1e6 for k, v in est.per_batch_s.items()},
                                   desc, topology, batch, shards)
            return {"step": p.step, "shards": shards, **out}
    raise ValueError(f"no step of topology {topology.name!r} fits the index in {shards} shard(s)")


# ------------------------------------------------------------------------------ 2 processes
def _free_port() -> int:
    """A free TCP port on 127.0.0.1 (other jobs run servers on this host at the same time)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ZeroLogits(nn.Module):
    """Stand-in OverArch of the index-only measurement: ``(query (B, D), items (B, K, D), features)``
    -> ``(B, K, T)`` zero logits. The scoring compute is out of scope (as in the 1-process figure),
    but the all-gather carries the real wire format, ``5 + T`` int32 words per candidate."""

    feature_names: list[str] = []

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.num_tasks = num_tasks

    def forward(self, query: torch.Tensor, items: torch.Tensor, features: object) -> torch.Tensor:
        return items.new_zeros((*items.shape[:2], self.num_tasks))


def _retrieval_step(index: ItemIndex, global_offsets: torch.Tensor, num_items: int, k: int, nprobe: int,
                    rank: int, world: int, timeout_s: float,
                    num_tasks: int = NUM_TASKS) -> Callable[[torch.Tensor], torch.Tensor]:
    """The index part of sharded retrieval on one rank: ``queries (B, D) f32`` -> merged top-``k``
    ids ``(B, k) int64``: this shard's ``silvertorch::ivf_search`` (candidates packed with their
    ``num_tasks`` task logits, here zeros: :class:`_ZeroLogits`), one all-gather over the ranks, the
    global merge. No towers and no OverArch compute (the same scope as the 1-process measurement);
    ``world == 1`` needs no process group."""
    cfg = RetrievalConfig(k_prime=k, nprobe=nprobe, max_k=k, verify=False)
    model = ShardedRetrievalModel(nn.Identity(), index, _ZeroLogits(num_tasks), nn.Identity(), None, {},
                                  cfg, global_offsets, num_items=num_items, rank=rank, world_size=world,
                                  timeout_s=timeout_s)

    @torch.no_grad()
    def step(queries: torch.Tensor) -> torch.Tensor:
        packed = model.local_candidates(queries, k, None, nprobe)  # (B, k, 5 + T) int32
        everyone = model.all_gather(packed)  # (R, B, k, 5 + T)
        return merge_candidates(*unpack_candidates(everyone), k)[1]

    step.model = model  # type: ignore[attr-defined]  # for timing the all-gather alone
    return step


def _timed(fn: Callable[[], object], repeats: int, sync: Callable[[], object]) -> list[float]:
    """``fn`` once untimed (warm-up), then ``repeats`` timed calls, each started after ``sync``."""
    sync()
    fn()
    times = []
    for _ in range(max(1, repeats)):
        sync()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _rank_main(rank: int, world: int, port: int, bundle_path: str, out_dir: str, threads: int,
               timeout_s: float) -> None:
    """One spawned rank: load its shard, time the sharded search, write ``rank{r}.json``
    (``error{r}.txt`` with the traceback on failure)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    out = Path(out_dir)
    try:
        import torch.distributed as dist

        from silvertorch.distributed.process_group import init_distributed

        init_distributed("cpu", timeout_s=timeout_s)
        gc.collect()
        rss_start = _rss_bytes()
        bundle = torch.load(bundle_path, weights_only=False)
        shard: ItemIndex = bundle["shard"]
        gc.collect()
        rss_loaded = _rss_bytes()
        c = bundle["config"]
        sharded = bundle["mode"] == "shards"  # else: a full replica, no collective per batch
        step = _retrieval_step(shard, bundle["global_offsets"], bundle["num_items"], c["k"], c["nprobe"],
                               rank if sharded else 0, world if sharded else 1, timeout_s)
        batches = list(bundle["queries"].split(bundle["batch"]))
        barrier = lambda: dist.barrier()  # noqa: E731
        one = _timed(lambda: step(batches[0]), c["repeats"], barrier)
        every = _timed(lambda: [step(b) for b in batches], c["repeats"], barrier)
        with torch.no_grad():
            packed = step.model.local_candidates(batches[0], c["k"], None, c["nprobe"])
        gather = _timed(lambda: step.model.all_gather(packed), c["repeats"], barrier) if sharded else []
        result = {
            "rank": rank,
            "threads": torch.get_num_threads(),
            "items": int(shard.ivf.ntotal),
            "slots": int(shard.ivf.num_slots),
            "index_bytes": sum(b.numel() * b.element_size() for _, b in shard.named_buffers()),
            "rss_start_bytes": rss_start,
            "rss_loaded_bytes": rss_loaded,
            "rss_after_bytes": _rss_bytes(),
            "batch_s": one,
            "all_queries_s": every,
            "all_gather_s": gather,
            "all_gather_bytes_per_rank": packed.numel() * packed.element_size() if sharded else 0,
            "num_queries": int(bundle["queries"].shape[0]),
        }
        (out / f"rank{rank}.json").write_text(json.dumps(result, indent=2) + "\n")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the parent reports it
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
        os._exit(1)


def _spread(times: list[float]) -> dict[str, float]:
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "max_s": max(times),
            "spread": (max(times) - min(times)) / med if med > 0 else 0.0}


def measure_two_process(index: ItemIndex, queries: torch.Tensor, cfg: CheckConfig, batch: int, *,
                        world: int = 2, mode: str = "shards", threads: int = 1, timeout_s: float = 300.0,
                        workdir: str | Path | None = None, log=print) -> dict:
    """Spawn ``world`` gloo ranks on this host and time the search on each.

    ``mode="shards"``: each rank holds one item shard of ``index``
    (:func:`~silvertorch.distributed.sharded_index.split_index`) and runs the same batches (SPMD):
    its shard's top-``cfg.k`` -> one all-gather -> the global merge. ``mode="replicas"``: each rank
    holds a full copy and answers every batch alone (no collective per batch; throughput is the
    sum over ranks). ``queries (Q, D) f32`` are cut into batches of ``batch``. Timings start after a
    barrier, warm-up excluded; a batch is done when the slowest rank is (the repeat's max over
    ranks). Returns the per-rank figures (``ranks``: shard bytes, items, RSS at start / after
    loading the shard / after searching, the raw times, the time of the all-gather of one batch's
    packed candidates alone) and the summary (``batch_latency_ms`` and
    ``throughput_qps`` as medians with ``*_spread`` = (max - min) / median, ``index_bytes_max``,
    ``rss_loaded_bytes_max``, ``rss_after_bytes_max``, ``all_gather_ms``). Raises ``RuntimeError``
    naming the rank when a rank fails or hangs.
    """
    if world < 2:
        raise ValueError(f"measure_two_process needs world >= 2 ranks, got {world}")
    if mode not in ("shards", "replicas"):
        raise ValueError(f"mode must be 'shards' or 'replicas', got {mode!r}")
    if queries.dim() != 2 or queries.shape[0] < 1 or batch < 1:
        raise ValueError(f"need queries (Q >= 1, D) and batch >= 1, got {tuple(queries.shape)}, {batch}")
    if queries.shape[1] != index.ivf.dim:
        raise ValueError(f"queries have {queries.shape[1]} dims, the index holds {index.ivf.dim}")
    if mode == "shards":
        shards, assignment = split_index(index, world)
        offsets, per_rank = assignment.global_offsets, list(assignment.items_per_shard)
    else:  # every rank a full copy: the planner's "1 shard x 2 replicas"
        shards, offsets = [index] * world, index.ivf.cluster_offsets
        per_rank = [int(index.ivf.ntotal)] * world
    with tempfile.TemporaryDirectory(prefix="planner_check_2p_", dir=workdir) as tmp:
        d = Path(tmp)
        for r, shard in enumerate(shards):
            torch.save({"shard": shard, "global_offsets": offsets, "mode": mode,
                        "num_items": int(index.ivf.slot_ids.max()) + 1, "queries": queries,
                        "batch": batch, "config": asdict(cfg)}, d / f"bundle{r}.pt")
        del shards
        gc.collect()
        ctx = multiprocessing.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, str(d / f"bundle{r}.pt"), str(d),
                                                      threads, timeout_s)) for r in range(world)]
        log(f"planner_check: {world} gloo ranks ({mode}) on 127.0.0.1:{port}, {threads} thread(s) each")
        for p in procs:
            p.start()
        deadline = time.monotonic() + 2 * timeout_s  # a hang guard, not a timing
        while time.monotonic() < deadline and any(p.is_alive() for p in procs):
            if any((d / f"error{r}.txt").exists() for r in range(world)):
                time.sleep(1.0)  # a failed rank: its peers would wait for it until their timeout
                break
            time.sleep(0.2)
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in alive:
            procs[r].kill()
        for p in procs:
            p.join(10)
        errors = {r: (d / f"error{r}.txt").read_text() for r in range(world)
                  if (d / f"error{r}.txt").exists()}
        if errors:
            r, tb = next(iter(errors.items()))
            raise RuntimeError(f"2-process measurement: rank {r} of {world} failed:\n{tb}")
        missing = [r for r in range(world) if not (d / f"rank{r}.json").exists()]
        if alive:
            raise RuntimeError(f"2-process measurement: ranks {alive} of {world} did not finish within "
                               f"{2 * timeout_s:g}s and were killed")
        if missing:
            raise RuntimeError(f"2-process measurement: ranks {missing} of {world} exited (codes "
                               f"{[p.exitcode for p in procs]}) without results; a spawned rank "
                               "re-imports the main module: call this under `if __name__ == '__main__':`")
        ranks = [json.loads((d / f"rank{r}.json").read_text()) for r in range(world)]
    batch_s = [max(t) for t in zip(*(r["batch_s"] for r in ranks))]
    all_s = [max(t) for t in zip(*(r["all_queries_s"] for r in ranks))]
    b, a = _spread(batch_s), _spread(all_s)
    gathers = [max(t) for t in zip(*(r["all_gather_s"] for r in ranks))]  # empty for replicas
    g = _spread(gathers) if gathers else None
    return {
        "world": world,
        "threads_per_rank": threads,
        "mode": mode,
        "items_per_shard": per_rank,
        "ranks": ranks,
        "index_bytes_max": max(r["index_bytes"] for r in ranks),
        "rss_loaded_bytes_max": max(r["rss_loaded_bytes"] for r in ranks),
        "rss_after_bytes_max": max(r["rss_after_bytes"] for r in ranks),
        "rss_shard_delta_bytes_max": max(r["rss_loaded_bytes"] - r["rss_start_bytes"] for r in ranks),
        "batch_latency_ms": b["median_s"] * 1e3,
        "batch_latency_spread": b["spread"],
        # shards answer every query together; replicas each answer all queries on their own
        "throughput_qps": (1 if mode == "shards" else world) * queries.shape[0] / a["median_s"],
        "throughput_spread": a["spread"],
        "all_gather_ms": g["median_s"] * 1e3 if g else None,
        "all_gather_spread": g["spread"] if g else None,
        "all_gather_bytes_per_rank": ranks[0]["all_gather_bytes_per_rank"],
    }


def run(quick: bool = True, out_dir: str | Path = "runs/planner_check", log=print,
        two_process: bool = True) -> dict:
    """Measure, compare with the planner, write ``out_dir/planner_check.{json,md}``; returns the dict.

    ``two_process=False`` skips the 2-rank launch (its entry then records why)."""
    cfg = CheckConfig.make(quick)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    topology = load_topology(ROOT / "configs/topologies/cpu_1.toml")
    batch = topology.max_batch
    log(f"planner_check: catalog {cfg.num_items:,} x {cfg.dim}, nlist {cfg.nlist}, nprobe {cfg.nprobe}")
    load_start = _load()
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
                "batch_latency_ms": one.median_s * 1e3, "batch_latency_spread": one.spread,
                "throughput_qps": everything.rate(cfg.num_queries), "throughput_spread": everything.spread,
                "build_s": build_s}
    # the 2-rank code path (custom op + pack + merge) in this one process, world 1: isolates what
    # the second process and the all-gather change
    step1 = _retrieval_step(index, index.ivf.cluster_offsets, int(index.ivf.slot_ids.max()) + 1,
                            cfg.k, cfg.nprobe, 0, 1, 30.0)
    one1 = time_call(lambda: step1(batches[0]), repeats=cfg.repeats)
    all1 = time_call(lambda: [step1(b) for b in batches], repeats=cfg.repeats)
    same_path = {"batch_latency_ms": one1.median_s * 1e3, "batch_latency_spread": one1.spread,
                 "throughput_qps": all1.rate(cfg.num_queries), "throughput_spread": all1.spread}
    # the same unsharded search on 1 torch thread: on an oversubscribed host the second intra-op
    # thread can cost more (every op waits for a descheduled worker) than it gives
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_t = time_call(lambda: index.search(batches[0], cfg.k, params), repeats=cfg.repeats)
        all_t = time_call(lambda: [index.search(b, cfg.k, params) for b in batches], repeats=cfg.repeats)
    finally:
        torch.set_num_threads(threads)
    one_thread = {"batch_latency_ms": one_t.median_s * 1e3, "batch_latency_spread": one_t.spread,
                  "throughput_qps": all_t.rate(cfg.num_queries), "throughput_spread": all_t.spread}

    attrs = {n: (a.cardinality, a.values.numel() / max(1, a.offsets.numel() - 1))
             for n, a in catalog.attributes.features.items()}
    desc = describe_catalog(cfg, attrs)
    plan = plan_model(desc, topology)
    predicted = predicted_index(plan, desc, topology, batch)
    two = load_topology(ROOT / "configs/topologies/cpu_2proc.toml")
    plan2 = plan_model(desc, two)
    two_entry: dict = {
        "predicted_step": plan2.step, "predicted_shards": plan2.shards, "predicted_replicas": plan2.replicas,
        "predicted_chosen": predicted_index(plan2, desc, two, two.max_batch),
        "predicted": predicted_for_shards(desc, two, 2, two.max_batch),
    }
    two_entry["wire_bytes_per_candidate"] = candidate_bytes(NUM_TASKS)
    two_entry["predicted_chosen"]["throughput_qps_all_replicas"] = \
        plan2.replicas * two_entry["predicted_chosen"]["throughput_qps"]
    if two_process:
        del catalog
        gc.collect()
        m2 = measure_two_process(index, queries, cfg, two.max_batch, world=2, threads=1, log=log)
        rep = measure_two_process(index, queries, cfg, two.max_batch, world=2, mode="replicas",
                                  threads=1, log=log)
        two_entry["measured"], two_entry["measured_replicas"] = m2, rep
        pc = two_entry["predicted_chosen"]
        two_entry["ratio_replicas_measured_over_predicted"] = {
            "index_bytes": rep["index_bytes_max"] / pc["index_bytes"],
            "batch_latency_ms": rep["batch_latency_ms"] / pc["batch_latency_ms"],
            "throughput_qps": rep["throughput_qps"] / pc["throughput_qps_all_replicas"],
        }
        two_entry["ratio_measured_over_predicted"] = {
            "index_bytes": m2["index_bytes_max"] / two_entry["predicted"]["index_bytes"],
            "batch_latency_ms": m2["batch_latency_ms"] / two_entry["predicted"]["batch_latency_ms"],
            "throughput_qps": m2["throughput_qps"] / two_entry["predicted"]["throughput_qps"],
            "merge_ms": m2["all_gather_ms"] / two_entry["predicted"]["merge_ms"],
        }
    else:
        two_entry["measured"] = "skipped (two_process=False)"
    result = {
        "config": asdict(cfg),
        "topology": topology.name,
        "batch": batch,
        "machine": machine_info(),
        "measured": measured,
        "measured_same_path_1proc": same_path,
        "measured_1proc_1thread": one_thread,
        "predicted": predicted,
        "ratio_measured_over_predicted": {
            k: measured[k] / predicted[k] for k in ("index_bytes", "batch_latency_ms", "throughput_qps")
        },
        "cpu_2proc": two_entry,
        "threads": torch.get_num_threads(),
        "load_average_start": load_start,
        "load_average": _load(),
    }
    (out / "planner_check.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (out / "planner_check.md").write_text(render_markdown(result, quick))
    log(render_markdown(result, quick))
    return result


def _load() -> float | None:
    """1-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def render_markdown(r: dict, quick: bool) -> str:
    m, p, q = r["measured"], r["predicted"], r["ratio_measured_over_predicted"]
    two = r["cpu_2proc"]
    p2 = two["predicted"]
    m2 = two["measured"] if isinstance(two["measured"], dict) else None
    q2 = two.get("ratio_measured_over_predicted", {})
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    pm = lambda spread: f" (±{spread / 2:.0%})"  # noqa: E731  half the (max - min) / median
    dash = "-"

    def two_cols(pred: str, meas: str, key: str | None) -> list[str]:
        if m2 is None:
            return [pred, "not measured", dash]
        return [pred, meas, f"{q2[key]:.2f}" if key else dash]

    rows = [
        ["index tensor bytes (per process)", mib(p["index_bytes"]), mib(m["index_bytes"]),
         f"{q['index_bytes']:.2f}",
         *two_cols(mib(p2["index_bytes"]), mib(m2["index_bytes_max"]) if m2 else "", "index_bytes")],
        ["RSS growth: build (1) / loading the shard (2)", dash, mib(m["rss_delta_bytes"]), dash,
         *two_cols(dash, mib(m2["rss_shard_delta_bytes_max"]) if m2 else "", None)],
        ["RSS of the process after loading", dash, dash, dash,
         *two_cols(dash, mib(m2["rss_loaded_bytes_max"]) if m2 else "", None)],
        ["RSS of the process after searching", dash, dash, dash,
         *two_cols(dash, mib(m2["rss_after_bytes_max"]) if m2 else "", None)],
        [f"latency of a batch of {r['batch']}", f"{p['batch_latency_ms']:.1f} ms",
         f"{m['batch_latency_ms']:.1f} ms{pm(m['batch_latency_spread'])}", f"{q['batch_latency_ms']:.2f}",
         *two_cols(f"{p2['batch_latency_ms']:.1f} ms",
                   f"{m2['batch_latency_ms']:.1f} ms{pm(m2['batch_latency_spread'])}" if m2 else "",
                   "batch_latency_ms")],
        ["throughput", f"{p['throughput_qps']:,.0f} q/s",
         f"{m['throughput_qps']:,.0f} q/s{pm(m['throughput_spread'])}", f"{q['throughput_qps']:.2f}",
         *two_cols(f"{p2['throughput_qps']:,.0f} q/s",
                   f"{m2['throughput_qps']:,.0f} q/s{pm(m2['throughput_spread'])}" if m2 else "",
                   "throughput_qps")],
        ["all-gather of one batch's candidates"
         + (f" ({mib(m2['all_gather_bytes_per_rank'])} per rank)" if m2 else ""),
         dash, dash, dash,
         *two_cols(f"{p2['merge_ms']:.2f} ms",
                   f"{m2['all_gather_ms']:.1f} ms{pm(m2['all_gather_spread'])}" if m2 else "", "merge_ms")],
    ]
    c = r["config"]
    s1 = r["measured_same_path_1proc"]
    cmd = "python -m benchmarks.planner_check" + (" --quick" if quick else "")
    load = " -> ".join(f"{x:.1f}" for x in (r.get("load_average_start"), r["load_average"]) if x is not None)
    text = (f"Catalog {c['num_items']:,} x {c['dim']} int8, nlist {c['nlist']}, nprobe {c['nprobe']}, "
            f"k {c['k']}, unfiltered, {c['num_queries']:,} queries, median of {c['repeats']} repeats "
            f"after a warm-up (± = half the max - min spread); 1 process: {r['threads']} torch threads, "
            f"2 processes: {m2['threads_per_rank'] if m2 else 1} thread each, gloo on 127.0.0.1; load "
            f"average {load} (start -> end) on {r['machine'].get('cores', '?')} cores; "
            f"{r['machine'].get('cpu', '')}. Command: `{cmd} --docs`.\n\n"
            + md_table(["quantity", "planner (cpu_1)", "measured, 1 process", "ratio",
                        f"planner (cpu_2proc, {p2['shards']} shards)", "measured, 2 processes", "ratio"],
                       rows)
            + f"\n\nThe sharded code path in 1 process (same custom op, pack and merge, no all-gather): "
            f"{s1['batch_latency_ms']:.1f} ms per batch{pm(s1['batch_latency_spread'])}, "
            f"{s1['throughput_qps']:,.0f} q/s{pm(s1['throughput_spread'])}.")
    t1 = r.get("measured_1proc_1thread")
    if t1:
        text += (f" The unsharded search in 1 process on 1 torch thread: {t1['batch_latency_ms']:.1f} ms per "
                 f"batch{pm(t1['batch_latency_spread'])}, {t1['throughput_qps']:,.0f} q/s"
                 f"{pm(t1['throughput_spread'])} (ratio to the cpu_1 estimate: "
                 f"{t1['batch_latency_ms'] / p['batch_latency_ms']:.2f} for latency).")
    if m2:
        text += (f" Items per shard: {', '.join(f'{n:,}' for n in m2['items_per_shard'])}. The "
                 f"all-gather carries {two['wire_bytes_per_candidate']} bytes per candidate (score, id, "
                 f"global slot, {NUM_TASKS} task logit; no vector), the count the cost model's merge term "
                 f"uses (`silvertorch.distributed.wire.candidate_bytes`).")
    pc = two["predicted_chosen"]
    rep = two.get("measured_replicas") if isinstance(two.get("measured_replicas"), dict) else None
    text += (f"\n\nOn `cpu_2proc` the planner itself picks step {two['predicted_step']} "
             f"({two['predicted_shards']} shard(s) x {two['predicted_replicas']} replica(s)); "
             + ("measured as 2 processes each holding the whole index and answering alone:\n\n" if rep
                else "not measured (`--one-process`):\n\n"))
    qr = two.get("ratio_replicas_measured_over_predicted", {})
    rrows = [
        ["index tensor bytes (per process)", mib(pc["index_bytes"]),
         mib(rep["index_bytes_max"]) if rep else "not measured", f"{qr['index_bytes']:.2f}" if rep else dash],
        ["RSS of the process after loading", dash, mib(rep["rss_loaded_bytes_max"]) if rep else dash, dash],
        ["RSS of the process after searching", dash, mib(rep["rss_after_bytes_max"]) if rep else dash, dash],
        [f"latency of a batch of {r['batch']}", f"{pc['batch_latency_ms']:.1f} ms",
         f"{rep['batch_latency_ms']:.1f} ms{pm(rep['batch_latency_spread'])}" if rep else dash,
         f"{qr['batch_latency_ms']:.2f}" if rep else dash],
        ["throughput (both replicas)", f"{pc['throughput_qps_all_replicas']:,.0f} q/s",
         f"{rep['throughput_qps']:,.0f} q/s{pm(rep['throughput_spread'])}" if rep else dash,
         f"{qr['throughput_qps']:.2f}" if rep else dash],
    ]
    text += md_table(["quantity", "planner (cpu_2proc, 1 shard x 2)", "measured, 2 replicas", "ratio"], rrows)
    return text + "\n"


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
    parser.add_argument("--one-process", action="store_true", help="skip the 2-process measurement")
    args = parser.parse_args(argv)
    result = run(args.quick, args.out_dir, two_process=not args.one_process)
    if args.docs:
        write_docs(render_markdown(result, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
