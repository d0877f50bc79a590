"""RetrievalModel: one forward pass against a step-by-step reference, filters, state, errors."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

from silvertorch.data.batching import features_to_kjt
from silvertorch.index import ItemIndex, SearchParams
from silvertorch.index.attributes import Attribute, ItemAttributes
from silvertorch.index.quantize import decode
from silvertorch.model import RetrievalConfig, RetrievalModel, TwoTower, TwoTowerConfig
from silvertorch.modules.overarch import OverArchConfig
from silvertorch.modules.reranker import RerankerConfig
from silvertorch.modules.towers import TowerConfig
from silvertorch.modules.value_model import ValueModelConfig
from silvertorch.config import from_dict

N_ITEMS, N_USERS, DIM = 300, 20, 8
GENRES = ["<oov>", "action", "comedy", "drama", "horror", "scifi"]
DECADES = ["<oov>", "1970", "1980", "1990", "2000"]
USER_CARD = {"user_id": N_USERS, "gender": 3}


def make_items(n: int = N_ITEMS, seed: int = 0) -> ItemAttributes:
    """``n`` items: ``item_id``, multi-valued ``genre`` (0-3 values, some empty), single ``decade``."""
    g = torch.Generator().manual_seed(seed)
    genres = [
        sorted(set(torch.randint(1, len(GENRES), (int(torch.randint(0, 4, (1,), generator=g)),),
                                 generator=g).tolist()))
        for _ in range(n)
    ]
    decade = torch.randint(1, len(DECADES), (n,), generator=g)
    return ItemAttributes(n, {
        "item_id": Attribute.from_single("item_id", torch.arange(n), n),
        "genre": Attribute.from_lists("genre", genres, len(GENRES), GENRES),
        "decade": Attribute.from_single("decade", decade, len(DECADES), DECADES),
    })


def tower_cfg(features: dict[str, int]) -> TowerConfig:
    return from_dict(TowerConfig, {
        "features": list(features),
        "tables": [{"name": f, "features": [f], "embedding_dim": 8} for f in features],
        "mlp_dims": [16, DIM],
    })


def user_kjt(users: list[int], genders: list[int] | None = None) -> KeyedJaggedTensor:
    genders = genders if genders is not None else [u % 3 for u in users]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "gender"], values=torch.tensor(users + genders),
        lengths=torch.ones(2 * len(users), dtype=torch.int64),
    )


def retrieval_config(**kw) -> RetrievalConfig:
    raw = dict(
        k_prime=40, nprobe=3, max_k=100,
        overarch=OverArchConfig(tasks=["liked", "rated"], hidden_dims=[16],
                                item_features=["genre", "decade"], feature_embedding_dim=4),
        value_model=ValueModelConfig(tasks=["liked", "rated"], weights=[1.0, 0.5]),
    )
    raw.update(kw)
    return RetrievalConfig(**raw)


def build_model(seed: int = 0, dtype: str = "int8", nlist: int = 6, items: ItemAttributes | None = None,
                **cfg_kw) -> RetrievalModel:
    """A tiny TwoTower's towers, an index of its item vectors, and a fresh scoring stack."""
    torch.manual_seed(seed)
    items = items or make_items()
    item_card = {"item_id": items.num_items, "genre": len(GENRES)}
    two = TwoTower(TwoTowerConfig(user_tower=tower_cfg(USER_CARD), item_tower=tower_cfg(item_card)),
                   USER_CARD, item_card, num_items=items.num_items)
    with torch.no_grad():
        vectors = two.item_embeddings(
            features_to_kjt(items.features, torch.arange(items.num_items), ["item_id", "genre"]))
    index = ItemIndex.build(vectors, attributes=items, nlist=nlist, dtype=dtype, seed=seed)
    model = RetrievalModel.build(retrieval_config(**cfg_kw), two.user_tower, index, items)
    return model.eval()


