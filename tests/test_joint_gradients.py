"""Joint step on a tiny synthetic catalog: gradients reach both towers through the index path.

An item the index retrieved for a user but that is no batch positive gets no gradient from the
in-batch sampled softmax; any gradient on its embedding row must come through the index path - the
OverArch scoring the retrieved candidates (heads) or the recomputed scan scores (hard negatives).
"""

from __future__ import annotations

import pytest
import torch

from silvertorch.data.batching import Batch, FeatureTable, features_to_kjt
from silvertorch.data.dataset import Interactions
from silvertorch.index import ItemIndex
from silvertorch.index.quantize import decode, quantize_rows_int8
from silvertorch.model import RetrievalModel, TwoTower, TwoTowerConfig
from tests.test_retrieval_model import GENRES, USER_CARD, make_items, retrieval_config, tower_cfg, user_kjt
from train.joint_step import JointInputs, _item_vectors, joint_loss
from train.mining import InteractionLabels, mine_candidates

ITEM_KEYS = ["item_id", "genre"]


def setup(seed: int = 0):
    torch.manual_seed(seed)
    items = make_items()
    card = {"item_id": items.num_items, "genre": len(GENRES)}
    two = TwoTower(TwoTowerConfig(user_tower=tower_cfg(USER_CARD), item_tower=tower_cfg(card)),
                   USER_CARD, card, num_items=items.num_items)  # fmt: skip
    table = FeatureTable(items.features, ITEM_KEYS)
    with torch.no_grad():
        vectors = two.item_embeddings(table.kjt(torch.arange(items.num_items)))
    index = ItemIndex.build(vectors, nlist=6, dtype="int8", seed=seed)
    scorer = RetrievalModel.build(retrieval_config(), two.user_tower, index, items)
    users = torch.tensor([0, 1, 2, 3, 4, 5])
    pos = torch.tensor([10, 20, 30, 40, 50, 60])
    batch = Batch(users, pos, user_kjt(users.tolist()), features_to_kjt(items.features, pos, ITEM_KEYS),
                  {"liked": torch.tensor([1.0, 0, 1, 0, 1, 0]), "rated": torch.ones(6)})  # fmt: skip
    # train history: each user rated a few items, some of which the index will retrieve
    g = torch.Generator().manual_seed(1)
    hist_u = torch.arange(6).repeat_interleave(40)
    hist_i = torch.randint(items.num_items, (240,), generator=g)
    inter = Interactions(hist_u, hist_i, torch.randint(1, 6, (240,), generator=g).float(),
                         torch.arange(240))  # fmt: skip
    labels = InteractionLabels(inter, items.num_items)
    return two, scorer, table, labels, batch


def grads(head: float, hard: float, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    two, scorer, table, labels, batch = setup(seed)
    mined: list[torch.Tensor] = []

    def mine(q: torch.Tensor) -> torch.Tensor:
        mined.append(mine_candidates(scorer.index, q, 12, 3))
        return mined[-1]

    out = joint_loss(two, scorer, table, labels, batch, JointInputs(mine=mine, head_rows=4),
                     head_loss_weight=head, hard_negative_weight=hard)  # fmt: skip
    two.zero_grad(set_to_none=False)
    out.loss.backward()
    named = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for n, p in two.named_parameters()}  # fmt: skip
    named.update({f"overarch.{n}": p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                  for n, p in scorer.overarch.named_parameters()})  # fmt: skip
    retrieved_only = torch.tensor(sorted(set(mined[0][mined[0] >= 0].tolist()) - set(batch.item_ids.tolist())))
    return named, retrieved_only


ITEM_ROWS = "item_tower.ebc.embedding_bags.item_id.weight"
USER_MLP = "user_tower.mlp.layers.0.weight"


def test_gradients_reach_the_item_tower_only_through_the_index_path() -> None:
    base, only = grads(head=0.0, hard=0.0)
    assert only.numel() > 5
    assert bool((base[ITEM_ROWS][only] == 0).all())  # sampled softmax alone: retrieved rows untouched
    via_heads, _ = grads(head=1.0, hard=0.0)
    assert bool(via_heads[ITEM_ROWS][only].abs().sum(1).gt(0).all())
    via_scan, _ = grads(head=0.0, hard=1.0)
    assert bool(via_scan[ITEM_ROWS][only].abs().sum(1).gt(0).any())
    for g in (via_heads, via_scan):
        assert all(bool(torch.isfinite(t).all()) for t in g.values())


def test_head_and_scan_gradients_reach_the_user_tower_and_the_overarch() -> None:
    base, _ = grads(head=0.0, hard=0.0)
    via_heads, _ = grads(head=1.0, hard=0.0)
    via_scan, _ = grads(head=0.0, hard=1.0)
    user_keys = [k for k in base if k.startswith("user_tower.")]
    assert user_keys
    assert not torch.allclose(via_heads[USER_MLP], base[USER_MLP])
    assert not torch.allclose(via_scan[USER_MLP], base[USER_MLP])
    oa = [k for k in via_heads if k.startswith("overarch.mlp")]
    assert oa and all(bool(via_heads[k].abs().sum() > 0) for k in oa)


def test_item_vectors_are_fake_quantized_like_the_int8_index() -> None:
    two, _, table, _, _ = setup()
    ids = torch.tensor([3, 3, 7, 1])
    vec = _item_vectors(two, table, ids, quantize=True)
    raw = two.item_embeddings(table.kjt(ids))
    torch.testing.assert_close(vec, decode(*quantize_rows_int8(raw.detach())))
    vec.sum().backward()  # straight-through: the identity gradient reaches the tower
    assert two.item_tower.ebc.embedding_bags["item_id"].weight.grad[[1, 3, 7]].abs().sum() > 0


def test_labels_come_from_train_ratings() -> None:
    inter = Interactions(torch.tensor([0, 0, 1]), torch.tensor([5, 6, 5]), torch.tensor([4.0, 2.0, 5.0]),
                         torch.zeros(3, dtype=torch.int64))  # fmt: skip
    lab = InteractionLabels(inter, 10).labels(torch.tensor([0, 1]), torch.tensor([[5, 6, 7, -1], [5, 6, 0, 9]]),
                                              ["liked", "rated"])  # fmt: skip
    assert lab[..., 0].tolist() == [[1, 0, 0, 0], [1, 0, 0, 0]]
    assert lab[..., 1].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match="no labels for task 'clicked'"):
        InteractionLabels(inter, 10).labels(torch.tensor([0]), torch.tensor([[5]]), ["clicked"])
