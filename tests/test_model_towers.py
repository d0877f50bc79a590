"""Towers: shapes, normalization, table sizing, meta construction, config errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torchrec import KeyedJaggedTensor

from silvertorch.config import ConfigError, from_dict
from silvertorch.model import TwoTower, TwoTowerConfig
from silvertorch.modules.mlp import MLP
from silvertorch.modules.temperature import Temperature
from silvertorch.modules.towers import ItemTower, TowerConfig, UserTower

USER_CARD = {"user_id": 11, "gender": 3}
ITEM_CARD = {"item_id": 21, "genre": 6}


def user_cfg(**kw) -> TowerConfig:
    raw = {
        "features": ["user_id", "gender"],
        "tables": [
            {"name": "user_id", "features": ["user_id"], "embedding_dim": 8},
            {"name": "gender", "features": ["gender"], "embedding_dim": 4},
        ],
        "mlp_dims": [16, 8],
    }
    raw.update(kw)
    return from_dict(TowerConfig, raw)


def item_cfg() -> TowerConfig:
    return from_dict(
        TowerConfig,
        {
            "features": ["item_id", "genre"],
            "tables": [
                {"name": "item_id", "features": ["item_id"], "embedding_dim": 8},
                {"name": "genre", "features": ["genre"], "embedding_dim": 4},
            ],
            "mlp_dims": [16, 8],
        },
    )


def user_kjt(users: list[int], genders: list[int]) -> KeyedJaggedTensor:
    b = len(users)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "gender"],
        values=torch.tensor(users + genders),
        lengths=torch.ones(2 * b, dtype=torch.int64),
    )


def item_kjt(items: list[int], genres: list[list[int]]) -> KeyedJaggedTensor:
    lengths = [1] * len(items) + [len(g) for g in genres]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["item_id", "genre"],
        values=torch.tensor(items + [v for g in genres for v in g], dtype=torch.int64),
        lengths=torch.tensor(lengths),
    )


def test_user_tower_shape_and_unit_norm() -> None:
    torch.manual_seed(0)
    tower = UserTower(user_cfg(), USER_CARD)
    out = tower(user_kjt([1, 2, 3, 10], [0, 1, 2, 1]))
    assert out.shape == (4, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))
    assert tower.num_embeddings == {"user_id": 11, "gender": 3}


def test_item_tower_multivalued_and_empty_bags() -> None:
    torch.manual_seed(0)
    tower = ItemTower(item_cfg(), ITEM_CARD)
    out = tower(item_kjt([1, 2, 3], [[1, 2, 3], [], [5]]))
    assert out.shape == (3, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_unnormalized_tower_without_mlp_is_concat_of_pooled() -> None:
    cfg = user_cfg(mlp_dims=[], normalize=False)
    tower = UserTower(cfg, USER_CARD)
    out = tower(user_kjt([4], [2]))
    w_u = tower.ebc.embedding_bags["user_id"].weight
    w_g = tower.ebc.embedding_bags["gender"].weight
    torch.testing.assert_close(out, torch.cat([w_u[4], w_g[2]]).unsqueeze(0))
    assert cfg.output_dim == 12


def test_explicit_table_rows_and_too_few_rows() -> None:
    cfg = user_cfg()
    cfg.tables[0].num_embeddings = 50
    assert UserTower(cfg, USER_CARD).num_embeddings["user_id"] == 50
    cfg.tables[0].num_embeddings = 5
    with pytest.raises(ConfigError) as err:
        UserTower(cfg, USER_CARD, config_key="model.user_tower")
    assert err.value.key == "model.user_tower.tables[0].num_embeddings"


def test_feature_not_in_data_names_the_table() -> None:
    with pytest.raises(ConfigError, match="gender") as err:
        UserTower(user_cfg(), {"user_id": 11})
    assert err.value.key.endswith("tables[1].features")


def test_feature_without_table_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="occupation") as err:
        user_cfg(features=["user_id", "gender", "occupation"])
    assert err.value.key == "features[2]"


def test_table_feature_not_declared_and_bad_dims() -> None:
    with pytest.raises(ConfigError) as err:
        user_cfg(features=["user_id"])
    assert err.value.key == "tables[1].features[0]"
    with pytest.raises(ConfigError) as err:
        user_cfg(mlp_dims=[16, -8])
    assert err.value.key == "mlp_dims[1]"


def test_missing_input_feature_is_named() -> None:
    tower = UserTower(user_cfg(), USER_CARD)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id"], values=torch.tensor([1]), lengths=torch.tensor([1])
    )
    with pytest.raises(KeyError, match="gender"):
        tower(kjt)


def test_meta_device_construction_then_materialize() -> None:
    tower = UserTower(user_cfg(), USER_CARD, device="meta")
    assert all(p.device.type == "meta" for p in tower.parameters())
    tower.to_empty(device="cpu")
    with torch.no_grad():  # to_empty leaves garbage: make it NaN so a skipped init cannot pass
        for p in tower.parameters():
            p.fill_(float("nan"))
    tower.reset_parameters()
    out = tower(user_kjt([1], [1]))
    assert torch.isfinite(out).all()
    model = TwoTower(
        TwoTowerConfig(user_tower=user_cfg(), item_tower=item_cfg()),
        USER_CARD,
        ITEM_CARD,
        num_items=21,
        device="meta",
    )
    assert model.item_probs.device.type == "meta"


def test_mlp_and_temperature() -> None:
    mlp = MLP(4, [8, 3], dropout=0.1)
    assert mlp(torch.randn(5, 4)).shape == (5, 3)
    with pytest.raises(ValueError):
        MLP(4, [0])
    fixed = Temperature(0.1)
    assert not list(fixed.parameters()) and abs(float(fixed()) - 0.1) < 1e-6
    learned = Temperature(0.1, learnable=True, min_value=0.05, max_value=0.2)
    with torch.no_grad():
        learned.log_tau.fill_(-100.0)
    assert abs(float(learned()) - 0.05) < 1e-6  # clamped
    with pytest.raises(ValueError):
        Temperature(2.0, max_value=1.0)


def test_two_tower_forward_backward() -> None:
    torch.manual_seed(0)
    cfg = TwoTowerConfig(user_tower=user_cfg(), item_tower=item_cfg(), learn_temperature=True)
    model = TwoTower(cfg, USER_CARD, ITEM_CARD, num_items=21)
    model.set_item_frequencies(torch.arange(21, dtype=torch.float32))
    batch = SimpleNamespace(
        item_ids=torch.tensor([1, 2, 3, 3]),
        user_features=user_kjt([1, 2, 3, 4], [1, 2, 1, 2]),
        item_features=item_kjt([1, 2, 3, 3], [[1], [2, 3], [], []]),
    )
    neg_ids = torch.tensor([5, 3])
    out = model(batch, negatives=(neg_ids, item_kjt([5, 3], [[1], [4]])))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.temperature.log_tau.grad is not None
    assert model.user_tower.ebc.embedding_bags["user_id"].weight.grad is not None
    # rows 2 and 3 share item 3; the negative 3 also collides with both
    assert out.stats["accidental_hits"] == pytest.approx((2 + 2) / 4)
    with pytest.raises(ValueError):
        model.set_item_frequencies(torch.ones(3))


def test_two_tower_config_dims_must_match() -> None:
    with pytest.raises(ConfigError) as err:
        TwoTowerConfig(user_tower=user_cfg(mlp_dims=[16, 4]), item_tower=item_cfg()).validate()
    assert err.value.key == "item_tower.mlp_dims"
