"""Compile filter expressions into a batched, lockstep bit-word program (:class:`FilterPlan`).

Pipeline, on the host, once per batch: parse (:mod:`.expr`) -> resolve ``feature:value`` against
the index schema -> negation normal form (NOTs pushed to the terms with De Morgan, constants
folded, nested AND/OR flattened) -> leaves -> a register program, padded to one length per batch.

**Negation, the trap.** A Bloom test is a superset of the exact term; NOT of a superset is a
*subset*, i.e. false negatives. In negation normal form every NOT sits directly on a term, and:
- a negated bitmap term is ``~row`` (exact);
- a negated Bloom term is evaluated on an **exact** row built at compile time from the stored
  per-value postings (CSC) of that value — only for the distinct values that appear negated in
  the batch (``FilterPlan.extra``), so the result is ``~exact``, never ``~superset``;
- positive Bloom terms stay Bloom tests (AND of K signature rows) — unless the same value is
  negated elsewhere in the batch, then its exact row is reused; AND / OR are monotone, so a
  superset of every positive leaf and an exact value of every negated leaf give a superset of the
  whole expression: never a false negative.

**Unknown features / values** resolve to the constant FALSE ("no item has that value") and add a
warning to the row. Ordinary Boolean logic then applies: ``NOT unknown:x`` is TRUE (every item
lacks the unknown value), ``a:1 AND unknown:x`` is FALSE, ``a:1 OR unknown:x`` is ``a:1``. An
unknown term itself never matches anything.

**Program.** Each internal node of a row's tree owns a register; register ``r`` stores its value
XOR ``c_r`` (``c_r = -1`` for OR nodes, which are stored complemented, 0 for AND nodes), and every
register starts as all ones. Then every instruction is ``reg[dst] &= src ^ x``: an AND node ANDs
child values in; an OR node, stored as ``~value``, ANDs ``~child`` in (De Morgan). ``x`` folds the
literal's negation and the complement conventions of source and destination. Leaves go first (in
two phases by source table: exact compile-time rows ``ext_*``, then index table rows ``lit_*``),
then register-to-register steps in post-order (``reg_*``); the result is ``reg[0] ^ root_xor``.
Rows are padded with no-ops (``reg[0] &= ones``), so all rows of a batch run in lockstep: one
gather of ``(rows, words)`` per step, no Python loop over queries. The verification program
(``v_*``) is the same machine over term leaves ``(feature, value)``, evaluated exactly on
candidate slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Callable

import torch
from torch import Tensor

from .expr import And, Node, Not, Or, Term, parse

__all__ = ["FilterPlan", "Schema", "compile_plan"]


@dataclass
class Schema:
    """What the compiler needs to know about an index (host-side, derived from its buffers)."""

    names: list[str]  # feature names, feature id = position
    bloom: list[bool]  # per feature: True = Bloom mode, False = exact bitmap
    cardinality: list[int]
    bitmap_base: list[int]  # first table row of a bitmap feature (-1 for Bloom features)
    vocab: list[dict[str, int] | None]  # name -> value id
    bloom_base: int  # first table row of the Bloom signature rows
    ones_row: int  # table row that is all ones (no-op padding)
    num_hashes: int
    width: int
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {n: i for i, n in enumerate(self.names)}

    def value_id(self, f: int, token: str) -> int | None:
        vocab = self.vocab[f]
        if vocab is not None and token in vocab:
            return vocab[token]
        if token.isascii() and token.isdigit():
            v = int(token)
            return v if v < self.cardinality[f] else None
        return None


@dataclass
class FilterPlan:
    """A compiled batch of filters. Programs are over ``U`` unique expressions; ``row_map (B,)``
    maps each of the ``B`` query rows to its program. All tensors int64 unless noted.

    - ``lit_src/lit_dst/lit_xor (U, L1)``: leaf steps reading index table rows.
    - ``ext_src/ext_dst/ext_xor (U, L0)``: leaf steps reading ``extra (E, n_words)``, the exact
      compile-time rows of Bloom values that appear negated (row 0 = all ones, for padding).
    - ``reg_src/reg_dst/reg_xor (U, L2)``: register steps; ``root_xor (U,)``; ``n_regs`` registers.
    - ``vbit_src/vbit_dst/vbit_xor (U, M0)`` (bitmap leaves: one bit test of a table row),
      ``v_feat/v_val/v_dst/v_xor (U, M1)`` (Bloom-feature leaves: CSR binary search),
      ``vreg_* (U, M2)``, ``v_root_xor (U,)``, ``v_n_regs``: the exact verification program.
    - ``row_exact (U,) bool``: the row's evaluation can have no false positive.
    - ``warnings[b]``: unknown features/values of row ``b`` (those terms match nothing).
    """

    expressions: list[str | None]
    warnings: list[list[str]]
    row_map: Tensor
    lit_src: Tensor
    lit_dst: Tensor
    lit_xor: Tensor
    lit_dst_uniform: list[int]  # per leaf step: the register all rows write, or -1 if they differ
    lit_xor_any: list[bool]  # per leaf step: some row negates (else the XOR is skipped)
    ext_src: Tensor
    ext_dst: Tensor
    ext_xor: Tensor
    extra: Tensor
    reg_src: Tensor
    reg_dst: Tensor
    reg_xor: Tensor
    reg_dst_uniform: list[int]
    root_xor: Tensor
    n_regs: int
    vbit_src: Tensor
    vbit_dst: Tensor
    vbit_xor: Tensor
    v_feat: Tensor
    v_val: Tensor
    v_dst: Tensor
    v_xor: Tensor
    vreg_src: Tensor
    vreg_dst: Tensor
    vreg_xor: Tensor
    v_root_xor: Tensor
    v_n_regs: int
    row_exact: Tensor
    n_words: int
    exact: bool = False  # compiled with every Bloom term materialized exactly

    @property
    def num_rows(self) -> int:
        return self.row_map.numel()

    @property
    def num_programs(self) -> int:
        return self.root_xor.numel()

    @property
    def device(self) -> torch.device:
        return self.row_map.device

    def to(self, device: torch.device | str) -> FilterPlan:
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **moved)


# --- negation normal form ---------------------------------------------------------------------
# nodes: ("const", bool) | ("lit", f, v, neg) | ("and", list) | ("or", list)

_TRUE = ("const", True)
_FALSE = ("const", False)


def _combine(op: str, children: list[tuple]) -> tuple:
    absorbing, identity = (_FALSE, _TRUE) if op == "and" else (_TRUE, _FALSE)
    out: list[tuple] = []
    seen: set = set()
    for ch in children:
        if ch == absorbing:
            return absorbing
        if ch == identity:
            continue
        for item in ch[1] if ch[0] == op else [ch]:
            key = repr(item)
            if key not in seen:
                seen.add(key)
                out.append(item)
    if not out:
        return identity
    return out[0] if len(out) == 1 else (op, out)


def _nnf(node: Node, neg: bool, schema: Schema, warn: list[str]) -> tuple:
    if isinstance(node, Term):
        f = schema.index.get(node.feature)
        v = None if f is None else schema.value_id(f, node.value)
        if v is None:
            what = "feature" if f is None else "value"
            note = " (negated: NOT of it matches every item)" if neg else ""
            warn.append(
                f"unknown {what} in term {node} at position {node.pos}: "
                f"the term matches no item{note}"
            )
            return _TRUE if neg else _FALSE
        return ("lit", f, v, neg)
    if isinstance(node, Not):
        return _nnf(node.child, not neg, schema, warn)
    op = "and" if isinstance(node, And) == (not neg) else "or"
    return _combine(op, [_nnf(c, neg, schema, warn) for c in node.children])


# --- leaves and register layout ---------------------------------------------------------------


def _layout(root: tuple) -> tuple[dict[str, list[tuple]], list[tuple], int, int]:
    """Register program of one NNF tree whose leaves are ("leaf", kind, payload, neg).

    Returns (leaf steps by kind: (payload, dst, xor)), reg steps (src, dst, xor), n_regs, root_xor.
    """
    if root[0] == "const":
        root = ("and", []) if root[1] else ("or", [])
    elif root[0] == "leaf":
        root = ("and", [root])
    comp: list[int] = []
    leaves: dict[str, list[tuple]] = {}
    regs: list[tuple] = []

    def visit(node: tuple) -> int:
        r = len(comp)
        comp.append(-1 if node[0] == "or" else 0)
        for ch in node[1]:
            if ch[0] == "leaf":
                x = (-1 if ch[3] else 0) ^ comp[r]
                leaves.setdefault(ch[1], []).append((ch[2], r, x))
            else:
                q = visit(ch)
                regs.append((q, r, comp[q] ^ comp[r]))
        return r

    visit(root)
    return leaves, regs, len(comp), comp[0]


def _map_leaves(node: tuple, fn: Callable[[tuple], tuple]) -> tuple:
    if node[0] == "lit":
        return fn(node)
    if node[0] in ("and", "or"):
        return _combine(node[0], [_map_leaves(c, fn) for c in node[1]])
    return node


def _pad(rows: list[list[tuple]], width: int, pad: tuple) -> list[Tensor]:
    """Pad per-row step lists to one length -> one (U, L) int64 tensor per tuple component."""
    length = max((len(r) for r in rows), default=0)
    table = [list(r) + [pad] * (length - len(r)) for r in rows]
    flat = torch.tensor(table, dtype=torch.int64).reshape(len(rows), length, width)
    return [flat[:, :, i].contiguous() for i in range(width)]


def _uniform(dst: Tensor) -> list[int]:
    """Per step (column): the destination register shared by every row, else -1."""
    if dst.numel() == 0:
        return [-1] * dst.shape[1]
    same = (dst == dst[:1]).all(0)
    return [int(d) if ok else -1 for d, ok in zip(dst[0].tolist(), same.tolist())]


def compile_plan(
    expressions: list[str | None],
    schema: Schema,
    materialize: Callable[[list[int], list[int]], Tensor],
    n_words: int,
    *,
    exact: bool = False,
    device: torch.device | str = "cpu",
) -> FilterPlan:
    """Compile a batch of expressions (see module docstring).

    ``materialize(features, values) -> (E, n_words) int64`` returns the exact slot bitmaps of
    Bloom values (used for negated Bloom terms, and for all Bloom terms when ``exact``).
    """
    from .bloom import term_rows

    uniq: dict[str | None, int] = {}
    keys = [e if e is None or e.strip() else None for e in expressions]
    row_map = [uniq.setdefault(k, len(uniq)) for k in keys]
    programs = list(uniq)
    row_warn: list[list[str]] = []
    trees: list[tuple] = []
    for text in programs:
        warn: list[str] = []
        ast = parse(text)
        trees.append(_TRUE if ast is None else _nnf(ast, False, schema, warn))
        row_warn.append(warn)

    # distinct Bloom (feature, value) pairs: positive ones hashed, exact ones materialized
    hashed: dict[tuple[int, int], list[int]] = {}
    ext: dict[tuple[int, int], int] = {}

    def collect(node: tuple) -> tuple:
        _, f, v, neg = node
        if schema.bloom[f]:
            if neg or exact:
                ext.setdefault((f, v), len(ext) + 1)
            else:
                hashed.setdefault((f, v), [])
        return node

    for t in trees:
        _map_leaves(t, collect)
    if hashed:
        keys = list(hashed)
        pos = term_rows(
            torch.tensor([k[0] for k in keys]), torch.tensor([k[1] for k in keys]),
            schema.num_hashes, schema.width,
        )
        for k, p in zip(keys, pos.tolist()):
            hashed[k] = sorted({schema.bloom_base + q for q in p})

    def to_eval_leaf(node: tuple) -> tuple:
        _, f, v, neg = node
        if not schema.bloom[f]:
            return ("leaf", "row", schema.bitmap_base[f] + v, neg)
        if (f, v) in ext:
            return ("leaf", "ext", ext[(f, v)], neg)
        rows = [("leaf", "bloom", r, False) for r in hashed[(f, v)]]
        return rows[0] if len(rows) == 1 else ("and", rows)

    def to_verify_leaf(node: tuple) -> tuple:
        _, f, v, neg = node
        if schema.bloom[f]:
            return ("leaf", "term", (f, v), neg)
        return ("leaf", "bit", schema.bitmap_base[f] + v, neg)  # exact: test the bitmap bit

    lit_rows, ext_rows, reg_rows, roots, n_regs, exact_rows = [], [], [], [], 1, []
    v_bit, v_lit, v_reg, v_roots, v_n_regs = [], [], [], [], 1
    for t in trees:
        leaves, regs, nr, rx = _layout(_map_leaves(t, to_eval_leaf))
        exact_rows.append(not leaves.get("bloom"))
        lit = leaves.get("row", []) + leaves.get("bloom", [])
        lit_rows.append(sorted(lit, key=lambda s: s[1]))  # by register: aligns similar rows
        ext_rows.append(leaves.get("ext", []))
        reg_rows.append(regs)
        roots.append(rx)
        n_regs = max(n_regs, nr)
        vt = _map_leaves(t, to_verify_leaf)
        leaves, regs, nr, rx = _layout(vt)
        v_bit.append(leaves.get("bit", []))
        v_lit.append([(f, v, d, x) for (f, v), d, x in leaves.get("term", [])])
        v_reg.append(regs)
        v_roots.append(rx)
        v_n_regs = max(v_n_regs, nr)
    # an extra never-written register (all ones) is the source of padded register steps
    lit_src, lit_dst, lit_xor = _pad(lit_rows, 3, (schema.ones_row, 0, 0))
    ext_src, ext_dst, ext_xor = _pad(ext_rows, 3, (0, 0, 0))
    reg_src, reg_dst, reg_xor = _pad(reg_rows, 3, (n_regs, 0, 0))
    vbit_src, vbit_dst, vbit_xor = _pad(v_bit, 3, (schema.ones_row, 0, 0))
    v_feat, v_val, v_dst, v_xor = _pad(v_lit, 4, (0, -1, 0, -1))  # value -1: never found -> TRUE
    vreg_src, vreg_dst, vreg_xor = _pad(v_reg, 3, (v_n_regs, 0, 0))

    if ext:
        keys = sorted(ext, key=ext.get)
        rows = materialize([k[0] for k in keys], [k[1] for k in keys])
        ones = torch.full((1, n_words), -1, dtype=torch.int64, device=rows.device)
        extra = torch.cat([ones, rows], 0)
    else:
        extra = torch.full((1, n_words), -1, dtype=torch.int64)
    plan = FilterPlan(
        expressions=list(expressions),
        warnings=[list(row_warn[u]) for u in row_map],
        row_map=torch.tensor(row_map, dtype=torch.int64),
        lit_src=lit_src, lit_dst=lit_dst, lit_xor=lit_xor,
        lit_dst_uniform=_uniform(lit_dst),
        lit_xor_any=[bool(lit_xor[:, t].any()) for t in range(lit_xor.shape[1])],
        ext_src=ext_src, ext_dst=ext_dst, ext_xor=ext_xor,
        extra=extra,
        reg_src=reg_src, reg_dst=reg_dst, reg_xor=reg_xor,
        reg_dst_uniform=_uniform(reg_dst),
        root_xor=torch.tensor(roots, dtype=torch.int64),
        n_regs=n_regs + 1,
        vbit_src=vbit_src, vbit_dst=vbit_dst, vbit_xor=vbit_xor,
        v_feat=v_feat, v_val=v_val, v_dst=v_dst, v_xor=v_xor,
        vreg_src=vreg_src, vreg_dst=vreg_dst, vreg_xor=vreg_xor,
        v_root_xor=torch.tensor(v_roots, dtype=torch.int64),
        v_n_regs=v_n_regs + 1,
        row_exact=torch.tensor(exact_rows, dtype=torch.bool),
        n_words=n_words,
        exact=exact,
    )
    return plan.to(device)
