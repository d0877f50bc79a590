"""A stand-in for ``silvertorch serve`` while its HTTP server is not in the tree: the same HTTP
stack, the same JSON API (:mod:`.api`) and the same micro-batcher as the mesh, around ONE
in-process :class:`~silvertorch.model.RetrievalModel` forward pass per batch. It has none of the
real server's extras (metrics, update log, hot swap), so it can only be as fast or faster than
the real server; :mod:`benchmarks.mesh_bench` uses ``python -m launch.cli serve`` when it exists.
"""

from __future__ import annotations

import numpy as np
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from silvertorch.export import encode_user_features

from .api import ApiError, RequestCodec, RetrieveRequest
from .service import MicroBatcher, health_routes, worker
from .settings import MeshSettings

__all__ = ["build_app"]


def build_app(codec: RequestCodec, settings: MeshSettings) -> Starlette:
    artifact = codec.artifact
    model = artifact.model.eval()
    defaults = model.value_model.weights.numpy()

    @torch.no_grad()
    def run(reqs: list[RetrieveRequest]) -> list[bytes]:
        kjt = encode_user_features(artifact, [r.user for r in reqs])
        filters = [r.filter for r in reqs] if any(r.filter for r in reqs) else None
        weights = None
        if any(r.weights is not None for r in reqs):
            weights = torch.from_numpy(np.stack([r.weights if r.weights is not None else defaults
                                                 for r in reqs]).astype(np.float32))
        out = model.retrieve(kjt, reqs[0].k, filters, weights, reqs[0].nprobe)
        ids, sc, ts, rs = (t.numpy() for t in out)
        return [codec.response(ids[i], sc[i], ts[i], rs[i]) for i in range(len(reqs))]

    batcher = MicroBatcher(run, settings, worker(settings.threads), key=lambda r: (r.k, r.nprobe))

    async def retrieve(request: Request) -> Response:
        try:
            req = codec.parse(await request.body())
            data = await batcher.submit(req)
        except ApiError as err:
            return Response(err.body(), err.status, media_type="application/json")
        return Response(data, media_type="application/json")

    return Starlette(routes=[Route("/v1/retrieve", retrieve, methods=["POST"]),
                             *health_routes(f"silvertorch-standin {codec.version}")])
