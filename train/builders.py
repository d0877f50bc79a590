"""Build the pieces of a run from a :class:`~train.config.TrainConfig`: data, model, optimizer."""

from __future__ import annotations

import dataclasses
import random

import torch
from torch import nn

from silvertorch.config import ConfigError
from silvertorch.data.dataset import RecDataset
from silvertorch.model import TwoTower
from silvertorch.modules.towers import TowerConfig
from train.config import DataConfig, OptimConfig, TrainConfig

__all__ = [
    "load_dataset",
    "training_view",
    "check_features",
    "build_model",
    "build_optimizer",
    "seed_everything",
]


def load_dataset(cfg: DataConfig) -> RecDataset:
    """The evaluation dataset: the configured split, restricted to ``max_users`` when set."""
    from silvertorch.data import movielens

    loaders = {
        "movielens_100k": movielens.load_movielens_100k,
        "movielens_small": movielens.load_movielens_small,
    }
    ds = loaders[cfg.dataset](test_fraction=cfg.test_fraction)
    if cfg.max_users is not None:
        ds = dataclasses.replace(
            ds,
            name=f"{ds.name}[users<{cfg.max_users}]",
            train=ds.train.select(ds.train.user < cfg.max_users),
            test=ds.test.select(ds.test.user < cfg.max_users),
        )
    return ds


def training_view(ds: RecDataset, cfg: DataConfig) -> RecDataset:
    """The dataset the loader iterates: train interactions that count as positives.

    ``positives = "rated"`` keeps every train interaction; ``"liked"`` keeps ratings
    ``>= like_threshold``. Evaluation always uses the full train set to mask seen items.
    """
    if cfg.positives == "rated":
        return ds
    train = ds.train.select(ds.train.rating >= cfg.like_threshold)
    return dataclasses.replace(ds, train=train)


def check_features(cfg: TrainConfig, ds: RecDataset) -> None:
    """Every tower feature must exist in the data; raises ``ConfigError`` naming the key."""
    for side, tower, table in (
        ("user_tower", cfg.model.user_tower, ds.users.cardinalities()),
        ("item_tower", cfg.model.item_tower, ds.items.cardinalities()),
    ):
        _check_tower(side, tower, table, ds.name)


def _check_tower(side: str, tower: TowerConfig, known: dict[str, int], name: str) -> None:
    for i, feat in enumerate(tower.features):
        if feat not in known:
            raise ConfigError(
                f"model.{side}.features[{i}]",
                f"feature '{feat}' is not in {name}; available: {sorted(known)}",
            )


def build_model(cfg: TrainConfig, ds: RecDataset, device: torch.device | str = "cpu") -> TwoTower:
    """A fresh :class:`TwoTower` sized from the data, with ``item_probs`` = train popularity of
    the training view (the distribution in-batch negatives are drawn from)."""
    check_features(cfg, ds)
    model = TwoTower(
        cfg.model,
        ds.users.cardinalities(),
        ds.items.cardinalities(),
        ds.num_items,
        device=device,
    )
    counts = training_view(ds, cfg.data).item_popularity()
    model.set_item_frequencies(counts + 1.0)  # +1: items never seen in train stay finite
    return model


def _is_embedding(name: str) -> bool:
    return ".ebc." in f".{name}"


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """One optimizer over all trainable parameters, two groups: embedding tables
    (``embedding_lr``, no weight decay) and the rest (``lr``, ``weight_decay``)."""
    emb = [p for n, p in model.named_parameters() if p.requires_grad and _is_embedding(n)]
    dense = [p for n, p in model.named_parameters() if p.requires_grad and not _is_embedding(n)]
    groups = [
        {"params": emb, "lr": cfg.embedding_lr or cfg.lr, "weight_decay": 0.0},
        {"params": dense, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
    ]
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.Adagrad(groups, lr=cfg.lr)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch and Python; optionally ask torch for deterministic kernels (warn-only for ops
    that have none, so a run never dies on a missing deterministic implementation)."""
    torch.manual_seed(seed)
    random.seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
