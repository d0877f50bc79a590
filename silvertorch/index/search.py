"""Faiss-style search over an IVF index with an optional eligibility filter.

``ItemIndex.search(queries (B, d) f32, k, params=None) -> (scores (B, k) f32, ids (B, k) int64)``:
rows sorted best first; where fewer than ``k`` items qualify (small catalog, selective filter, per-row
``params.k``) the row is padded with ``-inf`` / ``-1``. ``SearchParams`` is per call; the index is
never mutated by a search (only ``last_stats`` is refreshed).

A fresh segment (streaming updates, see :mod:`silvertorch.index.fresh`) is one extra cluster after
the main ones that every IVF search probes in addition to its ``nprobe`` nearest; exact search scans
every slot anyway. The scan, the filter and the verification treat it like any other cluster.

Selectivity-aware probing (:mod:`silvertorch.index.selectivity`): with a filter and
``params.min_candidates_factor > 0``, a query probes its ``nprobe`` nearest clusters and then more, in
centroid order, until the estimated eligible items of its probed clusters reach
``min_candidates_factor * k`` (at most ``params.max_nprobe``); rows of a batch are padded with an
empty cluster, so each query's answer is the one it gets alone. Needs the index's per-cluster
value histograms (``ItemIndex.selectivity``, built with the eligibility index); without them, or
unfiltered, the probe is the fixed ``nprobe`` one.

Probe-then-filter: the filter is evaluated only on the words of each query's probed clusters
(cluster ``c`` owns words ``[cluster_offsets[c] // 64, cluster_offsets[c+1] // 64)``), and
:class:`SearchStats` reports those words against the whole catalog.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .attributes import ItemAttributes
from .ivf import IVFIndex
from .kmeans import KMeansConfig
from .layout import SLOT_ALIGN, unpack_words
from .quantize import prepare_queries
from .scan import ScanStats, scan_fast, scan_reference
from .selectivity import DEFAULT_BUDGET_BYTES, ClusterHistogram, probe_for_filter

__all__ = ["SearchParams", "SearchStats", "ItemIndex", "select"]

Engine = Literal["auto", "ext", "fast", "reference", "triton"]


def select(scores: Tensor, k: int | Tensor, payload: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-k per row (``silvertorch.index.topk.select_topk`` when present, else ``torch.topk``).

    ``scores (B, L) f32``, ``k`` int or ``(B,) int64``, ``payload (B, L) int64`` ->
    ``(B, kmax) f32``, ``(B, kmax) int64`` padded with ``-inf`` / ``-1``.
    """
    try:
        from .topk import select_topk
    except ImportError:  # pragma: no cover - the selection module ships with the package
        select_topk = None
    if select_topk is not None:
        return select_topk(scores, k, payload)
    kmax = int(k) if isinstance(k, int) else int(k.max())
    B, L = scores.shape
    v, c = torch.topk(scores, min(kmax, L), dim=1)
    ids = payload.gather(1, c) if payload is not None else c
    bad = v == float("-inf")
    if not isinstance(k, int):
        bad |= torch.arange(v.shape[1], device=v.device)[None, :] >= k[:, None]
    v, ids = v.masked_fill(bad, float("-inf")), ids.masked_fill(bad, -1)
    pad = kmax - v.shape[1]
    return nn.functional.pad(v, (0, pad), value=float("-inf")), nn.functional.pad(ids, (0, pad), value=-1)


