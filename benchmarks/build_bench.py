"""Index build time at catalog scale: synthetic generation + IVF k-means + int8 layout.

    .venv/bin/python -m benchmarks.build_bench --items 10000000 --nlist 4096
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from silvertorch.data.synthetic import generate_catalog
from silvertorch.index import ItemIndex


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--nlist", type=int, default=4096)
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    catalog = generate_catalog(args.items, dim=args.dim, seed=0)
    t1 = time.perf_counter()
    index = ItemIndex.build(catalog.vectors, nlist=args.nlist, dtype=args.dtype)
    t2 = time.perf_counter()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"{args.items:,} x {args.dim}: generate {t1 - t0:.1f} s, IVF {args.dtype} build "
          f"(nlist {args.nlist}) {t2 - t1:.1f} s, {index.ivf.num_slots:,} slots, "
          f"peak RSS {peak_gb:.1f} GB, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
