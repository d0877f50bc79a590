"""Streaming item updates of one rank's shard: every rank applies the same update records (the
format of ``serve/update_log.py``, written by the leader) in the same order, so all ranks stay at
one generation.

Routing (decided identically on every rank from the record and the replicated owner map):

- an **upsert** of an item live on shard ``s`` is an in-place update on ``s``; an upsert of an
  item live nowhere (new, or deleted earlier) goes to the **fresh-segment owner** (the shard that
  holds the fresh region; the least-loaded shard when the artifact has none yet);
- a **delete** / **attribute patch** goes to the shard that holds the item;
- every other rank writes only the item's rows of the replicated OverArch feature tables
  (``item_feature_*``: the merged candidates of every shard are scored on every rank) and grows
  its id space the same way, so the replicated state stays bit-identical.

``owners (N,) int64`` (shard of each item id, ``-1`` = not live) is built once at start-up with one
all-gather of the ranks' live masks and then maintained from the records, so the leader can
validate a request completely (unknown ids, attribute values, vector shapes) **before** any rank
writes: :meth:`ShardCatalog.check` raises exactly what :meth:`ShardCatalog.apply` would.
The generation advances by what the single-process server's ``Served.apply_record`` advances it by
(one per updater call), so answers carry the same generation as the unsharded server's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from silvertorch.catalog import CatalogUpdater
from silvertorch.distributed.sharded_retrieval import ShardedRetrievalModel
from silvertorch.index.ivf import check_vectors

__all__ = ["ShardUpdater", "ShardCatalog", "upsert_groups"]


class ShardUpdater(CatalogUpdater):
    """:class:`~silvertorch.catalog.CatalogUpdater` on a :class:`ShardedRetrievalModel` (it has
    the buffers the updater writes: ``index``, ``item_slot``, ``item_feature_*``,
    ``catalog_generation``). Only ever called with ids this shard holds or new ids it receives."""

    def __init__(self, model: ShardedRetrievalModel) -> None:  # noqa: D107 - no super(): type check
        if not isinstance(model, ShardedRetrievalModel):
            raise TypeError(f"ShardUpdater wraps a ShardedRetrievalModel, got {type(model).__name__}")
        self.model = model.eval()  # type: ignore[assignment]
        self._capacity = int(model.config.fresh_capacity)
        self.features = self._feature_specs()


def upsert_groups(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The updater calls of one upsert record, as ``Served.apply_record`` makes them: the rows
    with attributes, then the rows without (empty groups left out)."""
    out = []
    for with_attrs in (True, False):
        part = [r for r in rows if (r.get("attributes") is not None) == with_attrs]
        if part:
            out.append(part)
    return out


