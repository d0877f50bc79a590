"""The hybrid eligibility index: exact bitmaps for small features, Bloom signatures for large ones.

:class:`EligibilityIndex` is an ``nn.Module`` whose state is registered buffers only, so it is in
``state_dict``, moves with ``.to()``, and exports with the model (``load_state_dict`` into an empty
``EligibilityIndex()`` restores it, vocabularies included). Built on item attributes in **slot
order** (bit ``s & 63`` of word ``s >> 6`` is slot ``s``). Buffers:

- ``table (R, n_words) int64``: the bit-sliced rows a filter reads — every bitmap feature's
  per-value rows, then the ``width`` Bloom signature rows, then one all-ones row.
- ``csr_offsets (F, S+1) int64`` / ``csr_values (nnz,) int64``: every feature's attribute sets
  (values sorted and distinct per slot; offsets are global positions) — exact verification.
- ``csc_offsets`` / ``csc_slots``: per Bloom value, its sorted slots (postings) — exact rows of
  negated Bloom terms at compile time, in time proportional to the posting list.
- ``live_words (n_words,) int64``: live slots (padding slots and the tail past ``S`` are 0);
  every evaluation and verification is ANDed with it.
- ``meta``, ``feat_info``, ``names_*``, ``vocab_*``: sizes, per-feature modes and vocabularies.

``compile(expressions) -> FilterPlan`` (host), ``evaluate(plan, words=None)`` (superset of the exact
matches, never a false negative), ``verify(plan, slots)`` (exact), ``is_exact(plan)``,
``false_positive_rate(plan)`` (measured) and ``expected_term_fpr()`` (analytical).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..config import check
from .attributes import ItemAttributes
from .bitmap import num_words, pack_bits, popcount, scatter_bits, unpack_bits
from .bloom import expected_fpr, term_rows
from .plan import FilterPlan, Schema, compile_plan
from .program import run_verify, run_runs, run_words

__all__ = ["EligibilityConfig", "EligibilityIndex", "Mode"]

Mode = Literal["bitmap", "bloom", "auto"]
_BUFFERS: dict[str, torch.dtype] = {
    "meta": torch.int64,
    "feat_info": torch.int64,
    "names_bytes": torch.uint8,
    "names_offsets": torch.int64,
    "vocab_bytes": torch.uint8,
    "vocab_offsets": torch.int64,
    "table": torch.int64,
    "csr_offsets": torch.int64,
    "csr_values": torch.int64,
    "csc_offsets": torch.int64,
    "csc_slots": torch.int64,
    "live_words": torch.int64,
}
# meta: [n_slots, n_words, num_hashes, width, bloom_base, ones_row, max_len, n_features]
# feat_info columns: is_bloom, cardinality, bitmap_base, csc_base, vocab_start (-1 = none)


@dataclass(kw_only=True)
class EligibilityConfig:
    """How each feature is indexed.

    ``modes`` maps a feature name to "bitmap" (exact per-value rows, cost ``cardinality * S / 8``
    bytes), "bloom" (hashed into the shared signature) or "auto"; unlisted features use
    ``default_mode``. "auto" picks bitmaps for the lowest-cardinality features first while they
    fit in ``bitmap_budget_bytes`` (after the explicit bitmaps) and have at most
    ``max_bitmap_cardinality`` values; everything else goes to the Bloom signature of
    ``bloom_width`` bits (a multiple of 64) with ``bloom_hashes`` hashes per pair.
    """

    modes: dict[str, Mode] = field(default_factory=dict)
    default_mode: Mode = "auto"
    bloom_hashes: int = 4
    bloom_width: int = 256
    bitmap_budget_bytes: int = 512 << 20
    max_bitmap_cardinality: int = 4096

    def validate(self) -> None:
        for name, mode in self.modes.items():
            check(mode in ("bitmap", "bloom", "auto"), f"modes.{name}", "bitmap | bloom | auto")
        check(
            self.default_mode in ("bitmap", "bloom", "auto"), "default_mode", "bitmap | bloom | auto"
        )
        check(1 <= self.bloom_hashes <= 64, "bloom_hashes", "an int in [1, 64]")
        check(
            self.bloom_width > 0 and self.bloom_width % 64 == 0,
            "bloom_width", "a positive multiple of 64 bits",
        )
        check(self.bitmap_budget_bytes >= 0, "bitmap_budget_bytes", ">= 0")
        check(self.max_bitmap_cardinality >= 0, "max_bitmap_cardinality", ">= 0")

    def choose_modes(self, cardinalities: dict[str, int], n_slots: int) -> dict[str, str]:
        """Resolve every feature to "bitmap" or "bloom" (see the class docstring)."""
        row_bytes = num_words(n_slots) * 8
        modes = {n: self.modes.get(n, self.default_mode) for n in cardinalities}
        left = self.bitmap_budget_bytes - sum(
            cardinalities[n] * row_bytes for n, m in modes.items() if m == "bitmap"
        )
        for name in sorted((n for n, m in modes.items() if m == "auto"), key=cardinalities.get):
            cost = cardinalities[name] * row_bytes
            if cardinalities[name] <= self.max_bitmap_cardinality and cost <= left:
                modes[name], left = "bitmap", left - cost
            else:
                modes[name] = "bloom"
        return modes


def _encode(strings: list[str]) -> tuple[Tensor, Tensor]:
    data = [s.encode("utf-8") for s in strings]
    lengths = torch.tensor([len(d) for d in data], dtype=torch.int64)
    offsets = torch.zeros(len(data) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    blob = bytearray(b"".join(data))
    if not blob:
        return torch.zeros(0, dtype=torch.uint8), offsets
    return torch.frombuffer(blob, dtype=torch.uint8).clone(), offsets


def _decode(blob: Tensor, offsets: Tensor, start: int, count: int) -> list[str]:
    raw = bytes(blob.cpu().tolist())
    off = offsets.cpu().tolist()
    return [raw[off[i] : off[i + 1]].decode("utf-8") for i in range(start, start + count)]


def _canonical_csr(
    offsets: Tensor, values: Tensor, cardinality: int, n: int
) -> tuple[Tensor, Tensor]:
    """Sort and de-duplicate each item's values -> (slots (nnz,), values (nnz,)) sorted by both."""
    lengths = offsets[1:] - offsets[:-1]
    slots = torch.repeat_interleave(torch.arange(n), lengths, output_size=values.numel())
    key = torch.unique(slots * max(cardinality, 1) + values)
    return key // max(cardinality, 1), key % max(cardinality, 1)


