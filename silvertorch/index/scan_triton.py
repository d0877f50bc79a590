"""Triton scan for CUDA: one program per (query, probe, slot block) scores a block of slots, rescales
and applies the liveness / eligibility bits in one pass, writing the dense candidate matrix
``(B, P * Lmax)`` that :func:`scan_reference` defines. Imported lazily (``import triton`` only here);
runs under ``TRITON_INTERPRET=1`` on CPU tensors for tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

__all__ = ["scan_triton"]


@triton.jit
def _scan_kernel(
    vec_ptr, scale_ptr, off_ptr, live_ptr, q_ptr, qscale_ptr, probe_ptr, words_ptr,
    out_s_ptr, out_i_ptr,
    P, LMAX, WC, D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_INT8: tl.constexpr, HAS_WORDS: tl.constexpr,
):
    pid_pair = tl.program_id(0)  # b * P + r
    pid_blk = tl.program_id(1)
    b = pid_pair // P
    c = tl.load(probe_ptr + pid_pair)
    start = tl.load(off_ptr + c)
    span = tl.load(off_ptr + c + 1) - start
    l = pid_blk * BLOCK_L + tl.arange(0, BLOCK_L)
    inside = l < span
    slot = start + l
    dd = tl.arange(0, BLOCK_D)
    if IS_INT8:
        acc = tl.zeros([BLOCK_L], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dm = (d0 + dd) < D
        x = tl.load(vec_ptr + slot[:, None] * D + (d0 + dd)[None, :], mask=inside[:, None] & dm[None, :], other=0)
        qv = tl.load(q_ptr + b * D + d0 + dd, mask=dm, other=0)
        if IS_INT8:
            acc += tl.sum(x.to(tl.int32) * qv.to(tl.int32)[None, :], axis=1)
        else:
            acc += tl.sum(x.to(tl.float32) * qv.to(tl.float32)[None, :], axis=1)
    score = acc.to(tl.float32)
    if IS_INT8:
        score = score * tl.load(qscale_ptr + b) * tl.load(scale_ptr + slot, mask=inside, other=0.0)
    lw = tl.load(live_ptr + (slot >> 6), mask=inside, other=0)
    ok = inside & (((lw >> (slot & 63)) & 1) == 1)
    if HAS_WORDS:
        w = l >> 6
        ew = tl.load(words_ptr + pid_pair * WC + w, mask=inside & (w < WC), other=0)
        ok = ok & (((ew >> (l & 63)) & 1) == 1)
    dst = pid_pair * LMAX + l
    keep = l < LMAX
    tl.store(out_s_ptr + dst, tl.where(ok, score, float("-inf")), mask=keep)
    tl.store(out_i_ptr + dst, tl.where(ok, slot, -1), mask=keep)


def scan_triton(
    vectors: Tensor,
    scales: Tensor,
    cluster_offsets: Tensor,
    live_words: Tensor,
    q: Tensor,
    qscale: Tensor,
    probes: Tensor,
    pair_words: Tensor | None = None,
    block_l: int = 64,
) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`silvertorch.index.scan.scan_reference`:
    ``-> scores (B, P * Lmax) f32, slots (B, P * Lmax) int64`` (``-inf`` / ``-1`` non-candidates)."""
    B, P = probes.shape
    d = vectors.shape[1]
    spans = (cluster_offsets[1:] - cluster_offsets[:-1])[probes]
    lmax = int(spans.max()) if spans.numel() else 0
    out_s = torch.empty(B, P * lmax, dtype=torch.float32, device=q.device)
    out_i = torch.empty(B, P * lmax, dtype=torch.int64, device=q.device)
    if B * P * lmax == 0:
        return out_s, out_i
    is_int8 = vectors.dtype == torch.int8
    qk = q if is_int8 else q.float()
    words = pair_words.contiguous() if pair_words is not None else live_words
    wc = pair_words.shape[2] if pair_words is not None else 1
    grid = (B * P, triton.cdiv(lmax, block_l))
    _scan_kernel[grid](
        vectors.contiguous(), scales.contiguous(), cluster_offsets.contiguous(), live_words.contiguous(),
        qk.contiguous(), qscale.contiguous(), probes.contiguous(), words,
        out_s, out_i, P, lmax, wc, D=d, BLOCK_L=block_l,
        BLOCK_D=min(64, triton.next_power_of_2(d)), IS_INT8=is_int8, HAS_WORDS=pair_words is not None,
    )
    return out_s, out_i
