"""Streaming in-place catalog updates of a :class:`~silvertorch.model.RetrievalModel` (no rebuild).

:class:`CatalogUpdater` wraps a model in eval mode and mutates its buffers:

- ``upsert(ids, vectors, attributes=None)``: a live id is updated **in place** (its row and scale
  re-encoded like the build, its attribute sets rewritten in the exact CSR, the bitmap rows and the
  Bloom signature bits; its OverArch feature rows follow); an unknown or deleted id becomes a new
  row of the **fresh segment** (:mod:`silvertorch.index.fresh`), which every search scans next to
  the probed clusters and merges at top-K. Ids beyond the model's id space grow ``item_slot`` and
  ``item_feature_*`` (with headroom).
- ``delete(ids)``: tombstones (live bits cleared in the IVF and eligibility ``live_words``).
- ``patch_attributes(ids, attributes)``: replace some features' sets of live items.
- :func:`compact_state`: a pure function from a model state dict to a compacted one (fresh segment
  folded into the main clusters, tombstones dropped) that ``model.load_state_dict`` accepts.

Every call validates everything first and raises (``ValueError`` / ``TypeError`` / ``KeyError``
naming the offending id or field) before anything is written; every successful non-empty call
increments ``model.generation``. Attribute values are raw strings as in the vocabularies
(``{"genre": ["Comedy"]}``); a string not in the vocabulary maps to the out-of-vocabulary id 0; an
``int`` is taken as a value id and must lie in ``[0, cardinality)``. A re-inserted (previously
deleted) id is a new item: attributes it is not given are empty.

Not thread-safe by itself: a server must exclude searches while a call runs (a write lock), or
apply calls to a copy and swap it in. Filter plans compiled before an update that grew the fresh
region (``plan.n_words`` changed) must be recompiled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from silvertorch.index import fresh
from silvertorch.index.compact import compact_index_state
from silvertorch.index.eligibility_update import check_sets, rewrite_sets
from silvertorch.index.eligibility_update import set_live as set_elig_live
from silvertorch.index.ivf import check_vectors
from silvertorch.index.layout import TOMBSTONE
from silvertorch.model import RetrievalModel

__all__ = ["UpdateResult", "CatalogUpdater", "FeatureSpec", "compact_state", "OOV_ID"]

OOV_ID = 0  # the value id of a string not in a feature's vocabulary
Attributes = list[dict[str, list[Any]] | None]


@dataclass(frozen=True)
class UpdateResult:
    """Outcome of one call: the generation after it and what it did."""

    generation: int
    updated: int = 0  # live items changed in place
    inserted: int = 0  # new items written to the fresh segment
    deleted: int = 0
    patched: int = 0


@dataclass(frozen=True)
class FeatureSpec:
    """How raw values of one item feature map to ids (what a server validates requests against).

    ``cardinality``: value ids lie in ``[0, cardinality)``; ``vocab``: value name -> id (None when
    the feature has no vocabulary: then only ints / decimal strings are accepted);
    ``eligibility_id``: the feature's index in the eligibility index (None = not filterable);
    ``overarch``: whether the OverArch reads it (``item_feature_<name>``).
    """

    name: str
    cardinality: int
    vocab: dict[str, int] | None
    eligibility_id: int | None
    overarch: bool

    def value_id(self, value: Any) -> int:
        """One raw value -> its id. ``str``: vocabulary lookup, unknown -> ``OOV_ID`` (a decimal
        string when there is no vocabulary); ``int``: checked against the cardinality."""
        if isinstance(value, bool):
            raise TypeError(f"attribute '{self.name}': value {value!r} must be a string or an int")
        if isinstance(value, str):
            if self.vocab is not None:
                return self.vocab.get(value, OOV_ID)
            if value.isascii() and value.isdigit():
                value = int(value)
            else:
                return OOV_ID
        if not isinstance(value, int):
            raise TypeError(f"attribute '{self.name}': value {value!r} must be a string or an int")
        if not 0 <= value < self.cardinality:
            raise ValueError(
                f"attribute '{self.name}': value id {value} out of range [0, {self.cardinality})"
            )
        return value


class CatalogUpdater:
    """Streaming updates of a :class:`RetrievalModel`'s catalog (see the module docstring)."""

    def __init__(self, model: RetrievalModel, *, fresh_capacity: int | None = None) -> None:
        if not isinstance(model, RetrievalModel):
            raise TypeError(f"CatalogUpdater wraps a RetrievalModel, got {type(model).__name__}")
        self.model = model.eval()
        cap = model.config.fresh_capacity if fresh_capacity is None else fresh_capacity
        if cap < 0:
            raise ValueError(f"fresh_capacity must be >= 0 (0 = automatic), got {cap}")
        self._capacity = cap
        self.features = self._feature_specs()

    # ------------------------------------------------------------------------- introspection
    @property
    def generation(self) -> int:
        return self.model.generation

    @property
    def index(self) -> Any:
        return self.model.index

    def fresh_capacity_for_new_region(self) -> int:
        """Slots a newly created fresh region gets (config knob, or the automatic default)."""
        return self._capacity or fresh.default_capacity(self.index.ivf.ntotal)

    def _feature_specs(self) -> dict[str, FeatureSpec]:
        specs: dict[str, FeatureSpec] = {}
        elig = self.index.eligibility
        if elig is not None:
            s = elig.schema()
            for f, name in enumerate(s.names):
                specs[name] = FeatureSpec(name, s.cardinality[f], s.vocab[f], f,
                                          name in self.model.feature_buffers)
        for name in self.model.feature_buffers:
            card = self.model.overarch.cardinalities[name]
            if name in specs:
                old = specs[name]
                specs[name] = FeatureSpec(name, min(card, old.cardinality), old.vocab,
                                          old.eligibility_id, True)
            else:
                specs[name] = FeatureSpec(name, card, None, None, True)
        return specs

    def value_ids(self, feature: str, values: list[Any]) -> list[int]:
        """Raw values of ``feature`` -> sorted distinct value ids (``KeyError`` for an unknown
        feature, ``ValueError`` / ``TypeError`` for a bad value)."""
        if feature not in self.features:
            raise KeyError(f"unknown item feature '{feature}'; known: {sorted(self.features)}")
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
            raise TypeError(f"attribute '{feature}': expected a list of values, got {type(values).__name__}")
        spec = self.features[feature]
        return sorted({spec.value_id(v) for v in values})

    def is_live(self, item_id: int) -> bool:
        """Whether ``item_id`` is in the index (inserted and not deleted)."""
        slot = self.model.item_slot
        return 0 <= int(item_id) < slot.shape[0] and int(slot[int(item_id)]) >= 0

    def stats(self) -> dict[str, int]:
        """``generation``, ``live_items``, ``main_items``, ``fresh_items``, ``fresh_used`` (fresh
        slots handed out, tombstones included), ``fresh_capacity`` (allocated fresh slots),
        ``tombstones`` (deleted slots awaiting compaction), ``slots``, ``id_space``."""
        ivf = self.index.ivf
        slot = self.model.item_slot
        live_slots = slot[slot >= 0]
        main = ivf.main_slots
        return {
            "generation": self.generation,
            "live_items": int(live_slots.numel()),
            "main_items": int((live_slots < main).sum()),
            "fresh_items": int((live_slots >= main).sum()) if ivf.has_fresh else 0,
            "fresh_used": fresh.fresh_used(ivf),
            "fresh_capacity": fresh.fresh_capacity(ivf),
            "tombstones": int((ivf.slot_ids == TOMBSTONE).sum()),
            "slots": ivf.num_slots,
            "id_space": int(slot.shape[0]),
        }

    # ---------------------------------------------------------------------------- validation
    def _check_device(self, what: str) -> None:
        dev = self.index.ivf.vectors.device
        if dev.type != "cpu":
            raise NotImplementedError(
                f"{what}: streaming updates run on a CPU model (index on {dev}); update a CPU copy "
                f"and move it, or load its state_dict"
            )

    def _check_ids(self, ids: Any, what: str) -> Tensor:
        self._check_device(what)
        if not isinstance(ids, Tensor):
            raise TypeError(f"{what}: ids must be an int64 tensor (n,), got {type(ids).__name__}")
        if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{what}: ids must be an int64 tensor (n,), got {ids.dtype} {tuple(ids.shape)}")
        ids = ids.to(torch.int64).cpu()
        if ids.numel() and int(ids.min()) < 0:
            bad = int(ids[ids < 0][0])
            raise ValueError(f"{what}: item ids must be >= 0, got {bad}")
        if torch.unique(ids).numel() != ids.numel():
            u, c = torch.unique(ids, return_counts=True)
            raise ValueError(f"{what}: item id {int(u[c > 1][0])} appears more than once in one call")
        return ids

    def _check_live(self, ids: Tensor, what: str) -> Tensor:
        """Slots of ``ids``; ``KeyError`` naming the first id that is unknown or deleted."""
        slot = self.model.item_slot.cpu()
        slots = torch.full_like(ids, -1)
        inside = ids < slot.shape[0]
        slots[inside] = slot[ids[inside]]
        if bool((slots < 0).any()):
            bad = int(ids[slots < 0][0])
            raise KeyError(f"{what}: item id {bad} is unknown or deleted")
        return slots

    def _encode_attributes(self, attributes: Any, n: int, what: str) -> list[dict[str, list[int]]]:
        if not isinstance(attributes, (list, tuple)) or len(attributes) != n:
            got = len(attributes) if isinstance(attributes, (list, tuple)) else type(attributes).__name__
            raise ValueError(f"{what}: attributes must be a list of {n} dicts (one per id), got {got}")
        out = []
        for i, item in enumerate(attributes):
            if item is None:  # this item keeps its attributes (a new item: empty sets)
                item = {}
            if not isinstance(item, dict):
                raise TypeError(f"{what}: attributes[{i}] must be a dict feature -> values, "
                                f"got {type(item).__name__}")
            enc = {}
            for name, values in item.items():
                if name not in self.features:
                    raise ValueError(f"{what}: attributes[{i}] has unknown feature '{name}'; "
                                     f"known: {sorted(self.features)}")
                enc[name] = self.value_ids(name, values)
            out.append(enc)
        return out

    # ------------------------------------------------------------------------------ updates
    @torch.no_grad()
    def upsert(self, ids: Tensor, vectors: Tensor, attributes: Attributes | None = None) -> UpdateResult:
        """Insert or update items: ``ids (n,) int64 >= 0`` (internal item ids), ``vectors (n, D)``
        float, ``attributes`` one dict (or None) per id, or None for all: listed features are
        replaced, the others kept (new items: empty sets)."""
        ids = self._check_ids(ids, "upsert")
        n = ids.numel()
        ivf = self.index.ivf
        check_vectors(vectors, "upsert vectors")
        if vectors.shape != (n, ivf.dim):
            raise ValueError(f"upsert: vectors must be ({n}, {ivf.dim}) (one row per id, index dim "
                             f"{ivf.dim}), got {tuple(vectors.shape)}")
        enc = None if attributes is None else self._encode_attributes(attributes, n, "upsert")
        if n == 0:
            return UpdateResult(self.generation)
        codes, scales = fresh.encode_rows(ivf, vectors)
        slot = self.model.item_slot.cpu()
        known = ids < slot.shape[0]
        cur = torch.full_like(ids, -1)
        cur[known] = slot[ids[known]]
        old = cur >= 0
        n_new = int((~old).sum())
        # ---------------------------------------------------------------- writes start here
        self._histograms(cur[old], -1)  # the updated items' old sets leave their clusters' counts
        if n_new:
            fresh.reserve(self.index, n_new, self.fresh_capacity_for_new_region())
            ivf = self.index.ivf
            cur[~old] = fresh.take_slots(ivf, n_new)
            self._grow_ids(int(ids.max()) + 1)
        fresh.write_rows(ivf, cur, codes, scales, ids)
        new_slots, new_ids = cur[~old], ids[~old]
        empty = [{} for _ in range(n)]
        self._write_attributes(cur, enc or empty, reset=~old)
        if n_new:
            dev = self.model.item_slot.device
            self.model.item_slot[new_ids.to(dev)] = new_slots.to(dev)
            fresh.set_live(ivf, new_slots, True)
            if self.index.eligibility is not None:
                set_elig_live(self.index.eligibility, new_slots, True)
        self._histograms(cur, +1)
        return UpdateResult(self._bump(), updated=n - n_new, inserted=n_new)

    @torch.no_grad()
    def delete(self, ids: Tensor) -> UpdateResult:
        """Tombstone items ``ids (n,) int64``; ``KeyError`` naming an unknown or deleted id."""
        ids = self._check_ids(ids, "delete")
        slots = self._check_live(ids, "delete")
        if ids.numel() == 0:
            return UpdateResult(self.generation)
        self._histograms(slots, -1)
        fresh.tombstone(self.index.ivf, slots)
        if self.index.eligibility is not None:
            set_elig_live(self.index.eligibility, slots, False)
        self.model.item_slot[ids.to(self.model.item_slot.device)] = -1
        return UpdateResult(self._bump(), deleted=ids.numel())

    @torch.no_grad()
    def patch_attributes(self, ids: Tensor, attributes: Attributes) -> UpdateResult:
        """Replace the listed features' sets of live items ``ids (n,)``; other features stay."""
        ids = self._check_ids(ids, "patch_attributes")
        enc = self._encode_attributes(attributes, ids.numel(), "patch_attributes")
        slots = self._check_live(ids, "patch_attributes")
        if ids.numel() == 0:
            return UpdateResult(self.generation)
        self._histograms(slots, -1)
        self._write_attributes(slots, enc, reset=torch.zeros(ids.numel(), dtype=torch.bool))
        self._histograms(slots, +1)
        return UpdateResult(self._bump(), patched=ids.numel())

    # ------------------------------------------------------------------------------ writers
    def _histograms(self, slots: Tensor, sign: int) -> None:
        """Per-cluster value counts (selectivity-aware probing) -/+ the live ``slots``' sets."""
        index = self.index
        if getattr(index, "selectivity", None) is not None and index.eligibility is not None:
            ivf = index.ivf
            index.selectivity.add_slots(slots.cpu(), ivf.cluster_offsets, ivf.live_words,
                                        index.eligibility, sign)

    def _bump(self) -> int:
        self.model.catalog_generation += 1
        return self.generation

    def _write_attributes(self, slots: Tensor, enc: list[dict[str, list[int]]], reset: Tensor) -> None:
        """Eligibility sets and OverArch rows of ``slots``; rows with ``reset`` start empty."""
        ids = self.model.index.ivf.slot_ids[slots.to(self.model.index.ivf.slot_ids.device)].cpu()
        elig = self.index.eligibility
        if elig is not None:
            sets: dict[int, tuple[list[int], list[list[int]]]] = {}
            for i, item in enumerate(enc):
                for name, vals in item.items():
                    f = self.features[name].eligibility_id
                    if f is not None:
                        sets.setdefault(f, ([], []))
                        sets[f][0].append(i)
                        sets[f][1].append(vals)
            for f, (rows, vals) in sets.items():
                sub = {f: vals}
                check_sets(elig, sub, len(rows))
                rewrite_sets(elig, slots[torch.tensor(rows, dtype=torch.int64)], sub)
        for name, buffer in self.model.feature_buffers.items():
            table = self.model._buffers[buffer]
            pad = self.model.overarch.padding_id(name)
            rows = [(int(ids[i]), item[name]) for i, item in enumerate(enc) if name in item]
            width = max([table.shape[1]] + [len(v) for _, v in rows])
            if width > table.shape[1]:
                wide = torch.full((table.shape[0], width), pad, dtype=table.dtype, device=table.device)
                wide[:, : table.shape[1]] = table
                self.model._buffers[buffer] = table = wide
            if bool(reset.any()):
                table[ids[reset].to(table.device)] = pad
            for item_id, vals in rows:
                row = torch.full((width,), pad, dtype=table.dtype)
                row[: len(vals)] = torch.tensor(vals, dtype=table.dtype)
                table[item_id] = row.to(table.device)

    def _grow_ids(self, needed: int) -> None:
        """Grow ``item_slot (N,)`` and ``item_feature_* (N + 1, L)`` to cover ids ``< needed``
        (with 25% + 64 headroom); the padding row stays last."""
        m = self.model
        n = m.item_slot.shape[0]
        if needed <= n:
            return
        new_n = max(needed, n + n // 4 + 64)
        slot = torch.full((new_n,), -1, dtype=torch.int64, device=m.item_slot.device)
        slot[:n] = m.item_slot
        m.item_slot = slot
        for name, buffer in m.feature_buffers.items():
            table = m._buffers[buffer]
            pad = m.overarch.padding_id(name)
            grown = torch.full((new_n + 1, table.shape[1]), pad, dtype=table.dtype, device=table.device)
            grown[:n] = table[:n]
            m._buffers[buffer] = grown
        m.num_items = new_n


def compact_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A :class:`RetrievalModel` state dict -> the compacted one (pure; run it on a snapshot).

    The fresh segment is folded into the main clusters (each fresh item joins its nearest
    centroid's cluster), tombstones are dropped, the eligibility index is rebuilt from its exact
    sets, and ``item_slot`` follows the moved slots. Everything else (towers, OverArch,
    ``item_feature_*``, ``catalog_generation``: compaction changes no item, so the generation stays)
    is passed through. ``model.load_state_dict(compact_state(model.state_dict()))`` is accepted.
    """
    prefix = "index."
    if "item_slot" not in state or prefix + "ivf.slot_ids" not in state:
        raise KeyError("compact_state expects a RetrievalModel state dict "
                       "(with 'item_slot' and 'index.ivf.*')")
    index_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    new_index, new_of_old = compact_index_state(index_state)
    out = {k: v for k, v in state.items() if not k.startswith(prefix)}
    out.update({prefix + k: v for k, v in new_index.items()})
    slot = state["item_slot"].cpu()
    live = slot >= 0
    moved = torch.full_like(slot, -1)
    moved[live] = new_of_old[slot[live]]
    out["item_slot"] = moved.to(state["item_slot"].device)
    return out
