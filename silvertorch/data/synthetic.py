"""Synthetic catalogs for index benchmarks and tests: clustered vectors plus filterable attributes.

:func:`generate_catalog` scales from 1k to 10M+ items: everything is generated in fixed-size chunks
with tensor ops (no Python loop per item) from one seeded ``torch.Generator``, so the same
``(num_items, dim, num_clusters, seed, spread)`` always gives the same catalog. Vectors are a
mixture of Gaussians around random unit centers with log-normal cluster weights (cluster sizes
vary by ~e^±2). Attributes (value id 0 of every vocabulary is ``"<oov>"``, never used by an item):

==========  ==========  ==================  ===============================================
feature     values      per item            structure
==========  ==========  ==================  ===============================================
language    30          1                   Zipf popularity; 70% the cluster's language
country     65          1                   90% a country of the item's language
category    20          1-3 (distinct)      the first is the cluster's category 80% of the time
creator     ~N/50       1                   creators own ranges inside clusters (skewed)
maturity    5           1                   G/PG/PG13/R/NC17, skewed; 50% the cluster's rating
tags        10,000      0-5 (distinct)      60% from a cluster-local topic of 64 tags, else Zipf
==========  ==========  ==================  ===============================================

Also :func:`make_queries` (query vectors near the clusters) and
:func:`random_filter_expressions` (realistic filter strings over those attributes).
:func:`generate_interactions` (users and events for training a two-tower) lives in
:mod:`silvertorch.data.synthetic_interactions` and is re-exported here.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import Tensor

from silvertorch.data.dataset import OOV
from silvertorch.data.synthetic_vocab import (
    CATEGORIES,
    COUNTRIES,
    LANGUAGE_COUNTRIES,
    LANGUAGES,
    MATURITY,
    MATURITY_PROBS,
)
from silvertorch.index.attributes import Attribute, ItemAttributes

__all__ = [
    "SyntheticCatalog",
    "generate_catalog",
    "make_queries",
    "random_filter_expressions",
    "generate_interactions",
]

CHUNK = 1 << 18  # items per generation step; part of the determinism contract, do not vary
MAX_CATEGORIES = 3
MAX_TAGS = 5
TOPIC_TAGS = 64


@dataclass
class SyntheticCatalog:
    """A generated catalog. Dense item ids ``0..N-1``.

    ``vectors (N, d) float32``, ``centers (C, d) float32`` (unit norm), ``cluster (N,) int64``,
    ``cluster_weights (C,) float32`` (sum 1), ``attributes`` (see module docstring).
    """

    vectors: Tensor
    centers: Tensor
    cluster: Tensor
    cluster_weights: Tensor
    attributes: ItemAttributes
    seed: int
    spread: float

    @property
    def num_items(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def num_clusters(self) -> int:
        return self.centers.shape[0]


def _zipf_weights(n: int, exponent: float = 1.0) -> Tensor:
    w = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** exponent
    return w / w.sum()


def _sample(cdf: Tensor, n: int, g: torch.Generator) -> Tensor:
    """(n,) int64 draws from a categorical given its ``cdf (K,) float64``."""
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.numel() - 1)


def _skewed(size: Tensor, g: torch.Generator, power: float = 2.0) -> Tensor:
    """(n,) int64 in ``[0, size)`` elementwise, skewed towards 0 (``floor(size * u**power)``)."""
    u = torch.rand(size.shape, generator=g, dtype=torch.float64)
    return torch.minimum((size.to(torch.float64) * u.pow_(power)).to(torch.int64), size - 1)


def _jagged(mat: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct values of the first ``lengths[i]`` columns of ``mat (n, m)`` per row.

    Returns ``(lengths (n,) int64, values (nnz,) int64)`` row-major, each row's values sorted.
    """
    n, m = mat.shape
    big = torch.iinfo(torch.int64).max
    keep = torch.arange(m).unsqueeze(0) < lengths.unsqueeze(1)
    srt = torch.where(keep, mat, torch.full_like(mat, big)).sort(dim=1).values
    dup = torch.zeros_like(keep)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    keep = (srt != big) & ~dup
    return keep.sum(1), srt[keep]


def _single(name: str, codes: Tensor, vocab: list[str], offsets: Tensor) -> Attribute:
    return Attribute(name, offsets, codes, len(vocab), vocab)


def _multi(name: str, lengths: list[Tensor], values: list[Tensor], vocab: list[str]) -> Attribute:
    lens = torch.cat(lengths)
    offsets = torch.zeros(lens.numel() + 1, dtype=torch.int64)
    torch.cumsum(lens, 0, out=offsets[1:])
    return Attribute(name, offsets, torch.cat(values), len(vocab), vocab)


