"""Training through RetrievalModel.score_candidates: gradients reach the towers and the OverArch."""

from __future__ import annotations

import torch

from silvertorch.data.batching import features_to_kjt
from silvertorch.index.quantize import fake_quantize_int8_ste
from tests.test_retrieval_model import build_model, make_items, user_kjt


def test_gradient_flows_to_user_tower_and_through_fake_quant_to_items() -> None:
    items = make_items()
    model = build_model(items=items).train()
    item_vecs = torch.randn(6, 8, requires_grad=True)  # stand-in for an item tower's output
    ids = torch.tensor([[3, 17, 42], [8, 99, -1]])
    query = model.user_tower(user_kjt([1, 2]))
    cand = fake_quantize_int8_ste(item_vecs).reshape(2, 3, 8)
    logits = model.score_candidates(query, cand, ids)
    assert logits.shape == (2, 3, 2)
    labels = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    loss.backward()
    ebc_grad = model.user_tower.ebc.embedding_bags["user_id"].weight.grad
    assert ebc_grad is not None and bool(ebc_grad[1:3].abs().sum() > 0)
    assert item_vecs.grad is not None and bool(item_vecs.grad[:5].abs().sum() > 0)
    genre_grad = model.overarch.embeddings["genre"].weight.grad
    assert genre_grad is not None and bool(genre_grad.abs().sum() > 0)
    assert bool((genre_grad[model.overarch.padding_id("genre")] == 0).all())  # padding row frozen
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_score_candidates_matches_the_serving_path() -> None:
    """Scoring the stored vectors of the served candidates reproduces the served task scores."""
    model = build_model()
    with torch.no_grad():
        kjt = user_kjt([0, 4])
        out = model(kjt, 8)
        logits = model.score_candidates(model.user_tower(kjt), model.candidate_vectors(out.ids), out.ids)
    torch.testing.assert_close(torch.sigmoid(logits), out.task_scores)


def test_item_tower_of_the_two_tower_trains_through_fake_quant() -> None:
    items = make_items()
    model = build_model(items=items)
    from silvertorch.model import TwoTower, TwoTowerConfig
    from tests.test_retrieval_model import tower_cfg

    card = {"item_id": items.num_items, "genre": 6}
    two = TwoTower(TwoTowerConfig(user_tower=tower_cfg({"user_id": 20, "gender": 3}),
                                  item_tower=tower_cfg(card)), {"user_id": 20, "gender": 3}, card, 300)
    ids = torch.tensor([5, 6, 7, 8])
    vec = two.item_embeddings(features_to_kjt(items.features, ids, ["item_id", "genre"]))
    logits = model.score_candidates(torch.randn(1, 8), fake_quantize_int8_ste(vec)[None], ids[None])
    logits.sum().backward()
    grad = two.item_tower.ebc.embedding_bags["item_id"].weight.grad
    assert grad is not None and bool(grad[5:9].abs().sum() > 0)
