"""The index search as one opaque custom op: ``torch.ops.silvertorch.ivf_search``.

Why an op: the search is host-heavy (probe-then-filter over a compiled register program, a bucketed
cluster-major scan, data-dependent candidate counts, ``.item()`` calls). Traced by ``torch.compile``
it would break the graph many times; traced by ``torch.export`` it cannot be captured at all. As a
``torch.library.custom_op`` with a fake (meta) implementation, compile and export see one node with
static output shapes ``(B, k)``, and the eager implementation is exactly :meth:`ItemIndex.search`
(whatever scan engine that selects), run on shells that share the op's input tensors (no copies).

The op takes only tensors, ints, bools and strings:

- the six ``IVFIndex`` buffers (:data:`silvertorch.index.ivf._BUFFERS` order) and the metric;
- the ``EligibilityIndex`` buffers (its ``_BUFFERS`` order; an empty list = no eligibility index);
- a :class:`FilterPlan` flattened by :func:`pack_plan` into ``(tensors, ints)`` (empty = no filter);
- ``k``, ``nprobe``, ``verify``, ``exact``;
- optional, last (defaults keep older call sites and exported programs valid): the
  ``ClusterHistogram`` buffers ``hist_counts`` / ``hist_cols`` (None = none), and the
  selectivity-aware probing knobs ``min_candidates_factor`` (0 = off) and ``max_nprobe`` (0 = nlist).

Returns ``scores (B, k) f32`` and ``ids (B, k) int64`` with Faiss padding (``-inf`` / ``-1``). The op
is not differentiable (the scores are a ranking signal; differentiable scoring happens after it).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .eligibility import _BUFFERS as _ELIG_BUFFERS
from .eligibility import EligibilityIndex
from .ivf import _BUFFERS as _IVF_BUFFERS
from .ivf import IVFIndex
from .plan import FilterPlan
from .search import ItemIndex, SearchParams
from .selectivity import ClusterHistogram

__all__ = ["ivf_search", "search_index", "pack_plan", "unpack_plan", "index_tensors", "histogram_tensors"]

_FIELDS = dataclasses.fields(FilterPlan)
_PLAN_TENSORS = tuple(f.name for f in _FIELDS if f.type == "Tensor")
_PLAN_INTS = tuple(f.name for f in _FIELDS if f.type in ("int", "bool"))
_PLAN_LISTS = tuple(f.name for f in _FIELDS if f.type in ("list[int]", "list[bool]"))
_PLAN_HOST_ONLY = {"expressions", "warnings"}  # not needed to evaluate or verify a plan
_unknown = {f.name for f in _FIELDS} - set(_PLAN_TENSORS + _PLAN_INTS + _PLAN_LISTS) - _PLAN_HOST_ONLY
if _unknown:  # a new FilterPlan field must be taught to pack_plan / unpack_plan
    raise ImportError(f"silvertorch.index.ops cannot flatten FilterPlan fields {sorted(_unknown)}")


def pack_plan(plan: FilterPlan | None) -> tuple[list[Tensor], list[int]]:
    """A plan as op arguments: ``(tensors in FilterPlan field order, ints)``; ``None`` -> empty lists.

    ``ints`` = the scalar fields (``n_regs``, ``v_n_regs``, ``n_words``, ``exact``), then every list
    field as its length followed by its items. Expressions and warnings stay on the host.
    """
    if plan is None:
        return [], []
    tensors = [getattr(plan, n) for n in _PLAN_TENSORS]
    ints = [int(getattr(plan, n)) for n in _PLAN_INTS]
    for name in _PLAN_LISTS:
        items = [int(v) for v in getattr(plan, name)]
        ints += [len(items), *items]
    return tensors, ints


def unpack_plan(tensors: list[Tensor], ints: list[int]) -> FilterPlan | None:
    """Inverse of :func:`pack_plan` (expressions become ``None``, warnings empty)."""
    if not tensors:
        return None
    if len(tensors) != len(_PLAN_TENSORS):
        raise ValueError(f"a packed plan has {len(_PLAN_TENSORS)} tensors, got {len(tensors)}")
    kw: dict[str, object] = dict(zip(_PLAN_TENSORS, tensors))
    pos = 0
    for name, f in ((f.name, f) for f in _FIELDS if f.name in _PLAN_INTS):
        kw[name] = bool(ints[pos]) if f.type == "bool" else int(ints[pos])
        pos += 1
    for name, f in ((f.name, f) for f in _FIELDS if f.name in _PLAN_LISTS):
        n = ints[pos]
        items = ints[pos + 1 : pos + 1 + n]
        kw[name] = [bool(v) for v in items] if f.type == "list[bool]" else list(items)
        pos += 1 + n
    rows = tensors[_PLAN_TENSORS.index("row_map")].numel()
    kw["expressions"] = [None] * rows
    kw["warnings"] = [[] for _ in range(rows)]
    return FilterPlan(**kw)  # type: ignore[arg-type]


def index_tensors(index: ItemIndex) -> tuple[list[Tensor], str, list[Tensor]]:
    """``(ivf buffers, metric, eligibility buffers)`` of an index, in the op's argument order."""
    ivf = [getattr(index.ivf, n) for n in _IVF_BUFFERS]
    elig = [] if index.eligibility is None else [getattr(index.eligibility, n) for n in _ELIG_BUFFERS]
    return ivf, index.ivf.metric, elig


