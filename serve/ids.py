"""Raw item ids (what clients send) <-> internal item ids (rows of the model).

The artifact's catalog gives ids ``0..N-1`` (``artifact.item_raw_ids``); a new raw id gets the next
internal id. The map (and titles given with upserts) is part of the durable state: the update log
records each new id and snapshots store :meth:`ItemIds.to_state`.
"""

from __future__ import annotations

from typing import Any, Sequence

import orjson

__all__ = ["ItemIds"]


class ItemIds:
    """Bidirectional id map; ``titles[i]`` is item ``i``'s title ("" when unknown)."""

    def __init__(self, raw_ids: Sequence[str], titles: Sequence[str] | None = None) -> None:
        self.raw: list[str] = [str(r) for r in raw_ids]
        self.titles: list[str] = [str(t) for t in titles] if titles is not None else [""] * len(self.raw)
        if len(self.titles) != len(self.raw):
            raise ValueError(f"{len(self.titles)} titles for {len(self.raw)} item ids")
        self.internal: dict[str, int] = {r: i for i, r in enumerate(self.raw)}
        if len(self.internal) != len(self.raw):
            raise ValueError("the artifact's raw item ids are not unique")
        # internal id -> b'{"id":RAW,"title":TITLE,"score":' (see serve/response.py); an entry is
        # dropped when assign() changes the item
        self._heads: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self.raw)

    def get(self, raw: str) -> int | None:
        return self.internal.get(raw)

    def peek_new(self, raws: Sequence[str]) -> list[int]:
        """Internal ids ``raws`` would have (existing or next free), without assigning them."""
        out, nxt, seen = [], len(self.raw), {}
        for r in raws:
            if r in self.internal:
                out.append(self.internal[r])
            elif r in seen:
                out.append(seen[r])
            else:
                seen[r] = nxt
                out.append(nxt)
                nxt += 1
        return out

    def assign(self, raw: str, internal: int, title: str | None = None) -> None:
        """Record ``raw -> internal`` (a new id must be the next one) and an optional title."""
        if raw in self.internal:
            if self.internal[raw] != internal:
                raise ValueError(f"item '{raw}' is internal id {self.internal[raw]}, not {internal}")
        elif internal != len(self.raw):
            raise ValueError(f"new item '{raw}' must get internal id {len(self.raw)}, got {internal}")
        else:
            self.raw.append(raw)
            self.titles.append("")
            self.internal[raw] = internal
        if title is not None:
            self.titles[internal] = title
        self._heads.pop(internal, None)

    def json_heads(self, internal: Sequence[int]) -> list[bytes]:
        """The constant JSON head ``{"id":RAW,"title":TITLE,"score":`` of each item (cached)."""
        heads = self._heads
        out = []
        for i in internal:
            h = heads.get(i)
            if h is None:
                h = heads[i] = (b'{"id":' + orjson.dumps(self.raw[i]) + b',"title":'
                                + orjson.dumps(self.titles[i]) + b',"score":')
            out.append(h)
        return out

    def copy(self) -> ItemIds:
        return ItemIds(list(self.raw), list(self.titles))

    def to_state(self) -> dict[str, Any]:
        return {"raw": list(self.raw), "titles": list(self.titles)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ItemIds:
        return cls(state["raw"], state["titles"])
