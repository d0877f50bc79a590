"""HTTP routes of a sharded replica's leader: the retrieval API of the single-process server
(``/v1/retrieve`` with the same request and response bodies, ``/healthz``, ``/readyz``,
``/metrics``, ``/v1/info``) and the item updates (``PUT /v1/items``, ``DELETE /v1/items/{id}``,
``PATCH /v1/items/{id}/attributes``, same bodies, answers and status codes). Compaction and hot swap
are not served by a sharded deployment yet: those routes answer 501 with what to do instead (see
docs/sharded_serving.md).

``/healthz`` answers 503 with the cause once a rank of the replica is dead (a failed all-gather or
broadcast): the orchestrator restarts the job; ``/v1/retrieve`` then fails at once with 503.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, Response

from serve.metrics import CONTENT_TYPE_LATEST, Metrics
from serve.schemas import (
    PatchAttributesRequest,
    RetrieveRequest,
    RetrieveResponse,
    UpdateResponse,
    UpsertRequest,
)
from serve.served import RequestError

from .leader import BadRequest, Leader, ShardUnavailable

__all__ = ["create_sharded_app"]

_NOT_SHARDED = ("not supported by the sharded server yet: to compact or replace the artifact, "
                "re-export with `silvertorch export --plan PLAN` and restart the ranks (item updates "
                "are served: PUT/DELETE/PATCH /v1/items)")


async def _update(future: Any) -> Any:
    """Await a leader update; map its refusals to HTTP errors."""
    try:
        record, seq, generation = await asyncio.wrap_future(future)
    except RequestError as err:
        raise HTTPException(err.status, str(err)) from None
    except ShardUnavailable as err:
        raise HTTPException(503, f"sharded replica unavailable: {err}") from None
    ids = [r["raw"] for r in record["items"]] if record["op"] == "upsert" else [record["raw"]]
    return {"ids": ids, "generation": generation, "seq": seq}


def create_sharded_app(leader: Leader, metrics: Metrics, max_upsert_batch: int = 1000) -> FastAPI:
    part = leader.part
    app = FastAPI(title="SilverTorch sharded retrieval server", version="1",
                  description=f"Item shard leader: {part.manifest['shards']} shard(s) per replica.")

    @app.get("/healthz")
    async def healthz() -> Response:
        if not leader.healthy:
            return JSONResponse({"status": "failed", "detail": leader.failure}, status_code=503)
        return JSONResponse({"status": "ok", "shards": part.manifest["shards"], "replica": part.replica})

    @app.get("/readyz")
    async def readyz() -> Response:
        if not (leader.ready and leader.healthy):
            return JSONResponse({"detail": leader.failure or "not ready"}, status_code=503)
        return JSONResponse({"status": "ready", "version": part.version})

    @app.get("/metrics", response_class=Response)
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        m = leader.model
        return {"version": part.version, "generation": m.generation, "tasks": leader.tasks,
                "dim": int(m.index.ivf.dim), "nlist": int(m.index.ivf.nlist), "max_k": leader.max_k,
                "shards": part.manifest["shards"], "replica": part.replica,
                "items_per_shard": part.manifest["assignment"]["items_per_shard"],
                "stats": leader.catalog.stats() if leader.catalog is not None else {},
                "replayed": leader.replayed}

    @app.post("/v1/retrieve", response_model=RetrieveResponse)
    async def retrieve(req: RetrieveRequest) -> Any:
        try:
            query = leader.parse(req.user, req.k, req.filter, req.value_weights, req.nprobe)
        except BadRequest as err:
            raise HTTPException(400, str(err)) from None
        try:
            return await asyncio.wrap_future(leader.submit(query))
        except BadRequest as err:
            raise HTTPException(400, str(err)) from None
        except ShardUnavailable as err:
            raise HTTPException(503, f"sharded replica unavailable: {err}") from None

    @app.put("/v1/items", response_model=UpdateResponse)
    async def upsert(req: UpsertRequest) -> Any:
        if len(req.items) > max_upsert_batch:
            raise HTTPException(413, f"items: {len(req.items)} items exceed max_upsert_batch={max_upsert_batch}")
        return await _update(leader.update(lambda p: p.upsert(req.items)))

    @app.delete("/v1/items/{item_id}", response_model=UpdateResponse)
    async def delete(item_id: str) -> Any:
        return await _update(leader.update(lambda p: p.delete(item_id)))

    @app.patch("/v1/items/{item_id}/attributes", response_model=UpdateResponse)
    async def patch(item_id: str, req: PatchAttributesRequest) -> Any:
        return await _update(leader.update(lambda p: p.patch(item_id, req.attributes)))

    async def not_sharded() -> Response:
        return JSONResponse({"detail": _NOT_SHARDED}, status_code=501)

    app.add_api_route("/v1/admin/compact", not_sharded, methods=["POST"], include_in_schema=False)
    app.add_api_route("/v1/admin/load", not_sharded, methods=["POST"], include_in_schema=False)
    return app
