"""The user-tower service: ``POST /v1/embed`` (user feature ids) -> query vectors.

Request frame: ``lengths (F * B,) int64`` and ``values (nnz,) int64`` in the KeyedJaggedTensor
layout (key-major: the ``B`` bag lengths of feature 0, then feature 1, ...) over the tower's
features in order (``GET /v1/schema`` is not needed: the orchestrator reads the same artifact).
Ids are vocabulary ids (the orchestrator maps raw values; unknown -> 0, the OOV row).
Response frame: ``query (B, D) float32``.

Rejected with 400 (nothing batched): a bad frame, lengths not a multiple of the feature count,
negative lengths, lengths that do not sum to the values, ids outside a feature's table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from silvertorch.modules.towers import UserTower

from .protocol import ProtocolError, require
from .service import BinaryService

__all__ = ["UserTowerService", "UserBatch"]


@dataclass
class UserBatch:
    lengths: np.ndarray  # (F, B) int64
    values: np.ndarray  # (nnz,) int64, key-major

    @property
    def size(self) -> int:
        return self.lengths.shape[1]


class UserTowerService(BinaryService[UserBatch]):
    name = "user_tower"

    def __init__(self, tower: UserTower) -> None:
        self.tower = tower.eval()
        self.keys = list(tower.feature_names)
        rows = {f: c.num_embeddings for c in tower.ebc.embedding_bag_configs() for f in c.feature_names}
        self.table_rows = np.array([rows[k] for k in self.keys], dtype=np.int64)

    def parse(self, arrays: dict[str, np.ndarray]) -> UserBatch:
        lengths = require(arrays, "lengths", "int64", 1)
        values = require(arrays, "values", "int64", 1)
        F = len(self.keys)
        if lengths.size == 0 or lengths.size % F:
            raise ProtocolError(f"lengths must hold {F} features x B rows (features {self.keys}), "
                                f"got {lengths.size} entries")
        if (lengths < 0).any() or int(lengths.sum()) != values.size:
            raise ProtocolError(f"lengths must be >= 0 and sum to the {values.size} values")
        lengths = lengths.reshape(F, -1)
        bound = np.repeat(self.table_rows, lengths.sum(1))
        bad = (values < 0) | (values >= bound)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            f = int(np.searchsorted(np.cumsum(lengths.sum(1)), i, side="right"))
            raise ProtocolError(f"feature '{self.keys[f]}': id {int(values[i])} outside its table "
                                f"[0, {int(self.table_rows[f])})")
        return UserBatch(lengths, values)

    def rows(self, item: UserBatch) -> int:
        return item.size

    @torch.no_grad()
    def run(self, items: list[UserBatch]) -> list[dict[str, np.ndarray]]:
        F = len(self.keys)
        lengths = np.concatenate([it.lengths for it in items], axis=1)  # (F, sum B)
        per_key = []
        for f in range(F):
            for it in items:
                counts = it.lengths.sum(1)
                start = int(counts[:f].sum())
                per_key.append(it.values[start : start + int(counts[f])])
        values = np.concatenate(per_key) if per_key else np.zeros(0, np.int64)
        B = lengths.shape[1]
        kjt = KeyedJaggedTensor(self.keys, torch.from_numpy(values.copy()),
                                lengths=torch.from_numpy(lengths.reshape(-1).copy()), stride=B)
        query = self.tower(kjt).float().numpy()
        out, pos = [], 0
        for it in items:
            out.append({"query": query[pos : pos + it.size]})
            pos += it.size
        return out
