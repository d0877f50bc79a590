"""Streaming catalog updates through ``silvertorch.catalog``: upsert, delete, patch, compaction."""

from __future__ import annotations

import pytest
import torch

from silvertorch.catalog import CatalogUpdater, compact_state
from silvertorch.config import to_dict
from silvertorch.data.batching import features_to_kjt
from silvertorch.index import ItemIndex, SearchParams
from silvertorch.index.eligibility import EligibilityConfig
from silvertorch.model import RetrievalModel, TwoTower, TwoTowerConfig
from tests.test_retrieval_model import (
    DIM, GENRES, USER_CARD, make_items, retrieval_config, tower_cfg, user_kjt,
)

N = 300


def make_model(genre_mode: str, dtype: str = "int8") -> RetrievalModel:
    torch.manual_seed(0)
    items = make_items(N)
    item_card = {"item_id": N, "genre": len(GENRES)}
    two = TwoTower(TwoTowerConfig(user_tower=tower_cfg(USER_CARD), item_tower=tower_cfg(item_card)),
                   USER_CARD, item_card, num_items=N)
    with torch.no_grad():
        vectors = two.item_embeddings(features_to_kjt(items.features, torch.arange(N), ["item_id", "genre"]))
    cfg = EligibilityConfig(modes={"genre": genre_mode, "item_id": "bloom"})
    index = ItemIndex.build(vectors, attributes=items, nlist=6, dtype=dtype, eligibility_config=cfg)
    return RetrievalModel.build(retrieval_config(), two.user_tower, index, items).eval()


@pytest.fixture(params=["bloom", "bitmap"])
def model(request: pytest.FixtureRequest) -> RetrievalModel:
    return make_model(request.param)


def big(n: int, seed: int) -> torch.Tensor:
    """Vectors of large norm: the best match of a query along themselves."""
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)) * 50


def search(m: RetrievalModel, q: torch.Tensor, k: int = 10, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    return m.index.search(q, k, SearchParams(**kw))


def clone_state(m: RetrievalModel) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in m.state_dict().items()}


def test_new_items_are_found_with_filters_and_forward(model: RetrievalModel) -> None:
    up = CatalogUpdater(model)
    v = big(2, 0)
    ids = torch.tensor([N + 5, N + 6])  # beyond the id space: item tables grow
    res = up.upsert(ids, v, [{"genre": ["comedy", "horror"], "decade": ["1990"]}, {"genre": ["nope"]}])
    assert (res.inserted, res.updated, res.generation) == (2, 0, 1)
    assert up.is_live(N + 5) and not up.is_live(N + 4) and model.num_items > N + 6
    for kw in ({"exact": True}, {"nprobe": 1}):
        assert search(model, v, **kw)[1][:, 0].tolist() == ids.tolist(), kw
        got = search(model, v[:1], filter=["genre:horror AND decade:1990"], **kw)[1][0]
        assert int(got[0]) == N + 5
        got = search(model, v[:1], filter=["NOT genre:comedy"], **kw)[1][0]
        assert N + 5 not in got.tolist()
        got = search(model, v[1:], filter=["genre:<oov>"], **kw)[1][0]  # unknown value -> OOV id 0
        assert int(got[0]) == N + 6
    assert model.item_feature_genre[N + 5].tolist()[:2] == [GENRES.index("comedy"), GENRES.index("horror")]
    # the whole forward pass (custom op, OverArch features of the new ids)
    kjt = user_kjt([0, 1, 2])
    out = model.retrieve(kjt, 20)
    q = model.user_tower(kjt)
    plain = search(model, q, model.config.k_prime, nprobe=model.config.nprobe)  # the OverArch's candidates
    assert set(out.ids[0].tolist()) <= set(plain[1][0].tolist())
    assert bool(torch.isfinite(out.scores).all())
    q_new = v[0:1] / v[0].norm() * q[0].norm()
    kp = model.config.k_prime  # k = K': every index candidate comes out, reordered by the OverArch
    plan = model.index.eligibility.compile(["genre:horror"])
    out = model.retrieve_from_query(q_new, kp, filter_plan=plan)
    row = out.ids[0].tolist()
    assert N + 5 in row
    assert float(out.retrieval_scores[0, row.index(N + 5)]) == float(out.retrieval_scores[0].max())
    assert bool(torch.isfinite(out.task_scores[0, row.index(N + 5)]).all())


