"""User and item towers: TorchRec ``EmbeddingBagCollection`` -> concat -> MLP -> L2 normalize.

Each tower consumes a set of categorical features (a ``KeyedJaggedTensor`` with one key per
feature, value ids in ``[0, cardinality)``, id 0 = out-of-vocabulary). Every feature is looked up in
exactly one embedding table declared in the config; several features may share a table. A table's
row count is given in the config or derived from the vocabulary sizes of its features.

Config (TOML)::

    [model.user_tower]
    features = ["user_id", "age_bucket", "gender", "occupation", "zip_prefix"]
    mlp_dims = [128, 64]
    [[model.user_tower.tables]]
    name = "user_id"
    features = ["user_id"]
    embedding_dim = 64
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from silvertorch.config import ConfigError, check
from silvertorch.modules.mlp import MLP, Activation

__all__ = ["TableConfig", "TowerConfig", "Tower", "UserTower", "ItemTower"]


@dataclass(kw_only=True)
class TableConfig:
    """One embedding table. ``num_embeddings`` None = the largest vocabulary of its features."""

    name: str
    features: list[str]
    embedding_dim: int
    num_embeddings: int | None = None
    pooling: Literal["mean", "sum"] = "mean"
    init_scale: float = 0.05  # weights ~ U(-init_scale, init_scale)

    def validate(self) -> None:
        check(bool(self.name), "name", "a non-empty table name")
        check(len(self.features) > 0, "features", "at least one feature per table")
        check(self.embedding_dim > 0, "embedding_dim", f"> 0, got {self.embedding_dim}")
        check(
            self.num_embeddings is None or self.num_embeddings > 0,
            "num_embeddings",
            f"> 0 (or omitted to derive it from the vocabulary), got {self.num_embeddings}",
        )
        check(self.init_scale > 0, "init_scale", f"> 0, got {self.init_scale}")


@dataclass(kw_only=True)
class TowerConfig:
    """Features consumed by a tower, the tables holding them, and the MLP on top."""

    features: list[str]
    tables: list[TableConfig]
    mlp_dims: list[int] = field(default_factory=lambda: [128, 64])
    activation: Activation = "relu"
    dropout: float = 0.0
    normalize: bool = True

    def validate(self) -> None:
        check(len(self.features) > 0, "features", "at least one feature")
        check(len(set(self.features)) == len(self.features), "features", "distinct names")
        for i, d in enumerate(self.mlp_dims):
            check(d > 0, f"mlp_dims[{i}]", f"a positive width, got {d}")
        check(0.0 <= self.dropout < 1.0, "dropout", f"in [0, 1), got {self.dropout}")
        names: set[str] = set()
        owner: dict[str, str] = {}
        for t, table in enumerate(self.tables):
            check(table.name not in names, f"tables[{t}].name", f"unique, '{table.name}' repeats")
            names.add(table.name)
            for j, feat in enumerate(table.features):
                check(
                    feat in self.features,
                    f"tables[{t}].features[{j}]",
                    f"a feature listed in 'features' {self.features}, got '{feat}'",
                )
                check(
                    feat not in owner,
                    f"tables[{t}].features[{j}]",
                    f"each feature in one table; '{feat}' is already in table '{owner.get(feat)}'",
                )
                owner[feat] = table.name
        for i, feat in enumerate(self.features):
            check(
                feat in owner,
                f"features[{i}]",
                f"an embedding table for feature '{feat}': add a [[tables]] entry listing it",
            )

    @property
    def output_dim(self) -> int:
        if self.mlp_dims:
            return self.mlp_dims[-1]
        return sum(t.embedding_dim * len(t.features) for t in self.tables)


def _table_rows(table: TableConfig, cardinalities: Mapping[str, int], where: str) -> int:
    missing = [f for f in table.features if f not in cardinalities]
    if missing:
        raise ConfigError(
            f"{where}.features",
            f"feature(s) {missing} of table '{table.name}' are not in the data "
            f"(known: {sorted(cardinalities)})",
        )
    needed = max(cardinalities[f] for f in table.features)
    if table.num_embeddings is None:
        return needed
    if table.num_embeddings < needed:
        raise ConfigError(
            f"{where}.num_embeddings",
            f"table '{table.name}' has {table.num_embeddings} rows but its features need {needed}",
        )
    return table.num_embeddings


class Tower(nn.Module):
    """Categorical features -> one (optionally L2-normalized) vector per row.

    Args:
        config: the tower's tables, features and MLP.
        cardinalities: vocabulary size per feature name (value ids lie in ``[0, cardinality)``);
            used for tables whose ``num_embeddings`` is not given.
        device: where to allocate parameters; ``torch.device("meta")`` allocates nothing (for the
            planner), the result is then moved with ``to_empty`` + ``reset_parameters``.
        name: for error messages ("user_tower").
        config_key: dotted config key of this tower, for :class:`ConfigError` (defaults to name).
    """

    def __init__(
        self,
        config: TowerConfig,
        cardinalities: Mapping[str, int],
        *,
        device: torch.device | str | None = None,
        name: str = "tower",
        config_key: str | None = None,
    ) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.name = name
        device = torch.device(device) if device is not None else None
        tables = []
        for t, table in enumerate(config.tables):
            rows = _table_rows(table, cardinalities, f"{config_key or name}.tables[{t}]")
            tables.append(
                EmbeddingBagConfig(
                    name=table.name,
                    feature_names=list(table.features),
                    embedding_dim=table.embedding_dim,
                    num_embeddings=rows,
                    pooling=PoolingType.MEAN if table.pooling == "mean" else PoolingType.SUM,
                    weight_init_min=-table.init_scale,
                    weight_init_max=table.init_scale,
                )
            )
        self.ebc = EmbeddingBagCollection(tables=tables, device=device)
        self.feature_names: list[str] = [f for t in tables for f in t.feature_names]
        pooled_dim = sum(t.embedding_dim * len(t.feature_names) for t in tables)
        self.mlp: nn.Module
        if config.mlp_dims:
            self.mlp = MLP(
                pooled_dim,
                list(config.mlp_dims),
                activation=config.activation,
                dropout=config.dropout,
                device=device,
            )
        else:
            self.mlp = nn.Identity()
        self.output_dim = config.output_dim

    @property
    def num_embeddings(self) -> dict[str, int]:
        """Rows per table name."""
        return {t.name: t.num_embeddings for t in self.ebc.embedding_bag_configs()}

    def reset_parameters(self) -> None:
        """Re-initialize every weight (after ``to_empty`` from ``meta``).

        TorchRec's ``EmbeddingBagCollection.reset_parameters`` is a no-op for a collection
        constructed on ``meta`` (it checks the construction device, which ``to_empty`` does not
        change), so each table's ``init_fn`` is applied here directly.
        """
        for table in self.ebc.embedding_bag_configs():
            weight = self.ebc.embedding_bags[table.name].weight
            if weight.device.type == "meta":
                continue
            assert table.init_fn is not None  # TorchRec's config sets a default init_fn
            with torch.no_grad():
                table.init_fn(weight)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward(self, features: KeyedJaggedTensor) -> Tensor:
        """``features``: KJT with (at least) this tower's keys, batch size ``B``.

        Returns ``(B, D)`` float32, unit L2 norm per row when ``config.normalize``.
        """
        keys = features.keys()
        missing = [f for f in self.feature_names if f not in keys]
        if missing:
            raise KeyError(
                f"{self.name}: input KeyedJaggedTensor lacks features {missing} (has {keys})"
            )
        pooled = self.ebc(features).values()  # (B, sum of dims), in table order
        out = self.mlp(pooled)
        if self.config.normalize:
            out = F.normalize(out, p=2.0, dim=-1, eps=1e-6)
        return out


class UserTower(Tower):
    """The query side: user features -> ``(B, D)`` query vector."""

    def __init__(
        self,
        config: TowerConfig,
        cardinalities: Mapping[str, int],
        *,
        device: torch.device | str | None = None,
        config_key: str | None = None,
    ) -> None:
        super().__init__(
            config, cardinalities, device=device, name="user_tower", config_key=config_key
        )


class ItemTower(Tower):
    """The candidate side: item features -> ``(N, D)`` item vector (what the index stores)."""

    def __init__(
        self,
        config: TowerConfig,
        cardinalities: Mapping[str, int],
        *,
        device: torch.device | str | None = None,
        config_key: str | None = None,
    ) -> None:
        super().__init__(
            config, cardinalities, device=device, name="item_tower", config_key=config_key
        )
