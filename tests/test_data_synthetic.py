"""Synthetic catalogs: determinism, cluster structure, attribute correlations, filters, users."""

from __future__ import annotations

import re

import pytest
import torch

from silvertorch.data.dataset import OOV
from silvertorch.data.synthetic import (
    SyntheticCatalog,
    _jagged,
    generate_catalog,
    generate_interactions,
    make_queries,
    random_filter_expressions,
)
from silvertorch.data.synthetic_vocab import CATEGORIES, LANGUAGE_COUNTRIES, MATURITY


@pytest.fixture(scope="module")
def catalog() -> SyntheticCatalog:
    return generate_catalog(6000, dim=16, num_clusters=30, seed=3)


def _mode_share(group: torch.Tensor, codes: torch.Tensor) -> float:
    """Fraction of rows whose code is the most common code of their group."""
    card = int(codes.max()) + 1
    counts = torch.bincount(group * card + codes, minlength=(int(group.max()) + 1) * card)
    return float(counts.view(-1, card).max(1).values.sum()) / codes.numel()


def test_shapes_and_determinism(catalog: SyntheticCatalog) -> None:
    assert catalog.vectors.shape == (6000, 16) and catalog.vectors.dtype == torch.float32
    assert catalog.centers.shape == (30, 16) and catalog.cluster.dtype == torch.int64
    assert torch.allclose(catalog.centers.norm(dim=1), torch.ones(30))
    again = generate_catalog(6000, dim=16, num_clusters=30, seed=3)
    assert torch.equal(again.vectors, catalog.vectors)
    for name, attr in catalog.attributes.features.items():
        assert torch.equal(attr.values, again.attributes[name].values), name
        assert torch.equal(attr.offsets, again.attributes[name].offsets), name
    other = generate_catalog(6000, dim=16, num_clusters=30, seed=4)
    assert not torch.equal(other.vectors, catalog.vectors)


def test_cluster_structure(catalog: SyntheticCatalog) -> None:
    dist = torch.cdist(catalog.vectors, catalog.centers)  # (N, C)
    own = dist.gather(1, catalog.cluster[:, None]).squeeze(1)
    others = dist.scatter(1, catalog.cluster[:, None], float("inf")).min(1).values
    assert float(own.mean()) < 0.7 * float(others.mean())
    assert float((dist.argmin(1) == catalog.cluster).float().mean()) > 0.95
    sizes = torch.bincount(catalog.cluster, minlength=30)
    assert int(sizes.max()) > 3 * int(sizes.min()), "cluster sizes should vary"
    assert abs(float(sizes.float().div(6000).sub(catalog.cluster_weights).abs().max())) < 0.02


def test_attribute_shapes_and_vocab(catalog: SyntheticCatalog) -> None:
    a = catalog.attributes
    assert set(a.features) == {"language", "country", "category", "creator", "maturity", "tags"}
    for name in ("language", "country", "creator", "maturity"):
        assert bool((a[name].lengths == 1).all()), name
    assert a["language"].cardinality == 31 and a["country"].cardinality >= 61
    assert a["creator"].cardinality == 6000 // 50 + 1 and a["tags"].cardinality == 10_001
    for name, attr in a.features.items():
        assert attr.vocab is not None and attr.vocab[0] == OOV
        assert int(attr.values.min()) >= 1, f"{name} uses the OOV id"
    assert a["language"].value_id("en") == 1 and a["creator"].value_id("creator_7") == 8
    cat_len, tag_len = a["category"].lengths, a["tags"].lengths
    assert int(cat_len.min()) == 1 and int(cat_len.max()) == 3
    assert int(tag_len.min()) == 0 and int(tag_len.max()) == 5
    for attr in (a["category"], a["tags"]):  # values within an item are distinct
        for i in range(0, 6000, 97):
            row = attr.values[attr.offsets[i] : attr.offsets[i + 1]]
            assert row.unique().numel() == row.numel()
    maturity = torch.bincount(a["maturity"].values, minlength=6)[1:]
    assert MATURITY[int(maturity.argmin())] == "NC17" and int(maturity.min()) > 0