def test_in_place_vector_update_changes_scores(model: RetrievalModel) -> None:
    up = CatalogUpdater(model)
    target = big(1, 1)
    before = search(model, target, 1, exact=True)[1][0, 0]
    item = 17 if int(before) != 17 else 18
    slot = int(model.item_slot[item])
    res = up.upsert(torch.tensor([item]), target)
    assert (res.updated, res.inserted) == (1, 0) and int(model.item_slot[item]) == slot  # same slot
    s, i = search(model, target, 1, exact=True)
    assert int(i[0, 0]) == item
    stored = model.index.ivf.vectors[slot].float() * model.index.ivf.scales[slot]
    q8 = target  # int8 queries: the score is close to q . stored
    assert abs(float(s[0, 0]) - float(q8[0] @ stored)) < 0.02 * abs(float(q8[0] @ stored))
    assert torch.allclose(model.candidate_vectors(torch.tensor([[item]]))[0, 0], stored)
    assert search(model, target, 1, nprobe=model.index.ivf.nlist)[1][0, 0] == item


def test_delete_is_honoured_everywhere(model: RetrievalModel) -> None:
    up = CatalogUpdater(model)
    q = torch.randn(6, DIM, generator=torch.Generator().manual_seed(3))
    victims = search(model, q, 3, exact=True)[1][:, 0].unique()
    up.upsert(torch.tensor([N + 1]), big(1, 4), [{"genre": ["drama"]}])
    victims = torch.cat([victims, torch.tensor([N + 1])])
    res = up.delete(victims)
    assert res.deleted == victims.numel() and up.stats()["tombstones"] == victims.numel()
    qs = torch.cat([q, big(1, 4)])
    for kw in ({"exact": True}, {"nprobe": 2}, {"nprobe": 6, "engine": "reference"}):
        for f in (None, ["genre:drama OR NOT genre:drama"], ["item_id:" + str(int(victims[0]))]):
            ids = search(model, qs, 50, filter=f, **kw)[1]
            assert not set(ids.flatten().tolist()) & set(victims.tolist()), (kw, f)
    assert not set(model.retrieve(user_kjt([0, 1]), 50).ids.flatten().tolist()) & set(victims.tolist())
    with pytest.raises(KeyError, match=str(int(victims[0]))):
        up.delete(victims[:1])
    # a deleted id comes back as a new item in the fresh segment
    assert up.upsert(victims[:1], big(1, 5)).inserted == 1 and up.is_live(int(victims[0]))


def test_an_index_with_every_item_deleted_answers_nothing(model: RetrievalModel) -> None:
    """Slots remain but none is live: every search path pads the whole answer (-1 ids, -inf)."""
    CatalogUpdater(model).delete(torch.arange(N))
    assert model.index.ivf.ntotal == 0 and model.index.ivf.num_slots >= N
    q = torch.randn(3, DIM, generator=torch.Generator().manual_seed(7))
    for kw in ({"exact": True}, {"nprobe": 2}, {"nprobe": 6, "engine": "reference"}):
        for f in (None, ["genre:drama OR NOT genre:drama"]):
            scores, ids = search(model, q, 20, filter=f, **kw)
            assert ids.shape == (3, 20) and bool((ids == -1).all()), (kw, f)
            assert bool(torch.isneginf(scores).all()), (kw, f)
    assert bool((model.retrieve(user_kjt([0, 1]), 20).ids == -1).all())