@dataclass(kw_only=True)
class SearchParams:
    """Per-call search parameters.

    - ``nprobe``: clusters scanned per query (clamped to ``nlist``).
    - ``filter``: a compiled ``FilterPlan`` or one expression per query row (``None``/"" = all);
      a single-element list applies to every row.
    - ``k``: optional ``(B,) int64`` per-row k, each in ``[1, k]``; row ``b`` is padded after ``k[b]``.
    - ``verify``: check the filter exactly on the final candidates (drops Bloom false positives).
    - ``exact``: brute force over every slot (ground truth / small catalogs), ignores ``nprobe``.
    - ``engine``: scan implementation: ``"ext"`` the fused C++ CPU kernel (``scan_cpu_ext``; the
      torch path with a one-time warning when it cannot be built), ``"fast"`` the torch cluster-major
      path, ``"reference"`` the plain-torch loop, ``"triton"`` the GPU kernel; ``"auto"`` = Triton on
      CUDA, ``"ext"`` on CPU when the extension is built, ``"fast"`` otherwise.
    - ``min_candidates_factor``: selectivity-aware probing of filtered queries (module doc): probe
      more clusters until the estimated eligible items reach ``min_candidates_factor * k``;
      0 = off (fixed ``nprobe``). Unfiltered queries always probe ``nprobe``.
    - ``max_nprobe``: the most clusters selectivity-aware probing may probe (0 = ``nlist``).
    """

    nprobe: int = 16
    filter: Any = None
    k: Tensor | None = None
    verify: bool = True
    exact: bool = False
    engine: Engine = "auto"
    int8_engine: Literal["intmm", "bmm"] = "intmm"
    min_candidates_factor: float = 0.0
    max_nprobe: int = 0


@dataclass
class SearchStats:
    """Work done by the last search (filter words evaluated vs. the whole catalog)."""

    queries: int = 0
    words_evaluated: int = 0  # filter words computed, summed over queries
    words_total: int = 0  # queries x words of the catalog (what filter-everything computes)
    candidates: int = 0
    scan: ScanStats = field(default_factory=ScanStats)

    @property
    def filter_work_saved(self) -> float:
        """``words_total / words_evaluated`` (inf when nothing was evaluated)."""
        return self.words_total / self.words_evaluated if self.words_evaluated else float("inf")


