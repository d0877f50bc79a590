"""The OverArch with its attribute tables as a TorchRec ``EmbeddingBagCollection`` (shardable by DMP).

:class:`~silvertorch.modules.overarch.OverArch` embeds each item feature with a plain
``nn.EmbeddingBag`` (``card + 1`` rows, MEAN, padding id ``card`` excluded from the mean, a bag of
only padding embeds to zeros). :class:`ShardableOverArch` is its twin for sharded training:

- one EBC with a table per item feature, named :func:`table_name` (``overarch__genre``; unique
  next to the towers' tables), ``card + 1`` rows, ``PoolingType.MEAN``, feature = table name;
- the padding ids are STRIPPED from the jagged ids before the lookup (:func:`strip_padding`), so the
  mean runs over the remaining ids and an emptied bag pools to zeros - the ``padding_idx`` semantics
  (TorchRec has no padding index; the padding row is never looked up and keeps its zeros);
- the SAME ``mlp`` module object as the OverArch it was built from, and the same input layout
  ``[q, e, q * e, <q, e>, emb(f_1) .. emb(f_F)]``.

Weights move between the two layouts with :func:`overarch_state` (twin state -> ``OverArch``
state_dict keys, for checkpoints / export of the unsharded ``RetrievalModel``) and the twin's
constructor (copies the ``nn.EmbeddingBag`` weights in).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from silvertorch.modules.overarch import JaggedIds, OverArch, pair_features

__all__ = ["TABLE_PREFIX", "table_name", "strip_padding", "ShardableOverArch", "overarch_state"]

TABLE_PREFIX = "overarch__"


def table_name(feature: str) -> str:
    """The EBC table (and KJT key) of OverArch item feature ``feature``."""
    return f"{TABLE_PREFIX}{feature}"


def strip_padding(
    item_features: Mapping[str, JaggedIds], cardinalities: Mapping[str, int], num_bags: int
) -> KeyedJaggedTensor:
    """Jagged attribute ids -> a KJT keyed by :func:`table_name` without the padding ids.

    Args:
        item_features: per feature ``(offsets (n+1,) int64, values (nnz,) int64)`` as
            :func:`~silvertorch.retrieval_ops.gather_features` returns them (``n = num_bags``).
        cardinalities: per feature its padding id (= cardinality); values equal to it are dropped.
        num_bags: ``n``, the number of bags (candidates) per feature.
    Returns:
        KJT with keys ``[table_name(f) for f in cardinalities]``, stride ``n``.
    Raises:
        KeyError naming a missing feature; ValueError for offsets of the wrong length.
    """
    keys, lengths, values = [], [], []
    for name, pad in cardinalities.items():
        if name not in item_features:
            raise KeyError(f"OverArch needs item feature '{name}' (has {sorted(item_features)})")
        offsets, vals = item_features[name]
        if offsets.numel() != num_bags + 1:
            raise ValueError(f"feature '{name}': offsets of {num_bags + 1} expected, got {offsets.numel()}")
        keep = vals != pad
        bag = torch.repeat_interleave(
            torch.arange(num_bags, device=vals.device), offsets[1:] - offsets[:-1], output_size=vals.numel()
        )
        lengths.append(torch.bincount(bag[keep], minlength=num_bags))
        values.append(vals[keep])
        keys.append(table_name(name))
    return KeyedJaggedTensor(
        keys, torch.cat(values).long(), lengths=torch.cat(lengths).long(), stride=num_bags
    )


class ShardableOverArch(nn.Module):
    """``(query, candidates, candidate attributes) -> (B, K, T)`` logits, the OverArch's function
    with its tables in an EBC (``self.tables``) that DMP shards; ``self.mlp`` is data-parallel.

    Built from an :class:`OverArch` (weights copied, the MLP shared, not copied).
    """

    def __init__(self, overarch: OverArch, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.query_dim = overarch.query_dim
        self.tasks = list(overarch.tasks)
        self.feature_names = list(overarch.feature_names)
        self.cardinalities = dict(overarch.cardinalities)
        dim = overarch.config.feature_embedding_dim
        configs = [
            EmbeddingBagConfig(
                name=table_name(f), embedding_dim=dim, num_embeddings=card + 1,
                feature_names=[table_name(f)], pooling=PoolingType.MEAN,
            )  # fmt: skip
            for f, card in self.cardinalities.items()
        ]
        self.tables = EmbeddingBagCollection(configs, device=torch.device(device)) if configs else None
        if self.tables is not None:
            with torch.no_grad():
                for f in self.feature_names:
                    self.tables.embedding_bags[table_name(f)].weight.copy_(overarch.embeddings[f].weight)
        self.mlp = overarch.mlp

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def forward(self, query: Tensor, items: Tensor, item_features: Mapping[str, JaggedIds]) -> Tensor:
        """Same contract as :meth:`OverArch.forward`: ``query (B, D)``, ``items (B, K, D) f32``,
        jagged ids of the ``B*K`` candidates per feature -> ``(B, K, T) f32`` logits."""
        parts = pair_features(query, items, self.query_dim)
        B, K, _ = items.shape
        if self.tables is not None:
            kjt = strip_padding(item_features, self.cardinalities, B * K)
            pooled = self.tables(kjt.to(items.device)).to_dict()
            parts.extend(pooled[table_name(f)].reshape(B, K, -1) for f in self.feature_names)
        return self.mlp(torch.cat(parts, dim=-1))


def overarch_state(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Whole tensors of a :class:`ShardableOverArch` (keys under ``prefix``, e.g. ``"overarch."``
    of a gathered sharded state) -> the ``OverArch.state_dict()`` keys
    (``embeddings.<f>.weight``, ``mlp.*``). Keys outside ``prefix`` are ignored."""
    out: dict[str, Tensor] = {}
    bags = f"{prefix}tables.embedding_bags.{TABLE_PREFIX}"
    for key, value in state.items():
        if key.startswith(bags) and key.endswith(".weight"):
            feature = key[len(bags) : -len(".weight")]
            out[f"embeddings.{feature}.weight"] = value
        elif key.startswith(f"{prefix}mlp."):
            out[key[len(prefix) :]] = value
    return out
