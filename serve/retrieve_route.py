"""``POST /v1/retrieve`` as a plain ASGI endpoint: the hot path without FastAPI's per-request
dependency machinery.

The FastAPI route of the same path stays registered (it is what ``/openapi.json`` describes and
what the tests' schema fuzzing reads); this endpoint is placed in front of it in the router and
answers the same way: body parsed by ``orjson``, validated by the same pydantic model
(:class:`serve.schemas.RetrieveRequest`), 422 with the same ``detail`` / ``errors`` as FastAPI's
(field names; ``body: invalid JSON at position N``), 400 / 404 / 500 as ``{"detail": ...}``, and
the answer is the JSON bytes the model-owner thread built for the whole batch
(:mod:`serve.response`). The body-size limit (413) and request metrics wrap it as before
(:mod:`serve.middleware`).

Measured CPU per request of the event-loop thread: ``docs/serving.md``, "Performance notes".
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import orjson
from pydantic import ValidationError

from serve.middleware import ROUTE_KEY
from serve.schemas import RetrieveRequest
from serve.served import RequestError

__all__ = ["RetrieveEndpoint", "validation_body"]

log = logging.getLogger("silvertorch.serve")

_JSON = [(b"content-type", b"application/json")]


def validation_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """pydantic / FastAPI validation errors -> the 422 body ``{"detail": "field: msg; ...",
    "errors": [{"field", "msg", "type"}]}`` (locations without the leading ``body``)."""
    out = []
    for e in errors:
        if e.get("type") == "json_invalid":  # loc is ("body", character offset)
            pos = e.get("loc", ("body", "?"))[-1]
            out.append({"field": "body", "msg": f"invalid JSON at position {pos}: "
                        f"{e.get('ctx', {}).get('error', e.get('msg'))}", "type": "json_invalid"})
            continue
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        out.append({"field": loc, "msg": str(e.get("msg")), "type": str(e.get("type"))})
    return {"detail": "; ".join(f"{e['field']}: {e['msg']}" for e in out), "errors": out}


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    """``Content-Type`` is ``application/json`` or ``application/*+json`` (FastAPI's rule)."""
    for name, value in headers:
        if name == b"content-type":
            kind = value.split(b";", 1)[0].strip().lower()
            return kind == b"application/json" or (kind.startswith(b"application/") and kind.endswith(b"+json"))
    return False


class RetrieveEndpoint:
    """ASGI app of ``POST /v1/retrieve``; ``engine`` is the :class:`serve.engine.Engine` (its
    ``served`` is read per request, so a hot swap takes effect at once)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        named = scope.get(ROUTE_KEY)
        if named is not None:  # the metrics label (serve.middleware.RequestMetrics)
            named["route"] = "/v1/retrieve"
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # client gone, or BodyLimit answered 413
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        status, body = await self._answer(b"".join(chunks), scope.get("headers", []))
        await send({"type": "http.response.start", "status": status,
                    "headers": [*_JSON, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, raw: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
        if not raw:
            return 422, orjson.dumps(validation_body(
                [{"type": "missing", "loc": ("body",), "msg": "Field required"}]))
        data: Any = raw
        if _is_json(headers):
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError as err:
                return 422, orjson.dumps(validation_body(
                    [{"type": "json_invalid", "loc": ("body", err.pos), "ctx": {"error": err.msg}}]))
        try:
            req = RetrieveRequest.model_validate(data)
        except ValidationError as err:
            return 422, orjson.dumps(validation_body(
                [{**e, "loc": ("body", *e.get("loc", ()))} for e in err.errors(include_url=False)]))
        try:
            query = self.engine.served.parse_query(req.user, req.k, req.filter, req.value_weights,
                                                   req.nprobe)
            return 200, await self.engine.query_async(query, as_json=True)
        except RequestError as err:
            return err.status, orjson.dumps({"detail": str(err)})
        except Exception as err:  # noqa: BLE001 - any other failure is the server's: 500
            log.error("request failed: %s: %s", type(err).__name__, err)
            return 500, orjson.dumps({"detail": f"internal error: {type(err).__name__}: {err}"})