def test_attribute_correlations(catalog: SyntheticCatalog) -> None:
    a, cl = catalog.attributes, catalog.cluster
    # a cluster's dominant language covers most of its items; globally the top language does not
    assert _mode_share(cl, a["language"].values) > 0.65
    assert _mode_share(torch.zeros_like(cl), a["language"].values) < 0.5
    # a country usually belongs to the item's language
    lang_vocab, country_vocab = a["language"].vocab, a["country"].vocab
    assert lang_vocab is not None and country_vocab is not None
    ok = [country_vocab[int(c)] in LANGUAGE_COUNTRIES[lang_vocab[int(lang)]]
          for lang, c in zip(a["language"].values[:2000], a["country"].values[:2000])]  # fmt: skip
    assert sum(ok) / len(ok) > 0.85
    # creators live inside one cluster
    assert _mode_share(a["creator"].values, cl) > 0.9
    # most items of a cluster carry the cluster's category (among their 1-3)
    cat = a["category"]
    owner = torch.repeat_interleave(cl, cat.lengths)
    ones = torch.ones(owner.numel())
    counts = torch.zeros(30, cat.cardinality).index_put_((owner, cat.values), ones, True)
    has_top = torch.zeros(6000).index_put_(
        (torch.repeat_interleave(torch.arange(6000), cat.lengths),),
        (cat.values == counts.argmax(1)[owner]).float(), True)  # fmt: skip
    assert float(has_top.mean()) > 0.8


def test_jagged_dedups_and_respects_lengths() -> None:
    mat = torch.tensor([[5, 5, 2], [1, 2, 3], [7, 8, 9]])
    lengths, values = _jagged(mat, torch.tensor([3, 0, 2]))
    assert lengths.tolist() == [2, 0, 2]
    assert values.tolist() == [2, 5, 7, 8]


def test_queries_near_clusters(catalog: SyntheticCatalog) -> None:
    q = make_queries(catalog, 200, seed=1)
    assert q.shape == (200, 16) and q.dtype == torch.float32
    assert torch.equal(q, make_queries(catalog, 200, seed=1))
    nearest = torch.cdist(q, catalog.centers).min(1).values
    assert float(nearest.mean()) < 0.7
    far = make_queries(catalog, 200, seed=1, noise=3.0)
    assert float(torch.cdist(far, catalog.centers).min(1).values.mean()) > float(nearest.mean())


TOKEN = re.compile(r"\(|\)|AND|OR|NOT|[A-Za-z_]+:[A-Za-z0-9_]+")


def test_filter_expressions_are_well_formed(catalog: SyntheticCatalog) -> None:
    exprs = random_filter_expressions(catalog, 200, seed=5)
    assert exprs == random_filter_expressions(catalog, 200, seed=5)
    assert len(set(exprs)) > 50
    assert any("(" in e for e in exprs) and any("NOT" in e for e in exprs)
    assert any(" OR " in e for e in exprs) and any(" AND " in e for e in exprs)
    for e in exprs:
        tokens = e.replace("(", " ( ").replace(")", " ) ").split()
        assert all(TOKEN.fullmatch(t) for t in tokens), e
        depth = 0
        for t in tokens:
            depth += (t == "(") - (t == ")")
            assert depth >= 0, e
        assert depth == 0, e
        for t in tokens:
            if ":" in t:
                feature, value = t.split(":")
                assert catalog.attributes[feature].value_id(value) is not None, t
    assert any(re.match(r"language:\w+ AND \(country:\w+ OR country:\w+\)", e) for e in exprs)
    categories = {t[len("category:"):] for e in exprs for t in TOKEN.findall(e)
                  if t.startswith("category:")}  # fmt: skip
    assert categories <= set(CATEGORIES)


def test_generate_interactions(catalog: SyntheticCatalog) -> None:
    ds = generate_interactions(catalog, num_users=300, per_user=30, seed=2)
    assert ds.num_users == 300 and ds.num_items == 6000 and ds.num_interactions == 9000
    assert ds.items.feature_names[0] == "item_id"
    assert set(catalog.attributes.features) <= set(ds.items.feature_names)
    assert ds.users.feature_names == ["user_id", "language", "country", "age_bucket"]
    assert torch.bincount(ds.test.user, minlength=300).min() == 3
    # structured: most of a user's events fall in two clusters
    cl = catalog.cluster[ds.train.item]
    counts = torch.zeros(300, 30).index_put_((ds.train.user, cl), torch.ones(len(ds.train)), True)
    top2 = counts.topk(2, dim=1).values.sum(1) / counts.sum(1)
    assert float(top2.mean()) > 0.7
    # ratings are higher in a user's favourite cluster -> "liked" is learnable
    fav = counts.argmax(1)
    in_fav = cl == fav[ds.train.user]
    liked = ds.train.labels()["liked"]
    assert float(liked[in_fav].mean()) > float(liked[~in_fav].mean()) + 0.2
    again = generate_interactions(catalog, num_users=300, per_user=30, seed=2)
    assert torch.equal(again.train.item, ds.train.item)
    assert torch.equal(again.train.rating, ds.train.rating)
