"""Checkpoints: exact resume, atomic writes, refusal of corrupt or mismatched files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from silvertorch.config import from_dict
from silvertorch.data.dataset import EntityTable, Interactions, RecDataset, multi_attribute
from silvertorch.index.attributes import Attribute, ItemAttributes
from train.checkpoint import CheckpointError, read_checkpoint
from train.config import TrainConfig
from train.loop import Trainer

NUM_USERS, NUM_ITEMS = 30, 40


def tiny_dataset(seed: int = 0) -> RecDataset:
    """30 users, 40 items, 600 train + 60 test events; users have gender, items genres."""
    g = torch.Generator().manual_seed(seed)
    users = EntityTable(
        [str(u) for u in range(NUM_USERS)],
        ItemAttributes(
            NUM_USERS,
            {
                "user_id": Attribute.from_single("user_id", torch.arange(NUM_USERS) + 1, NUM_USERS + 1),
                "gender": Attribute.from_single("gender", torch.randint(1, 3, (NUM_USERS,), generator=g), 3),
            },
        ),
    )
    genres = [[f"g{(i + j) % 5}" for j in range(i % 3)] for i in range(NUM_ITEMS)]
    items = EntityTable(
        [str(i) for i in range(NUM_ITEMS)],
        ItemAttributes(
            NUM_ITEMS,
            {
                "item_id": Attribute.from_single("item_id", torch.arange(NUM_ITEMS) + 1, NUM_ITEMS + 1),
                "genre": multi_attribute("genre", genres),
            },
        ),
        [f"Movie {i}" for i in range(NUM_ITEMS)],
    )

    def events(n: int) -> Interactions:
        return Interactions(
            torch.randint(NUM_USERS, (n,), generator=g),
            torch.randint(NUM_ITEMS, (n,), generator=g),
            torch.randint(1, 6, (n,), generator=g).to(torch.float32),
            torch.arange(n, dtype=torch.int64),
        )

    return RecDataset("tiny", users, items, events(600), events(60))


def tiny_config(out_dir: Path, **train: object) -> TrainConfig:
    def tower(prefix: str, second: str) -> dict:
        return {
            "features": [f"{prefix}_id", second],
            "tables": [
                {"name": f"{prefix}_id", "features": [f"{prefix}_id"], "embedding_dim": 8},
                {"name": second, "features": [second], "embedding_dim": 4},
            ],
            "mlp_dims": [16, 8],
            "dropout": 0.1,
        }

    raw = {
        "model": {
            "user_tower": tower("user", "gender"),
            "item_tower": tower("item", "genre"),
            "learn_temperature": True,
            "loss": {"num_uniform_negatives": 8},
        },
        "optim": {"lr": 0.01},
        "train": {"epochs": 3, "batch_size": 64, "seed": 3, "out_dir": str(out_dir),
                  "progress": False, **train},  # fmt: skip
    }
    return from_dict(TrainConfig, raw)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_is_exact(tmp_path: Path) -> None:
    data = tiny_dataset()
    straight = Trainer(tiny_config(tmp_path / "a", max_steps=13), data)
    straight.fit()
    # 9 batches per epoch: stop mid-epoch 0, resume, cross the epoch boundary
    first = Trainer(tiny_config(tmp_path / "b", max_steps=5), data)
    res = first.fit()
    assert res.step == 5 and res.checkpoint is not None and res.checkpoint.is_file()
    del first
    second = Trainer(tiny_config(tmp_path / "b", max_steps=13), data)
    state = second.resume()
    assert state.step == 5 and second.loader.position == 5
    second.fit()
    assert second.step == straight.step == 13
    a, b = params(straight.model), params(second.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"])


def test_same_seed_same_parameters_and_loss_falls(tmp_path: Path) -> None:
    data = tiny_dataset()
    r1 = Trainer(tiny_config(tmp_path / "a"), data).fit()
    r2 = Trainer(tiny_config(tmp_path / "b"), data).fit()
    for k, v in params(r1.model).items():
        assert torch.equal(v, params(r2.model)[k]), k
    assert len(r1.epoch_losses) == 3 and r1.epoch_losses[-1] < r1.epoch_losses[0]


def test_checkpoint_is_atomic_and_verified(tmp_path: Path) -> None:
    data = tiny_dataset()
    trainer = Trainer(tiny_config(tmp_path, max_steps=2), data)
    path = trainer.fit().checkpoint
    assert path is not None
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    payload = read_checkpoint(path)
    assert payload["step"] == 2 and payload["loader"]["position"] == 2
    raw = bytearray(path.read_bytes())
    # flip one byte in the payload
    raw[len(raw) // 2] ^= 0xFF
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(tiny_config(tmp_path), data).resume(bad)
    trunc = tmp_path / "truncated.pt"
    trunc.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(trunc)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a SilverTorch checkpoint"):
        read_checkpoint(junk)
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")


def test_mismatched_config_or_shapes_refuse_to_load(tmp_path: Path) -> None:
    data = tiny_dataset()
    path = Trainer(tiny_config(tmp_path, max_steps=2), data).fit().checkpoint
    other = tiny_config(tmp_path)
    other.optim.lr = 0.5
    fresh = Trainer(other, data)
    before = params(fresh.model)
    with pytest.raises(CheckpointError, match=r"optim\.lr: checkpoint=0\.01 now=0\.5"):
        fresh.resume(path)
    for k, v in params(fresh.model).items():  # nothing was loaded
        assert torch.equal(v, before[k])
    # same config hash but a model with other shapes (simulate by loading into a bigger model)
    bigger = tiny_config(tmp_path)
    bigger.model.user_tower.tables[0].embedding_dim = 16
    trainer = Trainer(bigger, data)
    trainer._config_hash = Trainer(tiny_config(tmp_path), data)._config_hash  # force hash match
    trainer._config_flat = Trainer(tiny_config(tmp_path), data)._config_flat
    with pytest.raises(CheckpointError, match=r"user_tower\.ebc\.embedding_bags\.user_id\.weight.*\(31, 8\)"):
        trainer.resume(path)


def test_resume_with_more_epochs_is_allowed(tmp_path: Path) -> None:
    data = tiny_dataset()
    Trainer(tiny_config(tmp_path, epochs=1), data).fit()
    more = Trainer(tiny_config(tmp_path, epochs=2), data)
    state = more.resume()
    assert state.epoch == 1
    result = more.fit()
    assert result.epoch == 2 and result.step == 18 and len(result.epoch_losses) == 1
