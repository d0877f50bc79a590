"""Synthetic users and interactions over a :class:`SyntheticCatalog`, to train a two-tower.

Each user prefers two clusters (drawn by cluster weight). 80% of a user's events pick a random
item of a preferred cluster, the rest a uniformly random item. The rating (1-5) grows with the
cosine between the item's vector and the user's taste (the mean of the preferred centers), plus
noise, so ``liked`` (rating >= 4) is learnable from item content and user features. Users have
``user_id``, ``language`` and ``country`` (those of their first preferred cluster's typical item)
and ``age_bucket``. Timestamps increase per user; the split is the usual per-user temporal one.
"""

from __future__ import annotations

import torch

from silvertorch.data.dataset import (
    OOV,
    EntityTable,
    Interactions,
    RecDataset,
    encode_vocab,
    single_attribute,
    temporal_split,
)
from silvertorch.data.movielens import AGE_BUCKETS
from silvertorch.data.synthetic import SyntheticCatalog
from silvertorch.index.attributes import ItemAttributes

__all__ = ["generate_interactions"]

NUM_FAVORITES = 2
P_FAVORITE = 0.8
T0 = 1_600_000_000  # seconds; first event of every user lies within a year after this


def _mode_per_cluster(cluster: torch.Tensor, codes: torch.Tensor, clusters: int) -> torch.Tensor:
    """(C,) int64 most frequent single-valued code per cluster (0 for empty clusters)."""
    card = int(codes.max()) + 1
    counts = torch.bincount(cluster * card + codes, minlength=clusters * card)
    return counts.view(clusters, card).argmax(1)


def generate_interactions(
    catalog: SyntheticCatalog,
    num_users: int,
    per_user: int,
    seed: int = 0,
    test_fraction: float = 0.1,
) -> RecDataset:
    """A :class:`RecDataset` of ``num_users * per_user`` events over the catalog's items.

    Items keep the catalog's attributes plus ``item_id`` (raw ids ``"0".."N-1"``); keep the catalog
    to training sizes (<= ~1M items): ids are Python strings.
    """
    if num_users < 1 or per_user < 2:
        raise ValueError(f"need num_users >= 1 and per_user >= 2, got {num_users}, {per_user}")
    g = torch.Generator().manual_seed(seed)
    N, C = catalog.num_items, catalog.num_clusters
    cdf = torch.cumsum(catalog.cluster_weights.to(torch.float64), 0)
    cdf /= cdf[-1].clone()

    def draw_clusters(n: int) -> torch.Tensor:
        u = torch.rand(n, generator=g, dtype=torch.float64)
        return torch.searchsorted(cdf, u, right=True).clamp_(max=C - 1)

    fav = draw_clusters(num_users * NUM_FAVORITES).view(num_users, NUM_FAVORITES)
    members = torch.argsort(catalog.cluster, stable=True)
    size = torch.bincount(catalog.cluster, minlength=C)
    start = torch.cumsum(size, 0) - size

    n = num_users * per_user
    user = torch.arange(num_users).repeat_interleave(per_user)
    pick = fav[user, torch.randint(NUM_FAVORITES, (n,), generator=g)]
    in_fav = (torch.rand(n, generator=g) < P_FAVORITE) & (size[pick] > 0)
    local = start[pick] + (torch.rand(n, generator=g) * size[pick]).to(torch.int64)
    local = torch.minimum(local, (start[pick] + size[pick] - 1).clamp(min=0))
    item = torch.where(in_fav, members[local.clamp(max=N - 1)], torch.randint(N, (n,), generator=g))

    taste = catalog.centers[fav].mean(1)
    taste = taste / taste.norm(dim=1, keepdim=True).clamp_min(1e-12)
    vec = catalog.vectors[item]
    cos = (vec * taste[user]).sum(1) / vec.norm(dim=1).clamp_min(1e-12)
    noisy = 2.5 + 2.0 * cos + 0.7 * torch.randn(n, generator=g)
    rating = noisy.round().clamp(1, 5).to(torch.float32)
    gaps = torch.randint(60, 7 * 86_400, (num_users, per_user), generator=g)
    first = T0 + torch.randint(365 * 86_400, (num_users, 1), generator=g)
    timestamp = (first + torch.cumsum(gaps, 1)).reshape(-1)

    attrs = catalog.attributes
    lang = _mode_per_cluster(catalog.cluster, attrs["language"].values, C)[fav[:, 0]]
    country = _mode_per_cluster(catalog.cluster, attrs["country"].values, C)[fav[:, 0]]
    age = torch.randint(len(AGE_BUCKETS), (num_users,), generator=g) + 1
    user_raw = [f"u{i}" for i in range(num_users)]
    vocab_u, codes_u = encode_vocab(user_raw, order=user_raw)
    users = EntityTable(user_raw, ItemAttributes(num_users, {
        "user_id": single_attribute("user_id", codes_u, vocab_u),
        "language": single_attribute("language", lang, attrs["language"].vocab or []),
        "country": single_attribute("country", country, attrs["country"].vocab or []),
        "age_bucket": single_attribute("age_bucket", age, [OOV, *AGE_BUCKETS]),
    }))  # fmt: skip
    item_raw = [str(i) for i in range(N)]
    item_vocab = [OOV, *item_raw]
    item_feats = {"item_id": single_attribute("item_id", torch.arange(1, N + 1), item_vocab)}
    item_feats.update(attrs.features)
    items = EntityTable(item_raw, ItemAttributes(N, item_feats))

    inter = Interactions(user, item, rating, timestamp.to(torch.int64))
    train, test = temporal_split(inter, num_users, test_fraction)
    return RecDataset(f"synthetic-{N}", users, items, train, test)