def test_patch_attributes_changes_filters(model: RetrievalModel) -> None:
    up = CatalogUpdater(model)
    v = big(1, 6)
    up.upsert(torch.tensor([N]), v, [{"genre": ["comedy"], "decade": ["1980"]}])
    item = int(search(model, v, 1, exact=True)[1][0, 0])  # a main-index item too
    for target in (N, 7):
        up.patch_attributes(torch.tensor([target]), [{"genre": ["horror", "scifi"]}])
        qv = v if target == N else model.candidate_vectors(torch.tensor([[7]]))[0]
        for kw in ({"exact": True}, {"nprobe": 6}):
            assert target in search(model, qv, 300, filter=["genre:scifi"], **kw)[1][0].tolist()
            assert target not in search(model, qv, 300, filter=["genre:comedy"], **kw)[1][0].tolist()
    assert item == N
    assert N in search(model, v, 300, filter=["decade:1980"], exact=True)[1][0].tolist()  # kept
    assert model.item_feature_genre[N].tolist()[:2] == [GENRES.index("horror"), GENRES.index("scifi")]
    up.upsert(torch.tensor([N, 7]), big(2, 16), [None, {"decade": ["2000"]}])  # None / unlisted: kept
    assert N in search(model, v, 300, filter=["genre:scifi AND decade:1980"], exact=True)[1][0].tolist()
    assert 7 in search(model, v, 300, filter=["genre:scifi AND decade:2000"], exact=True)[1][0].tolist()


def test_failed_validation_writes_nothing(model: RetrievalModel) -> None:
    up = CatalogUpdater(model)
    up.upsert(torch.tensor([N]), big(1, 7))
    before = clone_state(model)
    bad_calls = [
        (ValueError, lambda: up.upsert(torch.tensor([N + 1]), torch.randn(1, DIM + 1))),
        (ValueError, lambda: up.upsert(torch.tensor([N + 1]), torch.full((1, DIM), float("nan")))),
        (ValueError, lambda: up.upsert(torch.tensor([N + 1, 3]),
                                       torch.tensor([[1.0] * DIM, [float("inf")] * DIM]))),
        (ValueError, lambda: up.upsert(torch.tensor([-1]), torch.randn(1, DIM))),
        (ValueError, lambda: up.upsert(torch.tensor([4, 4]), torch.randn(2, DIM))),
        (ValueError, lambda: up.upsert(torch.tensor([N + 1]), torch.randn(1, DIM), [{"colour": ["red"]}])),
        (ValueError, lambda: up.upsert(torch.tensor([N + 1]), torch.randn(1, DIM), [{"genre": [99]}])),
        (TypeError, lambda: up.upsert(torch.tensor([N + 1]), torch.randn(1, DIM), [{"genre": "comedy"}])),
        (ValueError, lambda: up.upsert(torch.tensor([N + 1]), torch.randn(1, DIM), [])),
        (KeyError, lambda: up.delete(torch.tensor([2, N + 50]))),
        (KeyError, lambda: up.patch_attributes(torch.tensor([N + 50]), [{"genre": ["comedy"]}])),
        (ValueError, lambda: up.patch_attributes(torch.tensor([1]), [{"genre": [-3]}])),
    ]
    for err, call in bad_calls:
        with pytest.raises(err):
            call()
    up.delete(torch.tensor([5]))
    before = clone_state(model)
    with pytest.raises(KeyError, match="item id 5 "):
        up.delete(torch.tensor([5]))
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == after[k].dtype and torch.equal(v, after[k]), k
    assert up.generation == 2


