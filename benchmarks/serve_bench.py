"""Serving load benchmark: requests/s and p50/p95/p99 latency of ``silvertorch serve`` on loopback.

``python -m benchmarks.serve_bench [--quick]`` -> ``docs/benchmarks_serving.md`` + PNG.

- artifacts: MovieLens-100k exported from the demo's checkpoint (``silvertorch export``; when
  there is no checkpoint, a 1-epoch two-tower run makes one) and a synthetic catalog
  (``python -m train.synthetic_artifact``: 1M items, nlist 1024; ``--quick``: 100k, nlist 256),
  both built in subprocesses and cached under ``runs/serve_bench/``;
- the server runs as a subprocess (``--set threads=1``: the load generator needs the other core);
- the load generator is this process: a minimal asyncio HTTP/1.1 client (one keep-alive
  connection per concurrent worker, closed loop) at each concurrency level; a third of the requests
  carry a filter; random users; ``k = 10``;
- "with updates": one more task upserts a new item (by precomputed vector) every 50 ms (20/s)
  during the level, acknowledged (durable) before the next.

Latency is measured by the client (send -> full response), so it includes HTTP, JSON and the
micro-batching wait. Mean batch size comes from the server's ``/metrics`` histogram.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs" / "serve_bench"
REPORT = "benchmarks_serving.md"
PLOT = "serving_latency_throughput.png"

__all__ = ["LevelResult", "run", "main"]


@dataclass
class Workload:
    name: str
    artifact: Path
    users: list[dict[str, str]]
    filters: list[str]
    dim: int


@dataclass
class LevelResult:
    workload: str
    concurrency: int
    updates: bool
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch: float
    updates_done: int
    update_p99_ms: float


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "launch.cli", *args]


def _run(cmd: list[str], log: Any) -> None:
    log("$ " + " ".join(cmd[1:] if cmd[0] == sys.executable else cmd))
    subprocess.run(cmd, cwd=ROOT, check=True)


def movielens_artifact(checkpoint: Path, log: Any) -> Path:
    """Export ``checkpoint`` (train a 1-epoch one first when it is missing); cached."""
    out = CACHE / "movielens_artifact"
    if out.exists():
        return out
    if not checkpoint.exists():
        checkpoint = CACHE / "ml_train" / "checkpoint.pt"
        if not checkpoint.exists():
            _run(_cli("train", "--config", "configs/movielens_100k.toml", "train.epochs=1",
                      "joint.enabled=false", f"train.out_dir={checkpoint.parent}"), log)
    _run(_cli("export", "--config", "configs/movielens_100k.toml", "--checkpoint", str(checkpoint),
              "--out", str(out), "--no-programs"), log)
    return out


def synthetic_artifact(items: int, nlist: int, log: Any) -> Path:
    out = CACHE / f"synthetic_{items}"
    if not out.exists():
        _run([sys.executable, "-m", "train.synthetic_artifact", "--items", str(items), "--nlist",
              str(nlist), "--out", str(out), "--no-programs"], log)
    return out


def _workloads(quick: bool, checkpoint: Path, log: Any) -> list[Workload]:
    rng = random.Random(0)
    ml = movielens_artifact(checkpoint, log)
    ml_users = [{"user_id": str(rng.randint(1, 943)), "gender": rng.choice("MF")} for _ in range(512)]
    items = 100_000 if quick else 1_000_000
    syn = synthetic_artifact(items, 256 if quick else 1024, log)
    langs = ["en", "es", "fr", "de", "ja"]
    syn_users = [{"user_id": f"u{rng.randrange(100_000)}", "language": rng.choice(langs)} for _ in range(512)]
    return [
        Workload("MovieLens-100k (1,682 items)", ml, ml_users,
                 ["genre:Comedy", "genre:Drama AND NOT decade:1990s", "genre:Action OR genre:Thriller"], 64),
        Workload(f"synthetic {items:,} items", syn, syn_users,
                 ["language:en AND NOT maturity:R", "language:es", "maturity:G OR maturity:PG"], 64),
    ]


class Server:
    """``silvertorch serve`` subprocess on a free loopback port with a fresh state dir."""

    def __init__(self, artifact: Path, threads: int) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="st-bench-"))
        port_file = self.tmp / "port"
        self.proc = subprocess.Popen(
            _cli("serve", str(artifact), "--host", "127.0.0.1", "--port", "0", "--state-dir",
                 str(self.tmp / "state"), "--port-file", str(port_file), "--set", f"threads={threads}",
                 "--set", "compaction_threshold=0"),
            cwd=ROOT, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        deadline = time.monotonic() + 600
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server for {artifact} did not start (exit {self.proc.poll()})")
            time.sleep(0.2)
        self.url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        while httpx.get(f"{self.url}/readyz").status_code != 200:
            time.sleep(0.1)

    def batch_stats(self) -> tuple[float, float]:
        """(sum, count) of the batch-size histogram."""
        text = httpx.get(f"{self.url}/metrics").text
        vals = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines()
                if ln.startswith("silvertorch_batch_size_sum") or ln.startswith("silvertorch_batch_size_count")}
        return vals.get("silvertorch_batch_size_sum", 0.0), vals.get("silvertorch_batch_size_count", 0.0)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _pct(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


class _Conn:
    """One keep-alive HTTP/1.1 connection (asyncio streams): the lightest possible client, so the
    load generator takes little of the CPU it shares with the server."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        self.writer.write(head + data)
        await self.writer.drain()
        assert self.reader is not None
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _level(url: str, wl: Workload, concurrency: int, seconds: float, updates: bool,
                 warmup: float, seed: int) -> tuple[list[float], int, int, list[float], float]:
    """Closed loop at ``concurrency``; returns (latencies ms, requests, errors, update ms, wall s)."""
    rng = random.Random(seed)
    host, port = url.removeprefix("http://").split(":")
    lat: list[float] = []
    upd: list[float] = []
    counts = {"requests": 0, "errors": 0}
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + seconds
    conns: list[_Conn] = []

    async def worker() -> None:
        conn = _Conn(host, int(port))
        conns.append(conn)
        while (now := time.perf_counter()) < t_end:
            body: dict[str, Any] = {"user": rng.choice(wl.users), "k": 10}
            if rng.random() < 1 / 3:
                body["filter"] = rng.choice(wl.filters)
            try:
                status, _ = await conn.request("POST", "/v1/retrieve", body)
                ok = status == 200
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                ok = False
                conn.close()
                conn.writer = None
            done = time.perf_counter()
            if now >= t_measure:
                counts["requests"] += 1
                counts["errors"] += not ok
                lat.append((done - now) * 1000)

    async def updater() -> None:
        conn = _Conn(host, int(port))
        conns.append(conn)
        i = 0
        while (now := time.perf_counter()) < t_end:
            vec = [rng.uniform(-1, 1) for _ in range(wl.dim)]
            status, _ = await conn.request("PUT", "/v1/items", {"items": [{"id": f"bench-{seed}-{i}", "vector": vec}]})
            if status != 200:
                counts["errors"] += 1
            if now >= t_measure:
                upd.append((time.perf_counter() - now) * 1000)
            i += 1
            await asyncio.sleep(max(0.0, 0.05 - (time.perf_counter() - now)))

    try:
        await asyncio.gather(*[worker() for _ in range(concurrency)], *([updater()] if updates else []))
    finally:
        for conn in conns:
            conn.close()
    return lat, counts["requests"], counts["errors"], upd, time.perf_counter() - t_measure