def histogram_tensors(index: ItemIndex) -> tuple[Tensor | None, Tensor | None]:
    """``(counts, col_base)`` of the index's :class:`ClusterHistogram`, or ``(None, None)``."""
    h = index.selectivity
    return (None, None) if h is None else (h.counts, h.col_base)


def _shell(ivf_buffers: list[Tensor], metric: str, elig_buffers: list[Tensor],
           hist_counts: Tensor | None = None, hist_cols: Tensor | None = None) -> ItemIndex:
    """An :class:`ItemIndex` whose buffers *are* the given tensors (no copy, no validation)."""
    centroids, vectors = ivf_buffers[0], ivf_buffers[3]
    ivf = IVFIndex(centroids.shape[1], centroids.shape[0], vectors.dtype, metric)
    for name, t in zip(_IVF_BUFFERS, ivf_buffers):
        ivf._buffers[name] = t
    elig = None
    if elig_buffers:
        elig = EligibilityIndex()
        for name, t in zip(_ELIG_BUFFERS, elig_buffers):
            elig._buffers[name] = t
    hist = None
    if elig is not None and hist_counts is not None and hist_cols is not None:
        hist = ClusterHistogram()
        hist._buffers["counts"], hist._buffers["col_base"] = hist_counts, hist_cols
    return ItemIndex(ivf, elig, hist)


@torch.library.custom_op("silvertorch::ivf_search", mutates_args=())
def ivf_search(
    queries: Tensor,
    ivf_buffers: list[Tensor],
    metric: str,
    elig_buffers: list[Tensor],
    plan_tensors: list[Tensor],
    plan_ints: list[int],
    k: int,
    nprobe: int,
    verify: bool,
    exact: bool,
    hist_counts: Optional[Tensor] = None,
    hist_cols: Optional[Tensor] = None,
    min_candidates_factor: float = 0.0,
    max_nprobe: int = 0,
) -> tuple[Tensor, Tensor]:
    """``queries (B, d) f32`` -> ``scores (B, k) f32``, ``ids (B, k) int64`` (see module doc)."""
    index = _shell(ivf_buffers, metric, elig_buffers, hist_counts, hist_cols)
    plan = unpack_plan(plan_tensors, plan_ints)
    params = SearchParams(nprobe=nprobe, filter=plan, verify=verify, exact=exact,
                          min_candidates_factor=min_candidates_factor, max_nprobe=max_nprobe)
    scores, ids = index.search(queries, k, params)
    return scores.contiguous(), ids.contiguous()


@ivf_search.register_fake
def _(
    queries: Tensor,
    ivf_buffers: list[Tensor],
    metric: str,
    elig_buffers: list[Tensor],
    plan_tensors: list[Tensor],
    plan_ints: list[int],
    k: int,
    nprobe: int,
    verify: bool,
    exact: bool,
    hist_counts: Optional[Tensor] = None,
    hist_cols: Optional[Tensor] = None,
    min_candidates_factor: float = 0.0,
    max_nprobe: int = 0,
) -> tuple[Tensor, Tensor]:
    B = queries.shape[0]
    return (
        queries.new_empty((B, k), dtype=torch.float32),
        queries.new_empty((B, k), dtype=torch.int64),
    )


def search_index(
    index: ItemIndex,
    queries: Tensor,
    k: int,
    *,
    nprobe: int,
    plan: FilterPlan | None = None,
    verify: bool = True,
    exact: bool = False,
    min_candidates_factor: float = 0.0,
    max_nprobe: int = 0,
) -> tuple[Tensor, Tensor]:
    """:meth:`ItemIndex.search` through the custom op: ``(B, d)`` -> ``(B, k) f32, (B, k) int64``.

    ``queries`` are detached (the search is not differentiable). Same results as
    ``index.search(queries, k, SearchParams(nprobe=nprobe, filter=plan, verify=verify, exact=exact,
    min_candidates_factor=..., max_nprobe=...))``.
    """
    if plan is not None and index.eligibility is None:
        raise ValueError("a filter was given but the index was built without attributes")
    ivf, metric, elig = index_tensors(index)
    tensors, ints = pack_plan(plan)
    counts, cols = histogram_tensors(index)
    return torch.ops.silvertorch.ivf_search(
        queries.detach(), ivf, metric, elig, tensors, ints, k, nprobe, verify, exact,
        counts, cols, float(min_candidates_factor), int(max_nprobe),
    )
