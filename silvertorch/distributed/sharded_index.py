"""Split an :class:`~silvertorch.index.search.ItemIndex` by clusters into ``R`` item shards, and back.

Sharded serving (``docs/sharded_serving.md``) gives every rank one shard; each shard is a **plain
``ItemIndex``** (registered buffers, nothing new to load or export), laid out so that the ordinary
:meth:`ItemIndex.search` on it returns exactly the shard's part of the unsharded search:

- **All centroids** ``(C, d)`` are kept on every shard, so every rank probes the same ``nprobe``
  nearest clusters as the unsharded index.
- A shard **owns** a set of main clusters. An owned cluster keeps its slot block verbatim (its
  64-aligned span, padding included, in the same relative order); a cluster owned elsewhere has an
  **empty span** (``cluster_offsets[c + 1] == cluster_offsets[c]``), so probing it scans nothing.
  Owned blocks appear in global cluster order, so the map *local slot -> global slot* is increasing
  (ties broken by the smaller slot, as the fused CPU kernel does, stay consistent).
- **Balance**: clusters are placed by longest-processing-time greedy on their *live item count*
  (largest cluster first onto the least-loaded shard; ties -> the lower cluster id / lower rank).
- **The fresh segment** (streaming updates: ``cluster_offsets`` with ``C + 2`` entries) goes
  **whole to one shard** — the least-loaded one after the main clusters are placed (ties -> lower
  rank) — used part and headroom alike, so that shard's layout is the same fresh-region contract
  (:mod:`silvertorch.index.fresh`) and its streaming writes keep working there. The other shards
  have ``C + 1`` offsets (no fresh region). (Splitting the fresh segment would balance better but
  would make every shard a writer of new items; one owner keeps inserts single-writer.)
- **Eligibility**: each shard's ``EligibilityIndex`` is rebuilt over its own slots from the exact
  attribute sets of the source (same features, modes, vocabularies, Bloom width and hash count, so
  filter expressions compile to the same program on every shard), with the source's live bits.

:func:`gather_index` is the inverse (tests, re-sharding): IVF buffers come back bit-identical and
the eligibility index is rebuilt over the global slots, equal in behaviour (same filter results).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from silvertorch.index.compact import eligibility_attributes
from silvertorch.index.ivf import IVFIndex
from silvertorch.index.layout import SLOT_ALIGN, unpack_words
from silvertorch.index.search import ItemIndex

__all__ = [
    "ShardAssignment",
    "assign_clusters",
    "shard_index",
    "split_index",
    "gather_index",
    "local_to_global_slots",
]


@dataclass(frozen=True)
class ShardAssignment:
    """Which shard holds what.

    - ``num_shards``: ``R >= 1``;
    - ``cluster_owner (C,) int64``: the shard of every main cluster;
    - ``fresh_owner``: the shard holding the fresh region, ``-1`` when the index has none;
    - ``global_offsets (C+1,) | (C+2,) int64``: the source index's ``cluster_offsets`` (the global
      slot layout, used to map shard slots back to global slots);
    - ``items_per_shard``: live items per shard (the balance achieved).
    """

    num_shards: int
    cluster_owner: Tensor
    fresh_owner: int
    global_offsets: Tensor
    items_per_shard: tuple[int, ...]

    def owned(self, rank: int) -> Tensor:
        """``(C_r,) int64`` main clusters of shard ``rank``, ascending."""
        return torch.nonzero(self.cluster_owner == rank).flatten()


def _live_per_cluster(ivf: IVFIndex) -> Tensor:
    """``(C,) | (C+1,) int64`` live items per cluster (fresh cluster last when present)."""
    S = ivf.num_slots
    live = (unpack_words(ivf.live_words)[:S] & (ivf.slot_ids >= 0)).to(torch.int64).cpu()
    csum = torch.zeros(S + 1, dtype=torch.int64)
    csum[1:] = torch.cumsum(live, 0)
    off = ivf.cluster_offsets.cpu()
    return csum[off[1:]] - csum[off[:-1]]


def assign_clusters(index: ItemIndex, num_shards: int) -> ShardAssignment:
    """Balanced placement of ``index``'s clusters on ``num_shards`` shards (see module doc).

    Raises ``ValueError`` for ``num_shards < 1``. More shards than non-empty clusters is allowed
    (the extra shards are empty and answer padding).
    """
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be an int >= 1, got {num_shards!r}")
    ivf = index.ivf
    C = ivf.nlist
    counts = _live_per_cluster(ivf)
    main = counts[:C]
    load = [0] * num_shards
    owner = torch.zeros(C, dtype=torch.int64)
    # largest first; stable sort keeps the lower cluster id first among equal counts
    for c in torch.sort(-main, stable=True).indices.tolist():
        r = min(range(num_shards), key=lambda i: (load[i], i))
        owner[c] = r
        load[r] += int(main[c])
    fresh_owner = -1
    if ivf.has_fresh:
        fresh_owner = min(range(num_shards), key=lambda i: (load[i], i))
        load[fresh_owner] += int(counts[C])
    return ShardAssignment(num_shards, owner, fresh_owner, ivf.cluster_offsets.detach().cpu().clone(),
                           tuple(load))


def _check_assignment(index: ItemIndex, a: ShardAssignment) -> None:
    ivf = index.ivf
    if a.cluster_owner.shape != (ivf.nlist,):
        raise ValueError(f"assignment covers {a.cluster_owner.numel()} clusters, the index has {ivf.nlist}")
    if not torch.equal(a.global_offsets, ivf.cluster_offsets.detach().cpu()):
        raise ValueError("assignment was made for another slot layout (cluster_offsets differ): "
                         "re-run assign_clusters on this index")
    if ivf.has_fresh != (a.fresh_owner >= 0):
        raise ValueError(f"assignment fresh_owner={a.fresh_owner} but the index "
                         f"{'has' if ivf.has_fresh else 'has no'} fresh region")


def _shard_slots(off: Tensor, blocks: list[int]) -> tuple[Tensor, Tensor]:
    """Global slots of the given cluster blocks (in order) and the shard's spans per block."""
    runs = [torch.arange(int(off[b]), int(off[b + 1]), dtype=torch.int64) for b in blocks]
    slots = torch.cat(runs) if runs else torch.zeros(0, dtype=torch.int64)
    return slots, torch.tensor([r.numel() for r in runs], dtype=torch.int64)


