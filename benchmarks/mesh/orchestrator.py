"""The orchestrator: ``POST /v1/retrieve`` (the same JSON as ``silvertorch serve``) -> user-tower
service -> ANN + eligibility service -> scoring service -> merged JSON answer.

Concurrent requests are micro-batched here (same ``max_batch_size`` / ``max_wait_ms`` as the
SilverTorch server, grouped by ``(k, nprobe)``), so one batch costs one RPC per service; each
service batches concurrent RPCs again. RPCs use persistent keep-alive HTTP/1.1 connections
(:class:`.client.HttpPool`) and binary frames (:mod:`.protocol`). Requests are validated here
first (:class:`.api.RequestCodec`: 422 / 400 naming the field), so one bad request never fails a
batch; an upstream 4xx/5xx is passed on with the service named.
"""

from __future__ import annotations

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .api import ApiError, RequestCodec, RetrieveRequest
from .client import HttpError, HttpPool
from .protocol import CONTENT_TYPE, decode, encode, pack_strings
from .service import MicroBatcher, health_routes
from .settings import MeshSettings

__all__ = ["Orchestrator", "build_app"]


class Orchestrator:
    def __init__(self, codec: RequestCodec, upstream: dict[str, int], settings: MeshSettings,
                 host: str = "127.0.0.1") -> None:
        self.codec, self.settings, self.host = codec, settings, host
        self.upstream = upstream
        self.pools: dict[str, HttpPool] = {}
        self.default_weights = codec.artifact.model.value_model.weights.numpy()

    def pool(self, name: str) -> HttpPool:
        if name not in self.pools:
            self.pools[name] = HttpPool(self.host, self.upstream[name], size=32)
        return self.pools[name]

    async def rpc(self, name: str, path: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return decode(await self.pool(name).post(path, encode(arrays), CONTENT_TYPE, where=name))
        except HttpError as err:
            status = err.status if 400 <= err.status < 500 else 502
            raise ApiError(status, f"{name} service: {err.body.decode('utf-8', 'replace')}") from None

    async def run_batch(self, reqs: list[RetrieveRequest]) -> list[bytes]:
        codec = self.codec
        k, nprobe = reqs[0].k, reqs[0].nprobe
        lengths, values = codec.encode_users(reqs)
        query = (await self.rpc("user_tower", "/v1/embed", {"lengths": lengths, "values": values}))["query"]
        search: dict[str, np.ndarray] = {
            "query": query, "params": np.array([codec.k_candidates(k), nprobe, 0], dtype=np.int64)}
        if any(r.filter for r in reqs):
            search["filter_blob"], search["filter_offsets"] = pack_strings([r.filter for r in reqs])
        cand = await self.rpc("ann", "/v1/search", search)
        score = {"query": query, "ids": cand["ids"], "retrieval": cand["scores"],
                 "params": np.array([k], dtype=np.int64)}
        if any(r.weights is not None for r in reqs):
            score["weights"] = np.stack([r.weights if r.weights is not None else self.default_weights
                                         for r in reqs]).astype(np.float32)
        out = await self.rpc("scoring", "/v1/score", score)
        return [codec.response(out["ids"][i], out["scores"][i], out["task_scores"][i], out["retrieval"][i])
                for i in range(len(reqs))]


def build_app(codec: RequestCodec, upstream: dict[str, int], settings: MeshSettings) -> Starlette:
    orch = Orchestrator(codec, upstream, settings)
    batcher = MicroBatcher(orch.run_batch, settings, None, key=lambda r: (r.k, r.nprobe))

    async def retrieve(request: Request) -> Response:
        body = await request.body()
        if len(body) > settings.max_body_bytes:
            return Response(ApiError(413, "body too large").body(), 413, media_type="application/json")
        try:
            req = codec.parse(body)
            data = await batcher.submit(req)
        except ApiError as err:
            return Response(err.body(), err.status, media_type="application/json")
        return Response(data, media_type="application/json")

    routes = [Route("/v1/retrieve", retrieve, methods=["POST"]), *health_routes(f"orchestrator {codec.version}")]
    return Starlette(routes=routes)
