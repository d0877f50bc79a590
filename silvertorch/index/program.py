"""Run compiled :class:`~.plan.FilterPlan` programs: bit-word evaluation and exact verification.

Both are the same lockstep register machine (see :mod:`.plan`): every step is
``reg[dst[b]] &= src[b] ^ xor[b]`` for all rows ``b`` at once. Word evaluation runs it on int64
bit-words, chunked over words so the register file ``(R, rows, chunk)`` stays in cache and no
``(rows, terms, n_words)`` intermediate is ever materialized; verification runs it on ``(B, K)``
bools with a vectorized binary search of each candidate's sorted CSR values.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .plan import FilterPlan

__all__ = ["expand_rows", "run_words", "run_verify"]

_EVAL_FIELDS = (
    "lit_src", "lit_dst", "lit_xor", "ext_src", "ext_dst", "ext_xor",
    "reg_src", "reg_dst", "reg_xor", "root_xor",
)
_VERIFY_FIELDS = (
    "vbit_src", "vbit_dst", "vbit_xor", "v_feat", "v_val", "v_dst", "v_xor",
    "vreg_src", "vreg_dst", "vreg_xor", "v_root_xor",
)


def expand_rows(plan: FilterPlan, names: tuple[str, ...]) -> dict[str, Tensor]:
    """Program tensors of ``names`` re-indexed from unique programs to query rows (B, ...)."""
    return {n: getattr(plan, n).index_select(0, plan.row_map) for n in names}


def _run_chunk(
    prog: dict[str, Tensor],
    plan: FilterPlan,
    gather: Callable[[Tensor, Tensor], Tensor],
    table: Tensor,
    live: Tensor,
) -> Tensor:
    """One chunk: ``gather(table, rows (P,)) -> (P, C)``; ``live (P, C)`` or ``(C,)`` -> (P, C)."""
    n_rows = prog["root_xor"].numel()
    chunk = live.shape[-1]
    regs = torch.full((plan.n_regs, n_rows, chunk), -1, dtype=torch.int64, device=live.device)
    flat = regs.view(-1, chunk)
    ar = torch.arange(n_rows, device=live.device)

    def step(src: Tensor, dst: Tensor, xor: Tensor, uniform: int, negates: bool = True) -> None:
        if negates:
            src ^= xor[:, None]
        if uniform >= 0:  # every row writes the same register: a plain in-place AND
            regs[uniform] &= src
        else:
            idx = dst * n_rows + ar
            cur = flat.index_select(0, idx)
            cur &= src
            flat.index_copy_(0, idx, cur)

    for t in range(prog["ext_src"].shape[1]):
        step(gather(plan.extra, prog["ext_src"][:, t]), prog["ext_dst"][:, t],
             prog["ext_xor"][:, t], -1)
    for t in range(prog["lit_src"].shape[1]):
        step(gather(table, prog["lit_src"][:, t]), prog["lit_dst"][:, t],
             prog["lit_xor"][:, t], plan.lit_dst_uniform[t], plan.lit_xor_any[t])
    for t in range(prog["reg_src"].shape[1]):
        src = flat.index_select(0, prog["reg_src"][:, t] * n_rows + ar)
        step(src, prog["reg_dst"][:, t], prog["reg_xor"][:, t], plan.reg_dst_uniform[t])
    out = regs[0] ^ prog["root_xor"][:, None]
    out &= live
    return out


def run_words(
    plan: FilterPlan,
    table: Tensor,
    live_words: Tensor,
    words: Tensor | None,
    chunk_elements: int,
) -> Tensor:
    """Evaluate ``plan`` on the index ``table (R, n_words) int64``.

    ``words (B, W) int64`` (−1 = padding, result 0) -> ``(B, W) int64``; ``None`` -> all words,
    ``(B, n_words) int64``. With ``None`` each unique expression is evaluated once.
    """
    n_words = table.shape[1]
    if words is None:
        prog = {n: getattr(plan, n) for n in _EVAL_FIELDS}
        n_prog = plan.num_programs
        out = torch.empty(n_prog, n_words, dtype=torch.int64, device=table.device)
        step = max(64, chunk_elements // max(n_prog, 1))
        for w0 in range(0, n_words, step):
            w1 = min(n_words, w0 + step)

            def gather(src: Tensor, rows: Tensor, w0: int = w0, w1: int = w1) -> Tensor:
                return src[:, w0:w1].index_select(0, rows)

            out[:, w0:w1] = _run_chunk(prog, plan, gather, table, live_words[w0:w1])
        if n_prog == plan.num_rows and bool(
            (plan.row_map == torch.arange(n_prog, device=plan.row_map.device)).all()
        ):
            return out
        return out.index_select(0, plan.row_map)

    if words.dim() != 2 or words.shape[0] != plan.num_rows:
        raise ValueError(f"words must be (B={plan.num_rows}, W) int64, got {tuple(words.shape)}")
    if words.numel() and int(words.max()) >= n_words:
        raise ValueError(f"word index {int(words.max())} out of range [0, {n_words})")
    prog = expand_rows(plan, _EVAL_FIELDS)
    n_rows, n_cols = words.shape
    out = torch.empty(n_rows, n_cols, dtype=torch.int64, device=table.device)
    step = max(64, chunk_elements // max(n_rows, 1))
    for c0 in range(0, n_cols, step):
        wc = words[:, c0 : c0 + step].to(torch.int64)
        valid = wc >= 0
        wc = wc.clamp(min=0)
        live = torch.where(valid, live_words.take(wc), torch.zeros_like(wc))

        def gather(src: Tensor, rows: Tensor, wc: Tensor = wc) -> Tensor:
            return src.reshape(-1).take(rows[:, None] * src.shape[1] + wc)

        out[:, c0 : c0 + step] = _run_chunk(prog, plan, gather, table, live)
    return out


def _member(
    feat: Tensor, val: Tensor, slots: Tensor, csr_offsets: Tensor, csr_values: Tensor, max_len: int
) -> Tensor:
    """Does slot ``slots[b, k]`` carry value ``val[b]`` of feature ``feat[b]``? -> (B, K) bool.

    Each slot's values are sorted and distinct in the CSR, so a lower-bound binary search over
    ``[offsets[f, s], offsets[f, s+1])`` of ``max_len.bit_length()`` vectorized steps decides it.
    """
    nnz = csr_values.numel()
    if nnz == 0 or csr_offsets.shape[0] == 0:
        return torch.zeros(slots.shape, dtype=torch.bool, device=slots.device)
    v = val[:, None]
    pos = feat[:, None] * csr_offsets.shape[1] + slots
    flat = csr_offsets.reshape(-1)
    lo = flat.take(pos)
    hi = flat.take(pos + 1)
    end = hi
    for _ in range(max(1, max_len.bit_length())):
        active = lo < hi
        mid = (lo + hi) >> 1
        less = csr_values.take(mid.clamp(max=nnz - 1)) < v
        lo = torch.where(active & less, mid + 1, lo)
        hi = torch.where(active & ~less, mid, hi)
    return (lo < end) & (csr_values.take(lo.clamp(max=nnz - 1)) == v)


def run_verify(
    plan: FilterPlan,
    table: Tensor,
    csr_offsets: Tensor,
    csr_values: Tensor,
    max_len: int,
    live_words: Tensor,
    slots: Tensor,
) -> Tensor:
    """Exact evaluation of each row's expression on its candidates.

    ``csr_offsets (F, S+1) int64`` (global positions into ``csr_values (nnz,) int64``),
    ``slots (B, K) int64`` (−1 = padding) -> ``(B, K) bool``; padding and dead slots are False.
    """
    if slots.dim() != 2 or slots.shape[0] != plan.num_rows:
        raise ValueError(f"slots must be (B={plan.num_rows}, K) int64, got {tuple(slots.shape)}")
    prog = expand_rows(plan, _VERIFY_FIELDS)
    n_slots = csr_offsets.shape[1] - 1 if csr_offsets.dim() == 2 else live_words.numel() * 64
    slots = slots.to(torch.int64)
    valid = (slots >= 0) & (slots < n_slots)
    s = torch.where(valid, slots, torch.zeros_like(slots))
    n_rows, n_cand = slots.shape
    regs = torch.ones(plan.v_n_regs, n_rows, n_cand, dtype=torch.bool, device=slots.device)
    flat = regs.view(-1, n_cand)
    ar = torch.arange(n_rows, device=slots.device)

    def step(m: Tensor, dst: Tensor, xor: Tensor) -> None:
        m ^= (xor != 0)[:, None]
        idx = dst * n_rows + ar
        flat.index_copy_(0, idx, flat.index_select(0, idx) & m)

    n_words = table.shape[1]
    word, bit = s >> 6, s & 63
    for t in range(prog["vbit_src"].shape[1]):
        w = table.reshape(-1).take(prog["vbit_src"][:, t, None] * n_words + word)
        step(((w >> bit) & 1) != 0, prog["vbit_dst"][:, t], prog["vbit_xor"][:, t])
    for t in range(prog["v_feat"].shape[1]):
        m = _member(prog["v_feat"][:, t], prog["v_val"][:, t], s, csr_offsets, csr_values, max_len)
        step(m, prog["v_dst"][:, t], prog["v_xor"][:, t])
    for t in range(prog["vreg_src"].shape[1]):
        step(flat.index_select(0, prog["vreg_src"][:, t] * n_rows + ar),
             prog["vreg_dst"][:, t], prog["vreg_xor"][:, t])
    out = regs[0] ^ (prog["v_root_xor"] != 0)[:, None]
    alive = ((live_words.take(word) >> bit) & 1) != 0
    return out & valid & alive