#: slots per block of :func:`_or_bits` (a multiple of 64: blocks cover whole words)
_BLOCK_SLOTS = 1 << 20


def _or_bits(block: Tensor, offsets: Tensor, slots: Tensor, values: Tensor,
             rows_of: Callable[[Tensor], Tensor] | None) -> None:
    """OR into ``block (R, W) int64`` (a view of the table) bit ``slot`` of row ``row`` for every
    pair of one feature, ``slots, values (nnz,)`` sorted by slot with CSR ``offsets (n+1,)``.

    ``rows_of(values) -> (m, K)`` gives each pair's rows (Bloom: its K hash rows); None: the row is
    the value itself (bitmap). Works through ``_BLOCK_SLOTS`` slots at a time, so the temporaries of
    the scatter stay bounded whatever the catalog size; OR-ing makes the blocks' order (and pairs
    repeated across features or hashes) irrelevant."""
    n = offsets.numel() - 1
    for lo in range(0, n, _BLOCK_SLOTS):
        hi = min(lo + _BLOCK_SLOTS, n)
        a, b = int(offsets[lo]), int(offsets[hi])
        if a == b:
            continue
        vals, local = values[a:b], slots[a:b] - lo
        if rows_of is None:
            rows = vals
        else:
            pos = rows_of(vals)
            rows, local = pos.reshape(-1), local.repeat_interleave(pos.shape[1])
        w_lo = lo // 64
        words = num_words(hi - lo)
        block[:, w_lo:w_lo + words] |= scatter_bits(block.shape[0], words, rows, local)


