"""A serving artifact over a synthetic catalog, for load benchmarks (no training).

``python -m train.synthetic_artifact --items 1000000 --out DIR``

- item vectors: :func:`silvertorch.data.synthetic.generate_catalog` (clustered, unit-ish norm),
  precomputed and stored in the index, so the artifact's pairing id covers them;
- item attributes (language, country, category, creator, maturity, tags) from the same catalog:
  filters such as ``language:en AND NOT maturity:R`` work;
- user tower (``user_id``, ``language``, ``country``, ``age_bucket``) and item tower (the item
  attributes) with initialised weights, output width = the catalog's dimension; the item tower
  embeds items upserted by features;
- OverArch (over ``category``, ``maturity``, ``language``) and value model initialised;
- IVF with ``--nlist`` lists in ``--dtype``; Bloom / bitmap eligibility over every attribute.

Stages run under one tqdm bar; 1M items x 64 dims take a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from silvertorch.config import from_dict
from silvertorch.data.dataset import OOV
from silvertorch.data.movielens import AGE_BUCKETS
from silvertorch.data.synthetic import generate_catalog
from silvertorch.data.synthetic_vocab import COUNTRIES, LANGUAGES
from silvertorch.export import load_artifact, write_artifact
from silvertorch.index.kmeans import KMeansConfig
from silvertorch.index.search import ItemIndex
from silvertorch.model import RetrievalConfig, RetrievalModel
from silvertorch.modules.overarch import OverArchConfig
from silvertorch.modules.towers import ItemTower, TowerConfig, UserTower

__all__ = ["ITEM_TOWER_FEATURES", "OVERARCH_FEATURES", "build_synthetic_artifact", "main"]

ITEM_TOWER_FEATURES = ["language", "country", "category", "creator", "maturity", "tags"]
OVERARCH_FEATURES = ["category", "maturity", "language"]


def _tower(features: dict[str, int], dim: int) -> TowerConfig:
    """One table per feature (16 wide; 32 for ids), MLP [128, dim]."""
    return from_dict(TowerConfig, {
        "features": list(features),
        "tables": [{"name": f, "features": [f], "embedding_dim": 32 if f in ("user_id", "creator") else 16}
                   for f in features],
        "mlp_dims": [128, dim],
    })  # fmt: skip


def user_vocabulary(num_users: int) -> dict[str, list[str]]:
    """Per user feature, value id -> raw value (id 0 = OOV); users are ``u0 .. u{n-1}``."""
    return {
        "user_id": [OOV, *(f"u{i}" for i in range(num_users))],
        "language": [OOV, *LANGUAGES],
        "country": [OOV, *COUNTRIES],
        "age_bucket": [OOV, *AGE_BUCKETS],
    }


def build_synthetic_artifact(out: str | Path, *, items: int, dim: int = 64, nlist: int = 1024,
                             dtype: str = "int8", users: int = 100_000, seed: int = 0,
                             kmeans_points: int = 64, export_programs: bool = True,
                             overwrite: bool = False, progress: bool = True) -> Path:
    """Build and write the artifact (see module docstring); returns its path.

    ``kmeans_points``: k-means trains on at most this many points per list (the assignment pass
    covers every item).
    """
    if items < 1 or users < 1 or nlist < 1:
        raise ValueError(f"need items, users, nlist >= 1; got {items}, {users}, {nlist}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    torch.manual_seed(seed)
    stages = ["catalog", "towers", "index", "model", "write", "verify"]
    bar = tqdm(stages, desc="synthetic artifact", unit="stage", disable=not progress)
    times: dict[str, float] = {}
    t = time.perf_counter()

    def done(stage: str) -> None:
        nonlocal t
        times[stage] = time.perf_counter() - t
        t = time.perf_counter()
        bar.set_postfix_str(f"{stage} {times[stage]:.1f}s")
        bar.update(1)

    catalog = generate_catalog(items, dim, seed=seed)
    attrs = catalog.attributes
    done("catalog")
    uvocab = user_vocabulary(users)
    user_tower = UserTower(_tower({f: len(v) for f, v in uvocab.items()}, dim), {f: len(v) for f, v in uvocab.items()})
    item_cards = {f: attrs[f].cardinality for f in ITEM_TOWER_FEATURES}
    item_tower = ItemTower(_tower(item_cards, dim), item_cards)
    done("towers")
    index = ItemIndex.build(catalog.vectors, attributes=attrs, nlist=min(nlist, items), dtype=dtype, seed=seed,
                            kmeans_config=KMeansConfig(max_points_per_centroid=kmeans_points, seed=seed))
    done("index")
    rcfg = RetrievalConfig(overarch=OverArchConfig(item_features=list(OVERARCH_FEATURES), hidden_dims=[64, 32],
                                                   feature_embedding_dim=8))  # fmt: skip
    model = RetrievalModel.build(rcfg, user_tower, index, attrs).eval()
    done("model")
    ivocab = {n: list(a.vocab or []) for n, a in attrs.features.items()}
    path = write_artifact(
        out, model, item_tower.eval(), config={"synthetic": {"items": items, "dim": dim, "nlist": nlist,
                                                              "dtype": dtype, "users": users, "seed": seed}},
        user_vocab=uvocab, item_vocab=ivocab, item_raw_ids=[f"item{i}" for i in range(items)],
        extra_meta={"dataset": f"synthetic-{items}", "build_seconds": times},
        export_programs=export_programs, overwrite=overwrite, progress=progress)  # fmt: skip
    done("write")
    load_artifact(path)
    done("verify")
    bar.close()
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.synthetic_artifact", description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, required=True, help="catalog size")
    p.add_argument("--out", required=True, help="artifact directory to create")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--dtype", default="int8", choices=["int8", "fp32", "bf16", "fp16"])
    p.add_argument("--users", type=int, default=100_000, help="user_id vocabulary size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kmeans-points", type=int, default=64, help="k-means training points per list")
    p.add_argument("--no-programs", action="store_true", help="skip the torch.export programs")
    p.add_argument("--force", action="store_true", help="replace an existing artifact at --out")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        path = build_synthetic_artifact(args.out, items=args.items, dim=args.dim, nlist=args.nlist,
                                        dtype=args.dtype, users=args.users, seed=args.seed,
                                        kmeans_points=args.kmeans_points, export_programs=not args.no_programs,
                                        overwrite=args.force)  # fmt: skip
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"wrote {path}: {args.items} items, {size / 2**20:.1f} MiB, {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
