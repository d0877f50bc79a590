"""Small artifacts for tests and the quick benchmark, written with :func:`silvertorch.export.write_artifact`.

:func:`tiny_artifact` builds a random-weight two-tower (user features ``user_id``, ``gender``;
item features ``item_id``, ``genre``), an IVF index over its item vectors (``dtype`` int8 / fp32,
eligibility over ``genre`` and ``decade``), a fresh OverArch / value model, and writes them as one
artifact directory. Deterministic for a seed. Real benchmark artifacts come from ``silvertorch
export`` (MovieLens) and ``train.synthetic_artifact`` (1M items).
"""

from __future__ import annotations

from pathlib import Path

import torch

from silvertorch.config import from_dict
from silvertorch.data.batching import features_to_kjt
from silvertorch.export import write_artifact
from silvertorch.index.attributes import Attribute, ItemAttributes
from silvertorch.index.search import ItemIndex
from silvertorch.model import RetrievalConfig, RetrievalModel, TwoTower, TwoTowerConfig
from silvertorch.modules.overarch import OverArchConfig
from silvertorch.modules.towers import TowerConfig
from silvertorch.modules.value_model import ValueModelConfig

__all__ = ["GENRES", "DECADES", "tiny_artifact", "synthetic_artifact", "user_requests"]

GENRES = ["<oov>", "action", "comedy", "drama", "horror", "scifi"]
DECADES = ["<oov>", "1970s", "1980s", "1990s", "2000s"]
GENDERS = ["<oov>", "F", "M"]


def _tower(features: dict[str, int], dim: int) -> TowerConfig:
    return from_dict(TowerConfig, {
        "features": list(features),
        "tables": [{"name": f, "features": [f], "embedding_dim": 8} for f in features],
        "mlp_dims": [16, dim],
    })


def tiny_artifact(out: str | Path, *, num_items: int = 500, num_users: int = 50, dim: int = 16,
                  nlist: int = 8, dtype: str = "fp32", k_prime: int = 40, max_k: int = 200,
                  seed: int = 0, min_candidates_factor: float = 0.0) -> Path:
    """Write a small artifact directory at ``out`` (see module doc); returns ``out``.
    ``min_candidates_factor``: the config's selectivity-aware probing (0 = fixed ``nprobe``)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    genres = [sorted(set(torch.randint(1, len(GENRES), (int(torch.randint(0, 4, (1,), generator=g)),),
                                       generator=g).tolist())) for _ in range(num_items)]
    decade = torch.randint(1, len(DECADES), (num_items,), generator=g)
    items = ItemAttributes(num_items, {
        "item_id": Attribute.from_single("item_id", torch.arange(num_items), num_items),
        "genre": Attribute.from_lists("genre", genres, len(GENRES), GENRES),
        "decade": Attribute.from_single("decade", decade, len(DECADES), DECADES),
    })
    user_card = {"user_id": num_users + 1, "gender": len(GENDERS)}
    item_card = {"item_id": num_items, "genre": len(GENRES)}
    two = TwoTower(TwoTowerConfig(user_tower=_tower(user_card, dim), item_tower=_tower(item_card, dim)),
                   user_card, item_card, num_items=num_items).eval()
    with torch.no_grad():
        vectors = two.item_embeddings(features_to_kjt(items.features, torch.arange(num_items),
                                                      ["item_id", "genre"]))
    index = ItemIndex.build(vectors, attributes=items, nlist=nlist, dtype=dtype, seed=seed)
    cfg = RetrievalConfig(
        k_prime=k_prime, nprobe=2, max_k=max_k, min_candidates_factor=min_candidates_factor,
        overarch=OverArchConfig(tasks=["liked", "rated"], hidden_dims=[16],
                                item_features=["genre", "decade"], feature_embedding_dim=4),
        value_model=ValueModelConfig(tasks=["liked", "rated"], weights=[1.0, 0.5]),
    )
    model = RetrievalModel.build(cfg, two.user_tower, index, items).eval()
    user_vocab = {"user_id": ["<oov>", *[f"u{i}" for i in range(num_users)]], "gender": GENDERS}
    item_vocab = {"item_id": [str(i) for i in range(num_items)], "genre": GENRES, "decade": DECADES}
    return write_artifact(out, model, two.item_tower, config={"tiny": True}, user_vocab=user_vocab,
                          item_vocab=item_vocab, item_raw_ids=[f"m{i}" for i in range(num_items)],
                          export_programs=False, overwrite=True)


def user_requests(n: int, num_users: int = 50, seed: int = 0) -> list[dict[str, str]]:
    """``n`` raw user feature dicts for :func:`tiny_artifact` users (some unknown: OOV)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_users + 5, (n,), generator=g).tolist()
    return [{"user_id": f"u{u}", "gender": GENDERS[1 + u % 2]} for u in ids]


