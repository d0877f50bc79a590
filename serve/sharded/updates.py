"""The leader's side of item updates: HTTP request bodies -> update records (the format of
``serve/served.py``, so the update log of a sharded server reads like the single-process one),
validated completely before anything is sent to a rank.

:class:`UpdatePreparer` mirrors ``Served.prepare_upsert`` / ``prepare_delete`` / ``prepare_patch``:
the same checks, the same messages, the same raw-id -> internal-id assignment (``serve.ids``), the
same vectors (the replicated item tower for upserts by features); then
:meth:`ShardCatalog.check` runs what every rank's write would refuse. Refusals raise
``serve.served.RequestError`` (400 / 404) and nothing is written anywhere.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from serve.ids import ItemIds
from serve.served import ID_FEATURE, RequestError
from silvertorch.export import encode_item_features
from silvertorch.export_sharded import ShardedPart

from .catalog import ShardCatalog

__all__ = ["UpdatePreparer"]


def _values(raw: Any) -> list[str]:
    return [raw] if isinstance(raw, str) else [str(v) for v in raw]


class UpdatePreparer:
    """Builds checked update records on the leader (one per request)."""

    def __init__(self, part: ShardedPart, catalog: ShardCatalog, ids: ItemIds) -> None:
        self.part, self.catalog, self.ids = part, catalog, ids
        elig = part.model.index.eligibility
        self.attribute_names: set[str] = set(elig.schema().names) if elig is not None else set()
        self.dim = int(part.model.index.ivf.dim)

    def _internal(self, raw: str) -> int:
        internal = self.ids.get(raw)
        if internal is None or not self.catalog.is_live(internal):
            raise RequestError(404, f"item '{raw}' is not in the index")
        return internal

    def _check_attributes(self, where: str, attrs: dict[str, list[str]]) -> None:
        unknown = sorted(set(attrs) - self.attribute_names)
        if unknown:
            raise RequestError(400, f"{where}: unknown attribute(s) {unknown}; the index has "
                                    f"{sorted(self.attribute_names)}")

    def _checked(self, record: dict[str, Any]) -> dict[str, Any]:
        try:
            self.catalog.check(record)
        except KeyError as err:
            raise RequestError(404, f"{err.args[0] if err.args else err}") from None
        except (ValueError, TypeError) as err:
            raise RequestError(400, str(err)) from None
        return record

    @torch.no_grad()
    def upsert(self, items: Sequence[Any]) -> dict[str, Any]:
        """``schemas.ItemUpsert``-like objects -> the upsert record."""
        raws = [str(it.id) for it in items]
        if not raws:
            raise RequestError(400, "items: at least one item is needed")
        dup = sorted({r for r in raws if raws.count(r) > 1})
        if dup:
            raise RequestError(400, f"items: duplicate id(s) {dup[:5]} in one request")
        vectors = torch.empty(len(items), self.dim, dtype=torch.float32)
        by_features = []
        for i, it in enumerate(items):
            if (it.features is None) == (it.vector is None):
                raise RequestError(400, f"items[{i}]: give exactly one of 'features' or 'vector'")
            if it.vector is not None:
                if len(it.vector) != self.dim:
                    raise RequestError(400, f"items[{i}].vector: expected {self.dim} numbers, got {len(it.vector)}")
                if not all(math.isfinite(x) for x in it.vector):
                    raise RequestError(400, f"items[{i}].vector: must be finite (no NaN / inf)")
                vectors[i] = torch.tensor(it.vector, dtype=torch.float32)
            else:
                by_features.append(i)
        if by_features:
            tower = self.part.item_tower
            feats = [{n: _values(v) for n, v in items[i].features.items()} for i in by_features]
            if ID_FEATURE in tower.feature_names:
                for i, f in zip(by_features, feats):
                    f.setdefault(ID_FEATURE, [raws[i]])
            try:
                kjt = encode_item_features(self.part.item_vocab, feats, keys=list(tower.feature_names))
            except ValueError as err:
                raise RequestError(400, f"items[{by_features[0]}].features: {err}") from None
            vecs = tower(kjt).float()
            if not bool(torch.isfinite(vecs).all()):
                raise RequestError(400, "items: the item tower produced non-finite vectors")
            vectors[by_features] = vecs
        internal = self.ids.peek_new(raws)
        rows = []
        for i, it in enumerate(items):
            attrs = it.attributes
            if attrs is None and it.features is not None:
                attrs = {n: _values(v) for n, v in it.features.items() if n in self.attribute_names}
            if attrs is not None:
                self._check_attributes(f"items[{i}].attributes", attrs)
            rows.append({"raw": raws[i], "id": internal[i], "vector": vectors[i].tolist(),
                         "attributes": attrs, "title": it.title})
        return self._checked({"op": "upsert", "items": rows})

    def delete(self, raw: str) -> dict[str, Any]:
        return self._checked({"op": "delete", "raw": raw, "id": self._internal(raw)})

    def patch(self, raw: str, attributes: dict[str, list[str]]) -> dict[str, Any]:
        internal = self._internal(raw)
        self._check_attributes("attributes", attributes)
        return self._checked({"op": "patch", "raw": raw, "id": internal, "attributes": attributes})

    def assign_ids(self, record: dict[str, Any]) -> None:
        """After a record is applied: new raw ids and titles enter the id map."""
        if record["op"] == "upsert":
            for r in record["items"]:
                self.ids.assign(r["raw"], int(r["id"]), r.get("title"))