class ItemIndex(nn.Module):
    """The item side of retrieval: :class:`IVFIndex` (+ optional ``EligibilityIndex`` and its
    per-cluster value histograms ``selectivity``, a :class:`ClusterHistogram`) as buffers."""

    def __init__(self, ivf: IVFIndex, eligibility: nn.Module | None = None,
                 selectivity: ClusterHistogram | None = None) -> None:
        super().__init__()
        if selectivity is not None and eligibility is None:
            raise ValueError("selectivity histograms need an eligibility index (item attributes)")
        self.ivf = ivf
        self.eligibility = eligibility
        self.selectivity = selectivity
        self.last_stats = SearchStats()

    @classmethod
    def build(
        cls,
        vectors: Tensor,
        ids: Tensor | None = None,
        attributes: ItemAttributes | None = None,
        *,
        nlist: int = 1024,
        dtype: str | torch.dtype = "int8",
        metric: str = "ip",
        seed: int = 0,
        kmeans_config: KMeansConfig | None = None,
        eligibility_config: Any = None,
        histogram_budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
    ) -> ItemIndex:
        """Build from ``vectors (N, d) f32``, ``ids (N,) int64`` (default ``arange(N)``) and
        ``attributes`` of the same ``N`` items (row ``i`` = item ``i``), re-ordered into slots.

        With attributes, per-cluster value histograms (selectivity-aware probing) are built for the
        lowest-cardinality features within ``histogram_budget_bytes`` (None = no histograms)."""
        if attributes is not None and attributes.num_items != vectors.shape[0]:
            raise ValueError(
                f"attributes cover {attributes.num_items} items, vectors have {vectors.shape[0]}"
            )
        ivf = IVFIndex.build(vectors, ids, nlist=nlist, dtype=dtype, metric=metric, seed=seed,
                             kmeans_config=kmeans_config)
        elig = None
        if attributes is not None:
            from .eligibility import EligibilityIndex

            rows = _slot_rows(ivf, ids, vectors.shape[0])
            elig = EligibilityIndex.build(attributes.take(rows), eligibility_config, live=rows >= 0)
        hist = None
        if elig is not None and histogram_budget_bytes is not None:
            hist = ClusterHistogram.build(ivf.cluster_offsets, ivf.live_words, elig, ivf.nlist,
                                          budget_bytes=histogram_budget_bytes)
        return cls(ivf, elig, hist)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], assign: bool = False) -> ItemIndex:
        """An index of the right sizes for ``state`` (from ``state_dict()``), loaded (``assign``:
        holding ``state``'s tensors themselves, as ``nn.Module.load_state_dict(assign=True)``)."""
        ivf = IVFIndex.from_state_dict(state, "ivf.", assign=assign)
        elig = None
        if any(k.startswith("eligibility.") for k in state):
            from .eligibility import EligibilityIndex

            elig = EligibilityIndex()
        hist = ClusterHistogram() if elig is not None and any(k.startswith("selectivity.") for k in state) else None
        index = cls(ivf, elig, hist)
        index.load_state_dict(state, assign=assign)
        return index

    # ------------------------------------------------------------------------------ search
    def search(self, queries: Tensor, k: int, params: SearchParams | None = None) -> tuple[Tensor, Tensor]:
        """``queries (B, d) f32`` -> ``scores (B, k) f32``, ``ids (B, k) int64`` (see module doc)."""
        scores, ids, _ = self.search_with_stats(queries, k, params)
        return scores, ids

    @torch.no_grad()
    def search_with_stats(
        self, queries: Tensor, k: int, params: SearchParams | None = None
    ) -> tuple[Tensor, Tensor, SearchStats]:
        """:meth:`search` plus the :class:`SearchStats` of this call."""
        p = params or SearchParams()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        ivf = self.ivf
        q = ivf.prepare(queries)
        B, dev = q.shape[0], q.device
        k_rows = self._row_k(p.k, k, B)
        stats = SearchStats(queries=B, words_total=B * (ivf.num_slots // SLOT_ALIGN))
        plan = self._plan(p.filter, B)
        need_verify = plan is not None and p.verify and not self.eligibility.is_exact(plan)
        k_scan = k_rows if not need_verify else (2 * k_rows + 32)
        if B == 0 or ivf.num_slots == 0:  # (an index of dead slots only scans to -1 ids below)
            self.last_stats = stats
            return torch.full((B, k), float("-inf"), device=dev), torch.full((B, k), -1, dtype=torch.int64, device=dev), stats
        qc, qscale = prepare_queries(q, ivf.storage_dtype)
        if p.exact:
            cand_s, cand_slot = self._scan_exact(qc, qscale, plan, k_scan, stats)
        else:
            cand_s, cand_slot = self._scan_ivf(q, qc, qscale, plan, k_scan, p, stats, k_rows)
        stats.candidates = int((cand_slot >= 0).sum())
        if need_verify:
            cand_s, cand_slot = select(cand_s, k_scan, cand_slot)
            ok = self.eligibility.verify(plan, cand_slot)
            cand_s = cand_s.masked_fill(~ok, float("-inf"))
            cand_slot = cand_slot.masked_fill(~ok, -1)
        scores, slots = select(cand_s, k_rows, cand_slot)
        if scores.shape[1] < k:
            scores = nn.functional.pad(scores, (0, k - scores.shape[1]), value=float("-inf"))
            slots = nn.functional.pad(slots, (0, k - slots.shape[1]), value=-1)
        ids = torch.where(slots >= 0, ivf.slot_ids[slots.clamp_min(0)], -1)
        self.last_stats = stats
        return scores, ids, stats

    @property
    def has_histograms(self) -> bool:
        """True when selectivity-aware probing can run (histograms present and non-empty)."""
        h = self.selectivity
        return h is not None and h.counts.shape[0] == self.ivf.nlist + 1 and h.counts.shape[1] > 0

    def refresh_histograms(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        """(Re)build the per-cluster histograms from the current layout and eligibility sets."""
        if self.eligibility is None:
            raise ValueError("histograms need an eligibility index (the index has no attributes)")
        self.selectivity = ClusterHistogram.build(self.ivf.cluster_offsets, self.ivf.live_words,
                                                  self.eligibility, self.ivf.nlist,
                                                  budget_bytes=budget_bytes)

    # ----------------------------------------------------------------------------- helpers
    @staticmethod
    def _row_k(rows: Tensor | None, k: int, B: int) -> Tensor:
        if rows is None:
            return torch.full((B,), k, dtype=torch.int64)
        if rows.shape != (B,) or rows.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"params.k must be an int64 tensor of shape ({B},), got {rows.dtype} {tuple(rows.shape)}")
        if B and (int(rows.min()) < 1 or int(rows.max()) > k):
            raise ValueError(f"params.k values must lie in [1, {k}]")
        return rows.to(torch.int64).cpu()

    def _plan(self, filt: Any, B: int) -> Any:
        if filt is None:
            return None
        if self.eligibility is None:
            raise ValueError("a filter was given but the index was built without attributes")
        if isinstance(filt, (list, tuple)):
            exprs = list(filt)
            if len(exprs) == 1 and B != 1:
                exprs = exprs * B
            if len(exprs) != B:
                raise ValueError(f"filter has {len(exprs)} expressions, expected 1 or {B} (one per query)")
            if all(e is None or e == "" for e in exprs):
                return None
            return self.eligibility.compile(exprs)
        if getattr(filt, "num_rows", B) != B:
            raise ValueError(f"filter plan has {filt.num_rows} rows, expected {B}")
        return filt

    def _scan_ivf(self, q: Tensor, qc: Tensor, qscale: Tensor, plan: Any, k_scan: Tensor,
                  p: SearchParams, stats: SearchStats, k_rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        ivf = self.ivf
        off = ivf.cluster_offsets
        if p.nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {p.nprobe}")
        if p.min_candidates_factor < 0 or p.max_nprobe < 0:
            raise ValueError("min_candidates_factor and max_nprobe must be >= 0, got "
                             f"{p.min_candidates_factor} and {p.max_nprobe}")
        if plan is not None and p.min_candidates_factor > 0 and self.has_histograms:
            probes = probe_for_filter(q, ivf.centroids, off, ivf.live_words, self.selectivity,
                                      self.eligibility.feat_info, plan, p.nprobe,
                                      k_scan if k_rows is None else k_rows,
                                      p.min_candidates_factor, p.max_nprobe)
            if bool((probes < 0).any()):  # padding -> one extra, empty cluster after the last
                probes = torch.where(probes < 0, off.numel() - 1, probes)
                off = torch.cat([off, off[-1:]])
        else:
            probes = ivf.probe(q, p.nprobe)  # (B, P)
        if ivf.has_fresh:  # the fresh cluster (streaming updates) is always scanned, when non-empty
            fo = ivf.cluster_offsets
            if int(fo[-1]) > int(fo[-2]):
                probes = torch.cat([probes, torch.full_like(probes[:, :1], ivf.nlist)], dim=1)
        pair_words = None
        if plan is not None:
            pair_words, stats.words_evaluated = self._probed_words(plan, probes, off)
        engine = p.engine
        if engine == "auto":
            engine = "triton" if q.is_cuda else ("ext" if _ext_usable(ivf) else "fast")
        args = (ivf.vectors, ivf.scales, off, ivf.live_words, qc, qscale, probes)
        if engine == "ext":
            from .scan_cpu_ext import scan_ext

            return scan_ext(*args, k_scan, pair_words)
        if engine == "reference":
            return scan_reference(*args, pair_words)
        if engine == "triton":
            from .scan_triton import scan_triton

            return scan_triton(*args, pair_words)
        if engine != "fast":
            raise ValueError(f"engine must be auto, ext, fast, reference or triton, got {engine!r}")
        return scan_fast(*args, k_scan.to(q.device), pair_words,
                         engine=p.int8_engine, stats=stats.scan)

    def _probed_words(self, plan: Any, probes: Tensor, off: Tensor | None = None) -> tuple[Tensor, int]:
        """Eligibility words of each probed cluster: ``(B, P, Wc) int64`` and how many were computed
        (summed over queries, as if every query evaluated its own clusters).

        Every distinct (expression, cluster) pair is evaluated once (queries sharing an expression
        via ``plan.row_map`` and probing the same cluster share it), on that cluster's contiguous
        word run (``EligibilityIndex.evaluate_runs``: fused on CPU, else buckets of similar length), so
        the padding to the largest cluster (``Wc``) is paid only when the bits are handed to the scan.
        """
        off = self.ivf.cluster_offsets if off is None else off
        dev = off.device
        B, P = probes.shape
        nlist = off.numel() - 1
        first_all = off[:-1] // SLOT_ALIGN
        nw_all = (off[1:] - off[:-1]) // SLOT_ALIGN
        nw_probed = nw_all[probes]
        wc = max(int(nw_probed.max()) if nw_probed.numel() else 0, 1)
        n_eval = int(nw_probed.sum())
        if not hasattr(plan, "row_map"):  # a plan of another eligibility module: per query, padded
            w = torch.arange(wc, device=dev)
            words = torch.where(w < nw_probed[..., None], first_all[probes][..., None] + w, -1)
            return self.eligibility.evaluate(plan, words.reshape(B, -1)).reshape(B, P, wc), n_eval
        prog = plan.row_map.to(dev)[:, None].expand(B, P)
        keys, inverse = torch.unique(prog * nlist + probes, return_inverse=True)
        if 2 * keys.numel() > B * P:  # few shared pairs: evaluate every (query, cluster) run in place
            out = self.eligibility.evaluate_runs(plan, prog.reshape(-1), first_all[probes].reshape(-1),
                                                 nw_probed.reshape(-1), wc)
            return out.reshape(B, P, wc), n_eval
        pair_prog, pair_cluster = keys // nlist, keys % nlist
        out = self.eligibility.evaluate_runs(plan, pair_prog, first_all[pair_cluster], nw_all[pair_cluster], wc)
        return out[inverse.reshape(-1)].reshape(B, P, wc), n_eval

    def _scan_exact(self, qc: Tensor, qscale: Tensor, plan: Any, k_scan: Tensor,
                    stats: SearchStats, chunk: int = 1 << 16) -> tuple[Tensor, Tensor]:
        """Brute force over all slots in chunks, keeping the running best ``max(k_scan)``."""
        ivf = self.ivf
        words = ivf.live_words[None, :].expand(qc.shape[0], -1)
        if plan is not None:
            words = self.eligibility.evaluate(plan) & ivf.live_words
            stats.words_evaluated = stats.words_total
        kmax = int(k_scan.max())
        best_s = torch.full((qc.shape[0], 0), float("-inf"), device=qc.device)
        best_i = torch.zeros((qc.shape[0], 0), dtype=torch.int64, device=qc.device)
        for s in range(0, ivf.num_slots, chunk):
            e = min(s + chunk, ivf.num_slots)
            vec = ivf.vectors[s:e]
            if vec.dtype == torch.int8:
                acc = torch._int_mm(vec, qc.T.contiguous()).T.float() if qc.shape[0] else torch.zeros(0, e - s)
                sc = acc * qscale[:, None] * ivf.scales[s:e][None, :]
            else:
                sc = qc.float() @ vec.float().T
            ok = unpack_words(words[:, s // SLOT_ALIGN : e // SLOT_ALIGN])
            sc = sc.masked_fill(~ok, float("-inf"))
            slots = torch.arange(s, e, device=qc.device).expand(qc.shape[0], -1)
            best_s, best_i = select(torch.cat([best_s, sc], 1), kmax, torch.cat([best_i, slots], 1))
        return best_s, best_i


def _ext_usable(ivf: IVFIndex) -> bool:
    """The fused CPU kernel is built and takes this index (``SILVERTORCH_NO_EXT=1`` disables it)."""
    from . import scan_cpu_ext

    return scan_cpu_ext.available() and scan_cpu_ext.supports(ivf.vectors, ivf.cluster_offsets)


def _slot_rows(ivf: IVFIndex, ids: Tensor | None, n: int) -> Tensor:
    """``(S,) int64``: for every slot, the row of the input item it holds (-1 = padding)."""
    if ids is None:
        return ivf.slot_ids.clone()
    pos = torch.full((int(ids.max()) + 1 if n else 1,), -1, dtype=torch.int64)
    pos[ids.cpu()] = torch.arange(n)
    return torch.where(ivf.slot_ids >= 0, pos[ivf.slot_ids.clamp_min(0).cpu()], -1)
