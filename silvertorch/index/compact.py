"""Compaction: fold the fresh segment into the main clusters and drop tombstones (pure functions).

:func:`compact_index_state` takes an ``ItemIndex`` state dict (keys ``ivf.*`` / ``eligibility.*``)
and returns a new one plus the slot map; nothing it is given is modified, so it runs on a snapshot
(cloned tensors) in a background thread while the live index keeps serving.

- Main-cluster items keep their cluster and their relative order; fresh items go to the cluster of
  their nearest centroid (inner product of the stored, dequantized vector with the centroids, as
  the probe ranks clusters), after that cluster's main items. Centroids are not retrained.
- Rows move as stored (codes and scales are copied, never re-quantized), so every item's score for
  a query is bit-identical before and after: exact search returns the same results.
- The eligibility index is rebuilt (:meth:`EligibilityIndex.build`) from its own exact attribute
  sets in the new slot order, with the same per-feature modes, Bloom width and hash count.
- Per-cluster value histograms (selectivity-aware probing), when the index has them, are recounted
  for the new layout with the same features (the fresh cluster's counts move into the main ones).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attributes import Attribute, ItemAttributes
from .ivf import IVFIndex
from .kmeans import assign
from .layout import build_layout, live_words_from_ids, unpack_words
from .quantize import decode

__all__ = ["compact_index_state", "eligibility_attributes"]


def eligibility_attributes(elig: object) -> tuple[ItemAttributes, object]:
    """The exact attribute sets of an ``EligibilityIndex`` in slot order (``S`` items) and an
    ``EligibilityConfig`` that reproduces its modes, Bloom width and hash count."""
    from .eligibility import EligibilityConfig, EligibilityIndex, _decode

    assert isinstance(elig, EligibilityIndex)
    s = elig.schema()
    S = elig.num_slots
    info = elig.feat_info.tolist()
    off = elig.csr_offsets
    feats: dict[str, Attribute] = {}
    for f, name in enumerate(s.names):
        a, b = int(off[f, 0]), int(off[f, S])
        card, start = info[f][1], info[f][4]
        vocab = None if start < 0 else _decode(elig.vocab_bytes, elig.vocab_offsets, start, card)
        feats[name] = Attribute(name, (off[f] - a).clone(), elig.csr_values[a:b].clone(), card, vocab)
    cfg = EligibilityConfig(
        modes={n: ("bloom" if bl else "bitmap") for n, bl in zip(s.names, s.bloom)},
        bloom_hashes=max(1, s.num_hashes), bloom_width=max(64, s.width),
    )
    return ItemAttributes(S, feats), cfg


def compact_index_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """``ItemIndex`` state -> ``(compacted state, new_slot_of_old (S_old,) int64)`` (``-1`` for
    slots that held no live item). The input is not modified."""
    from .eligibility import EligibilityIndex
    from .search import ItemIndex

    index = ItemIndex.from_state_dict({k: v.cpu() for k, v in state.items() if isinstance(v, Tensor)}
                                      | {k: v for k, v in state.items() if not isinstance(v, Tensor)})
    ivf = index.ivf
    C, S = ivf.nlist, ivf.num_slots
    off = ivf.cluster_offsets
    live = unpack_words(ivf.live_words)[:S] & (ivf.slot_ids >= 0)
    src = torch.nonzero(live).flatten()
    main = src < int(off[C])
    cluster = torch.empty(src.numel(), dtype=torch.int64)
    cluster[main] = torch.searchsorted(off[1 : C + 1], src[main], right=True)
    fresh = src[~main]
    if fresh.numel():
        cluster[~main] = assign(decode(ivf.vectors[fresh], ivf.scales[fresh]), ivf.centroids, "ip")
    order, offsets, slots = build_layout(cluster, C)
    s_new = int(offsets[-1])
    src = src[order]
    out = IVFIndex(ivf.dim, C, ivf.storage_dtype, ivf.metric)
    vec = torch.zeros(s_new, ivf.dim, dtype=ivf.storage_dtype)
    vec[slots] = ivf.vectors[src]
    sc = torch.ones(s_new)
    sc[slots] = ivf.scales[src].float()
    ids = torch.full((s_new,), -1, dtype=torch.int64)
    ids[slots] = ivf.slot_ids[src]
    out.centroids, out.cluster_offsets, out.slot_ids = ivf.centroids.clone(), offsets, ids
    out.vectors, out.scales, out.live_words = vec, sc, live_words_from_ids(ids)
    new_of_old = torch.full((S,), -1, dtype=torch.int64)
    new_of_old[src] = slots
    elig = None
    if index.eligibility is not None:
        attrs, cfg = eligibility_attributes(index.eligibility)
        old_of_new = torch.full((s_new,), -1, dtype=torch.int64)
        old_of_new[slots] = src
        elig = EligibilityIndex.build(attrs.take(old_of_new), cfg, live=ids >= 0)
    hist = None
    if elig is not None and index.selectivity is not None:
        from .selectivity import ClusterHistogram

        hist = ClusterHistogram.build(out.cluster_offsets, out.live_words, elig, C,
                                      col_base=index.selectivity.col_base)
    return ItemIndex(out, elig, hist).state_dict(), new_of_old
