"""The leader's side of item updates: HTTP request bodies -> update records (the format of
``serve/served.py``, so the update log of a sharded server reads like the single-process one),
validated completely before anything is sent to a rank.

:class:`UpdatePreparer` builds upserts with the single-process server's own
``serve.served.upsert_rows`` (the same checks, messages, raw-id -> internal-id assignment and vectors,
from the replicated item tower for upserts by features) and mirrors its deletes and patches; then
:meth:`ShardCatalog.check` runs what every rank's write would refuse. Refusals raise
``serve.served.RequestError`` (400 / 404) and nothing is written anywhere.
"""

from __future__ import annotations

from typing import Any, Sequence

from serve.ids import ItemIds
from serve.served import RequestError, check_attribute_names, upsert_rows
from silvertorch.export import encode_item_features
from silvertorch.export_sharded import ShardedPart

from .catalog import ShardCatalog

__all__ = ["UpdatePreparer"]


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
        check_attribute_names(where, attrs, self.attribute_names)

    def _checked(self, record: dict[str, Any]) -> dict[str, Any]:
        try:
            self.catalog.check(record)
        except KeyError as err:
            raise RequestError(404, f"{err.args[0] if err.args else err}") from None
        except (ValueError, TypeError) as err:
            raise RequestError(400, str(err)) from None
        return record

    def upsert(self, items: Sequence[Any]) -> dict[str, Any]:
        """``schemas.ItemUpsert``-like objects -> the upsert record."""
        tower = self.part.item_tower
        keys = list(tower.feature_names)
        rows = upsert_rows(items, dim=self.dim, tower=tower,
                           encode=lambda feats: encode_item_features(self.part.item_vocab, feats, keys=keys),
                           ids=self.ids, attribute_names=self.attribute_names)
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
