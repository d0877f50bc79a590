"""A small asyncio HTTP/1.1 client with persistent keep-alive connections, used for the mesh's
internal RPCs and as the load generator for both systems (the same client for both).

- :class:`HttpPool`: up to ``size`` persistent connections to one ``host:port``; a request takes an
  idle connection (or opens one), writes ``POST``/``GET`` with ``Content-Length``, reads the status
  line, headers and a ``Content-Length`` body. A connection the server closed is reopened once.
- :func:`run_load`: ``concurrency`` workers, each on its own keep-alive connection, send request
  bodies in turn for ``duration_s`` (after ``warmup_s`` untimed) -> :class:`LoadResult`
  (requests/s = responses completed inside the window / its length, p50/p99 latency of those
  responses, errors).
- :func:`post_json` / :func:`get`: one-shot helpers for tests (blocking).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

__all__ = ["HttpError", "HttpPool", "LoadResult", "run_load", "post_json", "get", "request_once", "fetch_all"]


class HttpError(RuntimeError):
    """A non-2xx answer from a service: ``status`` and the body text."""

    def __init__(self, status: int, body: bytes, where: str = "") -> None:
        super().__init__(f"{where} HTTP {status}: {body[:300].decode('utf-8', 'replace')}")
        self.status, self.body = status, body


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        self.writer.write(head + body)
        line = await self.reader.readuntil(b"\r\n\r\n")
        status = int(line[9:12])
        length, close = 0, False
        for h in line.split(b"\r\n")[1:]:
            name, _, value = h.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
            elif name == b"transfer-encoding":
                raise HttpError(status, b"chunked responses are not supported by this client")
        data = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, data

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class HttpPool:
    """Persistent connections to one server (see module doc)."""

    def __init__(self, host: str, port: int, size: int = 16) -> None:
        self.host, self.port, self.size = host, port, size
        self.idle: list[_Conn] = []
        self.open = 0
        self.available = asyncio.Semaphore(size)

    async def _get(self) -> _Conn:
        while self.idle:
            c = self.idle.pop()
            if not c.closed:
                return c
            self.open -= 1
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self.open += 1
        return _Conn(reader, writer)

    async def request(self, method: str, path: str, body: bytes = b"",
                      content_type: str = "application/octet-stream",
                      timeout_s: float | None = 60.0) -> tuple[int, bytes]:
        """One request on a pooled connection. A reused connection the server has closed is
        dropped and the request retried on the next one (finally on a fresh connection);
        ``asyncio.TimeoutError`` after ``timeout_s``."""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        async with self.available:
            while True:
                fresh = not self.idle
                conn = await self._get()
                try:
                    status, data = await asyncio.wait_for(conn.request(head, body), timeout_s)
                except (ConnectionError, asyncio.IncompleteReadError, OSError, asyncio.TimeoutError):
                    conn.close()
                    self.open -= 1
                    if fresh:
                        raise
                    continue
                if conn.closed:
                    self.open -= 1
                else:
                    self.idle.append(conn)
                return status, data

    async def post(self, path: str, body: bytes, content_type: str, where: str = "") -> bytes:
        """POST and return the body; :class:`HttpError` for a non-2xx status."""
        status, data = await self.request("POST", path, body, content_type)
        if status >= 300:
            raise HttpError(status, data, where)
        return data

    async def close(self) -> None:
        for c in self.idle:
            c.close()
        self.idle.clear()


@dataclass
class LoadResult:
    """Latencies (ms) of completed requests in the timed window and the window length;
    ``completed_total`` counts every response, warm-up and stragglers after the window included
    (the denominator of CPU per request over the whole call)."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    completed_total: int = 0
    elapsed_s: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

    def summary(self) -> dict[str, float]:
        return {"rps": self.rps, "p50_ms": self.percentile(50), "p99_ms": self.percentile(99),
                "mean_ms": statistics.fmean(self.latencies_ms) if self.latencies_ms else float("nan"),
                "requests": len(self.latencies_ms), "errors": self.errors}


async def _load(host: str, port: int, path: str, bodies: list[bytes], concurrency: int,
                duration_s: float, warmup_s: float) -> LoadResult:
    result = LoadResult()
    t_start = time.perf_counter()
    t_timed = t_start + warmup_s
    t_end = t_timed + duration_s
    counter = iter(range(1 << 62))

    async def worker() -> None:
        pool = HttpPool(host, port, size=1)
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                body = bodies[next(counter) % len(bodies)]
                try:
                    status, _ = await pool.request("POST", path, body, "application/json")
                except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                    status = 599
                t1 = time.perf_counter()
                result.completed_total += 1
                if t_timed <= t1 <= t_end:  # completions inside the window: throughput = count / window
                    result.statuses[status] = result.statuses.get(status, 0) + 1
                    if status == 200:
                        result.latencies_ms.append((t1 - t0) * 1000.0)
                    else:
                        result.errors += 1
        finally:
            await pool.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed_s = duration_s
    return result


def run_load(host: str, port: int, bodies: list[bytes], *, concurrency: int = 16,
             duration_s: float = 5.0, warmup_s: float = 1.0, path: str = "/v1/retrieve") -> LoadResult:
    """Closed-loop load: ``concurrency`` keep-alive connections for ``duration_s`` (blocking).
    Responses that complete before ``warmup_s`` has passed or after the window are not counted."""
    try:
        import uvloop

        return uvloop.run(_load(host, port, path, bodies, concurrency, duration_s, warmup_s))
    except ImportError:  # pragma: no cover - uvloop is installed with the serving stack
        return asyncio.run(_load(host, port, path, bodies, concurrency, duration_s, warmup_s))


async def request_once(host: str, port: int, method: str, path: str, body: bytes = b"",
                       content_type: str = "application/json") -> tuple[int, bytes]:
    pool = HttpPool(host, port, size=1)
    try:
        return await pool.request(method, path, body, content_type)
    finally:
        await pool.close()


def post_json(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
    """Blocking one-shot POST to ``http://host:port/path``: ``(status, body)``."""
    host, port, path = _split(url)
    return asyncio.run(request_once(host, port, "POST", path, body, content_type))


def get(url: str) -> tuple[int, bytes]:
    host, port, path = _split(url)
    return asyncio.run(request_once(host, port, "GET", path))


def _split(url: str) -> tuple[str, int, str]:
    rest = url.split("://", 1)[-1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    return host, int(port or 80), "/" + path


async def _fetch_all(host: str, port: int, path: str, bodies: list[bytes],
                     concurrency: int) -> list[tuple[int, bytes]]:
    pool = HttpPool(host, port, size=concurrency)
    try:
        return list(await asyncio.gather(*(pool.request("POST", path, b, "application/json") for b in bodies)))
    finally:
        await pool.close()


def fetch_all(url: str, bodies: list[bytes], concurrency: int = 8) -> list[tuple[int, bytes]]:
    """POST every body to ``url`` over ``concurrency`` keep-alive connections: ``[(status, body)]``
    in order (blocking)."""
    host, port, path = _split(url)
    return asyncio.run(_fetch_all(host, port, path, bodies, concurrency))
