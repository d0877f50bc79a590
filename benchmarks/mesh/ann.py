"""The ANN + eligibility service: ``POST /v1/search`` (query vectors, filters) -> candidate ids.

The faiss index is built from the artifact's own IVF: its centroids (in a ``IndexFlatIP`` coarse
quantizer) and its cluster assignment (each stored item is added to the list of the cluster that
holds it in the artifact), so both systems probe the same clusters:

- ``ann="flat"``: ``IndexIVFFlat`` over the artifact's stored vectors, dequantized (int8 codes x
  per-item scale; fp32 as stored). For an int8 artifact the query is quantized per row like
  SilverTorch's int8 path (``quantize_rows_int8``), so scores equal SilverTorch's
  ``acc * qscale * scale`` up to float rounding: the same candidates.
- ``ann="sq8"``: ``IndexIVFScalarQuantizer(QT_8bit, by_residual=False)`` trained on those vectors:
  1 byte per dimension like our int8, but faiss's per-dimension ranges (recall measured).

Probing is done here exactly as SilverTorch does it (``q @ centroids.T``, top ``nprobe``; cosine
artifacts normalize the query), then ``search_preassigned``. Filtered rows with
``min_candidates_factor > 0`` and an artifact that carries per-cluster value histograms probe with
SilverTorch's own selectivity-aware selection (:func:`silvertorch.index.selectivity.probe_for_filter`
on the compiled filter: more clusters, in centroid order, until ``factor * k`` eligible items are
expected); padding probes are ``-1``, which faiss skips. ``nprobe >= nlist`` probes every list:
the exhaustive (exact) search. Filters: the inverted index (:mod:`.inverted_index`) gives an item
bitmap per distinct expression in the batch, handed to faiss as ``IDSelectorBitmap`` in
``SearchParametersIVF``: the scan skips ineligible ids, so no over-fetch is needed.

Request: ``query (B, D) f32``, ``params (3,) int64 = [k, nprobe, 0]``, ``filter_blob`` /
``filter_offsets`` (one expression per row, "" = none; :func:`.protocol.pack_strings`).
Response: ``ids (B, k) int64`` (-1 padding), ``scores (B, k) f32`` (-inf padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch

from silvertorch.index.quantize import decode, quantize_rows_int8
from silvertorch.index.search import ItemIndex
from silvertorch.index.selectivity import probe_for_filter

from .inverted_index import InvertedIndex
from .protocol import ProtocolError, require, unpack_strings
from .service import BinaryService

__all__ = ["AnnService", "SearchItem", "build_faiss_index"]


#: stored items decoded to float32 per ``add_core`` call (256 MiB at d = 64): the decoded catalog
#: is never held whole next to the faiss lists (at 10M items it would be 2.6 GB more at start-up)
ADD_CHUNK = 1 << 20


def build_faiss_index(index: ItemIndex, kind: str, chunk: int = ADD_CHUNK) -> faiss.IndexIVF:
    """A faiss IVF index with the artifact's centroids and cluster assignment (see module doc),
    filled ``chunk`` stored items at a time."""
    ivf = index.ivf
    if ivf.has_fresh:
        raise ValueError("the index has a fresh region (streaming inserts): compact it first "
                         "(silvertorch.catalog.compact_state); the faiss lists hold clustered items only")
    C, d = ivf.centroids.shape
    slot_ids = ivf.slot_ids
    live = torch.nonzero(slot_ids >= 0).flatten()  # the stored slots of live items, in slot order
    cluster_of_slot = torch.repeat_interleave(torch.arange(C, dtype=torch.int64),
                                              torch.diff(ivf.cluster_offsets))

    def decoded(slots: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(decode(ivf.vectors[slots], ivf.scales[slots]).numpy(), dtype=np.float32)

    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(np.ascontiguousarray(ivf.centroids.numpy(), dtype=np.float32))
    if kind == "flat":
        out = faiss.IndexIVFFlat(quantizer, d, C, faiss.METRIC_INNER_PRODUCT)
    elif kind == "sq8":
        out = faiss.IndexIVFScalarQuantizer(quantizer, d, C, faiss.ScalarQuantizer.QT_8bit,
                                            faiss.METRIC_INNER_PRODUCT, False)
        # the scalar quantizer's per-dimension ranges only (the coarse quantizer is already full),
        # by faiss's own training (which subsamples further) on at most ``chunk`` stored vectors: the
        # whole catalog when it fits (up to 1M items), else a seeded uniform sample of it
        sample = live
        if live.numel() > chunk:
            pick = torch.randperm(live.numel(), generator=torch.Generator().manual_seed(0))[:chunk]
            sample = live[pick.sort().values]
        out.train(decoded(sample))
    else:
        raise ValueError(f"ann kind must be 'flat' or 'sq8', got {kind!r}")
    out.is_trained = True
    for s in range(0, live.numel(), chunk):
        slots = live[s : s + chunk]
        x = decoded(slots)
        ids = np.ascontiguousarray(slot_ids[slots].numpy())
        assign = np.ascontiguousarray(cluster_of_slot[slots].numpy())
        out.add_core(x.shape[0], faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(assign))
    # (faiss's Python constructor keeps a reference to the quantizer: it lives as long as ``out``)
    return out


@dataclass
class SearchItem:
    query: np.ndarray  # (B, D) f32
    k: int
    nprobe: int
    filters: list[str]


class AnnService(BinaryService[SearchItem]):
    name = "ann"

    def __init__(self, index: ItemIndex, num_items: int, kind: str, max_k: int, *,
                 min_candidates_factor: float = 0.0, max_nprobe: int = 0) -> None:
        """``min_candidates_factor`` / ``max_nprobe``: the artifact's ``RetrievalConfig`` values
        (selectivity-aware probing of filtered rows; 0 = fixed ``nprobe``, as SilverTorch)."""
        if min_candidates_factor < 0 or max_nprobe < 0:
            raise ValueError("min_candidates_factor and max_nprobe must be >= 0, got "
                             f"{min_candidates_factor} and {max_nprobe}")
        ivf = index.ivf
        self.index = index
        self.min_candidates_factor, self.max_nprobe = float(min_candidates_factor), int(max_nprobe)
        self.dim, self.nlist = ivf.dim, ivf.nlist
        self.cosine = ivf.metric == "cosine"
        self.int8 = ivf.storage_dtype == torch.int8 and kind == "flat"
        self.centroids = ivf.centroids.float().contiguous()
        self.faiss = build_faiss_index(index, kind)
        self.max_k = max_k
        self.elig = None
        if index.eligibility is not None:
            self.elig = InvertedIndex(index.eligibility, ivf.slot_ids.numpy(), num_items)

    def parse(self, arrays: dict[str, np.ndarray]) -> SearchItem:
        q = require(arrays, "query", "float32", 2)
        params = require(arrays, "params", "int64", 1)
        if q.shape[1] != self.dim or q.shape[0] == 0:
            raise ProtocolError(f"query must be (B >= 1, {self.dim}) float32, got {q.shape}")
        if not np.isfinite(q).all():
            raise ValueError("query contains NaN or inf")
        if params.shape != (3,):
            raise ProtocolError(f"params must be (3,) int64 [k, nprobe, 0], got {params.shape}")
        k, nprobe = int(params[0]), int(params[1])
        if not 1 <= k <= self.max_k:
            raise ValueError(f"k must lie in [1, {self.max_k}], got {k}")
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        filters = [""] * q.shape[0]
        if "filter_offsets" in arrays:
            filters = unpack_strings(require(arrays, "filter_blob", "uint8", 1),
                                     require(arrays, "filter_offsets", "int64", 1))
            if len(filters) != q.shape[0]:
                raise ProtocolError(f"{len(filters)} filter expressions for {q.shape[0]} queries")
            if any(filters) and self.elig is None:
                raise ValueError("a filter was given but the artifact has no item attributes")
            for f in set(filters):
                if f:
                    self.elig.check(f)  # FilterSyntaxError (a ValueError) names the position
        return SearchItem(q, k, min(nprobe, self.nlist), filters)

    def key(self, item: SearchItem) -> tuple[int, int]:
        return (item.k, item.nprobe)

    def rows(self, item: SearchItem) -> int:
        return item.query.shape[0]

    @torch.no_grad()
    def search(self, query: np.ndarray, k: int, nprobe: int, filters: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(B, D)`` -> ``ids (B, k) int64``, ``scores (B, k) f32`` (the batch's work)."""
        q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
        if self.cosine:
            q = torch.nn.functional.normalize(q, dim=1)
        sims = q @ self.centroids.T
        if nprobe >= self.nlist:
            dq, iq = torch.sort(sims, dim=1, descending=True)
        else:
            dq, iq = torch.topk(sims, nprobe, dim=1)
        if self.min_candidates_factor > 0 and any(filters) and self.index.has_histograms:
            ivf, plan = self.index.ivf, self.index.eligibility.compile(filters)
            iq = probe_for_filter(q, ivf.centroids, ivf.cluster_offsets, ivf.live_words,
                                  self.index.selectivity, self.index.eligibility.feat_info, plan,
                                  nprobe, torch.full((q.shape[0],), k, dtype=torch.int64),
                                  self.min_candidates_factor, self.max_nprobe)
            dq = torch.where(iq >= 0, sims.gather(1, iq.clamp_min(0)), float("-inf"))
        if self.int8:  # the query SilverTorch's int8 scan effectively uses
            codes, scale = quantize_rows_int8(q)
            q = codes.float() * scale[:, None]
        x = np.ascontiguousarray(q.numpy(), dtype=np.float32)
        iq, dq = iq.numpy().astype(np.int64), np.ascontiguousarray(dq.numpy(), dtype=np.float32)
        B = x.shape[0]
        ids = np.full((B, k), -1, dtype=np.int64)
        scores = np.full((B, k), -np.inf, dtype=np.float32)
        groups: dict[str, list[int]] = {}
        for r, f in enumerate(filters):
            groups.setdefault(f, []).append(r)
        for expr, rows in groups.items():
            params = faiss.SearchParametersIVF(nprobe=iq.shape[1])
            sel = None
            if expr:
                sel = faiss.IDSelectorBitmap(InvertedIndex.bitmap(self.elig.mask(expr)))
                params.sel = sel
            r = np.asarray(rows)
            xr, iqr, dqr = (np.ascontiguousarray(a[r]) for a in (x, iq, dq))
            D = np.empty((len(rows), k), dtype=np.float32)
            I = np.empty((len(rows), k), dtype=np.int64)
            # the C++ call: the Python wrapper of search_preassigned takes no SearchParameters
            self.faiss.search_preassigned_c(len(rows), faiss.swig_ptr(xr), k, faiss.swig_ptr(iqr),
                                            faiss.swig_ptr(dqr), faiss.swig_ptr(D), faiss.swig_ptr(I),
                                            False, params)
            del sel
            ids[r] = I
            scores[r] = np.where(I >= 0, D, -np.inf)
        return ids, scores

    def run(self, items: list[SearchItem]) -> list[dict[str, np.ndarray]]:
        k, nprobe = items[0].k, items[0].nprobe
        query = np.concatenate([it.query for it in items])
        filters = [f for it in items for f in it.filters]
        ids, scores = self.search(query, k, nprobe, filters)
        out, pos = [], 0
        for it in items:
            n = it.query.shape[0]
            out.append({"ids": ids[pos : pos + n], "scores": scores[pos : pos + n]})
            pos += n
        return out