def _take_eligibility(elig: object, slots: Tensor) -> object:
    """A new ``EligibilityIndex`` over ``slots (S_r,) int64`` of ``elig`` (-1 = an empty dead slot)."""
    from silvertorch.index.eligibility import EligibilityIndex

    assert isinstance(elig, EligibilityIndex)
    attrs, cfg = eligibility_attributes(elig)
    live_all = unpack_words(elig.live_words.cpu())[: elig.num_slots]
    live = torch.where(slots >= 0, live_all[slots.clamp_min(0)], torch.zeros_like(slots, dtype=torch.bool))
    return EligibilityIndex.build(attrs.take(slots), cfg, live=live)


def shard_index(index: ItemIndex, assignment: ShardAssignment, rank: int) -> ItemIndex:
    """Shard ``rank`` of ``index`` as a plain :class:`ItemIndex` on the CPU (see module doc).

    ``index`` is not modified; the shard's tensors are new (copies).
    """
    _check_assignment(index, assignment)
    if not 0 <= rank < assignment.num_shards:
        raise ValueError(f"rank must lie in [0, {assignment.num_shards}), got {rank}")
    ivf = index.ivf
    C = ivf.nlist
    off = ivf.cluster_offsets.detach().cpu()
    blocks = assignment.owned(rank).tolist()
    spans = torch.zeros(C, dtype=torch.int64)
    spans[blocks] = (off[1:C + 1] - off[:C])[blocks]
    main_slots, _ = _shard_slots(off, blocks)
    local_off = torch.zeros(C + 1, dtype=torch.int64)
    local_off[1:] = torch.cumsum(spans, 0)
    slots = main_slots
    if assignment.fresh_owner == rank:  # the whole fresh region: used span, then headroom
        fresh = torch.arange(int(off[C]), ivf.num_slots, dtype=torch.int64)
        slots = torch.cat([main_slots, fresh])
        local_off = torch.cat([local_off, local_off[-1:] + (off[C + 1] - off[C])])
    out = IVFIndex(ivf.dim, C, ivf.storage_dtype, ivf.metric)
    out.centroids = ivf.centroids.detach().cpu().clone()
    out.cluster_offsets = local_off
    out.slot_ids = ivf.slot_ids.detach().cpu()[slots].clone()
    out.vectors = ivf.vectors.detach().cpu()[slots].clone()
    out.scales = ivf.scales.detach().cpu()[slots].clone()
    # blocks are 64-aligned, so the live words move whole
    out.live_words = ivf.live_words.detach().cpu()[slots[::SLOT_ALIGN] // SLOT_ALIGN].clone()
    out.validate()
    elig = None if index.eligibility is None else _take_eligibility(index.eligibility, slots)
    return ItemIndex(out, elig)  # type: ignore[arg-type]


def split_index(index: ItemIndex, num_shards: int) -> tuple[list[ItemIndex], ShardAssignment]:
    """All ``num_shards`` shards of ``index`` (CPU) and the assignment that made them."""
    a = assign_clusters(index, num_shards)
    return [shard_index(index, a, r) for r in range(num_shards)], a


def gather_index(shards: list[ItemIndex]) -> ItemIndex:
    """The inverse of :func:`split_index`: one ``ItemIndex`` over the global slot layout.

    Every main cluster's block is taken from the shard where its span is non-empty (at most one),
    the fresh region from the shard that has one. IVF buffers equal the source's bit for bit.
    Raises ``ValueError`` when the shards disagree (centroids, dims, dtypes, a cluster on two shards).
    """
    if not shards:
        raise ValueError("gather_index needs at least one shard")
    first = shards[0].ivf
    C = first.nlist
    for r, s in enumerate(shards):
        iv = s.ivf
        if (iv.nlist, iv.dim, iv.storage_dtype, iv.metric) != (C, first.dim, first.storage_dtype, first.metric):
            raise ValueError(f"shard {r} has (nlist, dim, dtype, metric) = "
                             f"{(iv.nlist, iv.dim, iv.storage_dtype, iv.metric)}, shard 0 "
                             f"{(C, first.dim, first.storage_dtype, first.metric)}")
        if not torch.equal(iv.centroids.cpu(), first.centroids.cpu()):
            raise ValueError(f"shard {r} has other centroids than shard 0 (shards of different indexes)")
        if (s.eligibility is None) != (shards[0].eligibility is None):
            yes = {True: "yes", False: "no"}
            raise ValueError(f"shards disagree on having an eligibility index (shard 0: "
                             f"{yes[shards[0].eligibility is not None]}, shard {r}: {yes[s.eligibility is not None]})")
    spans = torch.stack([s.ivf.spans()[:C].cpu() for s in shards])  # (R, C)
    if bool(((spans > 0).sum(0) > 1).any()):
        c = int(torch.nonzero((spans > 0).sum(0) > 1).flatten()[0])
        raise ValueError(f"cluster {c} is non-empty on more than one shard")
    fresh_owners = [r for r, s in enumerate(shards) if s.ivf.has_fresh]
    if len(fresh_owners) > 1:
        raise ValueError(f"shards {fresh_owners} all have a fresh region; expected at most one")
    span = spans.sum(0)
    owner = spans.argmax(0)
    parts: list[tuple[int, int, int]] = []  # (shard, local start, length) in global order
    for c in range(C):
        if int(span[c]):
            r = int(owner[c])
            parts.append((r, int(shards[r].ivf.cluster_offsets[c]), int(span[c])))
    off = torch.zeros(C + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(span, 0)
    if fresh_owners:
        fr = shards[fresh_owners[0]].ivf
        used = int(fr.cluster_offsets[C + 1] - fr.cluster_offsets[C])
        parts.append((fresh_owners[0], int(fr.cluster_offsets[C]), fr.num_slots - int(fr.cluster_offsets[C])))
        off = torch.cat([off, off[-1:] + used])

    def cat(name: str) -> Tensor:
        pieces = [getattr(shards[r].ivf, name).cpu()[a : a + n] for r, a, n in parts]
        return torch.cat(pieces) if pieces else getattr(first, name).cpu()[:0]

    out = IVFIndex(first.dim, C, first.storage_dtype, first.metric)
    out.centroids = first.centroids.cpu().clone()
    out.cluster_offsets = off
    out.slot_ids, out.vectors, out.scales = cat("slot_ids"), cat("vectors"), cat("scales")
    words = [shards[r].ivf.live_words.cpu()[a // SLOT_ALIGN : (a + n) // SLOT_ALIGN] for r, a, n in parts]
    out.live_words = torch.cat(words) if words else torch.zeros(0, dtype=torch.int64)
    out.validate()
    elig = None
    if shards[0].eligibility is not None:
        elig = _gather_eligibility([s.eligibility for s in shards], parts)
    return ItemIndex(out, elig)  # type: ignore[arg-type]


def _gather_eligibility(eligs: list, parts: list[tuple[int, int, int]]) -> object:
    from silvertorch.index.attributes import Attribute, ItemAttributes
    from silvertorch.index.eligibility import EligibilityIndex

    pieces = [eligibility_attributes(e) for e in eligs]
    cfg = pieces[0][1]
    names = list(pieces[0][0].features)
    total = sum(n for _, _, n in parts)
    feats: dict[str, Attribute] = {}
    for name in names:
        offs, vals, sizes = [torch.zeros(1, dtype=torch.int64)], [], 0
        for r, a, n in parts:
            attr = pieces[r][0][name].take(torch.arange(a, a + n))
            offs.append(attr.offsets[1:] + sizes)
            vals.append(attr.values)
            sizes += attr.values.numel()
        ref = pieces[0][0][name]
        feats[name] = Attribute(name, torch.cat(offs), torch.cat(vals) if vals else ref.values[:0],
                                ref.cardinality, ref.vocab)
    live = torch.cat([unpack_words(eligs[r].live_words.cpu())[a : a + n] for r, a, n in parts]) \
        if parts else torch.zeros(0, dtype=torch.bool)
    return EligibilityIndex.build(ItemAttributes(total, feats), cfg, live=live)


def local_to_global_slots(local_offsets: Tensor, global_offsets: Tensor, slots: Tensor) -> Tensor:
    """Map shard slots to global slots: ``slots (...) int64`` (``-1`` = none) -> ``(...) int64``.

    ``local_offsets`` / ``global_offsets``: the shard's and the source's ``cluster_offsets`` (the
    shard may have ``C + 1`` where the source has ``C + 2``). A slot in cluster ``c`` of the shard
    sits at the same distance from the start of ``c`` in the global layout.
    """
    n = local_offsets.numel()
    lo = local_offsets.to(slots.device)
    go = global_offsets[:n].to(slots.device)
    safe = slots.clamp_min(0)
    c = torch.searchsorted(lo[1:], safe, right=True).clamp_max(n - 2)
    return torch.where(slots >= 0, safe - lo[c] + go[c], slots)
