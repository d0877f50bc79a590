"""One mesh process: ``python -m benchmarks.mesh.run_service --role ROLE --artifact DIR [...]``.

Roles: ``user_tower``, ``ann``, ``scoring``, ``orchestrator`` (needs ``--upstream
user_tower=PORT,ann=PORT,scoring=PORT``) and ``standin`` (the in-process SilverTorch stand-in).
Each loads the same artifact (:func:`silvertorch.export.load_artifact`, tensors memory-mapped and so
shared between the processes; hashes verified by the orchestrator and the stand-in, the others trust
the same directory and skip the item names, which only those two use), sets torch / faiss threads,
binds ``127.0.0.1:0`` and prints ``READY <port>``. ``GET /healthz`` answers ``<role> <version>``.
"""

from __future__ import annotations

import argparse
import sys

ROLES = ("user_tower", "ann", "scoring", "orchestrator", "standin")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--artifact", required=True)
    p.add_argument("--upstream", default="", help="user_tower=PORT,ann=PORT,scoring=PORT")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-k", type=int, default=1000)
    p.add_argument("--ann", default="flat", choices=("flat", "sq8"))
    p.add_argument("--max-body-bytes", type=int, default=64 << 20)
    return p.parse_args(argv)


def build(args: argparse.Namespace):  # noqa: ANN201 - a Starlette app
    import torch
    from starlette.applications import Starlette

    from silvertorch.export import load_artifact

    from .service import binary_route, health_routes, worker
    from .settings import MeshSettings

    settings = MeshSettings(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                            threads=args.threads, max_k=args.max_k, ann=args.ann,
                            max_body_bytes=args.max_body_bytes)
    settings.validate()
    torch.set_num_threads(settings.threads)
    front = args.role in ("orchestrator", "standin")  # these verify the hashes and name the items
    artifact = load_artifact(args.artifact, verify=front, item_names=front)
    model = artifact.model.eval()
    health = health_routes(f"{args.role} {artifact.version}")
    if front:
        from .api import RequestCodec

        codec = RequestCodec(artifact, settings.max_k)
        if args.role == "standin":
            from .standin import build_app as standin_app

            return standin_app(codec, settings)
        from .orchestrator import build_app as orch_app

        upstream = dict(kv.split("=") for kv in args.upstream.split(",") if kv)
        missing = {"user_tower", "ann", "scoring"} - set(upstream)
        if missing:
            raise SystemExit(f"--upstream lacks {sorted(missing)}")
        return orch_app(codec, {k: int(v) for k, v in upstream.items()}, settings)
    pool = worker(settings.threads)
    if args.role == "user_tower":
        from .user_tower import UserTowerService

        route = binary_route("/v1/embed", UserTowerService(model.user_tower), settings, pool)
    elif args.role == "ann":
        from .ann import AnnService

        max_cand = max(settings.max_k, model.config.k_prime)
        route = binary_route("/v1/search", AnnService(model.index, model.num_items, settings.ann, max_cand,
                                                          min_candidates_factor=model.config.min_candidates_factor,
                                                          max_nprobe=model.config.max_nprobe),
                             settings, pool)
    else:
        from .scoring import ScoringService

        route = binary_route("/v1/score", ScoringService(model), settings, pool)
    return Starlette(routes=[route, *health])


def main(argv: list[str] | None = None) -> int:
    from .service import serve_app

    app = build(parse_args(argv))
    serve_app(app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
