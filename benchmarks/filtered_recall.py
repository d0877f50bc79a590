"""Filtered recall and cost, fixed ``nprobe`` vs selectivity-aware probing (docs/index.md).

``python -m benchmarks.filtered_recall [--items 200000] [--nlist 256] [--nprobe 16]``: a synthetic
catalog (:func:`silvertorch.data.synthetic.generate_catalog`), an int8 IVF index, queries near the
clusters, each with one of the catalog's realistic filter expressions. Recall@k = overlap with the
exhaustive answer to the same filtered request (``exact=True``), averaged over rows whose
exhaustive answer is not empty. Cost: clusters probed and live items scanned per query (exact,
machine-independent) and the fastest of 3 timed batch searches (machine- and load-dependent).
"""

from __future__ import annotations

import argparse
import time

import torch

from silvertorch.data.synthetic import generate_catalog, make_queries, random_filter_expressions
from silvertorch.index import ItemIndex, SearchParams
from silvertorch.index.selectivity import cluster_live_counts, probe_for_filter


def recall(got: torch.Tensor, truth: torch.Tensor) -> float:
    vals = []
    for g, t in zip(got.tolist(), truth.tolist()):
        want = set(t) - {-1}
        if want:
            vals.append(len(want & set(g)) / len(want))
    return sum(vals) / max(len(vals), 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--nlist", type=int, default=256)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--max-nprobe", type=int, default=128)
    ap.add_argument("--factors", default="0,1,2,4,8")
    ap.add_argument("--ks", default="100,1000")
    ap.add_argument("--fixed-nprobes", default="",
                    help="also rows with the factor off at these nprobe values (the cost baseline)")
    args = ap.parse_args(argv)
    cat = generate_catalog(args.items, args.dim, seed=0)
    index = ItemIndex.build(cat.vectors, attributes=cat.attributes, nlist=args.nlist, dtype="int8")
    q = make_queries(cat, args.queries, seed=1)
    exprs = random_filter_expressions(cat, args.queries, seed=1)
    plan = index.eligibility.compile(exprs)
    print(f"items {args.items}, dim {args.dim}, nlist {args.nlist}, nprobe {args.nprobe}, "
          f"max_nprobe {args.max_nprobe}, {args.queries} filtered queries, torch threads "
          f"{torch.get_num_threads()}")
    print("| k | nprobe | min_candidates_factor | recall@k | clusters probed / query | items scanned / query | ms / batch (min of 3) |")
    print("|---|---|---|---|---|---|---|")
    live = cluster_live_counts(index.ivf.cluster_offsets, index.ivf.live_words, args.nlist)
    for k in [int(x) for x in args.ks.split(",")]:
        truth = index.search(q, k, SearchParams(filter=plan, exact=True))[1]
        runs = [(args.nprobe, float(x)) for x in args.factors.split(",")]
        runs += [(int(x), 0.0) for x in args.fixed_nprobes.split(",") if x]
        for nprobe, f in runs:
            p = SearchParams(nprobe=nprobe, filter=plan, min_candidates_factor=f,
                             max_nprobe=args.max_nprobe)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                ids = index.search(q, k, p)[1]
                times.append(time.perf_counter() - t0)
            if f > 0:
                probes = probe_for_filter(index.ivf.prepare(q), index.ivf.centroids, index.ivf.cluster_offsets,
                                          index.ivf.live_words, index.selectivity, index.eligibility.feat_info,
                                          plan, nprobe, torch.full((q.shape[0],), k), f, args.max_nprobe)
            else:
                probes = index.ivf.probe(index.ivf.prepare(q), nprobe)
            n_probed = float((probes >= 0).sum(1).float().mean())
            scanned = float(torch.where(probes >= 0, live[probes.clamp_min(0)], 0).sum(1).float().mean())
            print(f"| {k} | {nprobe} | {f:g} | {recall(ids, truth):.3f} | {n_probed:.1f} | {scanned:.0f} | "
                  f"{1e3 * min(times):.0f} |", flush=True)


if __name__ == "__main__":
    main()