def test_compaction_keeps_exact_results_and_finds_fresh_items(model: RetrievalModel) -> None:
    up = CatalogUpdater(model, fresh_capacity=64)
    v = big(90, 8)  # > 64: the fresh region is reallocated once
    new_ids = torch.arange(N, N + 90)
    attrs = [{"genre": [GENRES[1 + i % 5]], "decade": ["1990"]} for i in range(90)]
    up.upsert(new_ids, v, attrs)
    up.delete(torch.tensor([0, 1, 2, N + 3]))
    up.upsert(torch.tensor([10]), big(1, 9), [{"genre": ["action"]}])
    up.patch_attributes(torch.tensor([20, N + 4]), [{"decade": ["1970"]}, {"genre": ["drama"]}])
    q = torch.cat([torch.randn(8, DIM, generator=torch.Generator().manual_seed(9)), v[:8]])
    filters = [None, ["genre:comedy OR decade:1990"], ["NOT genre:action"], ["item_id:10 OR genre:drama"]]
    exact_before = [search(model, q, 30, exact=True, filter=f) for f in filters]
    snapshot = clone_state(model)
    frozen = clone_state(model)
    gen, stats = up.generation, up.stats()
    compacted = compact_state(snapshot)
    for k, t in frozen.items():  # pure: the snapshot is untouched
        if isinstance(t, torch.Tensor):
            assert torch.equal(snapshot[k], t), k
    model.load_state_dict(compacted)
    after = up.stats()
    assert after["fresh_items"] == 0 and after["tombstones"] == 0 and after["fresh_capacity"] == 0
    assert after["live_items"] == stats["live_items"] == N - 3 + 89 and up.generation == gen
    assert not model.index.ivf.has_fresh
    for f, (s0, i0) in zip(filters, exact_before):
        s1, i1 = search(model, q, 30, exact=True, filter=f)
        assert torch.equal(i0, i1) and torch.equal(s0, s1), f
    ivf = model.index.ivf
    live_new = torch.tensor([i for i in new_ids.tolist() if i != N + 3])
    slots = model.item_slot[live_new]
    stored = ivf.vectors[slots].float() * ivf.scales[slots][:, None]
    # k >= catalog: nprobe=1 returns the whole nearest cluster, which must now hold the item
    everything = N + 100
    got = search(model, stored, everything, nprobe=1)[1]
    assert bool((got == live_new[:, None]).any(1).all())
    assert int((got >= 0).sum(1).max()) < after["live_items"]  # one cluster, not the catalog
    got = search(model, stored[3:4], everything, nprobe=1, filter=["genre:drama"])[1][0]
    assert N + 4 in got.tolist() and live_new[3] == N + 4
    # updates keep working on the compacted model
    assert up.upsert(torch.tensor([N + 200]), big(1, 10)).inserted == 1


def test_state_round_trip_through_the_artifact(model: RetrievalModel, tmp_path) -> None:
    from train.artifact import load_retrieval_model, save_artifact

    up = CatalogUpdater(model)
    up.upsert(torch.arange(N, N + 5), big(5, 11), [{"genre": ["scifi"]}] * 5)
    up.delete(torch.tensor([3, N + 1]))
    up.patch_attributes(torch.tensor([4]), [{"genre": ["horror"]}])
    cfg = {"retrieval": to_dict(model.config), "user_tower": to_dict(model.user_tower.config),
           "user_cardinalities": USER_CARD, "item_cardinalities": {"item_id": N, "genre": len(GENRES),
                                                                   "decade": 5},
           "reranker": False}
    path = save_artifact(tmp_path / "m.pt", model, cfg, {})
    loaded, _ = load_retrieval_model(path)
    assert loaded.generation == model.generation == 3
    q = torch.cat([torch.randn(4, DIM), big(5, 11)])
    for kw in ({"exact": True}, {"nprobe": 2, "filter": ["genre:scifi OR genre:horror"]}):
        a, b = search(model, q, 20, **kw), search(loaded, q, 20, **kw)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    kjt = user_kjt([0, 1])
    assert torch.equal(model.retrieve(kjt, 10).ids, loaded.retrieve(kjt, 10).ids)
    up2 = CatalogUpdater(loaded)
    assert up2.stats() == up.stats()
    assert up2.upsert(torch.tensor([N + 1]), big(1, 12)).generation == 4


def test_generation_counts_mutations_and_state_carries_it(model: RetrievalModel) -> None:
    up = CatalogUpdater(model)
    assert up.generation == model.generation == 0
    assert up.upsert(torch.tensor([1]), big(1, 13)).generation == 1
    assert up.upsert(torch.zeros(0, dtype=torch.int64), torch.zeros(0, DIM)).generation == 1  # no-op
    assert up.patch_attributes(torch.tensor([1]), [{"decade": ["2000"]}]).generation == 2
    assert up.delete(torch.tensor([1])).generation == 3
    assert int(model.state_dict()["catalog_generation"]) == 3
    other = make_model("bitmap")
    other.load_state_dict(model.state_dict())
    assert other.generation == 3
    legacy = {k: v for k, v in model.state_dict().items() if k != "catalog_generation"}
    other.load_state_dict(legacy)  # a state saved before streaming updates: generation 0
    assert other.generation == 0


