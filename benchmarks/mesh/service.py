"""What every mesh service shares: a micro-batcher, the binary endpoint, and the process runner.

- :class:`MicroBatcher`: concurrent requests queue up; a batch closes at ``max_batch_size`` rows or
  ``max_wait_ms`` after its first request, and runs on the one worker thread that owns the model
  (torch intra-op threads = ``settings.threads``), off the event loop.
- :func:`binary_route`: a Starlette route that decodes a frame (:mod:`.protocol`), validates it
  with the service's ``parse`` (cheap, on the event loop: a bad request never enters a batch),
  submits it, and answers the encoded result; :class:`~.protocol.ProtocolError` / ``ValueError``
  -> 400 with the message as text, an oversized body -> 413.
- :func:`serve_app`: uvicorn (uvloop + httptools, no access log) on a socket bound to
  ``127.0.0.1:0``; prints ``READY <port>`` on stdout once the socket listens.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, Sequence, TypeVar

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from .protocol import CONTENT_TYPE, ProtocolError, decode, encode
from .settings import MeshSettings

__all__ = ["MicroBatcher", "BinaryService", "binary_route", "health_routes", "serve_app", "worker"]

T = TypeVar("T")
R = TypeVar("R")


def worker(threads: int) -> ThreadPoolExecutor:
    """The one model-owner thread of a process, with ``threads`` torch / faiss threads."""

    def init() -> None:
        import torch

        torch.set_num_threads(threads)
        try:
            import faiss

            faiss.omp_set_num_threads(threads)
        except ImportError:  # pragma: no cover - faiss is only needed by the ANN service
            pass

    return ThreadPoolExecutor(max_workers=1, initializer=init, thread_name_prefix="model")


@dataclass
class _Pending(Generic[T]):
    item: T
    rows: int
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]


class MicroBatcher(Generic[T, R]):
    """Batches concurrent submissions with the same key and runs ``fn(items) -> results`` on the
    worker thread (or awaits it on the event loop when ``fn`` is a coroutine function; then
    ``executor`` may be None).

    ``key(item)`` groups compatible requests (e.g. equal ``k``); ``rows(item)`` is how many queries
    an item carries (a batch closes once it holds ``max_batch_size`` rows).
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], settings: MeshSettings,
                 executor: ThreadPoolExecutor | None, key: Callable[[T], Hashable] = lambda _: 0,
                 rows: Callable[[T], int] = lambda _: 1) -> None:
        self.fn, self.key, self.rows = fn, key, rows
        self.max_rows, self.max_wait = settings.max_batch_size, settings.max_wait_ms / 1000.0
        self.executor = executor
        self.queues: dict[Hashable, list[_Pending[T]]] = {}
        self.timers: dict[Hashable, asyncio.TimerHandle] = {}
        self.batches = 0
        self.batched_rows = 0
        self.running: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        p = _Pending(item, self.rows(item), loop.create_future())
        k = self.key(item)
        q = self.queues.setdefault(k, [])
        q.append(p)
        if sum(x.rows for x in q) >= self.max_rows:
            self._flush(k)
        elif k not in self.timers:
            self.timers[k] = loop.call_later(self.max_wait, self._flush, k)
        return await p.future

    def _flush(self, k: Hashable) -> None:
        timer = self.timers.pop(k, None)
        if timer is not None:
            timer.cancel()
        batch = self.queues.pop(k, [])
        if batch:
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _run(self, batch: list[_Pending[T]]) -> None:
        loop = asyncio.get_running_loop()
        self.batches += 1
        self.batched_rows += sum(p.rows for p in batch)
        try:
            items = [p.item for p in batch]
            if asyncio.iscoroutinefunction(self.fn):  # orchestration: awaits RPCs, no worker thread
                results = await self.fn(items)
            else:
                results = await loop.run_in_executor(self.executor, self.fn, items)
        except Exception as err:  # noqa: BLE001 - every waiter learns about the failure
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        for p, r in zip(batch, results):
            if not p.future.done():
                p.future.set_result(r)


class BinaryService(Generic[T]):
    """A service's logic: ``parse(arrays) -> item`` (validation; raise ``ValueError``),
    ``run(items) -> list of {name: array}`` (one batch, worker thread), ``key`` / ``rows``."""

    name = "service"

    def parse(self, arrays: dict[str, np.ndarray]) -> T:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, items: list[T]) -> list[dict[str, np.ndarray]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def key(self, item: T) -> Hashable:
        return 0

    def rows(self, item: T) -> int:
        return 1


def binary_route(path: str, service: BinaryService[Any], settings: MeshSettings,
                 executor: ThreadPoolExecutor) -> Route:
    """``POST path``: frame in, frame out (see module doc)."""
    batcher = MicroBatcher(service.run, settings, executor, service.key, service.rows)

    async def endpoint(request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return PlainTextResponse(f"body of {length} bytes exceeds {settings.max_body_bytes}", 413)
        body = await request.body()
        try:
            item = service.parse(decode(body))
        except (ProtocolError, ValueError, TypeError) as err:
            return PlainTextResponse(f"{service.name}: {err}", 400)
        out = await batcher.submit(item)
        return Response(encode(out), media_type=CONTENT_TYPE)

    route = Route(path, endpoint, methods=["POST"])
    route.batcher = batcher  # type: ignore[attr-defined]
    return route


def health_routes(name: str) -> list[Route]:
    async def healthz(_: Request) -> Response:
        return PlainTextResponse(f"{name} ok")

    return [Route("/healthz", healthz, methods=["GET"]), Route("/readyz", healthz, methods=["GET"])]


def serve_app(app: Starlette, host: str = "127.0.0.1") -> None:
    """Run ``app`` under uvicorn on a free port of ``host``; prints ``READY <port>`` (stdout)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, loop="uvloop", http="httptools", log_level="warning",
                            access_log=False, lifespan="off", timeout_keep_alive=3600,
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    print(f"READY {port}", flush=True)
    sys.stdout.flush()
    server.run(sockets=[sock])
