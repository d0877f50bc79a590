"""Retrieve responses as JSON bytes, built per micro-batch with little Python per item.

``POST /v1/retrieve`` answers ``{"items": [{"id", "title", "score", "task_scores": {task: p},
"retrieval_score"}], "version", "generation", "warnings"}``. Building that as Python dicts (one
dict per item plus one per item's task scores) and serializing them afterwards costs more CPU than
the forward pass itself at large ``k`` (measured in ``docs/serving.md``, "Performance notes"), so
the model-owner thread writes the bytes directly:

- each item's constant head ``{"id":...,"title":...,"score":`` is encoded once and cached by
  :class:`serve.ids.ItemIds` (dropped when an upsert changes the item);
- every number of a query's answer is formatted by ONE ``orjson.dumps`` of a ``float64`` numpy
  array (the same shortest round-trip text as ``orjson.dumps`` of the Python floats that
  ``Tensor.tolist()`` gives, so the bytes equal those of the dict path);
- the pieces are put together by one ``bytes %`` call over a template for ``n`` items.

The answer is byte-for-byte what ``orjson.dumps`` of the dict answer of
:meth:`serve.served.Served.run_queries` gives (``tests/test_serve_response.py`` checks it).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import orjson

from serve.ids import ItemIds

__all__ = ["ResponseEncoder"]


class ResponseEncoder:
    """Encodes the answers of one artifact (fixed ``tasks`` and ``version``)."""

    def __init__(self, tasks: Sequence[str], version: str) -> None:
        self.tasks = list(tasks)
        self.width = len(self.tasks) + 2  # numbers per item: score, task scores, retrieval score
        scores = b",".join(orjson.dumps(str(t)) + b":%s" for t in self.tasks)
        # one item: head (cached per item) + score + task scores + retrieval score
        self._item = b'%s%s,"task_scores":{' + scores + b'},"retrieval_score":%s}'
        self._templates: dict[int, bytes] = {}
        self._version = orjson.dumps(str(version))

    def _template(self, n: int) -> bytes:
        tmpl = self._templates.get(n)
        if tmpl is None:
            tmpl = self._templates[n] = b",".join([self._item] * n)
        return tmpl

    def encode(self, ids: ItemIds, item_ids: Sequence[int], numbers: np.ndarray, generation: int,
               warnings: Sequence[str]) -> bytes:
        """One answer. ``item_ids``: the ``n`` internal ids to list (valid ones, best first);
        ``numbers``: ``(n, 2 + T)`` floats, rows ``[score, task scores..., retrieval score]``
        (written as ``float64``)."""
        n = len(item_ids)
        end = (b'],"version":' + self._version + b',"generation":' + str(int(generation)).encode()
               + b',"warnings":' + orjson.dumps([str(w) for w in warnings]) + b"}")
        if n == 0:
            return b'{"items":[' + end
        if tuple(numbers.shape) != (n, self.width):
            raise ValueError(f"numbers: expected shape ({n}, {self.width}), got {tuple(numbers.shape)}")
        text = orjson.dumps(np.ascontiguousarray(numbers, dtype=np.float64),
                            option=orjson.OPT_SERIALIZE_NUMPY)
        flat = text[2:-2].replace(b"],[", b",").split(b",")  # b'[[a,b],[c,d]]' -> [a, b, c, d]
        w = self.width
        args: list[bytes] = [b""] * (n * (w + 1))
        args[0::w + 1] = ids.json_heads(item_ids)
        for c in range(w):
            args[c + 1::w + 1] = flat[c::w]
        return b'{"items":[' + self._template(n) % tuple(args) + end