def generate_catalog(
    num_items: int,
    dim: int = 64,
    num_clusters: int | None = None,
    seed: int = 0,
    *,
    spread: float = 0.5,
    num_tags: int = 10_000,
    items_per_creator: int = 50,
) -> SyntheticCatalog:
    """Generate ``num_items`` clustered vectors with attributes (see module docstring).

    ``num_clusters`` defaults to ``round(sqrt(num_items))`` clamped to [1, 4096]. ``spread`` is
    the expected norm of an item's offset from its (unit) center. Memory: the output (about
    ``N * (4 d + 90)`` bytes) plus one chunk of ``2**18`` items.
    """
    if num_items < 1 or dim < 1:
        raise ValueError(f"need num_items >= 1 and dim >= 1, got {num_items}, {dim}")
    C = num_clusters or max(1, min(4096, round(math.sqrt(num_items))))
    g = torch.Generator().manual_seed(seed)

    centers = torch.randn(C, dim, generator=g)
    centers /= centers.norm(dim=1, keepdim=True).clamp_min(1e-12)
    weights = torch.exp(torch.randn(C, generator=g, dtype=torch.float64))
    weights /= weights.sum()
    cluster_cdf = torch.cumsum(weights, 0)

    L, K, M = len(LANGUAGES), len(COUNTRIES), len(MATURITY)
    lang_cdf = torch.cumsum(_zipf_weights(L), 0)
    country_idx = {c: i for i, c in enumerate(COUNTRIES)}
    n_countries = torch.tensor([len(v) for v in LANGUAGE_COUNTRIES.values()])
    country_table = torch.zeros(L, int(n_countries.max()), dtype=torch.int64)
    for li, cs in enumerate(LANGUAGE_COUNTRIES.values()):
        country_table[li, : len(cs)] = torch.tensor([country_idx[c] for c in cs])
    maturity_cdf = torch.cumsum(torch.tensor(MATURITY_PROBS, dtype=torch.float64), 0)
    num_creators = max(1, num_items // items_per_creator)

    # per-cluster tendencies
    c_lang = _sample(lang_cdf, C, g)
    c_cat = torch.randint(len(CATEGORIES), (C,), generator=g)
    c_maturity = _sample(maturity_cdf, C, g)
    c_tag_base = torch.randint(num_tags, (C,), generator=g)
    c_creator_len = (weights * num_creators).round().clamp(min=1).to(torch.int64)
    c_creator_start = (torch.cumsum(c_creator_len, 0) - c_creator_len) % num_creators

    vectors = torch.empty(num_items, dim)
    cluster = torch.empty(num_items, dtype=torch.int64)
    single = {k: torch.empty(num_items, dtype=torch.int64) for k in
              ("language", "country", "creator", "maturity")}  # fmt: skip
    cat_parts: tuple[list[Tensor], list[Tensor]] = ([], [])
    tag_parts: tuple[list[Tensor], list[Tensor]] = ([], [])
    std = spread / math.sqrt(dim)

    for s in range(0, num_items, CHUNK):
        e = min(num_items, s + CHUNK)
        n = e - s
        c = _sample(cluster_cdf, n, g)
        cluster[s:e] = c
        out = vectors[s:e]
        torch.randn(n, dim, generator=g, out=out)
        out.mul_(std).add_(centers.index_select(0, c))

        def coin(p: float) -> Tensor:
            return torch.rand(n, generator=g) < p

        lang = torch.where(coin(0.7), c_lang[c], _sample(lang_cdf, n, g))
        own = country_table.view(-1)[lang * country_table.shape[1] + _skewed(n_countries[lang], g)]
        single["language"][s:e] = lang + 1
        anywhere = torch.randint(K, (n,), generator=g)
        single["country"][s:e] = torch.where(coin(0.9), own, anywhere) + 1
        creator = c_creator_start[c] + _skewed(c_creator_len[c], g, power=1.5)
        single["creator"][s:e] = creator % num_creators + 1
        mat = torch.where(coin(0.5), c_maturity[c], _sample(maturity_cdf, n, g))
        single["maturity"][s:e] = mat + 1

        first = torch.where(coin(0.8), c_cat[c], torch.randint(len(CATEGORIES), (n,), generator=g))
        d1 = torch.randint(1, len(CATEGORIES), (n,), generator=g)
        d2 = torch.randint(1, len(CATEGORIES) - 1, (n,), generator=g)
        d2 = d2 + (d2 >= d1).to(torch.int64)  # distinct from d1, never 0
        cats = torch.stack([first, (first + d1) % len(CATEGORIES), (first + d2) % len(CATEGORIES)])
        cats = cats.T
        n_cat = _sample(torch.tensor([0.5, 0.8, 1.0], dtype=torch.float64), n, g) + 1
        lens, vals = _jagged(cats + 1, n_cat)
        cat_parts[0].append(lens)
        cat_parts[1].append(vals)

        topic = _skewed(torch.full((n, MAX_TAGS), TOPIC_TAGS), g)
        local = (c_tag_base[c].unsqueeze(1) + topic) % num_tags
        glob = _skewed(torch.full((n, MAX_TAGS), num_tags), g, power=3.0)
        tags = torch.where(torch.rand(n, MAX_TAGS, generator=g) < 0.6, local, glob)
        n_tags = torch.randint(MAX_TAGS + 1, (n,), generator=g)
        lens, vals = _jagged(tags + 1, n_tags)
        tag_parts[0].append(lens)
        tag_parts[1].append(vals)

    offsets = torch.arange(num_items + 1, dtype=torch.int64)  # shared by the single-valued features
    feats = {
        "language": _single("language", single["language"], [OOV, *LANGUAGES], offsets),
        "country": _single("country", single["country"], [OOV, *COUNTRIES], offsets),
        "category": _multi("category", *cat_parts, [OOV, *CATEGORIES]),
        "creator": _single(
            "creator", single["creator"], [OOV, *(f"creator_{i}" for i in range(num_creators))],
            offsets,
        ),
        "maturity": _single("maturity", single["maturity"], [OOV, *MATURITY], offsets),
        "tags": _multi("tags", *tag_parts, [OOV, *(f"tag_{i}" for i in range(num_tags))]),
    }
    return SyntheticCatalog(
        vectors, centers, cluster, weights.to(torch.float32), ItemAttributes(num_items, feats),
        seed, spread,
    )  # fmt: skip


def make_queries(
    catalog: SyntheticCatalog, num_queries: int, seed: int = 0, noise: float | None = None
) -> Tensor:
    """(Q, d) float32 queries: a center drawn by cluster weight plus Gaussian noise.

    ``noise`` is the expected norm of the offset from the center (default: the catalog's spread).
    """
    g = torch.Generator().manual_seed(seed)
    cdf = torch.cumsum(catalog.cluster_weights.to(torch.float64), 0)
    c = _sample(cdf / cdf[-1], num_queries, g)
    std = (catalog.spread if noise is None else noise) / math.sqrt(catalog.dim)
    return catalog.centers[c] + std * torch.randn(num_queries, catalog.dim, generator=g)


def random_filter_expressions(catalog: SyntheticCatalog, n: int, seed: int = 0) -> list[str]:
    """``n`` filter strings in the SilverTorch filter language over the catalog's attributes.

    Terms are ``feature:value`` joined by ``AND`` / ``OR`` / ``NOT`` and parentheses, e.g.
    ``language:en AND (country:us OR country:gb) AND NOT category:news``. Values are drawn like
    the catalog's (popular languages more often; a creator or tag of a random item), so most
    expressions match some items.
    """
    rng = random.Random(seed)
    attrs = catalog.attributes
    lang_w = _zipf_weights(len(LANGUAGES)).tolist()

    def lang() -> str:
        return rng.choices(LANGUAGES, lang_w)[0]

    def of_item(feature: str, fallback: str) -> str:
        a = attrs[feature]
        assert a.vocab is not None
        for _ in range(16):  # a random item's value; items may have none (tags)
            i = rng.randrange(catalog.num_items)
            lo, hi = int(a.offsets[i]), int(a.offsets[i + 1])
            if hi > lo:
                return a.vocab[int(a.values[rng.randrange(lo, hi)])]
        return fallback

    def two(values: list[str]) -> tuple[str, str]:
        a, b = rng.sample(values, 2) if len(values) >= 2 else (values[0], values[0])
        return a, b

    def build() -> str:
        kind = rng.randrange(8)
        if kind == 0:
            return f"language:{lang()}"
        if kind == 1:
            la = lang()
            c1, c2 = two(LANGUAGE_COUNTRIES[la])
            return (f"language:{la} AND (country:{c1} OR country:{c2}) "
                    f"AND NOT category:{rng.choice(CATEGORIES)}")  # fmt: skip
        if kind == 2:
            a, b = two(CATEGORIES)
            return f"(category:{a} OR category:{b}) AND NOT maturity:{rng.choice(['R', 'NC17'])}"
        if kind == 3:
            return f"language:{lang()} AND (maturity:G OR maturity:PG)"
        if kind == 4:
            return f"creator:{of_item('creator', 'creator_0')} OR tags:{of_item('tags', 'tag_0')}"
        if kind == 5:
            return f"NOT language:{lang()} AND category:{rng.choice(CATEGORIES)}"
        if kind == 6:
            return " OR ".join(f"tags:{of_item('tags', 'tag_0')}" for _ in range(3))
        l1, l2 = two(LANGUAGES[:8])
        return f"(language:{l1} OR language:{l2}) AND NOT (maturity:R OR maturity:NC17)"

    return [build() for _ in range(n)]


def __getattr__(name: str) -> object:
    # ``generate_interactions`` lives in its own module (it imports this one); re-export it lazily.
    if name == "generate_interactions":
        from silvertorch.data.synthetic_interactions import generate_interactions

        return generate_interactions
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
