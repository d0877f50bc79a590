"""CPU cost of ``POST /v1/retrieve`` per request, in-process (no sockets, no load generator).

``python -m serve.profile_retrieve ARTIFACT [--k 10] [--requests 1500] [--concurrency 16]
[--profile] [--breakdown]`` builds the server's engine and ASGI app around ARTIFACT, sends the
requests straight to the app (``concurrency`` coroutines, a third with a filter when the index has
attributes) and prints one JSON line: CPU milliseconds per request of the whole process and of the
event-loop thread (``time.process_time`` / ``time.thread_time``, so other work on a shared
machine does not count), the mean batch size, and what one full garbage collection of the loaded
process costs (the stall that ``serve.gc_freeze`` avoids; this script does not freeze).
``--profile`` adds a ``cProfile`` listing of the event-loop thread; ``--breakdown`` the
model-owner side per query (:func:`breakdown`).

It measures what the server adds per request (validation, routing, hand-offs, encoding) next to the
forward pass, without uvicorn's HTTP parsing; ``benchmarks/serve_bench.py`` measures the whole
stack over loopback. Figures: ``docs/serving.md``, "Performance notes".
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["measure", "main"]


async def _post(app: Any, body: bytes) -> int:
    """One ASGI request to ``POST /v1/retrieve``; returns the status."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/retrieve", "raw_path": b"/v1/retrieve", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(b"host", b"local"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


def _bodies(served: Any, n: int, k: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    vocab = served.artifact.user_vocab
    users = [{f: rng.choice(list(vals)[1:] or list(vals)) for f, vals in vocab.items() if vals}
             for _ in range(256)]
    filters = []
    attrs = sorted(served.attribute_names)
    if attrs:
        values = [v for v in served.artifact.item_vocab.get(attrs[0], [])[1:4]]
        filters = [f"{attrs[0]}:{v}" for v in values]
    out = []
    for _ in range(n):
        body: dict[str, Any] = {"user": rng.choice(users), "k": k}
        if filters and rng.random() < 1 / 3:
            body["filter"] = rng.choice(filters)
        out.append(json.dumps(body).encode())
    return out


def breakdown(served: Any, bodies: list[bytes], batch: int = 16) -> dict[str, float]:
    """Model-owner side, CPU ms per query over batches of ``batch``: user encoding, filter
    compilation, the forward pass alone, and ``Served.run_queries`` answering as dicts
    (+ ``orjson.dumps``, the old path) and as bytes (the HTTP path)."""
    import orjson
    import torch

    from silvertorch.export import encode_user_features

    queries = []
    for b in bodies:
        r = orjson.loads(b)
        queries.append(served.parse_query(r["user"], r["k"], r.get("filter"), None, None))
    groups = [queries[i:i + batch] for i in range(0, len(queries) - batch + 1, batch)]
    n = sum(len(g) for g in groups)
    elig = served.model.index.eligibility

    def cpu(fn: Any) -> float:
        fn(groups[0])  # warm-up
        t = time.process_time()
        for g in groups:
            fn(g)
        return round((time.process_time() - t) / n * 1000, 4)

    with torch.no_grad():
        kjts = {id(g): encode_user_features(served.artifact, [q.user for q in g]) for g in groups}
        return {
            "encode_users": cpu(lambda g: encode_user_features(served.artifact, [q.user for q in g])),
            "compile_filters": cpu(lambda g: elig.compile([q.filter for q in g])) if elig is not None else 0.0,
            "forward_no_filter": cpu(lambda g: served.model(kjts[id(g)], max(q.k for q in g))),
            "run_queries_dicts_plus_orjson": cpu(lambda g: [orjson.dumps(a) for a in served.run_queries(g)]),
            "run_queries_bytes": cpu(lambda g: served.run_queries(g, as_json=True)),
        }


def measure(artifact: str | Path, *, k: int = 10, requests: int = 1500, concurrency: int = 16,
            threads: int = 1, profile: bool = False, owner_breakdown: bool = False,
            seed: int = 0) -> dict[str, Any]:
    """Run the measurement (see the module docstring); returns the figures."""
    from serve.app import create_app
    from serve.config import ServeConfig
    from serve.server import build_engine

    sys.setswitchinterval(0.001)  # as serve_forever does (switch_interval_ms default)
    cfg = ServeConfig(state_dir=tempfile.mkdtemp(prefix="st-profile-"), threads=threads, max_k=max(k, 1))
    engine, metrics = build_engine(artifact, cfg)
    engine.start()
    try:
        app = create_app(engine, metrics, lambda p: engine.served)
        bodies = _bodies(engine.served, requests, k, seed)

        async def run() -> tuple[float, float, list[int]]:
            for b in bodies[:50]:  # warm-up
                await _post(app, b)
            todo = list(bodies)
            statuses: list[int] = []

            async def client() -> None:
                while todo:
                    statuses.append(await _post(app, todo.pop()))

            c0, t0 = time.process_time(), time.thread_time()
            await asyncio.gather(*[client() for _ in range(concurrency)])
            return time.process_time() - c0, time.thread_time() - t0, statuses

        prof = cProfile.Profile() if profile else None
        if prof is not None:
            prof.enable()
        count0 = metrics.registry.get_sample_value("silvertorch_batch_size_count") or 0.0
        sum0 = metrics.registry.get_sample_value("silvertorch_batch_size_sum") or 0.0
        cpu, loop_cpu, statuses = asyncio.run(run())
        if prof is not None:
            prof.disable()
        parts = breakdown(engine.served, bodies[:400]) if owner_breakdown else None
        gc.collect()
        tracked = len(gc.get_objects())
        t = time.perf_counter()
        gc.collect()  # what one full collection would stall (serve.gc_freeze avoids it)
        full_gc_ms = (time.perf_counter() - t) * 1000
        count = (metrics.registry.get_sample_value("silvertorch_batch_size_count") or 0.0) - count0
        total = (metrics.registry.get_sample_value("silvertorch_batch_size_sum") or 0.0) - sum0
    finally:
        engine.stop()
    out: dict[str, Any] = {
        "artifact": str(artifact), "k": k, "requests": requests, "concurrency": concurrency,
        "ok": statuses.count(200), "cpu_ms_per_request": round(cpu / requests * 1000, 3),
        "event_loop_cpu_ms_per_request": round(loop_cpu / requests * 1000, 3),
        "mean_batch": round(total / count, 2) if count else 0.0,
        "gc_tracked_objects": tracked, "full_gc_ms_unfrozen": round(full_gc_ms, 1)}
    if parts is not None:
        out["owner_cpu_ms_per_query_batch16"] = parts
    if prof is not None:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
        out["profile"] = text.getvalue()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.profile_retrieve", description=__doc__.split("\n")[0])
    p.add_argument("artifact")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--requests", type=int, default=1500)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the model-owner thread")
    p.add_argument("--profile", action="store_true", help="cProfile of the event-loop thread")
    p.add_argument("--breakdown", action="store_true",
                   help="also the model-owner side per query (encode, filters, forward, answers)")
    a = p.parse_args(argv)
    res = measure(a.artifact, k=a.k, requests=a.requests, concurrency=a.concurrency,
                  threads=a.threads, profile=a.profile, owner_breakdown=a.breakdown)
    listing = res.pop("profile", None)
    print(json.dumps(res))
    if listing:
        print(listing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
