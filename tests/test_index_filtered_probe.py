"""Selectivity-aware probing (silvertorch.index.selectivity): the per-cluster histograms and the
eligible-item estimate, recall of filtered queries, batch independence, off == fixed nprobe, and
histograms that follow streaming updates, compaction and an export round trip."""

from __future__ import annotations

import pytest
import torch

from silvertorch.data.synthetic import generate_catalog, make_queries
from silvertorch.index import ItemIndex, SearchParams
from silvertorch.index.bitmap import popcount, unpack_bits
from silvertorch.index.selectivity import ClusterHistogram, estimate_eligible, select_probes

NLIST = 32
FILTERS = ["maturity:R", "language:en AND NOT category:news", "category:sports OR category:music",
           "maturity:G AND (language:fr OR language:de)", "tags:tag_1", "NOT maturity:PG13"]


@pytest.fixture(scope="module")
def catalog():
    return generate_catalog(12_000, 16, num_clusters=NLIST, seed=3)


@pytest.fixture(scope="module")
def index(catalog) -> ItemIndex:
    return ItemIndex.build(catalog.vectors, attributes=catalog.attributes, nlist=NLIST, dtype="fp32")


def exact_counts(index: ItemIndex, exprs: list[str]) -> torch.Tensor:
    """``(U, C)`` exact eligible live items per cluster, from the exact filter bits."""
    elig, off = index.eligibility, index.ivf.cluster_offsets
    plan = elig.compile(exprs, exact=True)
    bits = unpack_bits(elig.evaluate(plan), elig.num_slots)
    cluster = torch.searchsorted(off[1:], torch.arange(elig.num_slots), right=True)
    out = torch.zeros(len(exprs), NLIST + 1)
    for u in range(len(exprs)):
        out[u] = torch.bincount(cluster[bits[u]], minlength=NLIST + 1)[: NLIST + 1].float()
    return out


def estimates(index: ItemIndex, exprs: list[str]) -> torch.Tensor:
    plan = index.eligibility.compile(exprs)
    est, filtered = estimate_eligible(plan, index.selectivity, index.ivf.cluster_offsets,
                                      index.ivf.live_words, index.eligibility.feat_info)
    assert bool(filtered.all())
    return est


def recall(got: torch.Tensor, truth: torch.Tensor) -> float:
    vals = [len((set(t) - {-1}) & set(g)) / len(set(t) - {-1})
            for g, t in zip(got.tolist(), truth.tolist()) if set(t) - {-1}]
    return sum(vals) / len(vals)


def test_estimate_is_exact_for_single_terms_and_follows_the_independence_rules(index) -> None:
    single = ["maturity:R", "language:en", "category:sports", "tags:tag_1", "NOT maturity:PG13"]
    assert torch.allclose(estimates(index, single), exact_counts(index, single), atol=1e-2)
    live = exact_counts(index, ["NOT language:__unknown__"])[0]  # every live item, per cluster
    a, b = exact_counts(index, ["maturity:R", "language:en"]) / live.clamp_min(1)
    both = estimates(index, ["maturity:R AND language:en", "maturity:R OR language:en",
                             "NOT (maturity:R OR language:en)"])
    assert torch.allclose(both[0], a * b * live, atol=1e-2)
    assert torch.allclose(both[1], (1 - (1 - a) * (1 - b)) * live, atol=1e-2)
    assert torch.allclose(both[2], (1 - a) * (1 - b) * live, atol=1e-2)