# ------------------------------------------------------------------------------ reference
def jagged(attr: Attribute, ids: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """True jagged (offsets, values) of candidates ``ids (B, K)``; padding ids get one pad value."""
    offsets, values = [0], []
    for i in ids.reshape(-1).tolist():
        row = attr.values[attr.offsets[i]:attr.offsets[i + 1]].tolist() if i >= 0 else [pad]
        values += row
        offsets.append(len(values))
    return torch.tensor(offsets), torch.tensor(values, dtype=torch.int64)


def reference(model: RetrievalModel, items: ItemAttributes, kjt: KeyedJaggedTensor, k: int,
              plan=None, weights=None, nprobe=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline written out step by step with the public pieces."""
    cfg = model.config
    q = model.user_tower(kjt)
    k_cand = max(k, cfg.k_prime)
    params = SearchParams(nprobe=nprobe or cfg.nprobe, filter=plan, verify=cfg.verify)
    _, ids = model.index.search(q, k_cand, params)
    ivf = model.index.ivf
    stored = decode(ivf.vectors, ivf.scales)  # (S, D) dequantized "cached" item vectors
    slot_of = {int(i): s for s, i in enumerate(ivf.slot_ids.tolist()) if i >= 0}
    e = torch.stack([stored[slot_of[i]] if i >= 0 else torch.zeros(DIM)
                     for i in ids.reshape(-1).tolist()]).reshape(*ids.shape, DIM)
    feats = {f: jagged(items[f], ids, model.overarch.padding_id(f)) for f in model.overarch.feature_names}
    logits = model.overarch(q, e, feats)
    comp = model.value_model(logits, weights).masked_fill(ids < 0, float("-inf"))
    scores, pos = torch.topk(comp, k, dim=1)
    out_ids = torch.where(scores > float("-inf"), ids.gather(1, pos), -1)
    return out_ids, scores


@pytest.fixture(scope="module")
def items() -> ItemAttributes:
    return make_items()


@pytest.fixture(scope="module")
def model(items) -> RetrievalModel:
    return build_model(items=items)


@torch.no_grad()
def test_forward_matches_step_by_step_reference(model, items) -> None:
    kjt = user_kjt([0, 3, 7, 19])
    out = model(kjt, 10)
    ref_ids, ref_scores = reference(model, items, kjt, 10)
    assert out.ids.shape == (4, 10) and out.ids.dtype == torch.int64
    assert out.task_scores.shape == (4, 10, 2) and out.retrieval_scores.shape == (4, 10)
    assert torch.equal(out.ids, ref_ids)
    torch.testing.assert_close(out.scores, ref_scores)
    # task scores are the probabilities the value model combined
    torch.testing.assert_close((out.task_scores * torch.tensor([1.0, 0.5])).sum(-1), out.scores)
    assert bool((out.scores[:, :-1] >= out.scores[:, 1:]).all())


@torch.no_grad()
def test_filtered_results_satisfy_the_expression(model, items) -> None:
    kjt = user_kjt([1, 2, 5])
    filters = ["genre:comedy AND NOT decade:1990", "genre:horror OR genre:scifi", None]
    out = model.retrieve(kjt, 15, filters)
    plan = model.index.eligibility.compile(filters)
    ref_ids, ref_scores = reference(model, items, kjt, 15, plan=plan)
    assert torch.equal(out.ids, ref_ids)
    torch.testing.assert_close(out.scores, ref_scores)
    genre, decade = items["genre"], items["decade"]
    for row, ids in enumerate(out.ids.tolist()):
        for i in (i for i in ids if i >= 0):
            g = set(genre.values[genre.offsets[i]:genre.offsets[i + 1]].tolist())
            d = int(decade.values[i])
            if row == 0:
                assert 2 in g and d != 3
            elif row == 1:
                assert g & {4, 5}
    # exact check through the eligibility index as well
    slots = torch.where(out.ids >= 0, model.item_slot[out.ids.clamp_min(0)], -1)
    assert bool((model.index.eligibility.verify(plan, slots) | (out.ids < 0)).all())


@torch.no_grad()
def test_selective_filter_pads_and_empty_filter_is_well_formed(model, items) -> None:
    decade = items["decade"]
    comedy_70s = [i for i in range(items.num_items) if int(decade.values[i]) == 1
                  and 2 in items["genre"].values[items["genre"].offsets[i]:items["genre"].offsets[i + 1]].tolist()]
    assert 0 < len(comedy_70s) < 60
    out = model.retrieve(user_kjt([4]), 60, ["genre:comedy AND decade:1970"], nprobe=100)
    n = int((out.ids >= 0).sum())
    assert n == len(comedy_70s)  # nprobe >= nlist: every match is found
    assert set(out.ids[0, :n].tolist()) == set(comedy_70s)
    assert bool((out.ids[0, n:] == -1).all()) and bool(torch.isinf(out.scores[0, n:]).all())
    assert bool((out.task_scores[0, n:] == 0).all()) and bool(torch.isinf(out.retrieval_scores[0, n:]).all())
    for expr in ["genre:western", "genre:comedy AND NOT genre:comedy"]:
        out = model.retrieve(user_kjt([4, 5]), 7, [expr])
        assert out.ids.shape == (2, 7) and bool((out.ids == -1).all())
        assert bool((out.scores == float("-inf")).all()) and bool((out.task_scores == 0).all())


@torch.no_grad()
def test_value_weights_override_changes_the_ranking(model, items) -> None:
    kjt = user_kjt([0, 1, 2])
    only_liked = model(kjt, 10, value_weights=torch.tensor([1.0, 0.0]))
    only_rated = model(kjt, 10, value_weights=torch.tensor([[0.0, 1.0]] * 3))
    for out, t in ((only_liked, 0), (only_rated, 1)):
        torch.testing.assert_close(out.scores, out.task_scores[..., t])
        assert bool((out.task_scores[:, :-1, t] >= out.task_scores[:, 1:, t]).all())
    assert not torch.equal(only_liked.ids, only_rated.ids)
    per_row = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    mixed = model(kjt, 10, value_weights=per_row)
    assert torch.equal(mixed.ids[0], only_liked.ids[0]) and torch.equal(mixed.ids[1], only_rated.ids[1])
    ref_ids, ref_scores = reference(model, items, kjt, 10, weights=per_row)
    assert torch.equal(mixed.ids, ref_ids)


def test_bad_requests_raise_clear_errors(model) -> None:
    kjt = user_kjt([0, 1])
    for k in (0, -3, 101, 2.5):
        with pytest.raises(ValueError, match="k must"):
            model(kjt, k)
    with pytest.raises(ValueError, match=r"shape \(2,\) or \(B, 2\)"):
        model(kjt, 5, value_weights=torch.ones(3))
    with pytest.raises(ValueError, match="rows, expected one per query"):
        model(kjt, 5, value_weights=torch.ones(3, 2))
    with pytest.raises(ValueError, match="finite"):
        model(kjt, 5, value_weights=torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="finite"):
        model.value_model.check_weights(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="nprobe"):
        model(kjt, 5, nprobe=0)
    with pytest.raises(ValueError, match="expected 1 or 2"):
        model.retrieve(kjt, 5, ["genre:comedy", None, None])


@torch.no_grad()
def test_state_dict_round_trip_into_a_fresh_model(model) -> None:
    kjt = user_kjt([0, 6, 11])
    filters = ["genre:drama OR decade:2000"]
    before = model.retrieve(kjt, 12, filters)
    fresh = build_model(seed=1, items=make_items(seed=5))  # same sizes, other weights and catalog
    assert not torch.equal(fresh.retrieve(kjt, 12, filters).ids, before.ids)
    fresh.load_state_dict(model.state_dict())
    after = fresh.retrieve(kjt, 12, filters)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    keys = model.state_dict().keys()
    assert {"index.ivf.vectors", "index.eligibility.table", "item_slot", "item_feature_genre",
            "value_model.weights"} <= set(keys)


@torch.no_grad()
def test_reranker_starts_as_identity_and_then_reorders(items) -> None:
    plain = build_model(items=items)
    reranked = build_model(items=items, reranker=RerankerConfig(enabled=True, hidden_dim=8, top_n=20))
    reranked.overarch.load_state_dict(plain.overarch.state_dict())
    kjt = user_kjt([2, 9])
    a, b = plain(kjt, 10), reranked(kjt, 10)
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.scores, b.scores)
    torch.nn.init.normal_(reranked.reranker.head[-1].weight, std=5.0)
    c = reranked(kjt, 10)
    assert not torch.equal(c.ids, a.ids)
    assert bool((c.scores[:, :-1] >= c.scores[:, 1:]).all())
