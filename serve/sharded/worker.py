"""One rank of a sharded serving job: ``python -m serve.sharded.worker ARTIFACT [options]``.

Launched once per rank by torchrun / torchx (which set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``). Every rank starts the process group (gloo on CPU, nccl with
``--device cuda``), loads ITS part of the sharded artifact (``load_sharded_part``: refuses a plan or
world-size mismatch, naming it), then:

- the replica's rank 0 (the leader, global rank ``g * shards``) serves HTTP on ``--port + g``
  (``--port 0``: any free port) and prints one JSON line ``{"listening": URL, "port": P, "rank": R,
  "shards": S, "replica": g, "version": V}`` (and writes the port to ``--port-file`` + ``.g``
  suffix for ``g > 0``);
- the other ranks follow: run every broadcast batch and apply every broadcast item update, exit 0
  on ``stop``, exit 1 when the leader is gone (no message within ``heartbeat + timeout``) so the
  launcher restarts the job.

Item updates (CPU ranks): every rank builds the replicated owner map (one all-gather, see
``serve/sharded/catalog.py``); the leader keeps the durable update log under ``--state-dir``
(``STATE_DIR/<artifact version>/log.jsonl``, one sub-directory ``replica-g`` per replica when the
world runs several) and replays it to every rank before it listens.

Exit codes: 0 normal stop, 1 a dead peer / unusable artifact, 2 bad flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "add_arguments", "run"]

log = logging.getLogger("silvertorch.serve.sharded")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="sharded artifact directory (silvertorch export --plan PLAN)")
    parser.add_argument("--plan", default=None, help="refuse the artifact unless it was exported for this plan")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="replica g listens on port + g; 0 = any free port")
    parser.add_argument("--port-file", default=None, help="leader writes its bound port here once listening")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--timeout-s", type=float, default=30.0,
                        help="collective timeout (a dead rank fails requests within it)")
    parser.add_argument("--heartbeat-s", type=float, default=5.0, help="leader ping interval while idle")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--max-k", type=int, default=1000)
    parser.add_argument("--state-dir", default="runs/serve_state",
                        help="the leader's durable update log (per artifact version)")
    parser.add_argument("--max-upsert-batch", type=int, default=1000, help="most items in one PUT /v1/items")
    parser.add_argument("--log-level", default="warning")


def _groups(world: int, shards: int, backend: str) -> tuple[list[Any], list[Any]]:
    """Per replica: the process group of its all-gathers, and the gloo group of its control
    messages (the same group on CPU; nccl cannot broadcast host tensors). Every rank creates all
    of them, in the same order, as ``new_group`` requires."""
    import torch.distributed as dist

    n = world // shards
    ranks = [list(range(g * shards, (g + 1) * shards)) for g in range(n)]
    data = [None] if n == 1 else [dist.new_group(r) for r in ranks]
    if backend == "gloo":
        return data, data
    return data, [dist.new_group(r, backend="gloo") for r in ranks]


def run(args: argparse.Namespace) -> int:
    from silvertorch.distributed.process_group import env_world, init_distributed
    from silvertorch.export import ArtifactError
    from silvertorch.export_sharded import load_sharded_part, read_sharded_manifest, world_layout

    if args.timeout_s <= 0 or args.heartbeat_s <= 0 or args.max_batch_size < 1:
        print("error: --timeout-s, --heartbeat-s must be > 0 and --max-batch-size >= 1", file=sys.stderr)
        return 2
    try:
        rank, world, _ = env_world()
        manifest = read_sharded_manifest(args.artifact)
        world_layout(world, manifest["shards"], manifest["replicas"])
    except (RuntimeError, ArtifactError, ValueError) as err:
        print(f"error: refusing to serve {args.artifact}: {err}", file=sys.stderr)
        return 1
    ctx = init_distributed(args.device, timeout_s=args.timeout_s + args.heartbeat_s + 30)
    shards = manifest["shards"]
    groups, control = _groups(world, shards, ctx.backend)
    replica = rank // shards
    try:
        part = load_sharded_part(args.artifact, rank=rank, world_size=world, plan=args.plan,
                                 group=groups[replica], timeout_s=args.timeout_s)
    except ArtifactError as err:
        print(f"error: rank {rank}: refusing to serve {args.artifact}: {err}", file=sys.stderr)
        return 1
    part.model.to(ctx.device)
    from silvertorch.distributed.sharded_retrieval import ShardPeerError

    from .fanout import Fanout
    from .leader import execute

    try:  # warm-up, the same on every rank: the first forward loads the compiled search kernels,
        # which can take long on a busy host; the leader listens (is ready) only after it
        execute(part, {"users": [{}], "k": 1, "filters": None, "weights": None, "nprobe": None})
    except ShardPeerError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    catalog = None
    if ctx.device.type == "cpu":  # streaming updates run on CPU shards (as the unsharded updater)
        try:
            catalog = _catalog(part)
        except ShardPeerError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 1
    fanout = None if shards == 1 else Fanout(rank=rank, leader=replica * shards, group=control[replica],
                                              timeout_s=args.timeout_s)
    if rank % shards == 0:
        return _lead(args, part, fanout, replica, catalog, world // shards)
    return _follow(args, part, fanout, catalog)


def _catalog(part: Any) -> Any:
    """This rank's :class:`ShardCatalog` (a collective: every rank of the replica calls it)."""
    from .catalog import ShardCatalog

    a = part.manifest["assignment"]
    fresh_owner = int(a["fresh_owner"])
    if fresh_owner < 0:  # no fresh region yet: the least-loaded shard receives new items, ties
        # to the highest rank (shard 0 already carries the HTTP front, the log and the item tower)
        load = list(a["items_per_shard"])
        fresh_owner = min(range(len(load)), key=lambda r: (load[r], -r))
    return ShardCatalog.gather(part.model, fresh_owner)


