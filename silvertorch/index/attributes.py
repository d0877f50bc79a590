"""Item attributes: per feature, a jagged set of categorical value ids per item.

This is the one attribute format shared by the data loaders (MovieLens genres, synthetic
languages/creators), the eligibility index (Bloom signatures, exact bitmaps) and the exact
verification stage. Torch only.

An :class:`Attribute` holds, for ``n`` items, ``offsets (n+1,) int64`` and ``values (nnz,) int64``:
item ``i`` has the values ``values[offsets[i]:offsets[i+1]]`` (possibly none, possibly several).
``vocab[v]`` is the human-readable name of value id ``v`` when known.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Attribute", "ItemAttributes"]


@dataclass
class Attribute:
    """One categorical feature over ``n`` items, jagged (CSR)."""

    name: str
    offsets: Tensor  # (n+1,) int64, offsets[0] == 0, non-decreasing
    values: Tensor  # (nnz,) int64, in [0, cardinality)
    cardinality: int
    vocab: list[str] | None = None  # value id -> name; len == cardinality when given
    _index: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.offsets.dtype != torch.int64 or self.values.dtype != torch.int64:
            raise TypeError(f"attribute '{self.name}': offsets and values must be int64")
        if self.offsets.dim() != 1 or self.offsets.numel() < 1 or int(self.offsets[0]) != 0:
            raise ValueError(f"attribute '{self.name}': offsets must be 1-D and start at 0")
        if int(self.offsets[-1]) != self.values.numel():
            raise ValueError(
                f"attribute '{self.name}': offsets[-1]={int(self.offsets[-1])} "
                f"but {self.values.numel()} values"
            )
        if self.values.numel() and (
            int(self.values.min()) < 0 or int(self.values.max()) >= self.cardinality
        ):
            raise ValueError(
                f"attribute '{self.name}': values must lie in [0, {self.cardinality})"
            )
        if self.vocab is not None and len(self.vocab) != self.cardinality:
            raise ValueError(
                f"attribute '{self.name}': vocab has {len(self.vocab)} names, "
                f"cardinality is {self.cardinality}"
            )

    @property
    def num_items(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> Tensor:
        """(n,) int64 number of values per item."""
        return self.offsets[1:] - self.offsets[:-1]

    @classmethod
    def from_single(
        cls, name: str, codes: Tensor, cardinality: int, vocab: list[str] | None = None
    ) -> Attribute:
        """One value per item: ``codes (n,)`` int. A negative code means "no value"."""
        codes = codes.to(torch.int64)
        present = codes >= 0
        offsets = torch.zeros(codes.numel() + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(present.to(torch.int64), 0)
        return cls(name, offsets, codes[present].contiguous(), cardinality, vocab)

    @classmethod
    def from_lists(
        cls, name: str, lists: list[list[int]], cardinality: int, vocab: list[str] | None = None
    ) -> Attribute:
        lengths = torch.tensor([len(x) for x in lists], dtype=torch.int64)
        offsets = torch.zeros(len(lists) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        flat = [v for x in lists for v in x]
        return cls(name, offsets, torch.tensor(flat, dtype=torch.int64), cardinality, vocab)

    def take(self, rows: Tensor) -> Attribute:
        """Attribute of the items ``rows (m,) int64``; a row of -1 yields an empty set."""
        rows = rows.to(torch.int64)
        valid = rows >= 0
        safe = torch.where(valid, rows, torch.zeros_like(rows))
        starts = self.offsets[safe]
        lengths = torch.where(valid, self.offsets[safe + 1] - starts, torch.zeros_like(rows))
        offsets = torch.zeros(rows.numel() + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        total = int(offsets[-1])
        # position j of the output belongs to output row r(j); its source is starts[r] + (j - offsets[r])
        row_of = torch.repeat_interleave(torch.arange(rows.numel()), lengths, output_size=total)
        src = starts[row_of] + (torch.arange(total) - offsets[:-1][row_of])
        return Attribute(self.name, offsets, self.values[src], self.cardinality, self.vocab)

    def value_id(self, token: str) -> int | None:
        """Value id for a name (or a decimal id string); None if unknown."""
        if self.vocab is not None:
            if self._index is None or len(self._index) != len(self.vocab):
                self._index = {name: i for i, name in enumerate(self.vocab)}
            if token in self._index:
                return self._index[token]
        if token.isascii() and token.isdigit():
            v = int(token)
            return v if 0 <= v < self.cardinality else None
        return None



@dataclass
class ItemAttributes:
    """All attribute features of a catalog of ``num_items`` items."""

    num_items: int
    features: dict[str, Attribute] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, attr in self.features.items():
            if attr.num_items != self.num_items:
                raise ValueError(
                    f"attribute '{name}' covers {attr.num_items} items, expected {self.num_items}"
                )

    def take(self, rows: Tensor) -> ItemAttributes:
        """Re-order / select items (e.g. into IVF slot order; -1 rows are empty padding)."""
        return ItemAttributes(rows.numel(), {n: a.take(rows) for n, a in self.features.items()})

    def __getitem__(self, name: str) -> Attribute:
        return self.features[name]

    def __contains__(self, name: str) -> bool:
        return name in self.features
