"""Pure ASGI middleware: the request-body size limit (413) and per-route request metrics."""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

import orjson

from serve.metrics import Metrics

__all__ = ["BodyLimit", "RequestMetrics", "ROUTE_KEY"]

ROUTE_KEY = "silvertorch.route"  # scope key: {"route": template} set by an endpoint (metrics label)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def _reply(send: Send, status: int, detail: str) -> None:
    body = orjson.dumps({"detail": detail})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Answer 413 when a body is larger than ``limit`` bytes: at once from ``Content-Length``, or
    while reading a chunked body (the app never sees the rest)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    await _reply(send, 400, "content-length: not an integer")
                    return
                if size > self.limit:
                    await _reply(send, 413, f"request body of {size} bytes exceeds max_body_bytes={self.limit}")
                    return
        seen = 0
        refused = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # answer 413 now; the app sees a disconnect, its reply is dropped
                    refused = True
                    await _reply(send, 413, f"request body exceeds max_body_bytes={self.limit}")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if not refused:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)


class RequestMetrics:
    """Count requests by route template and status, and time them (``Metrics.requests/latency``)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        # (route, method, status) -> (counter child, histogram child): ``labels()`` resolves
        # and locks per call; the children are stable, so each is looked up once
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        # an endpoint that the framework's routing does not report back in ``scope["route"]`` (the
        # scope may be copied on the way down) names its route here: shared by every copy
        named: dict[str, str] = {}
        scope[ROUTE_KEY] = named

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = scope.get("route")
            path = named.get("route") or getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            key = (path, method, status)
            children = self._children.get(key)
            if children is None:
                children = (self.metrics.requests.labels(path, method, str(status)),
                            self.metrics.latency.labels(path, method))
                if len(self._children) < 4096:  # bounded: methods are client-chosen strings
                    self._children[key] = children
            children[0].inc()
            children[1].observe(time.perf_counter() - start)