class ShardCatalog:
    """One rank's view of the catalog (see the module doc).

    Args:
        model: this rank's sharded model (CPU: streaming updates run on CPU shards).
        owners: ``(N,) int64`` shard of each item id, ``-1`` when not live (same on every rank).
        fresh_owner: the shard that receives new items.
    """

    def __init__(self, model: ShardedRetrievalModel, owners: Tensor, fresh_owner: int) -> None:
        if not 0 <= fresh_owner < model.world_size:
            raise ValueError(f"fresh_owner must lie in [0, {model.world_size}), got {fresh_owner}")
        if owners.dim() != 1 or owners.dtype != torch.int64:
            raise ValueError(f"owners must be (N,) int64, got {owners.dtype} {tuple(owners.shape)}")
        self.model = model
        self.rank = model.rank
        self.fresh_owner = int(fresh_owner)
        self.owners = owners.clone()
        self.updater = ShardUpdater(model)

    @classmethod
    def gather(cls, model: ShardedRetrievalModel, fresh_owner: int) -> ShardCatalog:
        """Build the owner map with one all-gather of every rank's live mask (every rank calls
        this at the same point; raises ``ShardPeerError`` when a peer is gone)."""
        live = (model.item_slot >= 0).to(torch.int32).cpu()
        everyone = model.all_gather(live).cpu()  # (R, N)
        owners = torch.full((live.numel(),), -1, dtype=torch.int64)
        for r in range(everyone.shape[0]):
            owners[everyone[r].bool()] = r
        return cls(model, owners, fresh_owner)

    # ------------------------------------------------------------------------------ queries
    def owner(self, item_id: int) -> int:
        """The shard holding ``item_id``, -1 when it is not live."""
        return int(self.owners[item_id]) if 0 <= item_id < self.owners.numel() else -1

    def is_live(self, item_id: int) -> bool:
        return self.owner(item_id) >= 0

    def stats(self) -> dict[str, int]:
        """Replica-wide ``live_items`` and this shard's updater stats (``shard_*``)."""
        own = {f"shard_{k}": int(v) for k, v in self.updater.stats().items() if isinstance(v, (int, float))}
        return {"generation": self.model.generation, "live_items": int((self.owners >= 0).sum()), **own}

    # --------------------------------------------------------------------------- validation
    def check(self, record: dict[str, Any]) -> None:
        """Everything :meth:`apply` could refuse, without writing: ``ValueError`` / ``TypeError``
        (bad vector / attribute), ``KeyError`` (delete / patch of an item that is not live)."""
        op = record.get("op")
        up = self.updater
        if op == "upsert":
            rows = record["items"]
            ids = [int(r["id"]) for r in rows]
            if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
                raise ValueError(f"upsert: ids must be distinct and >= 0, got {ids[:5]}")
            vecs = torch.tensor([r["vector"] for r in rows], dtype=torch.float32)
            check_vectors(vecs, "upsert vectors")
            dim = self.model.index.ivf.dim
            if vecs.shape != (len(rows), dim):
                raise ValueError(f"upsert: vectors must be ({len(rows)}, {dim}), got {tuple(vecs.shape)}")
            for group in upsert_groups(rows):
                if group[0].get("attributes") is not None:
                    up._encode_attributes([r["attributes"] for r in group], len(group), "upsert")
        elif op in ("delete", "patch"):
            if not self.is_live(int(record["id"])):
                raise KeyError(f"{op}: item id {record['id']} is unknown or deleted")
            if op == "patch":
                up._encode_attributes([record["attributes"]], 1, "patch_attributes")
        else:
            raise ValueError(f"unknown update record op {op!r}")

    # ------------------------------------------------------------------------------- writes
    @torch.no_grad()
    def apply(self, record: dict[str, Any]) -> int:
        """Apply one (checked) record to this rank; returns the generation after it."""
        self.check(record)
        gen0 = self.model.generation
        bumps = 0
        op = record["op"]
        if op == "upsert":
            rows = record["items"]
            ids = [int(r["id"]) for r in rows]
            self._grow(max(ids) + 1)
            for group in upsert_groups(rows):
                bumps += 1
                self._upsert_group(group)
            for i in ids:
                if self.owners[i] < 0:
                    self.owners[i] = self.fresh_owner
            self._sync_global_offsets()
        elif op == "delete":
            item = int(record["id"])
            if self.owner(item) == self.rank:
                self.updater.delete(torch.tensor([item], dtype=torch.int64))
            self.owners[item] = -1
            bumps = 1
        else:  # patch
            item = int(record["id"])
            if self.owner(item) == self.rank:
                self.updater.patch_attributes(torch.tensor([item], dtype=torch.int64), [record["attributes"]])
            else:
                enc = self.updater._encode_attributes([record["attributes"]], 1, "patch_attributes")
                self._write_feature_rows([item], enc, [False])
            bumps = 1
        self.model.catalog_generation.fill_(gen0 + bumps)
        return self.model.generation

    def _upsert_group(self, group: list[dict[str, Any]]) -> None:
        with_attrs = group[0].get("attributes") is not None
        mine, others = [], []
        for r in group:
            owner = self.owner(int(r["id"]))
            target = owner if owner >= 0 else self.fresh_owner
            (mine if target == self.rank else others).append(r)
        if mine:
            ids = torch.tensor([int(r["id"]) for r in mine], dtype=torch.int64)
            vecs = torch.tensor([r["vector"] for r in mine], dtype=torch.float32)
            self.updater.upsert(ids, vecs, [r["attributes"] for r in mine] if with_attrs else None)
        if others:
            attrs = [r["attributes"] if with_attrs else None for r in others]
            enc = self.updater._encode_attributes(attrs, len(others), "upsert")
            self._write_feature_rows([int(r["id"]) for r in others], enc,
                                     [self.owner(int(r["id"])) < 0 for r in others])

    def _grow(self, needed: int) -> None:
        """Grow the id space (``item_slot``, feature tables: the updater's rule, identical on every
        rank) and the owner map to cover ids ``< needed``."""
        self.updater._grow_ids(needed)
        n = self.model.item_slot.shape[0]
        if self.owners.numel() < n:
            grown = torch.full((n,), -1, dtype=torch.int64)
            grown[: self.owners.numel()] = self.owners
            self.owners = grown

    def _write_feature_rows(self, ids: list[int], enc: list[dict[str, list[int]]], reset: list[bool]) -> None:
        """The OverArch feature-table rows of items another shard holds, written as
        ``CatalogUpdater._write_attributes`` writes them on the holder (reset rows start empty;
        a longer value list widens the table)."""
        m = self.model
        for name, buffer in m.feature_buffers.items():
            table = m._buffers[buffer]
            pad = m.overarch.padding_id(name)
            rows = [(ids[i], item[name]) for i, item in enumerate(enc) if name in item]
            width = max([table.shape[1]] + [len(v) for _, v in rows])
            if width > table.shape[1]:
                wide = torch.full((table.shape[0], width), pad, dtype=table.dtype, device=table.device)
                wide[:, : table.shape[1]] = table
                m._buffers[buffer] = table = wide
            for item_id, r in zip(ids, reset):
                if r:
                    table[item_id] = pad
            for item_id, vals in rows:
                row = torch.full((width,), pad, dtype=table.dtype)
                row[: len(vals)] = torch.tensor(vals, dtype=table.dtype)
                table[item_id] = row.to(table.device)

    def _sync_global_offsets(self) -> None:
        """Once the fresh owner has a fresh region, every rank's global offsets get the fresh
        cluster's entry (``(C+2,)``): a fresh slot ``main + j`` of the owner maps to the unsharded
        slot ``global_main + j``, as the unsharded model lays its fresh region out."""
        go = self.model.global_offsets
        C = int(self.model.index.ivf.nlist)
        if go.numel() == C + 1:
            self.model.global_offsets = torch.cat([go, go[-1:]])