def model_only(wl: Workload, batches: tuple[int, ...] = (1, 4, 16, 64), repeats: int = 5) -> list[tuple[int, float]]:
    """Forward passes of the artifact's model alone, in this process on one thread, no filter:
    ``[(batch size, median ms per pass)]`` (what bounds the server's throughput)."""
    import statistics

    import torch

    from silvertorch.export import encode_user_features, load_artifact

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        art = load_artifact(wl.artifact, verify=False)
        out = []
        with torch.no_grad():
            for b in batches:
                kjt = encode_user_features(art, [wl.users[i % len(wl.users)] for i in range(b)])
                art.model(kjt, 10)
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    art.model(kjt, 10)
                    times.append((time.perf_counter() - t) * 1000)
                out.append((b, statistics.median(times)))
        return out
    finally:
        torch.set_num_threads(threads)


def run(quick: bool, out_dir: Path, *, checkpoint: Path | None = None, log: Any = print) -> dict[str, Any]:
    """Run the benchmark and write ``out_dir/benchmarks_serving.md`` + the PNG; returns the results."""
    checkpoint = checkpoint or ROOT / "runs" / "movielens_100k" / "checkpoint.pt"
    levels = [1, 4, 16] if quick else [1, 4, 16, 32, 64]
    seconds, warmup = (3.0, 1.0) if quick else (8.0, 2.0)
    results: list[LevelResult] = []
    alone: dict[str, list[tuple[int, float]]] = {}
    for wl in _workloads(quick, checkpoint, log):
        alone[wl.name] = model_only(wl)
        log(f"{wl.name}: model alone, 1 thread: " +
            ", ".join(f"batch {b} {ms:.1f} ms ({b / ms * 1000:,.0f} q/s)" for b, ms in alone[wl.name]))
        server = Server(wl.artifact, threads=1)
        try:
            for updates in (False, True):
                for c in levels:
                    s0, n0 = server.batch_stats()
                    lat, n, errors, upd, wall = asyncio.run(
                        _level(server.url, wl, c, seconds, updates, warmup, seed=len(results)))
                    s1, n1 = server.batch_stats()
                    lat.sort()
                    upd.sort()
                    res = LevelResult(wl.name, c, updates, n, errors, wall, n / wall, _pct(lat, 0.5),
                                      _pct(lat, 0.95), _pct(lat, 0.99),
                                      (s1 - s0) / (n1 - n0) if n1 > n0 else float("nan"),
                                      len(upd), _pct(upd, 0.99) if upd else float("nan"))
                    results.append(res)
                    log(f"{wl.name:<30} c={c:<3} updates={'yes' if updates else 'no ':<3} "
                        f"{res.rps:8.1f} req/s  p50 {res.p50_ms:6.1f}  p95 {res.p95_ms:6.1f}  "
                        f"p99 {res.p99_ms:6.1f} ms  batch {res.mean_batch:5.1f}  errors {errors}")
        finally:
            server.stop()
    command = "python -m benchmarks.serve_bench" + (" --quick" if quick else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot(results, out_dir / PLOT)
    (out_dir / REPORT).write_text(_report(results, command, quick, levels, seconds, alone))
    log(f"wrote {out_dir / REPORT} and {out_dir / PLOT}")
    return {"command": command, "quick": quick, "results": [asdict(r) for r in results],
            "model_alone_ms": {k: dict(v) for k, v in alone.items()}}


def _plot(results: list[LevelResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for wl in dict.fromkeys(r.workload for r in results):
        for updates, style in ((False, "-o"), (True, "--s")):
            rows = [r for r in results if r.workload == wl and r.updates == updates]
            ax.plot([r.rps for r in rows], [r.p99_ms for r in rows], style,
                    label=f"{wl}{' + 20 upserts/s' if updates else ''}")
            for r in rows:
                ax.annotate(f"c={r.concurrency}", (r.rps, r.p99_ms), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    ax.axhline(100, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("requests / s")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.set_title("silvertorch serve on loopback: p99 vs throughput")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _machine() -> str:
    import platform

    import torch

    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, python {platform.python_version()}, torch {torch.__version__}; "
            f"load average {load:.2f} at the end of the run")


def _report(results: list[LevelResult], command: str, quick: bool, levels: list[int], seconds: float,
            alone: dict[str, list[tuple[int, float]]]) -> str:
    lines = [
        "# Serving load benchmark",
        "",
        f"Reproduce: `{command}` (writes this file and `{PLOT}`). "
        f"{'Quick mode: 100k-item synthetic catalog, 3 s per level.' if quick else 'Full mode: 1M-item synthetic catalog, 8 s per level.'}",
        "",
        f"Machine: {_machine()}.",
        "",
        *([f"**Caveat**: the machine was shared with other jobs during this run (load average "
           f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): the server and the load generator got a "
           f"fraction of a core each, so these figures are lower bounds and noisy; rerun on a quiet "
           f"machine for representative numbers.", ""]
          if hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1) else []),
        "Setup: one `silvertorch serve` process (`threads=1`, default `max_batch_size=64`, "
        "`max_wait_ms=2`) and the load generator (a minimal Python asyncio HTTP/1.1 client, one keep-alive "
        "connection per concurrent client, closed loop) share the machine's cores. Each request: a "
        "random user, `k=10`, a filter on one third of them. \"updates\" = a concurrent stream of "
        "20 upserts/s (one new item each, fsynced before the answer). Latency is client-side.",
        "",
        "| workload | clients | updates | req/s | p50 ms | p95 ms | p99 ms | mean batch | errors | upserts (p99 ms) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        ups = f"{r.updates_done} ({r.update_p99_ms:.1f})" if r.updates else "-"
        lines.append(f"| {r.workload} | {r.concurrency} | {'yes' if r.updates else 'no'} | {r.rps:,.0f} | "
                     f"{r.p50_ms:.1f} | {r.p95_ms:.1f} | {r.p99_ms:.1f} | {r.mean_batch:.1f} | "
                     f"{r.errors} | {ups} |")
    lines += ["", f"![p99 latency vs throughput]({PLOT})", "",
              "The model alone (same run, in the benchmark process, one thread, no filter, k=10): "
              "milliseconds per forward pass by batch size, and the queries/s that makes. This bounds "
              "what the server can reach on one core; micro-batching is what moves it along this curve.", "",
              "| workload | " + " | ".join(f"batch {b}" for b, _ in next(iter(alone.values()))) + " |",
              "| --- | " + " | ".join("---:" for _ in next(iter(alone.values()))) + " |"]
    for wl, rows in alone.items():
        lines.append(f"| {wl} | " + " | ".join(f"{ms:.1f} ms ({b / ms * 1000:,.0f} q/s)" for b, ms in rows) + " |")
    lines.append("")
    for wl in dict.fromkeys(r.workload for r in results):
        for updates in (False, True):
            rows = [r for r in results if r.workload == wl and r.updates == updates]
            best = max(rows, key=lambda r: r.rps)
            verdict = "meets" if best.p99_ms < 100 and best.errors == 0 else "misses"
            lines.append(f"- {wl}, {'with' if updates else 'without'} updates: highest throughput "
                         f"{best.rps:,.0f} req/s at {best.concurrency} clients, p99 {best.p99_ms:.1f} ms, "
                         f"{sum(r.errors for r in rows)} errors: {verdict} the target (p99 < 100 ms, no errors).")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="100k synthetic items, shorter levels")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--checkpoint", type=Path, default=None, help="MovieLens training checkpoint")
    a = p.parse_args(argv)
    result = run(a.quick, a.out, checkpoint=a.checkpoint)
    print(json.dumps({"levels": len(result["results"]),
                      "errors": sum(r["errors"] for r in result["results"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
