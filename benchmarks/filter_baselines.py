"""Two CPU filter baselines evaluated straight from item attributes (item order, not slots).

- :class:`AttributeMaskFilter`: per query, a boolean mask over all items computed from the
  attribute arrays (``codes == v`` for single-valued features, a scatter of ``values == v`` hits
  for multi-valued ones), combined with ``& | ~``. Exact; also the ground truth of the filtered
  recall and of the Bloom false-positive rate.
- :class:`InvertedIndex`: per ``(feature, value)`` a sorted posting list of item ids (numpy);
  AND intersects smallest-first with binary search, AND NOT subtracts, OR merges. Exact.

Both use the project's parser (:mod:`silvertorch.index.expr`), so they accept exactly the language
the eligibility index does; an unknown feature or value matches nothing, like the index.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from silvertorch.index.attributes import Attribute, ItemAttributes
from silvertorch.index.expr import And, Node, Not, Or, Term, parse

__all__ = ["AttributeMaskFilter", "InvertedIndex"]


def _smallest_int(cardinality: int) -> torch.dtype:
    for dt in (torch.int8, torch.int16, torch.int32):
        if cardinality <= torch.iinfo(dt).max:
            return dt
    return torch.int64


class AttributeMaskFilter:
    """Exact per-query boolean masks ``(N,) bool`` over the attribute arrays."""

    def __init__(self, attributes: ItemAttributes) -> None:
        self.n = attributes.num_items
        self.attrs = attributes.features
        self.codes: dict[str, Tensor] = {}  # single-valued features: one code per item (-1 none)
        self.owner: dict[str, Tensor] = {}  # multi-valued: item of every value entry
        for name, a in attributes.features.items():
            if bool((a.lengths == 1).all()):
                self.codes[name] = a.values.to(_smallest_int(a.cardinality))
            else:
                self.owner[name] = torch.repeat_interleave(
                    torch.arange(self.n), a.lengths, output_size=a.values.numel()
                )

    def _term(self, t: Term) -> Tensor:
        a: Attribute | None = self.attrs.get(t.feature)
        v = a.value_id(t.value) if a is not None else None
        if v is None:
            return torch.zeros(self.n, dtype=torch.bool)
        if t.feature in self.codes:
            return self.codes[t.feature] == v
        mask = torch.zeros(self.n, dtype=torch.bool)
        mask[self.owner[t.feature][a.values == v]] = True
        return mask

    def _eval(self, node: Node) -> Tensor:
        if isinstance(node, Term):
            return self._term(node)
        if isinstance(node, Not):
            return ~self._eval(node.child)
        parts = [self._eval(c) for c in node.children]
        out = parts[0]
        for p in parts[1:]:
            out = out & p if isinstance(node, And) else out | p
        return out

    def mask(self, expression: str | None) -> Tensor:
        """``(N,) bool``: items matching ``expression`` (all items for None / blank)."""
        node = parse(expression)
        return torch.ones(self.n, dtype=torch.bool) if node is None else self._eval(node)


def _intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted unique ``a ∩ b``: binary-search the smaller list in the larger, O(s log l)."""
    small, large = (a, b) if a.size <= b.size else (b, a)
    if small.size == 0 or large.size == 0:
        return small[:0]
    pos = np.searchsorted(large, small).clip(max=large.size - 1)
    return small[large[pos] == small]


def _difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted unique ``a \\ b``."""
    if a.size == 0 or b.size == 0:
        return a
    pos = np.searchsorted(b, a).clip(max=b.size - 1)
    return a[b[pos] != a]


class InvertedIndex:
    """Per ``(feature, value)`` sorted item-id posting lists; queries return sorted id arrays."""

    def __init__(self, attributes: ItemAttributes) -> None:
        self.n = attributes.num_items
        self.attrs = attributes.features
        self.postings: dict[str, list[np.ndarray]] = {}
        for name, a in attributes.features.items():
            owner = np.repeat(np.arange(self.n, dtype=np.int32), a.lengths.numpy())
            values = a.values.numpy()
            order = np.argsort(values, kind="stable")  # stable: ids stay sorted within a value
            bounds = np.searchsorted(values[order], np.arange(a.cardinality + 1))
            ids = owner[order]
            self.postings[name] = [
                np.unique(ids[bounds[v] : bounds[v + 1]]) for v in range(a.cardinality)
            ]
        self._all = np.arange(self.n, dtype=np.int32)

    def memory_bytes(self) -> int:
        return sum(p.nbytes for lists in self.postings.values() for p in lists)

    def _term(self, t: Term) -> np.ndarray:
        a = self.attrs.get(t.feature)
        v = a.value_id(t.value) if a is not None else None
        return self._all[:0] if v is None else self.postings[t.feature][v]

    def _eval(self, node: Node) -> np.ndarray:
        if isinstance(node, Term):
            return self._term(node)
        if isinstance(node, Not):
            return _difference(self._all, self._eval(node.child))
        if isinstance(node, Or):
            return np.unique(np.concatenate([self._eval(c) for c in node.children]))
        positive = [self._eval(c) for c in node.children if not isinstance(c, Not)]
        negative = [self._eval(c.child) for c in node.children if isinstance(c, Not)]
        positive.sort(key=len)  # intersect smallest first: every step is O(small log large)
        out = positive[0] if positive else self._all
        for p in positive[1:]:
            out = _intersect(out, p)
        for q in negative:
            out = _difference(out, q)
        return out

    def ids(self, expression: str | None) -> np.ndarray:
        """Sorted ``int32`` ids of the items matching ``expression``."""
        node = parse(expression)
        return self._all if node is None else self._eval(node)
