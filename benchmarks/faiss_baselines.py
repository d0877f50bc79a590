"""faiss-cpu baselines and exact ground truth (inner product, like the SilverTorch index)."""

from __future__ import annotations

import faiss
import numpy as np
import torch
from torch import Tensor

__all__ = ["build_faiss_ivf", "faiss_search", "faiss_filtered_search", "filter_bitmaps", "build_flat", "exact_topk",
           "recall_at_k", "per_query_recall", "FAISS_KINDS"]

FAISS_KINDS = ("IVF-Flat", "IVF-SQ8")


def build_faiss_ivf(vectors: Tensor, nlist: int, kinds: tuple[str, ...] = FAISS_KINDS,
                    seed: int = 0) -> dict[str, faiss.Index]:
    """Train one IVF coarse quantizer (faiss k-means, its defaults) and share it between an
    ``IndexIVFFlat`` and an ``IndexIVFScalarQuantizer(QT_8bit)``: same lists, two encodings."""
    x = np.ascontiguousarray(vectors.numpy(), dtype=np.float32)
    d = x.shape[1]
    quantizer = faiss.IndexFlatIP(d)
    out: dict[str, faiss.Index] = {}
    for kind in kinds:
        if kind == "IVF-Flat":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        elif kind == "IVF-SQ8":
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
        else:
            raise ValueError(f"unknown faiss kind {kind!r}, expected one of {FAISS_KINDS}")
        index.cp.seed = seed
        index.train(x)  # the k-means runs once: later indexes find the quantizer trained
        index.add(x)
        out[kind] = index
    out["_quantizer"] = quantizer  # keep the shared quantizer alive with its indexes
    return out


def faiss_search(index: faiss.Index, queries: Tensor, k: int, nprobe: int) -> tuple[Tensor, Tensor]:
    """``(scores (B, k) f32, ids (B, k) int64)`` with per-call ``SearchParametersIVF``."""
    q = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
    D, I = index.search(q, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
    return torch.from_numpy(D), torch.from_numpy(I)


def build_flat(vectors: Tensor) -> faiss.Index:
    """Exact inner-product index (faiss ``IndexFlatIP``, fp32): the recall ground truth."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors.numpy(), dtype=np.float32))
    return flat


def exact_topk(flat: faiss.Index, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of ``queries`` on a :func:`build_flat` index: ``(scores, ids)``."""
    D, I = flat.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), k)
    return torch.from_numpy(D), torch.from_numpy(I)


def per_query_recall(ids: Tensor, truth: Tensor, truth_counts: Tensor | None = None) -> Tensor:
    """``(B,) float64``: ``|ids ∩ truth| / min(k, matches)`` per query (−1 entries never count).

    ``truth_counts (B,)``: how many items qualify per query (filtered search); a query with none
    scores 1 when nothing is returned, so empty filters neither help nor hurt.
    """
    k = truth.shape[1]
    t = truth.masked_fill(truth < 0, -2)  # padding in the truth never matches padding in ids
    hits = (ids.unsqueeze(2) == t.unsqueeze(1)).any(2) & (ids >= 0)
    found = hits.sum(1).to(torch.float64)
    if truth_counts is None:
        return found / k
    denom = truth_counts.clamp(max=k).to(torch.float64)
    return torch.where(denom > 0, found / denom.clamp(min=1), torch.ones_like(found))


def recall_at_k(ids: Tensor, truth: Tensor, truth_counts: Tensor | None = None) -> float:
    """Mean of :func:`per_query_recall`."""
    return float(per_query_recall(ids, truth, truth_counts).mean())


def filter_bitmaps(masker, expressions: list[str]) -> dict[str, np.ndarray]:
    """One packed bitmap (bit ``i & 7`` of byte ``i >> 3`` = item ``i``) per distinct expression,
    the layout ``faiss.IDSelectorBitmap`` reads; built from the exact attribute masks."""
    return {e: np.packbits(masker.mask(e).numpy(), bitorder="little") for e in dict.fromkeys(expressions)}


def faiss_filtered_search(index: faiss.Index, queries: Tensor, expressions: list[str],
                          bitmaps: dict[str, np.ndarray], k: int, nprobe: int) -> tuple[Tensor, Tensor]:
    """faiss with a per-query filter: the queries sharing an expression go in one ``search`` call
    with ``SearchParametersIVF(nprobe, sel=IDSelectorBitmap)`` (faiss takes one selector per call)."""
    q = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
    D = np.empty((q.shape[0], k), dtype=np.float32)
    I = np.empty((q.shape[0], k), dtype=np.int64)
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(expressions):
        groups.setdefault(e, []).append(i)
    for e, rows in groups.items():
        bits = bitmaps[e]
        sel = faiss.IDSelectorBitmap(index.ntotal, faiss.swig_ptr(bits))
        r = np.asarray(rows)
        D[r], I[r] = index.search(q[r], k, params=faiss.SearchParametersIVF(nprobe=nprobe, sel=sel))
    return torch.from_numpy(D), torch.from_numpy(I)
