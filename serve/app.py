"""The FastAPI application: routes, error mapping, and the ASGI wrappers (body limit, metrics).

Every route that touches the model goes through :class:`serve.engine.Engine` (one model-owner
thread); the event loop only parses, validates what needs no model, and awaits a Future.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.routing import Route

from serve.engine import Engine
from serve.metrics import CONTENT_TYPE_LATEST, Metrics
from serve.middleware import BodyLimit, RequestMetrics
from serve.retrieve_route import RetrieveEndpoint, validation_body
from serve.server import freeze_heap
from serve.schemas import (
    CompactResponse,
    ErrorResponse,
    LoadRequest,
    LoadResponse,
    PatchAttributesRequest,
    RetrieveRequest,
    RetrieveResponse,
    UpdateResponse,
    UpsertRequest,
)
from serve.served import RequestError, Served

__all__ = ["create_app"]

log = logging.getLogger("silvertorch.serve")

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid value (the message names the field)"},
    413: {"model": ErrorResponse, "description": "body or batch too large"},
}


def _fail(err: Exception) -> HTTPException:
    if isinstance(err, RequestError):
        return HTTPException(err.status, str(err))
    log.error("request failed: %s: %s", type(err).__name__, err)
    return HTTPException(500, f"internal error: {type(err).__name__}: {err}")


async def _wait(future: Any) -> Any:
    try:
        return await asyncio.wrap_future(future)
    except Exception as err:  # noqa: BLE001 - mapped to a status code (RequestError -> its own)
        raise _fail(err) from None


def create_app(engine: Engine, metrics: Metrics,
               load_served: Callable[[str], Served]) -> Any:
    """The ASGI app. ``load_served(path)`` builds the :class:`Served` of another artifact (hot swap;
    raises ``ArtifactError`` / ``LogError`` / ``OSError`` for one that cannot be served)."""
    cfg = engine.config
    app = FastAPI(title="SilverTorch retrieval server", version="1",
                  description="One artifact, one forward pass: retrieval with streaming item updates.")
    swap_lock = asyncio.Lock()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_body(list(exc.errors())), status_code=422)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz() -> Response:
        if not engine.ready:
            return JSONResponse({"detail": "not ready"}, status_code=503)
        return JSONResponse({"status": "ready", "version": engine.served.version})

    @app.get("/metrics", response_class=Response)
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        def read() -> dict[str, Any]:
            s = engine.served
            return {"version": s.version, "generation": s.generation, "tasks": s.tasks, "dim": s.dim,
                    "nlist": int(s.model.index.ivf.nlist),
                    "max_k": s.max_k, "attributes": sorted(s.attribute_names), "stats": s.stats(),
                    "compacting": engine.compacting, "last_compaction_error": engine.last_compaction_error}
        return await _wait(engine.call(read))

    # The documented route (``/openapi.json``); requests are answered by the plain ASGI endpoint
    # placed in front of it below (same validation, errors and answer; less work per request).
    @app.post("/v1/retrieve", response_model=RetrieveResponse, responses=_ERRORS)
    async def retrieve(req: RetrieveRequest) -> Any:
        served = engine.served
        try:
            query = served.parse_query(req.user, req.k, req.filter, req.value_weights, req.nprobe)
        except RequestError as err:
            raise _fail(err) from None
        try:
            body = await engine.query_async(query, as_json=True)  # JSON bytes built per batch
        except Exception as err:  # noqa: BLE001 - mapped to a status code
            raise _fail(err) from None
        return Response(body, media_type="application/json")

    @app.put("/v1/items", response_model=UpdateResponse, responses=_ERRORS)
    async def upsert(req: UpsertRequest) -> Any:
        if len(req.items) > cfg.max_upsert_batch:
            raise HTTPException(413, f"items: {len(req.items)} items exceed max_upsert_batch="
                                     f"{cfg.max_upsert_batch}")
        record, seq, generation = await _wait(engine.update(lambda s: s.prepare_upsert(req.items)))
        return {"ids": [r["raw"] for r in record["items"]], "generation": generation, "seq": seq}

    @app.delete("/v1/items/{item_id}", response_model=UpdateResponse,
                responses={404: {"model": ErrorResponse}})
    async def delete(item_id: str) -> Any:
        record, seq, generation = await _wait(engine.update(lambda s: s.prepare_delete(item_id)))
        return {"ids": [record["raw"]], "generation": generation, "seq": seq}

    @app.patch("/v1/items/{item_id}/attributes", response_model=UpdateResponse,
               responses={**_ERRORS, 404: {"model": ErrorResponse}})
    async def patch(item_id: str, req: PatchAttributesRequest) -> Any:
        record, seq, generation = await _wait(
            engine.update(lambda s: s.prepare_patch(item_id, req.attributes)))
        return {"ids": [record["raw"]], "generation": generation, "seq": seq}

    @app.post("/v1/admin/compact", response_model=CompactResponse)
    async def compact() -> Any:
        def start() -> dict[str, Any]:
            started = engine.start_compaction()
            return {"started": started, "generation": engine.served.generation,
                    "detail": "compaction started in the background" if started
                    else "a compaction is already running"}
        return await _wait(engine.call(start))

    @app.post("/v1/admin/load", response_model=LoadResponse,
              responses={**_ERRORS, 409: {"model": ErrorResponse}})
    async def load(req: LoadRequest) -> Any:
        if swap_lock.locked():
            raise HTTPException(409, "another artifact load is in progress")
        async with swap_lock:
            path = Path(req.path)
            try:
                from silvertorch.export import read_manifest

                manifest = await asyncio.to_thread(read_manifest, path)
            except Exception as err:  # noqa: BLE001 - any unusable artifact: old one keeps serving
                metrics.swaps.labels("refused").inc()
                raise HTTPException(400, f"path: artifact refused, still serving "
                                         f"{engine.served.version}: {err}") from None
            if str(manifest.get("version_id")) == engine.served.version:
                raise HTTPException(409, f"path: artifact version {engine.served.version} is "
                                         f"already being served")
            try:
                new = await asyncio.to_thread(load_served, str(path))
            except Exception as err:  # noqa: BLE001
                metrics.swaps.labels("refused").inc()
                raise HTTPException(400, f"path: artifact refused, still serving "
                                         f"{engine.served.version}: {type(err).__name__}: {err}") from None
            previous = await _wait(engine.call(lambda: engine.swap(new)))
            metrics.swaps.labels("ok").inc()
            if cfg.gc_freeze:  # drop the old artifact's objects, keep the new ones out of reach
                await asyncio.to_thread(freeze_heap)
            return {"version": new.version, "previous_version": previous,
                    "generation": new.generation, "replayed": new.replayed}

    app.router.routes.insert(0, Route("/v1/retrieve", RetrieveEndpoint(engine), methods=["POST"],
                                      include_in_schema=False))
    wrapped: Any = BodyLimit(app, cfg.max_body_bytes)
    wrapped = RequestMetrics(wrapped, metrics)
    wrapped.fastapi = app  # type: ignore[attr-defined]  (for tests / openapi access)
    return wrapped