class EligibilityIndex(nn.Module):
    """Hybrid bitmap / Bloom eligibility filter over ``S`` slots (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        for name, dtype in _BUFFERS.items():
            self.register_buffer(name, torch.zeros(0, dtype=dtype))
        self._schema: Schema | None = None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        attributes: ItemAttributes,
        config: EligibilityConfig | None = None,
        live: Tensor | None = None,
    ) -> EligibilityIndex:
        """Index ``attributes`` (already in slot order, one item per slot; padding slots empty).

        ``live (S,) bool`` marks real items (default: all ``S``); dead slots never match.
        """
        config = config or EligibilityConfig()
        config.validate()
        n = attributes.num_items
        n_words = num_words(n)
        names = list(attributes.features)
        cards = {k: attributes[k].cardinality for k in names}
        unknown = sorted(set(config.modes) - set(names))
        check(not unknown, f"modes.{unknown[0] if unknown else ''}", f"a feature among {names}")
        modes = config.choose_modes(cards, n)
        width, k = config.bloom_width, config.bloom_hashes
        has_bloom = any(m == "bloom" for m in modes.values())

        info, csr_offsets, csr_values, csc_offsets, csc_slots = [], [], [], [], []
        vocab_names: list[str] = []
        bitmap_rows = sum(cards[n_] for n_ in names if modes[n_] == "bitmap")
        bloom_base = bitmap_rows
        ones_row = bloom_base + (width if has_bloom else 0)
        # bits are OR-ed into the table feature by feature and block by block of slots (below):
        # one scatter of every (row, slot) pair at once held ~10 int64 copies of all of them
        # (a 10M-item catalog needed 24 GB)
        table = torch.zeros(ones_row + 1, n_words, dtype=torch.int64)
        base = nnz_base = csc_pos = csc_base = max_len = 0
        for fid, name in enumerate(names):
            attr = attributes[name]
            card = attr.cardinality
            slots, values = _canonical_csr(attr.offsets, attr.values, card, n)
            counts = torch.bincount(slots, minlength=n)
            offsets = torch.zeros(n + 1, dtype=torch.int64)
            offsets[1:] = torch.cumsum(counts, 0)
            max_len = max(max_len, int(counts.max()) if n else 0)
            csr_offsets.append(offsets + nnz_base)
            csr_values.append(values)
            nnz_base += values.numel()
            vocab_start = -1
            if attr.vocab is not None:
                vocab_start = len(vocab_names)
                vocab_names.extend(attr.vocab)
            if modes[name] == "bitmap":
                _or_bits(table[base:base + card], offsets, slots, values, None)
                info.append([0, card, base, -1, vocab_start])
                base += card
            else:
                _or_bits(table[bloom_base:bloom_base + width], offsets, slots, values,
                         lambda v, f=fid: term_rows(torch.full_like(v, f), v, k, width))
                order = torch.argsort(values * max(n, 1) + slots)
                per_value = torch.zeros(card + 1, dtype=torch.int64)
                per_value[1:] = torch.cumsum(torch.bincount(values, minlength=card), 0)
                csc_offsets.append(per_value + csc_pos)
                csc_slots.append(slots[order])
                info.append([1, card, -1, csc_base, vocab_start])
                csc_pos += values.numel()
                csc_base += card + 1
        empty = torch.zeros(0, dtype=torch.int64)
        table[ones_row] = -1
        live_mask = torch.ones(n, dtype=torch.bool) if live is None else live.to(torch.bool).cpu()
        if live_mask.shape != (n,):
            raise ValueError(f"live must be ({n},) bool, got {tuple(live_mask.shape)}")

        index = cls()
        index.meta = torch.tensor(
            [n, n_words, k, width, bloom_base, ones_row, max_len, len(names)], dtype=torch.int64
        )
        index.feat_info = torch.tensor(info, dtype=torch.int64).reshape(len(names), 5)
        index.names_bytes, index.names_offsets = _encode(names)
        index.vocab_bytes, index.vocab_offsets = _encode(vocab_names)
        index.table = table
        index.csr_offsets = (
            torch.stack(csr_offsets) if csr_offsets else torch.zeros(0, n + 1, dtype=torch.int64)
        )
        index.csr_values = torch.cat(csr_values) if csr_values else empty
        index.csc_offsets = torch.cat(csc_offsets) if csc_offsets else empty
        index.csc_slots = torch.cat(csc_slots) if csc_slots else empty
        index.live_words = pack_bits(live_mask)
        return index

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # buffer shapes depend on the catalog: adopt the incoming shapes, then copy
        for name in _BUFFERS:
            if prefix + name in state_dict:
                incoming = state_dict[prefix + name]
                self._buffers[name] = torch.empty(
                    incoming.shape, dtype=incoming.dtype, device=self._buffers[name].device
                )
        self._schema = None
        super()._load_from_state_dict(state_dict, prefix, *args)

    # ---- schema -----------------------------------------------------------------------------
    def _meta(self, i: int) -> int:
        if self.meta.numel() == 0:
            raise RuntimeError("EligibilityIndex is empty: build() it or load_state_dict() first")
        return int(self.meta[i])

    @property
    def num_slots(self) -> int:
        return self._meta(0)

    @property
    def num_words(self) -> int:
        return self._meta(1)

    def schema(self) -> Schema:
        """Host-side view of names, modes and vocabularies (decoded once, cached)."""
        if self._schema is None:
            meta = self.meta.cpu().tolist()
            info = self.feat_info.cpu().tolist()
            names = _decode(self.names_bytes, self.names_offsets, 0, meta[7])
            vocab: list[dict[str, int] | None] = []
            for is_bloom, card, _, _, start in info:
                if start < 0:
                    vocab.append(None)
                else:
                    words = _decode(self.vocab_bytes, self.vocab_offsets, start, card)
                    vocab.append({w: i for i, w in enumerate(words)})  # as Attribute.value_id
            self._schema = Schema(
                names=names,
                bloom=[bool(r[0]) for r in info],
                cardinality=[r[1] for r in info],
                bitmap_base=[r[2] for r in info],
                vocab=vocab,
                bloom_base=meta[4],
                ones_row=meta[5],
                num_hashes=meta[2],
                width=meta[3],
            )
        return self._schema

    @property
    def modes(self) -> dict[str, str]:
        """Feature name -> "bitmap" | "bloom"."""
        s = self.schema()
        return {n: "bloom" if b else "bitmap" for n, b in zip(s.names, s.bloom)}

    def memory_bytes(self) -> dict[str, int]:
        """Bytes per buffer (``table`` holds the bitmaps and the Bloom signatures)."""
        return {n: b.numel() * b.element_size() for n, b in self.named_buffers()}

    # ---- filtering ----------------------------------------------------------------------------
    def _exact_rows(self, features: list[int], values: list[int]) -> Tensor:
        """Exact slot bitmaps of Bloom values from their postings -> (E, n_words) int64."""
        info = self.feat_info.cpu()
        dev = self.csc_slots.device
        f = torch.tensor(features, dtype=torch.int64)
        pos = (info[f, 3] + torch.tensor(values, dtype=torch.int64)).to(dev)
        starts = self.csc_offsets[pos]
        lengths = self.csc_offsets[pos + 1] - starts
        total = int(lengths.sum())
        ids = torch.arange(len(features), device=dev)
        row = torch.repeat_interleave(ids, lengths, output_size=total)
        first = torch.cumsum(lengths, 0) - lengths
        src = starts[row] + (torch.arange(total, device=dev) - first[row])
        return scatter_bits(len(features), self.num_words, row, self.csc_slots[src])

    def compile(self, expressions: list[str | None], *, exact: bool = False) -> FilterPlan:
        """Parse and compile one expression per query row (``None`` / "" = match all).

        Raises :class:`~.expr.FilterSyntaxError` for an unparsable expression. Unknown features
        or values match nothing and are reported in ``plan.warnings[row]``. ``exact=True``
        evaluates every Bloom term on exact postings (slower compile, no false positives).
        """
        if isinstance(expressions, str) or expressions is None:
            raise TypeError("compile() takes a list of expressions, one per query row")
        return compile_plan(
            list(expressions), self.schema(), self._exact_rows, self.num_words,
            exact=exact, device=self.table.device,
        )

    def evaluate(
        self, plan: FilterPlan, words: Tensor | None = None, *, chunk_elements: int = 1 << 18
    ) -> Tensor:
        """Bit-words of the matching slots: a superset of the exact matches (no false negative).

        ``chunk_elements`` bounds the working set (rows × words per chunk of the register file).
        ``words (B, W) int64`` word indices (−1 = padding -> 0) -> ``(B, W) int64``;
        ``None`` -> every word, ``(B, n_words) int64``. Dead slots are always 0.
        """
        if plan.n_words != self.num_words:
            raise ValueError(f"plan compiled for {plan.n_words} words, index has {self.num_words}")
        return run_words(plan, self.table, self.live_words, words, chunk_elements)

    def evaluate_runs(
        self, plan: FilterPlan, programs: Tensor, first: Tensor, count: Tensor, width: int,
        *, chunk_elements: int = 1 << 18,
    ) -> Tensor:
        """Bit-words of contiguous word runs (e.g. the probed clusters of probe-then-filter).

        Run ``k`` evaluates unique program ``programs[k]`` (an index into the plan's programs, as in
        ``plan.row_map``) on words ``first[k] + [0, count[k])`` -> ``(K, width) int64``, zero past
        ``count[k]``. The same bits as :meth:`evaluate` on those words.
        """
        if plan.n_words != self.num_words:
            raise ValueError(f"plan compiled for {plan.n_words} words, index has {self.num_words}")
        return run_runs(plan, self.table, self.live_words, programs, first, count, width, chunk_elements)

    def verify(self, plan: FilterPlan, slots: Tensor) -> Tensor:
        """Exact match of each candidate: ``slots (B, K) int64`` (−1 padded) -> ``(B, K) bool``.

        Bitmap-feature terms test one bit; Bloom-feature terms binary-search the slot's CSR values.
        """
        return run_verify(
            plan, self.table, self.csr_offsets, self.csr_values, self._meta(6), self.live_words,
            slots,
        )

    def is_exact(self, plan: FilterPlan) -> bool:
        """True when no row of ``plan`` tests a positive Bloom term (no false positive possible)."""
        return bool(plan.row_exact.all())

    # ---- measurement ------------------------------------------------------------------------
    def false_positive_rate(self, plan: FilterPlan) -> Tensor:
        """Measured FPR per row: ``(B,) float64`` = false positives / live non-matching slots."""
        approx = self.evaluate(plan)
        truth = self.evaluate(self.compile(plan.expressions, exact=True))
        false_pos = popcount(approx & ~truth).sum(1)
        live = int(popcount(self.live_words).sum())
        negatives = (live - popcount(truth).sum(1)).clamp(min=1)
        return false_pos.to(torch.float64) / negatives.to(torch.float64)

    def expected_term_fpr(self) -> float:
        """Analytical FPR of one positive Bloom term, averaged over live slots."""
        s = self.schema()
        bloom = [i for i, b in enumerate(s.bloom) if b]
        if not bloom:
            return 0.0
        counts = self.csr_offsets[bloom, 1:] - self.csr_offsets[bloom, :-1]
        pairs = counts.sum(0)
        alive = unpack_bits(self.live_words, self.num_slots)
        return expected_fpr(pairs[alive], s.num_hashes, s.width)
