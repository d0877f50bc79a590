"""HTTP routes of a sharded replica's leader: the retrieval API of the single-process server
(``/v1/retrieve`` with the same request and response bodies, ``/healthz``, ``/readyz``,
``/metrics``, ``/v1/info``) and the item updates (``PUT /v1/items``, ``DELETE /v1/items/{id}``,
``PATCH /v1/items/{id}/attributes``, same bodies, answers and status codes), compaction
(``POST /v1/admin/compact``: every rank compacts its shard at one log position, synchronously between
batches) and hot swap (``POST /v1/admin/load`` with ``{"path": SHARDED_ARTIFACT}`` and optionally
``"plan"``: every rank loads and verifies its part, the ranks vote, and all switch at one batch
boundary or all keep the old model; 400 names the mismatch, 409 when that version already serves).

``/healthz`` answers 503 with the cause once a rank of the replica is dead (a failed all-gather or
broadcast): the orchestrator restarts the job; ``/v1/retrieve`` then fails at once with 503.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, Response

from serve.metrics import CONTENT_TYPE_LATEST, Metrics
from pydantic import Field

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
from serve.served import RequestError

from .leader import BadRequest, Leader, ShardUnavailable

__all__ = ["create_sharded_app"]



class ShardedLoadRequest(LoadRequest):
    """``path``: a sharded artifact directory on every rank's filesystem; ``plan``: refuse it
    unless it was exported for this plan JSON."""

    plan: str | None = Field(default=None, description="plan JSON the artifact must have been exported for")


class ShardedCompactResponse(CompactResponse):
    seq: int = Field(description="the update-log position every rank compacted at (its snapshot)")


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
    part = leader.part  # the served part at start-up (the leader's changes after a hot swap)
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
        return JSONResponse({"status": "ready", "version": leader.part.version})

    @app.get("/metrics", response_class=Response)
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        m, part = leader.model, leader.part
        return {"version": part.version, "generation": m.generation, "tasks": leader.tasks,
                "dim": int(m.index.ivf.dim), "nlist": int(m.index.ivf.nlist), "max_k": leader.max_k,
                "shards": part.manifest["shards"], "replica": part.replica,
                "items_per_shard": part.manifest["assignment"]["items_per_shard"],
                "stats": leader.catalog.stats() if leader.catalog is not None else {},
                "replayed": leader.replayed, "snapshot_seq": leader.rs.snapshot_seq,
                "compactions": leader.compactions}

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

    @app.post("/v1/admin/compact", response_model=ShardedCompactResponse)
    async def compact() -> Any:
        try:
            return await asyncio.wrap_future(leader.compact())
        except RequestError as err:
            raise HTTPException(err.status, str(err)) from None
        except ShardUnavailable as err:
            raise HTTPException(503, f"sharded replica unavailable: {err}") from None

    swap_lock = asyncio.Lock()

    @app.post("/v1/admin/load", response_model=LoadResponse,
              responses={400: {"model": ErrorResponse}, 409: {"model": ErrorResponse}})
    async def load(req: ShardedLoadRequest) -> Any:
        if swap_lock.locked():
            raise HTTPException(409, "another artifact load is in progress")
        async with swap_lock:
            try:
                return await asyncio.wrap_future(leader.swap(req.path, req.plan))
            except RequestError as err:
                if err.status == 400:
                    metrics.swaps.labels("refused").inc()
                raise HTTPException(err.status, str(err)) from None
            except ShardUnavailable as err:
                raise HTTPException(503, f"sharded replica unavailable: {err}") from None

    return app
