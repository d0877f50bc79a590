"""Building request KJTs for the user tower, with unseen values mapped to the OOV row 0.

Value id 0 of every model feature is the out-of-vocabulary row (``silvertorch.data.dataset``). The
TorchRec embedding lookup does not check bounds (an id past the table raises deep inside the
kernel), so requests are sanitized here, at the query-building boundary:

- :class:`QueryBuilder` turns raw feature values (strings, as in the data files) into a KJT with
  the training vocabularies; a value never seen in training becomes 0;
- :func:`sanitize_kjt` maps ids outside ``[0, rows)`` of an already-encoded KJT to 0.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torchrec import KeyedJaggedTensor

from silvertorch.modules.towers import Tower

__all__ = ["feature_rows", "sanitize_kjt", "QueryBuilder"]


def feature_rows(tower: Tower) -> dict[str, int]:
    """Feature name -> rows of the embedding table it is looked up in."""
    return {f: c.num_embeddings for c in tower.ebc.embedding_bag_configs() for f in c.feature_names}


def sanitize_kjt(kjt: KeyedJaggedTensor, rows: Mapping[str, int]) -> KeyedJaggedTensor:
    """A copy of ``kjt`` whose values outside ``[0, rows[key])`` are 0 (the OOV row).

    Raises ``KeyError`` for a key with no known table size.
    """
    keys = kjt.keys()
    missing = [k for k in keys if k not in rows]
    if missing:
        raise KeyError(f"no embedding table size for feature(s) {missing} (known: {sorted(rows)})")
    B = kjt.stride()
    per_key = kjt.lengths().reshape(len(keys), B).sum(1)  # (F,) values per key
    bound = torch.repeat_interleave(torch.tensor([rows[k] for k in keys]), per_key)
    values = kjt.values()
    clean = torch.where((values >= 0) & (values < bound), values, torch.zeros_like(values))
    return KeyedJaggedTensor(keys, clean, lengths=kjt.lengths(), stride=B)


class QueryBuilder:
    """Raw user features -> the user tower's KJT.

    Args:
        vocab: per feature, the training vocabulary (value id -> name, ``vocab[0]`` = OOV).
        keys: the features the tower reads, in order.
    """

    def __init__(self, vocab: Mapping[str, Sequence[str]], keys: Sequence[str]) -> None:
        missing = [k for k in keys if k not in vocab]
        if missing:
            raise KeyError(f"no vocabulary for user feature(s) {missing} (known: {sorted(vocab)})")
        self.keys = list(keys)
        self.index = {k: {name: i for i, name in enumerate(vocab[k])} for k in self.keys}

    def encode(self, key: str, value: str) -> int:
        """Value id of ``value`` for feature ``key``; 0 (OOV) when unseen in training."""
        return self.index[key].get(str(value), 0)

    def build(self, requests: Sequence[Mapping[str, str | Sequence[str]]]) -> KeyedJaggedTensor:
        """One row per request: ``{feature: value or list of values}``; an absent feature is an
        empty bag (the tower's mean pooling embeds it as zeros)."""
        lengths, values = [], []
        for key in self.keys:
            for req in requests:
                raw = req.get(key, [])
                vals = [raw] if isinstance(raw, str) else list(raw)
                lengths.append(len(vals))
                values.extend(self.encode(key, v) for v in vals)
        return KeyedJaggedTensor(
            self.keys,
            torch.tensor(values, dtype=torch.int64),
            lengths=torch.tensor(lengths, dtype=torch.int64),
            stride=len(requests),
        )
