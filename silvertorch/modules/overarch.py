"""OverArch: multi-task scoring of (query, candidate) pairs inside retrieval.

For every candidate ``k`` of query ``b`` the MLP input is
``[q, e, q * e, <q, e>, emb(feature_1), ..., emb(feature_F)]`` (width ``3 D + 1 + F * E``) where
``q (D,)`` is the user-tower query, ``e (D,)`` the candidate's item vector (in serving: the index's
stored vector, dequantized) and ``emb(f)`` the mean of the candidate's attribute value embeddings of
item feature ``f`` (a plain ``nn.EmbeddingBag``). The MLP ends in one logit per task.

Attribute ids: value id ``0`` is the out-of-vocabulary row (the data layer maps unknown values to it),
ids lie in ``[0, cardinality)``; the id ``cardinality`` is the padding id, excluded from the mean
(a bag of only padding, or an empty bag, embeds to zeros).

Config (TOML)::

    [model.overarch]
    tasks = ["liked", "rated"]
    hidden_dims = [128, 64]
    item_features = ["genre", "decade"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from silvertorch.config import check
from silvertorch.modules.mlp import MLP

__all__ = ["OverArchConfig", "OverArch", "JaggedIds", "pair_features"]

JaggedIds = tuple[Tensor, Tensor]  # (offsets (B*K+1,) int64, values (nnz,) int64)


@dataclass(kw_only=True)
class OverArchConfig:
    """Tasks predicted per candidate, the MLP widths and the item attribute features embedded."""

    tasks: list[str] = field(default_factory=lambda: ["liked", "rated"])
    hidden_dims: list[int] = field(default_factory=lambda: [128, 64])
    item_features: list[str] = field(default_factory=list)
    feature_embedding_dim: int = 16
    dropout: float = 0.0

    def validate(self) -> None:
        check(len(self.tasks) > 0, "tasks", "at least one task name")
        check(len(set(self.tasks)) == len(self.tasks), "tasks", f"distinct names, got {self.tasks}")
        for i, d in enumerate(self.hidden_dims):
            check(d > 0, f"hidden_dims[{i}]", f"a positive width, got {d}")
        check(
            len(set(self.item_features)) == len(self.item_features),
            "item_features", f"distinct names, got {self.item_features}",
        )
        check(
            self.feature_embedding_dim > 0,
            "feature_embedding_dim", f"> 0, got {self.feature_embedding_dim}",
        )
        check(0.0 <= self.dropout < 1.0, "dropout", f"in [0, 1), got {self.dropout}")


def pair_features(query: Tensor, items: Tensor, query_dim: int) -> list[Tensor]:
    """The (query, candidate) part of the OverArch input, checked: ``[q, e, q * e, <q, e>]``, each
    ``(B, K, .)``, from ``query (B, D)`` and ``items (B, K, D)`` (``D = query_dim``)."""
    if query.dim() != 2 or items.dim() != 3 or items.shape[0] != query.shape[0]:
        raise ValueError(
            f"OverArch expects query (B, D) and items (B, K, D), got "
            f"{tuple(query.shape)} and {tuple(items.shape)}"
        )
    if query.shape[1] != query_dim or items.shape[2] != query_dim:
        raise ValueError(f"OverArch was built for D={query_dim}, got {tuple(items.shape)}")
    B, K, D = items.shape
    q = query.unsqueeze(1).expand(B, K, D)
    return [q, items, q * items, (q * items).sum(-1, keepdim=True)]


class OverArch(nn.Module):
    """``(query, candidates, candidate attributes) -> (B, K, T)`` task logits.

    Args:
        config: tasks, widths, embedded item features.
        query_dim: ``D``, the width of the query and item vectors.
        item_cardinalities: vocabulary size per item feature (at least those in
            ``config.item_features``); each table gets one extra row, the padding id.
    """

    def __init__(
        self, config: OverArchConfig, query_dim: int, item_cardinalities: Mapping[str, int]
    ) -> None:
        super().__init__()
        config.validate()
        if query_dim <= 0:
            raise ValueError(f"query_dim must be > 0, got {query_dim}")
        missing = [f for f in config.item_features if f not in item_cardinalities]
        if missing:
            raise ValueError(
                f"OverArch item_features {missing} have no cardinality "
                f"(known: {sorted(item_cardinalities)})"
            )
        self.config = config
        self.query_dim = query_dim
        self.tasks = list(config.tasks)
        self.feature_names = list(config.item_features)
        self.cardinalities = {f: int(item_cardinalities[f]) for f in self.feature_names}
        self.embeddings = nn.ModuleDict(
            {
                f: nn.EmbeddingBag(
                    card + 1,
                    config.feature_embedding_dim,
                    mode="mean",
                    padding_idx=card,
                    include_last_offset=True,
                )
                for f, card in self.cardinalities.items()
            }
        )
        for bag in self.embeddings.values():
            nn.init.uniform_(bag.weight, -0.05, 0.05)
            with torch.no_grad():
                bag.weight[bag.padding_idx].zero_()
        in_dim = 3 * query_dim + 1 + len(self.feature_names) * config.feature_embedding_dim
        self.mlp = MLP(in_dim, [*config.hidden_dims, len(self.tasks)], dropout=config.dropout)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def padding_id(self, feature: str) -> int:
        """The value id excluded from the mean of ``feature`` (its cardinality)."""
        return self.cardinalities[feature]

    def forward(
        self, query: Tensor, items: Tensor, item_features: Mapping[str, JaggedIds]
    ) -> Tensor:
        """Task logits.

        Args:
            query: ``(B, D) float32``.
            items: ``(B, K, D) float32`` candidate vectors.
            item_features: per name in ``config.item_features``, ``(offsets (B*K+1,) int64,
                values (nnz,) int64)``: the attribute ids of the ``B*K`` candidates, row-major.
        Returns:
            ``(B, K, T) float32`` logits, ``T = len(config.tasks)``.
        """
        parts = pair_features(query, items, self.query_dim)
        B, K, _ = items.shape
        for name in self.feature_names:
            if name not in item_features:
                raise KeyError(f"OverArch needs item feature '{name}' (has {sorted(item_features)})")
            offsets, values = item_features[name]
            pooled = self.embeddings[name](values, offsets)  # (B*K, E)
            parts.append(pooled.reshape(B, K, -1))
        return self.mlp(torch.cat(parts, dim=-1))
