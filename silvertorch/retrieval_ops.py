"""Tensor plumbing of :class:`silvertorch.model.RetrievalModel`, kept out of the model file.

Everything here has static output shapes (no data-dependent sizes), so it traces under
``torch.compile`` without graph breaks and exports with ``torch.export``:

- :class:`RetrievalOutput`: the result of one request batch;
- :func:`padded_attribute`: an item attribute (CSR, item-id order) as a dense ``(N + 1, L)`` table
  padded with the OverArch padding id; row ``N`` is all padding (the row of candidate id ``-1``);
- :func:`gather_features`: the jagged ``(offsets, values)`` of a ``(B, K)`` block of item ids;
- :func:`item_slots`: the inverse of the index's ``slot_ids``;
- :func:`dequantize_candidates`: the stored (cached) vectors of candidate ids;
- :func:`rerank_top_n` / :func:`select_output`: the last two steps of the forward pass;
- :func:`check_request`: host-side validation of ``k`` / ``nprobe``.

Importing this module (torch only, no TorchRec) registers what an exported ``RetrievalModel``
artifact needs to load: the ``silvertorch::ivf_search`` op and the ``RetrievalOutput`` pytree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, NamedTuple

import torch
import torch.utils._pytree as _pytree
from torch import Tensor

from silvertorch.index import ops as _ops  # noqa: F401  (registers silvertorch::ivf_search)
from silvertorch.index.attributes import Attribute

if TYPE_CHECKING:
    from silvertorch.modules.reranker import Reranker

__all__ = [
    "RetrievalOutput",
    "padded_attribute",
    "gather_features",
    "item_slots",
    "dequantize_candidates",
    "rerank_top_n",
    "select_output",
    "check_request",
]


class RetrievalOutput(NamedTuple):
    """The result of one forward pass; row ``b`` holds its best candidates first.

    - ``ids (B, k) int64``: item ids, ``-1`` padding (fewer than ``k`` eligible items);
    - ``scores (B, k) float32``: the composite value-model score (reranked when enabled), ``-inf``
      padding;
    - ``task_scores (B, k, T) float32``: per-task sigmoid probabilities, 0 for padding;
    - ``retrieval_scores (B, k) float32``: the index's (ANN) similarity, ``-inf`` padding.
    """

    ids: Tensor
    scores: Tensor
    task_scores: Tensor
    retrieval_scores: Tensor


# exported programs serialize their output structure: give the namedtuple a stable name
_pytree._register_namedtuple(RetrievalOutput, serialized_type_name="silvertorch.RetrievalOutput")


def padded_attribute(attr: Attribute, pad: int) -> Tensor:
    """``attr`` over ``N`` items -> ``(N + 1, L) int64``, ``L = max(1, longest row)``.

    Row ``i < N`` holds item ``i``'s value ids then ``pad``; row ``N`` is all ``pad``. Memory is
    ``(N + 1) * L * 8`` bytes: fine for short attribute lists (genres, decade, language).
    """
    n = attr.num_items
    lengths = attr.lengths
    width = max(1, int(lengths.max()) if n else 0)
    table = torch.full((n + 1, width), pad, dtype=torch.int64)
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    table[:n][mask] = attr.values  # row-major order of the mask matches the CSR order
    return table


def gather_features(tables: Mapping[str, Tensor], ids: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Jagged attribute ids of the candidates ``ids (B, K) int64`` (``-1`` = padding).

    ``tables[name] (N + 1, L) int64`` from :func:`padded_attribute` -> per name
    ``(offsets (B*K + 1,) int64, values (B*K*L,) int64)``: every bag has exactly ``L`` entries, the
    padding id among them excluded from the OverArch's mean.
    """
    flat = ids.reshape(-1)
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, table in tables.items():
        n, width = table.shape[0] - 1, table.shape[1]
        rows = torch.where((flat >= 0) & (flat < n), flat, torch.full_like(flat, n))
        values = table.index_select(0, rows).reshape(-1)
        offsets = torch.arange(0, flat.numel() * width + 1, width, dtype=torch.int64, device=ids.device)
        out[name] = (offsets, values)
    return out