def _follow(args: argparse.Namespace, part: Any, fanout: Any, catalog: Any) -> int:
    from silvertorch.distributed.sharded_retrieval import ShardPeerError

    from .fanout import FanoutError
    from .leader import execute

    while True:
        try:
            msg = fanout.recv(args.heartbeat_s + args.timeout_s)
        except FanoutError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 1
        op = msg.get("op")
        if op == "stop":
            return 0
        if op == "update":
            try:
                catalog.apply(msg["record"])
            except Exception as err:  # noqa: BLE001 - the leader checked it: this rank would diverge
                print(f"error: rank {part.shard}: update {msg['record'].get('op')} refused after the "
                      f"leader accepted it ({type(err).__name__}: {err}); stopping so all ranks restart",
                      file=sys.stderr, flush=True)
                return 1
            continue
        if op != "retrieve":
            continue
        try:
            execute(part, msg)
        except ShardPeerError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 1
        except ValueError as err:  # the leader refused the same batch identically
            log.warning("batch refused on this rank too: %s", err)


def _lead(args: argparse.Namespace, part: Any, fanout: Any, replica: int, catalog: Any, replicas: int) -> int:
    import uvicorn

    from serve.metrics import Metrics
    from serve.server import _bind, _loop_and_http

    from .app import create_sharded_app
    from .leader import Leader

    metrics = Metrics()
    from serve.update_log import LogError

    from .fanout import FanoutError

    state = Path(args.state_dir) if replicas == 1 else Path(args.state_dir) / f"replica-{replica}"
    try:
        leader = Leader(part, fanout, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                        max_k=args.max_k, heartbeat_s=args.heartbeat_s, metrics=metrics, catalog=catalog,
                        state_dir=state if catalog is not None else None)
        leader.replay()
    except (LogError, FanoutError, ValueError, KeyError) as err:
        print(f"error: refusing to serve {args.artifact}: {err}", file=sys.stderr, flush=True)
        if fanout is not None and fanout.failure is None:
            try:
                fanout.send({"op": "stop"})
            except FanoutError:
                pass
        return 1
    leader.start()
    app = create_sharded_app(leader, metrics, max_upsert_batch=args.max_upsert_batch)
    sock = _bind(args.host, args.port + replica if args.port else 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False,
                                           **_loop_and_http()))
    shards = part.manifest["shards"]
    line = {"listening": f"http://{args.host}:{port}", "port": port, "rank": replica * shards,
            "shards": shards, "replica": replica, "version": part.version, "replayed": leader.replayed}
    print(json.dumps(line), flush=True)
    if args.port_file:
        target = Path(args.port_file if replica == 0 else f"{args.port_file}.{replica}")
        tmp = target.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(target)
    try:
        server.run(sockets=[sock])
    finally:
        leader.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.sharded.worker", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING))
    try:
        return run(args)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
