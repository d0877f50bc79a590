"""Memory section: bytes per item of the index tensors for each storage dtype (eligibility
included), and the peak resident memory of the real server process after it loaded an artifact and
served traffic (``VmHWM`` of ``python -m launch.cli serve ARTIFACT`` from ``/proc/PID/status``).

    python -m benchmarks --only memory [--quick]
"""

from __future__ import annotations

import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from silvertorch.data.synthetic import generate_catalog
from silvertorch.index.search import ItemIndex

from .common import progress

__all__ = ["DtypeMemory", "index_memory", "proc_status_kib", "server_memory", "memory_section", "MEMORY_PLOT"]

MEMORY_PLOT = "memory_bytes_per_item.png"
DTYPES = ("int8", "fp16", "bf16", "fp32")


@dataclass
class DtypeMemory:
    """Bytes of each group of index buffers for one storage dtype, over ``items`` real items."""

    dtype: str
    items: int
    slots: int
    groups: dict[str, int]  # "vectors", "scales", "layout" (centroids, offsets, ids, live bits), "eligibility"

    @property
    def total(self) -> int:
        return sum(self.groups.values())

    def per_item(self, group: str | None = None) -> float:
        return (self.total if group is None else self.groups[group]) / self.items


def _group_ivf(index: ItemIndex) -> dict[str, int]:
    out = {"vectors": 0, "scales": 0, "layout": 0}
    for name, b in index.ivf.named_buffers():
        key = name if name in ("vectors", "scales") else "layout"
        out[key] += b.numel() * b.element_size()
    return out


def index_memory(items: int, dim: int = 64, nlist: int = 256, seed: int = 0,
                 show: bool = True) -> list[DtypeMemory]:
    """Build the index of a synthetic catalog once per dtype; the eligibility index (bitmaps +
    Bloom signatures over the slots) is built once with the int8 index and counted for every dtype:
    it depends on the slot layout only, not on the vector dtype."""
    catalog = generate_catalog(items, dim, seed=seed)
    out: list[DtypeMemory] = []
    elig_bytes = 0
    for dtype in progress(DTYPES, "memory: dtypes", show):
        attrs = catalog.attributes if dtype == "int8" else None
        index = ItemIndex.build(catalog.vectors, attributes=attrs, nlist=nlist, dtype=dtype, seed=seed)
        groups = _group_ivf(index)
        if index.eligibility is not None:
            elig_bytes = sum(index.eligibility.memory_bytes().values())
        groups["eligibility"] = elig_bytes
        out.append(DtypeMemory(dtype, items, index.ivf.num_slots, groups))
    return out


def proc_status_kib(pid: int) -> dict[str, int]:
    """``VmHWM`` (peak resident) and ``VmRSS`` (current) of ``pid`` in KiB, from ``/proc/PID/status``."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(rest.split()[0])
    if set(out) != {"VmHWM", "VmRSS"}:
        raise RuntimeError(f"/proc/{pid}/status lacks VmHWM / VmRSS (got {sorted(out)})")
    return out


def _artifact_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def server_memory(artifact: Path, requests: int, users: list[dict[str, str]], log=print) -> dict:
    """Start ``silvertorch serve`` on ``artifact`` (loopback, free port, 1 thread), read its memory
    after it is ready, send ``requests`` retrievals (k=100), read it again, stop it."""
    import httpx

    from .serve_bench import Server

    start = time.perf_counter()
    server = Server(artifact, threads=1)
    try:
        ready_s = time.perf_counter() - start
        after_load = proc_status_kib(server.proc.pid)
        rng = random.Random(0)
        ok = 0
        with httpx.Client(timeout=60) as client:
            for _ in range(requests):
                r = client.post(f"{server.url}/v1/retrieve", json={"user": rng.choice(users), "k": 100})
                ok += r.status_code == 200
        after_traffic = proc_status_kib(server.proc.pid)
    finally:
        server.stop()
    if ok == 0:
        raise RuntimeError(f"the server on {artifact} answered none of {requests} requests with 200")
    log(f"server {artifact.name}: VmHWM {after_traffic['VmHWM'] / 2**20:.2f} GiB after {ok} requests")
    return {"artifact": str(artifact), "artifact_bytes": _artifact_bytes(artifact), "ready_s": ready_s,
            "requests_ok": ok, "requests": requests, "after_load_kib": after_load,
            "after_traffic_kib": after_traffic}


def _workload_artifacts(ctx) -> list[tuple[str, Path, list[dict[str, str]]]]:
    """MovieLens (when its artifact is cached) and the synthetic catalog serve_bench uses."""
    from . import serve_bench

    rng = random.Random(0)
    out = []
    ml = serve_bench.CACHE / "movielens_artifact"
    if ml.exists():
        out.append(("MovieLens-100k (1,682 items)", ml,
                    [{"user_id": str(rng.randint(1, 943)), "gender": rng.choice("MF")} for _ in range(64)]))
    items = 100_000 if ctx.quick else 1_000_000
    syn = serve_bench.synthetic_artifact(items, 256 if ctx.quick else 1024, ctx.log)
    out.append((f"synthetic {items:,} items", syn,
                [{"user_id": f"u{rng.randrange(100_000)}", "language": rng.choice(["en", "es", "fr"])}
                 for _ in range(64)]))
    return out


def memory_section(ctx) -> dict:
    """Bytes per item per dtype (always) and the server's peak RSS (not in ``--smoke``)."""
    from .plots import plot_memory

    items, nlist = {"smoke": (4_000, 32), "quick": (100_000, 256), "full": (1_000_000, 1024)}[ctx.mode]
    with torch.no_grad():
        dtypes = index_memory(items, nlist=nlist, show=ctx.show_progress and ctx.mode != "smoke")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    plot_memory(dtypes, ctx.out_dir / MEMORY_PLOT)
    servers: list[dict] = []
    server_note = ""
    if ctx.mode == "smoke":
        server_note = "server peak RSS not measured in --smoke mode (it starts a server); run --quick or full"
    else:
        for name, path, users in _workload_artifacts(ctx):
            try:
                servers.append({"workload": name, **server_memory(path, 50 if ctx.quick else 200, users, ctx.log)})
            except Exception as err:  # noqa: BLE001 - report, keep the dtype table
                servers.append({"workload": name, "error": f"{type(err).__name__}: {str(err)[:300]}"})
    return {"items": items, "nlist": nlist, "dtypes": dtypes, "servers": servers, "server_note": server_note,
            "bench_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "plot": MEMORY_PLOT}