def synthetic_artifact(out: str | Path, *, num_items: int = 1_000_000, dim: int = 64, nlist: int = 1024,
                       dtype: str = "int8", num_users: int = 1000, k_prime: int = 200, nprobe: int = 16,
                       max_k: int = 10_000, seed: int = 0, progress: bool = True,
                       min_candidates_factor: float = 0.0, max_nprobe: int = 128) -> Path:
    """A synthetic catalog (:func:`silvertorch.data.synthetic.generate_catalog`) as an artifact.

    Item vectors are the catalog's clustered vectors (stored ``dtype`` in an ``nlist`` IVF), every
    catalog attribute is filterable, the OverArch reads ``category`` and ``maturity``; the user
    tower (``user_id`` -> ``dim``) and the scoring heads have random weights. Also writes
    ``<out>.filters.json``: 64 filter expressions over the catalog's attributes.
    ``min_candidates_factor`` / ``max_nprobe``: selectivity-aware probing of filtered requests
    (0 = fixed ``nprobe``; docs/index.md "Filtered recall" measures the choice).
    """
    import json

    from silvertorch.data.synthetic import generate_catalog, random_filter_expressions

    out = Path(out)
    torch.manual_seed(seed)
    cat = generate_catalog(num_items, dim, seed=seed)
    attrs = cat.attributes
    cards = {n: a.cardinality for n, a in attrs.features.items()}
    user_card = {"user_id": num_users + 1}
    item_card = {"category": cards["category"]}
    two = TwoTower(TwoTowerConfig(user_tower=_tower(user_card, dim), item_tower=_tower(item_card, dim)),
                   user_card, item_card, num_items=num_items).eval()
    index = ItemIndex.build(cat.vectors, attributes=attrs, nlist=nlist, dtype=dtype, seed=seed)
    cfg = RetrievalConfig(
        k_prime=k_prime, nprobe=nprobe, max_k=max_k, min_candidates_factor=min_candidates_factor,
        max_nprobe=max_nprobe,
        overarch=OverArchConfig(tasks=["liked", "rated"], hidden_dims=[64],
                                item_features=["category", "maturity"], feature_embedding_dim=8),
        value_model=ValueModelConfig(tasks=["liked", "rated"], weights=[1.0, 0.5]),
    )
    model = RetrievalModel.build(cfg, two.user_tower, index, attrs).eval()
    vocab = {n: list(a.vocab) if a.vocab is not None else [str(i) for i in range(a.cardinality)]
             for n, a in attrs.features.items()}
    user_vocab = {"user_id": ["<oov>", *[f"u{i}" for i in range(num_users)]]}
    write_artifact(out, model, two.item_tower, config={"synthetic": num_items}, user_vocab=user_vocab,
                   item_vocab=vocab, item_raw_ids=[str(i) for i in range(num_items)],
                   export_programs=False, overwrite=True, progress=progress)
    Path(f"{out}.filters.json").write_text(json.dumps(random_filter_expressions(cat, 64, seed=seed)))
    return out
