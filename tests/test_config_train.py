"""Config validation: every bad input fails before any work and names its dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from silvertorch.config import ConfigError, to_dict
from train.builders import check_features
from train.config import TrainConfig, config_hash, load_train_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "movielens_100k.toml"


def error_key(overrides: list[str], path: Path | None = SHIPPED) -> str:
    with pytest.raises(ConfigError) as err:
        load_train_config(path, overrides)
    assert err.value.key in str(err.value)
    return err.value.key


def test_shipped_config_loads() -> None:
    cfg = load_train_config(SHIPPED)
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.user_tower.output_dim == cfg.model.item_tower.output_dim == 64
    assert cfg.train.batch_size > 1


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.user_tower.colour=1", "model.user_tower.colour"),  # unknown key
        ("nonsense.x=1", "nonsense"),  # unknown section
        ("train.batch_size=big", "train.batch_size"),  # wrong type
        ("train.epochs=2.5", "train.epochs"),
        ("optim.name=sgd", "optim.name"),  # not one of the choices
        ("optim.lr=-0.1", "optim.lr"),  # impossible value
        ("train.batch_size=1", "train.batch_size"),
        ("model.temperature=5.0", "model.temperature"),
        ("model.user_tower.mlp_dims=[64,-1]", "model.user_tower.mlp_dims[1]"),
        ("model.item_tower.mlp_dims=[128,32]", "model.item_tower.mlp_dims"),
        ("model.loss.num_uniform_negatives=-3", "model.loss.num_uniform_negatives"),
        ("data.test_fraction=1.5", "data.test_fraction"),
        ("eval.recall_ks=[10,0]", "eval.recall_ks[1]"),
        (
            'model.user_tower.features=["user_id","gender","age_bucket","occupation","zip_prefix","shoe_size"]',
            "model.user_tower.features[5]",
        ),
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    assert error_key([override]) == key


def test_negative_embedding_dim_in_a_table(tmp_path: Path) -> None:
    text = SHIPPED.read_text().replace("embedding_dim = 16", "embedding_dim = -16")
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    assert error_key([], bad) == "model.item_tower.tables[1].embedding_dim"


def test_table_listing_an_undeclared_feature(tmp_path: Path) -> None:
    text = SHIPPED.read_text().replace('features = ["decade"]', 'features = ["century"]')
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    assert error_key([], bad) == "model.item_tower.tables[3].features[0]"


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nepochs = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_train_config(broken)
    with pytest.raises(ConfigError) as err:
        load_train_config(None)  # model is required
    assert err.value.key == "model"


def test_feature_absent_from_the_data_is_named() -> None:
    from types import SimpleNamespace

    cfg = load_train_config(SHIPPED)
    ds = SimpleNamespace(
        name="fake",
        users=SimpleNamespace(cardinalities=lambda: {f: 3 for f in cfg.model.user_tower.features}),
        items=SimpleNamespace(cardinalities=lambda: {"item_id": 3, "year": 2, "decade": 2}),
    )
    with pytest.raises(ConfigError, match="genre") as err:
        check_features(cfg, ds)  # type: ignore[arg-type]
    assert err.value.key == "model.item_tower.features[1]"


def test_config_hash_ignores_only_resumable_keys() -> None:
    base = load_train_config(SHIPPED)
    assert config_hash(base) == config_hash(load_train_config(SHIPPED, ["train.epochs=99", "train.out_dir=x", "eval.user_chunk=7"]))
    assert config_hash(base) != config_hash(load_train_config(SHIPPED, ["train.seed=1"]))
    assert to_dict(base)["train"]["epochs"] == base.train.epochs
