"""Joint training smoke test on a MovieLens-100k slice (150 users, 1 warm-up + 2 joint epochs).

Losses fall, and the task heads, evaluated through the RetrievalModel on held-out interactions,
rank better than chance; the shipped recipe's warm-up epochs are the two-tower loop's epochs.
No wall-clock assertion.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from silvertorch.config import ConfigError as ConfigErrorType
from train.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "movielens_100k.toml"


def slice_config(tmp_path: Path, *extra: str):
    return load_train_config(SHIPPED, [
        "data.max_users=150", "train.batch_size=512", "train.progress=false",
        f"train.out_dir={tmp_path}", "joint.head_rows=64", "joint.mine_k=30",
        "joint.index_refresh_every=2", "train.epochs=3", "joint.warmup_epochs=1",
        "joint.head_polish_epochs=2", *extra,
    ])  # fmt: skip


def test_joint_training_on_a_movielens_slice(tmp_path: Path) -> None:
    from silvertorch.data.fetch import DataMissingError
    from train.joint import train_joint
    from train.joint_eval import evaluate_retrieval_model

    cfg = slice_config(tmp_path)
    try:
        result = train_joint(cfg)
    except DataMissingError as err:
        pytest.skip(f"MovieLens-100k not fetched: {err}")
    assert len(result.epoch_losses) == 3 and result.epoch_losses[2] < result.epoch_losses[1]
    assert result.epoch_head_losses[0] == 0.0  # warm-up: the towers alone
    assert result.epoch_head_losses[2] < result.epoch_head_losses[1]
    # at the start, when the warm-up ends (epoch 2, refresh_every = 2 counts from there), at the end
    assert result.index_builds == 3
    # then the heads alone on the final index, towers frozen
    assert len(result.polish_head_losses) == cfg.joint.head_polish_epochs >= 2
    assert result.polish_head_losses[-1] < result.polish_head_losses[0]
    assert not any(p.requires_grad for p in result.model.parameters())
    metrics = evaluate_retrieval_model(result.scorer, result.dataset, cfg.eval, user_chunk=64)
    assert metrics["auc_liked"] > 0.5 and metrics["auc_rated"] > 0.5, metrics
    assert 0.0 < metrics["recall@100"] <= 1.0
    # the checkpoint is a two-tower checkpoint with the trained heads alongside
    from train.checkpoint import read_checkpoint

    payload = read_checkpoint(result.checkpoint)
    assert set(payload["extra"]["heads"]) == {"overarch", "value_model"}
    assert payload["extra"]["recipe"] == "joint"
    torch.testing.assert_close(payload["extra"]["heads"]["overarch"]["mlp.layers.0.weight"],
                               result.scorer.overarch.mlp.layers[0].weight.detach())  # fmt: skip


def test_warmup_epochs_are_the_two_tower_loop(tmp_path: Path) -> None:
    """The joint recipe's warm-up trains exactly what ``train.loop`` trains (the two-stage
    baseline's first stage): same losses, same tower parameters after it."""
    from silvertorch.data.fetch import DataMissingError
    from train.joint import JointTrainer
    from train.loop import train

    small = ("data.max_users=80", "train.epochs=1")
    cfg = slice_config(tmp_path / "joint", *small, "joint.head_polish_epochs=0")
    try:
        towers = train(slice_config(tmp_path / "towers", *small))
    except DataMissingError as err:
        pytest.skip(f"MovieLens-100k not fetched: {err}")
    joint = JointTrainer(cfg, towers.dataset)
    result = joint.fit()
    assert result.epoch_head_losses == [0.0]
    torch.testing.assert_close(result.epoch_losses[0], towers.epoch_losses[0], rtol=1e-5, atol=0)
    for (name, a), b in zip(towers.model.state_dict().items(), joint.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ConfigErrorType) as err:
        JointTrainer(slice_config(tmp_path / "bad", *small, "joint.warmup_epochs=2"), towers.dataset).fit()
    assert err.value.key == "joint.warmup_epochs"


def test_joint_config_sections_are_optional_and_validated(tmp_path: Path) -> None:
    from silvertorch.config import ConfigError

    base = load_train_config(SHIPPED, ["joint.enabled=false"])
    assert base.joint.nlist == 32 and base.retrieval.overarch.item_features == ["genre", "year", "decade"]
    for bad, key in (("joint.nlist=0", "joint.nlist"), ("joint.index_dtype=int4", "joint.index_dtype"),
                     ("joint.head_loss_weight=-1", "joint.head_loss_weight")):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            load_train_config(SHIPPED, [bad])
        assert err.value.key == key
