"""Storage dtypes for item vectors and the matching query preparation.

int8 is symmetric per row: ``scale = max|x| / 127`` and ``q = round(x / scale)`` in [-127, 127], so
``x ≈ q * scale``. Queries are quantized the same way, per row, at search time; a score is then the
int32 accumulation ``<q_item, q_query>`` times ``scale_item * scale_query``. fp32 / bf16 / fp16 store
the vectors as they are (scale 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "STORAGE_DTYPES", "parse_dtype", "quantize_rows_int8", "encode", "decode", "prepare_queries",
    "fake_quantize_int8_ste",
]

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "int8": torch.int8,
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A storage dtype from a name ("int8", "fp32", "bf16", "fp16") or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in STORAGE_DTYPES.values():
            raise ValueError(f"storage dtype {dtype} not supported; expected one of int8/fp32/bf16/fp16")
        return dtype
    try:
        return STORAGE_DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(
            f"storage dtype '{dtype}' not supported; expected one of int8, fp32, bf16, fp16"
        ) from None


def quantize_rows_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: ``x (n, d) f32 -> (q (n, d) int8, scale (n,) f32)``.

    An all-zero row gets scale 1 (its codes are all 0, so any scale is exact).
    """
    x = x.float()
    amax = x.abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0])
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def encode(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Item vectors into storage: ``x (n, d) f32 -> (vectors (n, d) dtype, scales (n,) f32)``."""
    if dtype == torch.int8:
        return quantize_rows_int8(x)
    return x.to(dtype).contiguous(), torch.ones(x.shape[0], dtype=torch.float32, device=x.device)


def decode(vectors: Tensor, scales: Tensor) -> Tensor:
    """Storage back to f32: ``(n, d) -> (n, d) f32`` (dequantized for int8)."""
    return vectors.float() * scales[:, None].float()


def prepare_queries(queries: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Queries in the compute dtype of a storage dtype: ``(B, d) f32 -> (q (B, d), qscale (B,) f32)``.

    int8 storage -> int8 queries quantized per row; bf16 -> bf16; fp16 and fp32 -> f32 (CPU fp16
    GEMMs are slow, fp32 accumulation is what the reference computes anyway).
    """
    if dtype == torch.int8:
        return quantize_rows_int8(queries)
    ones = torch.ones(queries.shape[0], dtype=torch.float32, device=queries.device)
    if dtype == torch.bfloat16:
        return queries.to(torch.bfloat16), ones
    return queries.float(), ones


def fake_quantize_int8_ste(x: Tensor) -> Tensor:
    """Quantization-aware training: ``x (N, d) float -> (N, d)`` same dtype, straight-through.

    The forward value is exactly ``decode(*quantize_rows_int8(x))`` (per-row symmetric int8, what an
    int8 index stores and what ``RetrievalModel`` scores); the gradient is the identity, so the item
    tower learns vectors that survive quantization. Works on any device; keeps ``x``'s dtype.
    """
    if x.dim() != 2:
        raise ValueError(f"fake_quantize_int8_ste expects (N, d), got {tuple(x.shape)}")
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True) if x.shape[1] else torch.zeros_like(xf[:, :1])
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    dq = torch.round(xf / scale).clamp(-127, 127) * scale
    return x + (dq.to(x.dtype) - x).detach()
