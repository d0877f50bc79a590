"""Batching: KJT layout on hand-made features, the resumable loader, whole-catalog chunks."""

from __future__ import annotations

import pytest
import torch

from silvertorch.data.batching import (
    Batch,
    FeatureTable,
    InteractionLoader,
    all_items_kjt,
    features_to_kjt,
)
from silvertorch.data.dataset import RecDataset
from silvertorch.data.synthetic import generate_catalog, generate_interactions
from silvertorch.index.attributes import Attribute


def _features() -> dict[str, Attribute]:
    # 4 rows; "a" single-valued, "b" multi-valued with an empty row,
    # "c" has a 40-value row (the CSR gather path)
    return {
        "a": Attribute.from_single("a", torch.tensor([10, 11, 12, 13]), 20),
        "b": Attribute.from_lists("b", [[1, 2], [], [3], [4, 5, 6]], 8),
        "c": Attribute.from_lists("c", [[7], list(range(40)), [], [0, 1]], 50),
    }


def test_kjt_hand_made() -> None:
    kjt = features_to_kjt(_features(), torch.tensor([3, 1, 0]), ["b", "a", "c"])
    assert kjt.keys() == ["b", "a", "c"]
    assert kjt.stride() == 3
    # key-major: all rows of "b", then of "a", then of "c"
    assert kjt.lengths().tolist() == [3, 0, 2, 1, 1, 1, 2, 40, 1]
    assert kjt.values().tolist() == [4, 5, 6, 1, 2, 13, 11, 10, 0, 1, *range(40), 7]
    assert kjt.lengths().dtype == torch.int64 and kjt.values().dtype == torch.int64
    jt = kjt["b"]
    assert [x.tolist() for x in jt.to_dense()] == [[4, 5, 6], [], [1, 2]]


def test_kjt_matches_per_row_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    lists = [torch.randint(9, (int(n),), generator=gen).tolist()
             for n in torch.randint(0, 5, (50,), generator=gen)]  # fmt: skip
    feats = {"m": Attribute.from_lists("m", lists, 9),
             "s": Attribute.from_single("s", torch.arange(50) % 7, 7)}  # fmt: skip
    rows = torch.randint(50, (64,), generator=gen)
    kjt = FeatureTable(feats).kjt(rows)
    want_m = [v for r in rows.tolist() for v in lists[r]]
    want_s = [r % 7 for r in rows.tolist()]
    assert kjt.values().tolist() == want_m + want_s
    assert kjt.lengths().tolist() == [len(lists[r]) for r in rows.tolist()] + [1] * 64


def test_kjt_errors() -> None:
    with pytest.raises(KeyError, match="unknown feature keys"):
        features_to_kjt(_features(), torch.tensor([0]), ["nope"])
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        features_to_kjt(_features(), torch.tensor([4]))


@pytest.fixture(scope="module")
def dataset() -> RecDataset:
    catalog = generate_catalog(500, dim=8, num_clusters=10, seed=0)
    return generate_interactions(catalog, num_users=50, per_user=21, seed=0)  # 1000 train rows


def _same(a: Batch, b: Batch) -> bool:
    return (
        torch.equal(a.user_ids, b.user_ids)
        and torch.equal(a.item_ids, b.item_ids)
        and torch.equal(a.user_features.values(), b.user_features.values())
        and torch.equal(a.item_features.lengths(), b.item_features.lengths())
        and torch.equal(a.item_features.values(), b.item_features.values())
        and all(torch.equal(a.labels[k], b.labels[k]) for k in a.labels)
    )


def test_batch_contents(dataset: RecDataset) -> None:
    loader = InteractionLoader(dataset, 64, seed=1)
    batch = next(iter(loader))
    assert batch.size == 64 and batch.user_ids.dtype == torch.int64
    assert set(batch.labels) == {"liked", "rated"}
    assert all(v.shape == (64,) and v.dtype == torch.float32 for v in batch.labels.values())
    assert batch.user_features.keys() == dataset.users.feature_names
    assert batch.item_features.keys() == dataset.items.feature_names
    assert batch.item_features.stride() == 64
    # item_id feature = dense id + 1 (0 is OOV)
    assert torch.equal(batch.item_features["item_id"].values(), batch.item_ids + 1)
    assert torch.equal(batch.user_features["user_id"].values(), batch.user_ids + 1)
    moved = batch.to("cpu")
    assert _same(moved, batch)


def test_epoch_covers_everything_once(dataset: RecDataset) -> None:
    n = len(dataset.train)
    loader = InteractionLoader(dataset, 128, seed=0)
    assert len(loader) == -(-n // 128)
    assert len(InteractionLoader(dataset, 128, drop_last=True)) == n // 128
    pairs = torch.cat([b.user_ids * 1000 + b.item_ids for b in loader])
    want = dataset.train.user * 1000 + dataset.train.item
    assert torch.equal(pairs.sort().values, want.sort().values)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0
    first_e1 = next(iter(loader)).user_ids
    first_e0 = next(iter(InteractionLoader(dataset, 128, seed=0))).user_ids
    assert not torch.equal(first_e0, first_e1), "each epoch has its own permutation"
    sizes = [b.size for b in InteractionLoader(dataset, 128, drop_last=True)]
    assert sizes == [128] * (n // 128)


@pytest.mark.parametrize("stop_after", [3, 8])  # mid-epoch, and at the epoch boundary (8 batches)
def test_resume_gives_identical_next_batch(dataset: RecDataset, stop_after: int) -> None:
    loader = InteractionLoader(dataset, 125, seed=7)
    it = iter(loader)
    for _ in range(stop_after):
        next(it)
    state = loader.state_dict()
    assert (state["epoch"], state["position"]) == ((1, 0) if stop_after == 8 else (0, stop_after))
    expected = [next(iter(loader)) for _ in range(3)]
    resumed = InteractionLoader(dataset, 125, seed=7)
    resumed.load_state_dict(state)
    got = [next(iter(resumed)) for _ in range(3)]
    assert all(_same(a, b) for a, b in zip(expected, got))


def test_drop_last_smaller_than_batch(dataset: RecDataset) -> None:
    loader = InteractionLoader(dataset, 5000, drop_last=True)
    assert len(loader) == 0 and list(loader) == []
    assert [b.size for b in InteractionLoader(dataset, 5000)] == [len(dataset.train)]


def test_state_mismatch_is_rejected(dataset: RecDataset) -> None:
    state = InteractionLoader(dataset, 100, seed=1).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        InteractionLoader(dataset, 64, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        InteractionLoader(dataset, 100, seed=2).load_state_dict(state)


def test_all_items_kjt(dataset: RecDataset) -> None:
    chunks = list(all_items_kjt(dataset, chunk_size=128, keys=["item_id", "category"]))
    ids = torch.cat([c[0] for c in chunks])
    assert torch.equal(ids, torch.arange(dataset.num_items))
    assert [c[1].stride() for c in chunks] == [128, 128, 128, 116]
    cat = dataset.items.features["category"]
    got = torch.cat([c[1]["category"].values() for c in chunks])
    assert torch.equal(got, cat.values)