def item_slots(slot_ids: Tensor, num_items: int) -> Tensor:
    """``slot_ids (S,) int64`` (``-1`` padding, ``-2`` deleted) -> ``(num_items,) int64`` slot of each item
    (``-1`` for an item absent from the index)."""
    live = slot_ids >= 0
    if live.any() and int(slot_ids.max()) >= num_items:
        raise ValueError(
            f"the index holds item id {int(slot_ids.max())} but the item attributes cover "
            f"{num_items} items (ids must lie in [0, {num_items}))"
        )
    slots = torch.full((num_items,), -1, dtype=torch.int64, device=slot_ids.device)
    positions = torch.arange(slot_ids.numel(), device=slot_ids.device)
    slots[slot_ids[live]] = positions[live]
    return slots


def check_request(k: int, max_k: int, nprobe: int | None) -> None:
    """``ValueError`` unless ``1 <= k <= max_k`` (an int) and ``nprobe`` is None or >= 1."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int in [1, {max_k}], got {k!r}")
    if not 1 <= k <= max_k:
        raise ValueError(f"k must lie in [1, max_k={max_k}], got {k} (raise config.max_k for more)")
    if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1):
        raise ValueError(f"nprobe must be an int >= 1, got {nprobe!r}")


def dequantize_candidates(vectors: Tensor, scales: Tensor, item_slot: Tensor, ids: Tensor) -> Tensor:
    """Stored vectors of candidates: ``vectors (S, D)`` storage dtype, ``scales (S,) f32``,
    ``item_slot (N,) int64``, ``ids (B, K) int64`` (``-1`` = padding) -> ``(B, K, D) f32``, zeros
    for padding. Equals ``silvertorch.index.quantize.decode`` of the candidates' slots."""
    valid = ids >= 0
    slots = item_slot.index_select(0, ids.clamp_min(0).reshape(-1))
    slots = torch.where(valid.reshape(-1) & (slots >= 0), slots, torch.zeros_like(slots))
    vec = vectors.index_select(0, slots).float() * scales.index_select(0, slots).float()[:, None]
    vec = vec.reshape(*ids.shape, vectors.shape[1])
    return torch.where(valid.unsqueeze(-1), vec, torch.zeros_like(vec))


def rerank_top_n(
    reranker: Reranker, query: Tensor, items: Tensor, logits: Tensor, composite: Tensor, valid: Tensor
) -> Tensor:
    """Rerank the ``reranker.config.top_n`` best candidates by composite; the rest keep theirs.

    ``query (B, D)``, ``items (B, K, D)``, ``logits (B, K, T)``, ``composite (B, K)``,
    ``valid (B, K) bool`` -> ``(B, K) f32`` scores on the composite's scale (``-inf`` = padding).
    """
    n = min(reranker.config.top_n, composite.shape[1])
    top, pos = torch.topk(composite, n, dim=1)  # (B, n)
    D, T = items.shape[-1], logits.shape[-1]
    new = reranker(
        query,
        items.gather(1, pos.unsqueeze(-1).expand(-1, -1, D)),
        logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, T)),
        top,
        valid.gather(1, pos),
    )
    return composite.scatter(1, pos, new)


def select_output(
    scores: Tensor, ids: Tensor, logits: Tensor, retrieval: Tensor, k: int
) -> RetrievalOutput:
    """Top-``k`` of ``scores (B, K) f32`` (``K >= k``, ``-inf`` = not a candidate) with the
    candidates' ``ids (B, K) int64``, ``logits (B, K, T)`` and ``retrieval (B, K) f32`` scores,
    padded Faiss-style (``-1`` / ``-inf``; task probabilities 0)."""
    top, pos = torch.topk(scores, k, dim=1)  # (B, k)
    keep = top > float("-inf")
    out_ids = torch.where(keep, ids.gather(1, pos), torch.full_like(pos, -1))
    probs = torch.sigmoid(logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1])))
    probs = torch.where(keep.unsqueeze(-1), probs, torch.zeros_like(probs))
    neg_inf = torch.full_like(top, float("-inf"))
    return RetrievalOutput(out_ids, top, probs, torch.where(keep, retrieval.gather(1, pos), neg_inf))
