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

__all__ = ["expand_rows", "run_words", "run_runs", "run_verify"]

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


# ---- contiguous word runs (probe-then-filter) ---------------------------------------------------
_RUNS_CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

// out[k, i] = program pair_prog[k] evaluated on word first[k] + i, i < count[k] (the rest set to 0).
// The same lockstep register machine as the torch path (ext, then lit, then reg steps, each
// reg[dst] &= src ^ xor; result reg[0] ^ root_xor, & live), fused per block of 64 words.
void eval_runs(torch::Tensor table, torch::Tensor extra, torch::Tensor live,
               torch::Tensor ext_src, torch::Tensor ext_dst, torch::Tensor ext_xor,
               torch::Tensor lit_src, torch::Tensor lit_dst, torch::Tensor lit_xor,
               torch::Tensor reg_src, torch::Tensor reg_dst, torch::Tensor reg_xor,
               torch::Tensor root_xor, torch::Tensor pair_prog, torch::Tensor first,
               torch::Tensor count, torch::Tensor out, int64_t n_regs) {
  const int64_t* T = table.data_ptr<int64_t>();
  const int64_t* X = extra.data_ptr<int64_t>();
  const int64_t* LV = live.data_ptr<int64_t>();
  const int64_t tw = table.size(1), xw = extra.size(1);
  const int64_t L0 = ext_src.size(1), L1 = lit_src.size(1), L2 = reg_src.size(1);
  const int64_t *es = ext_src.data_ptr<int64_t>(), *ed = ext_dst.data_ptr<int64_t>(), *ex = ext_xor.data_ptr<int64_t>();
  const int64_t *ls = lit_src.data_ptr<int64_t>(), *ld = lit_dst.data_ptr<int64_t>(), *lx = lit_xor.data_ptr<int64_t>();
  const int64_t *rs = reg_src.data_ptr<int64_t>(), *rd = reg_dst.data_ptr<int64_t>(), *rx = reg_xor.data_ptr<int64_t>();
  const int64_t* root = root_xor.data_ptr<int64_t>();
  const int64_t *pp = pair_prog.data_ptr<int64_t>(), *fs = first.data_ptr<int64_t>(), *cn = count.data_ptr<int64_t>();
  int64_t* O = out.data_ptr<int64_t>();
  const int64_t K = pair_prog.size(0), W = out.size(1);
  constexpr int64_t BLK = 64;
  at::parallel_for(0, K, 16, [&](int64_t b, int64_t e) {
    std::vector<int64_t> regs(std::max<int64_t>(n_regs, 1) * BLK);
    for (int64_t k = b; k < e; ++k) {
      const int64_t u = pp[k], f = fs[k], n = std::min(cn[k], W);
      std::fill(O + k * W + n, O + (k + 1) * W, (int64_t)0);
      for (int64_t w0 = 0; w0 < n; w0 += BLK) {
        const int64_t m = std::min(BLK, n - w0);
        for (int64_t r = 0; r < n_regs; ++r) std::fill(regs.data() + r * BLK, regs.data() + r * BLK + m, (int64_t)-1);
        for (int64_t t = 0; t < L0; ++t) {
          const int64_t* src = X + es[u * L0 + t] * xw + f + w0;
          int64_t* r = regs.data() + ed[u * L0 + t] * BLK;
          const int64_t x = ex[u * L0 + t];
          for (int64_t i = 0; i < m; ++i) r[i] &= src[i] ^ x;
        }
        for (int64_t t = 0; t < L1; ++t) {
          const int64_t* src = T + ls[u * L1 + t] * tw + f + w0;
          int64_t* r = regs.data() + ld[u * L1 + t] * BLK;
          const int64_t x = lx[u * L1 + t];
          for (int64_t i = 0; i < m; ++i) r[i] &= src[i] ^ x;
        }
        for (int64_t t = 0; t < L2; ++t) {
          const int64_t* src = regs.data() + rs[u * L2 + t] * BLK;
          int64_t* r = regs.data() + rd[u * L2 + t] * BLK;
          const int64_t x = rx[u * L2 + t];
          if (src == r) { for (int64_t i = 0; i < m; ++i) r[i] &= r[i] ^ x; }
          else { for (int64_t i = 0; i < m; ++i) r[i] &= src[i] ^ x; }
        }
        int64_t* o = O + k * W + w0;
        const int64_t* lv = LV + f + w0;
        for (int64_t i = 0; i < m; ++i) o[i] = (regs[i] ^ root[u]) & lv[i];
      }
    }
  });
}
"""
_RUNS_STATE: dict[str, object] = {}


def _runs_ext():
    """The fused run evaluator (built once, cached like the scan extension); ``None`` if unavailable."""
    if "mod" not in _RUNS_STATE:
        mod = None
        import os

        if os.environ.get("SILVERTORCH_NO_EXT", "") in ("", "0"):
            try:
                import hashlib

                from torch.utils.cpp_extension import load_inline

                from .scan_cpu_ext import _arch, _cpu_tag

                root = os.environ.get("SILVERTORCH_EXT_DIR") or os.path.join(
                    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "silvertorch", "ext")
                tag = hashlib.sha1(_RUNS_CPP.encode()).hexdigest()[:8]
                tv = torch.__version__.replace("+", "_").replace(".", "_")
                build = os.path.join(root, f"filter_runs_{tv}_{_arch()}_{_cpu_tag()}_{tag}")
                os.makedirs(build, exist_ok=True)
                mod = load_inline(name="silvertorch_filter_runs", cpp_sources=[_RUNS_CPP], functions=["eval_runs"],
                                  extra_cflags=["-O3", f"-march={_arch()}", "-std=c++17", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"], build_directory=build)
            except Exception:  # no compiler / build error: the torch path below
                mod = None
        _RUNS_STATE["mod"] = mod
    return _RUNS_STATE["mod"]


def run_runs(
    plan: FilterPlan,
    table: Tensor,
    live_words: Tensor,
    programs: Tensor,
    first: Tensor,
    count: Tensor,
    width: int,
    chunk_elements: int,
) -> Tensor:
    """Evaluate program ``programs[k]`` on the contiguous words ``first[k] + [0, count[k])``.

    -> ``(K, width) int64`` (words beyond ``count[k]`` are 0). Same bits as :func:`run_words` on
    those word indices: a fused C++ loop on CPU when it can be built, else :func:`run_words` on
    runs grouped by length (buckets of at most twice the length, so padding stays small).
    """
    K = programs.numel()
    mod = _runs_ext() if table.device.type == "cpu" and K and width else None
    if mod is not None:
        out = torch.empty(K, width, dtype=torch.int64, device=table.device)  # the kernel zero-fills the tail
        c = lambda t: t.to(torch.int64).contiguous()  # noqa: E731
        mod.eval_runs(c(table), c(plan.extra), c(live_words), c(plan.ext_src), c(plan.ext_dst), c(plan.ext_xor),
                      c(plan.lit_src), c(plan.lit_dst), c(plan.lit_xor), c(plan.reg_src), c(plan.reg_dst),
                      c(plan.reg_xor), c(plan.root_xor), c(programs), c(first), c(count), out, int(plan.n_regs))
        return out
    from dataclasses import replace

    out = torch.zeros(K, width, dtype=torch.int64, device=table.device)
    lo = 0
    while lo < width:  # buckets of run lengths (lo, hi]: hi <= max(8, 2 * lo)
        hi = min(max(8, 2 * lo), width)
        in_bucket = (count <= hi) if lo == 0 else (count > lo) & (count <= hi)
        sel = torch.nonzero(in_bucket).flatten()
        lo = hi
        if sel.numel() == 0:
            continue
        w = torch.arange(hi, device=table.device)
        words = torch.where(w < count[sel, None], first[sel, None] + w, -1)
        sub = replace(plan, row_map=programs[sel], warnings=[])
        out[sel, :hi] = run_words(sub, table, live_words, words, chunk_elements)
    return out