def test_select_probes_stops_at_the_target_within_bounds() -> None:
    sims = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    elig = torch.tensor([[1.0, 1.0, 5.0, 5.0, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    p = select_probes(sims, 1, elig, torch.tensor([6.0, 0.0]), 4)
    assert p.tolist() == [[0, 1, 2], [4, -1, -1]]  # 1+1 < 6 <= 1+1+5; unfiltered row: nprobe
    p = select_probes(sims, 2, elig, torch.tensor([1e9, 1e9]), 4)  # capped by max_nprobe
    assert p.tolist() == [[0, 1, 2, 3], [4, 3, 2, 1]]


def test_adaptive_probing_recovers_recall_and_off_equals_fixed_nprobe(catalog, index) -> None:
    q = make_queries(catalog, 24, seed=5)
    exprs = [FILTERS[i % len(FILTERS)] for i in range(24)]
    k = 200
    truth = index.search(q, k, SearchParams(filter=exprs, exact=True))[1]
    fixed = index.search(q, k, SearchParams(nprobe=2, filter=exprs))[1]
    off = index.search(q, k, SearchParams(nprobe=2, filter=exprs, min_candidates_factor=0.0))[1]
    adaptive = index.search(q, k, SearchParams(nprobe=2, filter=exprs, min_candidates_factor=2.0))[1]
    assert torch.equal(off, fixed)
    r_fixed, r_adapt = recall(fixed, truth), recall(adaptive, truth)
    assert r_adapt >= r_fixed and r_adapt >= 0.9 and r_fixed < 0.8, (r_fixed, r_adapt)
    # unfiltered requests are untouched by the knob
    a = index.search(q, k, SearchParams(nprobe=2))
    b = index.search(q, k, SearchParams(nprobe=2, min_candidates_factor=4.0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("engine", ["auto", "fast"])
def test_a_query_alone_equals_the_same_query_in_a_batch(catalog, index, engine) -> None:
    q = make_queries(catalog, 8, seed=7)
    exprs = [FILTERS[i % len(FILTERS)] for i in range(7)] + [None]
    p = dict(nprobe=2, min_candidates_factor=3.0, max_nprobe=16, engine=engine)
    s, ids = index.search(q, 100, SearchParams(filter=exprs, **p))
    for i in range(8):
        s1, i1 = index.search(q[i : i + 1], 100, SearchParams(filter=[exprs[i]], **p))
        assert torch.equal(i1[0], ids[i]), i  # the same clusters probed, the same answer
        # (fp32 scores of the torch path are GEMMs of another width in a batch: rounding only)
        assert torch.allclose(s1[0], s[i], rtol=1e-5, atol=1e-6), i


def _recount(index: ItemIndex) -> ClusterHistogram:
    return ClusterHistogram.build(index.ivf.cluster_offsets, index.ivf.live_words, index.eligibility,
                                  index.ivf.nlist, col_base=index.selectivity.col_base)


def test_histograms_follow_upserts_deletes_patches_and_compaction(tmp_path) -> None:
    from benchmarks.mesh.artifacts import tiny_artifact
    from silvertorch.catalog import CatalogUpdater, compact_state
    from silvertorch.export import load_artifact

    art = load_artifact(tiny_artifact(tmp_path / "a", num_items=300, min_candidates_factor=2.0))
    model = art.model
    index = model.index
    assert index.has_histograms
    assert torch.equal(index.selectivity.counts, _recount(index).counts)  # exported and loaded
    up = CatalogUpdater(model)
    g = torch.Generator().manual_seed(0)
    up.upsert(torch.tensor([300, 301, 5]), torch.randn(3, index.ivf.dim, generator=g),
              [{"genre": ["comedy"], "decade": ["1980s"]}, {"genre": ["drama", "horror"]}, {"genre": ["scifi"]}])
    up.delete(torch.tensor([7, 8]))
    up.patch_attributes(torch.tensor([9, 301]), [{"decade": ["2000s"]}, {"genre": []}])
    assert int(index.selectivity.counts[NLIST_TINY].sum()) > 0  # the fresh cluster has counts
    assert torch.equal(index.selectivity.counts, _recount(index).counts)
    total = index.selectivity.counts[:, index.selectivity.col_base[1]:].sum()
    assert int(total) > 0
    model.load_state_dict(compact_state(model.state_dict()))
    index = model.index
    assert int(index.selectivity.counts[NLIST_TINY].sum()) == 0
    assert torch.equal(index.selectivity.counts, _recount(index).counts)
    live = int(popcount(index.ivf.live_words).sum())
    assert live == 300 + 2 - 2


NLIST_TINY = 8  # tiny_artifact's nlist


def test_an_index_without_histograms_probes_as_before(catalog, index) -> None:
    state = {k: v for k, v in index.state_dict().items() if not k.startswith("selectivity.")}
    old = ItemIndex.from_state_dict(state)
    assert old.selectivity is None and not old.has_histograms
    q = make_queries(catalog, 6, seed=9)
    p = SearchParams(nprobe=2, filter=FILTERS, min_candidates_factor=2.0)
    assert torch.equal(old.search(q, 50, p)[1], index.search(q, 50, SearchParams(nprobe=2, filter=FILTERS))[1])
    with pytest.raises(ValueError, match="min_candidates_factor"):
        index.search(q, 5, SearchParams(filter=FILTERS, min_candidates_factor=-1.0))
