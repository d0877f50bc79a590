"""Eligibility the traditional way: an inverted index (feature value -> sorted item ids) and
boolean algebra over it, producing the item bitmap a faiss ``IDSelectorBitmap`` takes.

Built from the artifact's exact attribute CSR (``index.eligibility.csr_offsets / csr_values``, in
slot order, mapped to item ids through ``index.ivf.slot_ids``) and its vocabularies, so it answers
exactly the items SilverTorch's verified filter answers. The expression language is SilverTorch's
(:func:`silvertorch.index.expr.parse`); values resolve like SilverTorch's compiler
(:meth:`silvertorch.index.plan.Schema.value_id`: a vocabulary name, or a decimal value id). An
unknown *value* matches nothing (as in SilverTorch); an unknown *feature* is rejected
(``ValueError`` naming it and the known features) — a service answers 400.

Evaluation: each term becomes a boolean mask over the ``N`` item ids (its posting list scattered
into zeros), combined with numpy ``& | ~`` (NOT is relative to the live items).
"""

from __future__ import annotations

import numpy as np

from silvertorch.index.eligibility import EligibilityIndex
from silvertorch.index.expr import And, Node, Not, Term, parse
from silvertorch.index.plan import Schema

__all__ = ["InvertedIndex"]


class InvertedIndex:
    """Postings per ``(feature, value)``; ``num_items`` = the model's item-id space."""

    def __init__(self, eligibility: EligibilityIndex, slot_ids: np.ndarray, num_items: int) -> None:
        self.schema: Schema = eligibility.schema()
        self.num_items = num_items
        csr_off = eligibility.csr_offsets.numpy()
        csr_val = eligibility.csr_values.numpy()
        S = slot_ids.shape[0]
        self.live = np.zeros(num_items, dtype=bool)
        self.live[slot_ids[slot_ids >= 0]] = True
        self.offsets: list[np.ndarray] = []  # per feature: (card + 1,) into postings
        self.postings: list[np.ndarray] = []  # per feature: item ids grouped by value, sorted
        for f, card in enumerate(self.schema.cardinality):
            off = csr_off[f]
            lengths = off[1 : S + 1] - off[:S]
            slots = np.repeat(np.arange(S, dtype=np.int64), lengths)
            vals = csr_val[off[0] : off[S]]
            items = slot_ids[slots]
            keep = items >= 0
            items, vals = items[keep], vals[keep]
            order = np.lexsort((items, vals))
            self.postings.append(items[order])
            o = np.zeros(card + 1, dtype=np.int64)
            o[1:] = np.cumsum(np.bincount(vals, minlength=card)[:card])
            self.offsets.append(o)

    def check(self, expression: str | None) -> Node | None:
        """Parse and resolve feature names (``FilterSyntaxError`` / ``ValueError``); the AST."""
        node = parse(expression) if expression else None
        if node is not None:
            self._check(node)
        return node

    def _check(self, node: Node) -> None:
        if isinstance(node, Term):
            if node.feature not in self.schema.index:
                raise ValueError(f"unknown filter feature '{node.feature}' at position {node.pos}; "
                                 f"known features: {self.schema.names}")
        elif isinstance(node, Not):
            self._check(node.child)
        else:
            for c in node.children:
                self._check(c)

    def postings_of(self, feature: str, value: str) -> np.ndarray:
        """Sorted item ids having ``feature:value`` (empty for an unknown value)."""
        f = self.schema.index[feature]
        v = self.schema.value_id(f, value)
        if v is None:
            return np.zeros(0, dtype=np.int64)
        o = self.offsets[f]
        return self.postings[f][o[v] : o[v + 1]]

    def mask(self, expression: str | None) -> np.ndarray:
        """``(N,) bool`` items matching ``expression`` (None / "" = every live item)."""
        node = self.check(expression)
        return self.live.copy() if node is None else self._eval(node)

    def _eval(self, node: Node) -> np.ndarray:
        if isinstance(node, Term):
            m = np.zeros(self.num_items, dtype=bool)
            m[self.postings_of(node.feature, node.value)] = True
            return m
        if isinstance(node, Not):
            return ~self._eval(node.child) & self.live
        parts = [self._eval(c) for c in node.children]
        out = parts[0]
        for p in parts[1:]:
            out = (out & p) if isinstance(node, And) else (out | p)
        return out

    @staticmethod
    def bitmap(mask: np.ndarray) -> np.ndarray:
        """A mask as the little-endian bit array ``faiss.IDSelectorBitmap`` reads."""
        return np.packbits(mask, bitorder="little")


