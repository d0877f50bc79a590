"""GPU figures: the Triton scan vs the torch paths on the same GPU vs the CPU scan, same index and
queries (unfiltered IVF search, end to end: probe + scan + top-k). Needs torch (+ triton for the
Triton rows) and ``silvertorch.index`` only: no TorchRec, no faiss.

    python -m benchmarks.gpu_bench --items 1000000 --nprobe 16 32

Prints a Markdown table: path, device, nprobe, queries/s (median of ``--repeats`` after a warm-up),
spread, recall@k against exact fp32 search on the same device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from silvertorch.data.synthetic import generate_catalog, make_queries
from silvertorch.index.search import ItemIndex, SearchParams

__all__ = ["main"]


def _timed(fn, repeats: int, sync) -> tuple[float, float]:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    return med, (max(times) - min(times)) / 2 / med


def _recall(ids: torch.Tensor, truth: torch.Tensor) -> float:
    return float((ids.unsqueeze(2) == truth.unsqueeze(1)).any(2).float().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--dtype", default="int8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU rows")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        print("no CUDA device: only the CPU rows are measured", file=sys.stderr)
    with torch.no_grad():
        catalog = generate_catalog(args.items, args.dim, seed=0)
        queries = make_queries(catalog, args.queries, seed=1)
        index = ItemIndex.build(catalog.vectors, nlist=args.nlist, dtype=args.dtype, seed=0)
        dev = "cuda" if cuda else "cpu"
        vec = catalog.vectors.to(dev)
        truth = torch.cat([torch.topk(q @ vec.T, args.k, dim=1).indices for q in queries.to(dev).split(256)])
        del vec
        paths: list[tuple[str, str, ItemIndex, torch.Tensor]] = []
        if cuda:
            gi = ItemIndex(index.ivf).to("cuda")
            gq = queries.to("cuda")
            paths += [("triton", "cuda", gi, gq), ("fast", "cuda", gi, gq), ("reference", "cuda", gi, gq)]
        if not args.no_cpu:
            paths += [("auto", "cpu", index, queries)]
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        rows = []
        for p in args.nprobe:
            for engine, device, idx, q in paths:
                params = SearchParams(nprobe=p, engine=engine)
                try:
                    ids = idx.search(q, args.k, params)[1]
                    med, spread = _timed(lambda: idx.search(q, args.k, params), args.repeats, sync)
                    rows.append((engine, device, p, f"{args.queries / med:,.0f}", f"±{spread:.0%}",
                                 f"{_recall(ids.to(truth.device), truth):.4f}"))
                except Exception as err:  # noqa: BLE001 - one path failing must not hide the others
                    rows.append((engine, device, p, "failed", "-", f"{type(err).__name__}: {str(err)[:80]}"))
    name = torch.cuda.get_device_name() if cuda else "none"
    print(f"{args.items:,} x {args.dim} {args.dtype}, nlist {args.nlist}, {args.queries} queries, k={args.k}; "
          f"GPU: {name}; torch {torch.__version__}\n")
    print("| path | device | nprobe | queries/s | spread | recall@k |\n|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
