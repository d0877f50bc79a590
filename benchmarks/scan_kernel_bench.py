"""Fused CPU scan (C++ extension) vs the torch fast path vs faiss IVF, same process, interleaved.

    .venv/bin/python -m benchmarks.scan_kernel_bench [--items 1000000] [--repeats 3]

Data: ``--items`` x 64 clustered vectors (1,024 random unit centers + gaussian noise of expected norm
0.5), 2,000 queries from the same distribution, nlist 1024, k=100, nprobe in {8, 16, 32}. The
SilverTorch index (k-means), the faiss indexes (faiss k-means, same nlist, trained on the same
vectors) and the exact ground truth are cached under ``--cache`` (default /tmp/silvertorch_bench).

Every cell is end-to-end ``search`` of all queries in one call (probe + scan + top-k), except the
"(scan only)" rows (the fused kernel alone on precomputed probes / int8 queries / filter words), timed
once per round; rounds interleave all configurations so a noisy neighbour slows them alike; the table reports
the median over rounds. "filter" rows use a 50%-selective exact attribute filter (``half:0``) for
SilverTorch (probe-then-filter words + kernel skipping) and an ``IDSelectorBitmap`` for faiss.
Recall@100 is against exact inner-product search (over the eligible items for filter rows).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from silvertorch.index import IVFIndex, ItemIndex, SearchParams
from silvertorch.index import scan_cpu_ext
from silvertorch.index.attributes import Attribute, ItemAttributes
from silvertorch.index.quantize import prepare_queries

from .common import md_table

BOUND_QPS = 28_000  # DESIGN.md: streaming 16/1024 of the int8 matrix once per query at ~28 GB/s


def _data(n: int, d: int, nq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = torch.nn.functional.normalize(torch.randn(1024, d, generator=g), dim=1)
    x = c[torch.randint(1024, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g) / d**0.5
    q = c[torch.randint(1024, (nq,), generator=g)] + 0.5 * torch.randn(nq, d, generator=g) / d**0.5
    return x.contiguous(), q.contiguous()


def _cached(path: Path, make):  # type: ignore[no-untyped-def]
    if path.exists():
        return torch.load(path, weights_only=False)
    t = time.perf_counter()
    obj = make()
    torch.save(obj, path)
    print(f"  built {path.name} in {time.perf_counter() - t:.0f} s", flush=True)
    return obj


def _exact(x: torch.Tensor, q: torch.Tensor, k: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    rows = torch.arange(x.shape[0]) if keep is None else torch.nonzero(keep).flatten()
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(np.ascontiguousarray(x[rows].numpy()))
    _, i = flat.search(np.ascontiguousarray(q.numpy()), k)
    return rows[torch.from_numpy(i)]


def _recall(ids: torch.Tensor, truth: torch.Tensor) -> float:
    t = truth.masked_fill(truth < 0, -2)
    hits = (ids.unsqueeze(2) == t.unsqueeze(1)).any(2) & (ids >= 0)
    return float(hits.sum()) / truth.numel()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-torch-fast", action="store_true", help="skip the (slow) torch fast path")
    ap.add_argument("--cache", default=os.environ.get("SILVERTORCH_BENCH_CACHE", "/tmp/silvertorch_bench"))
    a = ap.parse_args(argv)

    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    tag = f"{a.items}x{a.dim}_q{a.queries}_nl{a.nlist}"
    x, q = _data(a.items, a.dim, a.queries)
    print(f"data {tag}; extension: {scan_cpu_ext.simd_level()}", flush=True)

    state = _cached(cache / f"st_ivf_int8_{tag}.pt",
                    lambda: ItemIndex.build(x, nlist=a.nlist, dtype="int8").ivf.state_dict())
    ivf8 = IVFIndex.from_state_dict(state)
    # fp32 storage on the same slot layout (no second k-means)
    sid = ivf8.slot_ids
    vf = torch.zeros(sid.numel(), a.dim)
    vf[sid >= 0] = x[sid[sid >= 0]]
    ivf32 = IVFIndex.from_state_dict({**state, "vectors": vf, "scales": torch.ones(sid.numel())})
    # a 50%-selective attribute: eligibility over slots, and the same items as a faiss id bitmap
    half = torch.randint(2, (a.items,), generator=torch.Generator().manual_seed(1))
    attrs = ItemAttributes(a.items, {"half": Attribute.from_single("half", half, 2)})
    from silvertorch.index.eligibility import EligibilityIndex

    rows = sid.clone()
    elig = EligibilityIndex.build(attrs.take(rows), None, live=rows >= 0)
    idx8, idx32 = ItemIndex(ivf8, elig), ItemIndex(ivf32, elig)
    plan = elig.compile(["half:0"] * a.queries)
    keep = half == 0
    bitmap = np.packbits(keep.numpy().astype(np.uint8), bitorder="little")
    sel = faiss.IDSelectorBitmap(a.items, faiss.swig_ptr(bitmap))

    fpath = cache / f"faiss_{tag}"
    fidx: dict[str, faiss.Index] = {}
    for kind in ("IVF-SQ8", "IVF-Flat"):
        p = Path(f"{fpath}_{kind}.index")
        if p.exists():
            fidx[kind] = faiss.read_index(str(p))
    if len(fidx) < 2:
        t = time.perf_counter()
        from .faiss_baselines import build_faiss_ivf

        built = build_faiss_ivf(x, a.nlist)
        for kind in ("IVF-SQ8", "IVF-Flat"):
            faiss.write_index(built[kind], f"{fpath}_{kind}.index")
            fidx[kind] = faiss.read_index(f"{fpath}_{kind}.index")
        print(f"  built faiss indexes in {time.perf_counter() - t:.0f} s", flush=True)
    truth = _cached(cache / f"truth_{tag}_k{a.k}.pt", lambda: _exact(x, q, a.k))
    truth_f = _cached(cache / f"truth_half0_{tag}_k{a.k}.pt", lambda: _exact(x, q, a.k, keep))
    qn = np.ascontiguousarray(q.numpy())

    def st(idx: ItemIndex, engine: str, nprobe: int, filt: bool):  # type: ignore[no-untyped-def]
        return lambda: idx.search(q, a.k, SearchParams(nprobe=nprobe, engine=engine, filter=plan if filt else None))[1]

    def fs(kind: str, nprobe: int, filt: bool):  # type: ignore[no-untyped-def]
        def run() -> torch.Tensor:
            prm = faiss.SearchParametersIVF(nprobe=nprobe, sel=sel) if filt else faiss.SearchParametersIVF(nprobe=nprobe)
            return torch.from_numpy(fidx[kind].search(qn, a.k, params=prm)[1])
        return run

    def kernel_only(idx: ItemIndex, nprobe: int, filt: bool):  # type: ignore[no-untyped-def]
        """The fused scan alone: probing, query quantization and filter words done beforehand."""
        ivf = idx.ivf
        qf = ivf.prepare(q)
        probes = ivf.probe(qf, nprobe)
        qc, qs = prepare_queries(qf, ivf.storage_dtype)
        pw = idx._probed_words(plan, probes)[0] if filt else None
        k_rows = torch.full((a.queries,), a.k, dtype=torch.int64)
        args = (ivf.vectors, ivf.scales, ivf.cluster_offsets, ivf.live_words, qc, qs, probes, k_rows, pw)
        return lambda: torch.where(
            (s := scan_cpu_ext.scan_ext(*args)[1]) >= 0, ivf.slot_ids[s.clamp_min(0)], -1)

    methods: list[tuple[str, bool, object]] = [
        ("ext int8", False, lambda p: st(idx8, "ext", p, False)),
        ("ext int8 (scan only)", False, lambda p: kernel_only(idx8, p, False)),
        ("ext f32", False, lambda p: st(idx32, "ext", p, False)),
        ("torch-fast int8", False, lambda p: st(idx8, "fast", p, False)),
        ("faiss IVF-SQ8", False, lambda p: fs("IVF-SQ8", p, False)),
        ("faiss IVF-Flat", False, lambda p: fs("IVF-Flat", p, False)),
        ("ext int8 + filter", True, lambda p: st(idx8, "ext", p, True)),
        ("ext int8 + filter (scan only)", True, lambda p: kernel_only(idx8, p, True)),
        ("ext f32 + filter", True, lambda p: st(idx32, "ext", p, True)),
        ("faiss IVF-SQ8 + filter", True, lambda p: fs("IVF-SQ8", p, True)),
    ]
    if a.no_torch_fast:
        methods = [m for m in methods if m[0] != "torch-fast int8"]

    configs = [(m, f, mk, p, t) for p in a.nprobe for t in a.threads for (m, f, mk) in methods]
    times: dict[tuple[str, int, int], list[float]] = {}
    recalls: dict[tuple[str, int], float] = {}
    fns = {(m, p): mk(p) for (m, f, mk, p, t) in configs}
    for (m, f, mk, p, t) in configs:  # warm-up + recall (once per method and nprobe)
        if (m, p) not in recalls:
            torch.set_num_threads(max(a.threads))
            faiss.omp_set_num_threads(max(a.threads))
            ids = fns[(m, p)]()
            recalls[(m, p)] = _recall(ids, truth_f if f else truth)
    for r in range(a.repeats):
        for (m, f, mk, p, t) in configs:
            torch.set_num_threads(t)
            faiss.omp_set_num_threads(t)
            t0 = time.perf_counter()
            fns[(m, p)]()
            times.setdefault((m, p, t), []).append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{a.repeats} done", flush=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    heads = ["nprobe", "method"] + [f"q/s {t}T" for t in a.threads] + ["recall@100"]
    heads += [f"vs SQ8 {t}T" for t in a.threads]
    out = []
    for p in a.nprobe:
        for (m, f, _) in methods:
            qps = [a.queries / statistics.median(times[(m, p, t)]) for t in a.threads]
            sq8 = [a.queries / statistics.median(times[("faiss IVF-SQ8", p, t)]) for t in a.threads]
            out.append([p, m] + [f"{v:,.0f}" for v in qps] + [f"{recalls[(m, p)]:.3f}"]
                       + [f"{v / s:.2f}x" for v, s in zip(qps, sq8)])
    print()
    print(f"{a.items:,} x {a.dim}, nlist {a.nlist}, {a.queries} queries, k={a.k}; median of "
          f"{a.repeats} interleaved rounds; load average {load:.1f}; bound ~{BOUND_QPS:,} q/s at nprobe 16")
    print(md_table(heads, out))


if __name__ == "__main__":
    main()