def test_feature_specs_map_raw_values() -> None:
    up = CatalogUpdater(make_model("bloom"))
    assert up.value_ids("genre", ["drama", "comedy", "drama", "zzz"]) == [0, 2, 3]
    assert up.value_ids("item_id", ["12", 7]) == [7, 12]
    with pytest.raises(ValueError, match="out of range"):
        up.value_ids("item_id", [N])
    with pytest.raises(KeyError, match="colour"):
        up.value_ids("colour", ["x"])


def test_random_updates_match_an_index_built_from_the_final_catalog() -> None:
    """Random upserts / deletes / patches, then exact search (with filters) equals the search of
    an index built from scratch on the final catalog."""
    from silvertorch.index.attributes import Attribute, ItemAttributes

    model = make_model("bloom", dtype="fp32")
    up = CatalogUpdater(model, fresh_capacity=64)
    items = make_items(N)
    ivf = model.index.ivf
    vec = {i: ivf.vectors[int(model.item_slot[i])].clone() for i in range(N)}
    names = ["item_id", "genre", "decade"]
    truth = {i: {n: items[n].values[items[n].offsets[i]:items[n].offsets[i + 1]].tolist() for n in names}
             for i in range(N)}
    g = torch.Generator().manual_seed(21)
    for _ in range(3):
        ids = torch.unique(torch.randint(0, N + 80, (40,), generator=g))
        v = torch.randn(ids.numel(), DIM, generator=g)
        attrs = []
        for i in ids.tolist():
            genre = sorted(set(torch.randint(1, len(GENRES), (2,), generator=g).tolist()))
            attrs.append({"genre": [GENRES[x] for x in genre]})
            old = truth.get(i) if up.is_live(i) else None
            truth[i] = {"item_id": old["item_id"] if old else [], "genre": genre,
                        "decade": old["decade"] if old else []}
        up.upsert(ids, v, attrs)
        vec.update({i: v[j] for j, i in enumerate(ids.tolist())})
        live = [i for i in truth if up.is_live(i)]
        dead = torch.tensor(live)[torch.randperm(len(live), generator=g)[:15]]
        up.delete(dead)
        for i in dead.tolist():
            truth.pop(i), vec.pop(i)
        patch = torch.tensor(sorted(truth))[torch.randperm(len(truth), generator=g)[:10]]
        up.patch_attributes(patch, [{"decade": ["1980"]}] * patch.numel())
        for i in patch.tolist():
            truth[i]["decade"] = [DECADES_1980]
    final = sorted(truth)
    cards = model.index.eligibility.schema().cardinality
    ref_items = ItemAttributes(len(final), {
        n: Attribute.from_lists(n, [truth[i][n] for i in final], cards[f], items[n].vocab)
        for f, n in enumerate(names)})
    cfg = EligibilityConfig(modes={"genre": "bloom", "item_id": "bloom"})
    ref = ItemIndex.build(torch.stack([vec[i] for i in final]), ids=torch.tensor(final),
                          attributes=ref_items, nlist=6, dtype="fp32", eligibility_config=cfg)
    q = torch.randn(5, DIM, generator=g)
    for f in (None, ["genre:comedy AND NOT decade:1980"], ["decade:1980 OR genre:horror"], ["NOT genre:drama"]):
        a = search(model, q, 40, exact=True, filter=f)
        b = ref.search(q, 40, SearchParams(exact=True, filter=f))
        assert torch.equal(a[1], b[1]), f
        assert torch.allclose(a[0], b[0], atol=1e-5), f


DECADES_1980 = 2  # value id of "1980" in tests.test_retrieval_model.DECADES
