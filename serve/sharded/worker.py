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

Compaction and hot swap (``serve/sharded/admin.py``): every rank keeps its shard's snapshots under
the same state directory; at start-up the leader reads the committed snapshot seq and broadcasts it,
every rank loads its snapshot of that seq, then the log records after it are replayed. The
followers run ``compact`` / ``swap_prepare`` / ``swap_commit`` / ``swap_abort`` messages between
batches, as the leader does.

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
    parser.add_argument("--compaction-threshold", type=int, default=0,
                        help="compact every shard once this many new items or log records came since the "
                             "last snapshot (0 = only on POST /v1/admin/compact)")
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

    if args.timeout_s <= 0 or args.heartbeat_s <= 0 or args.max_batch_size < 1 or args.compaction_threshold < 0:
        print("error: --timeout-s, --heartbeat-s must be > 0, --max-batch-size >= 1 and "
              "--compaction-threshold >= 0", file=sys.stderr)
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
    from serve.served import state_dir_for
    from serve.update_log import LogError
    from silvertorch.distributed.sharded_retrieval import ShardPeerError

    from . import admin
    from .fanout import Fanout, FanoutError
    from .leader import execute

    fanout = None if shards == 1 else Fanout(rank=rank, leader=replica * shards, group=control[replica],
                                              timeout_s=args.timeout_s)
    cpu = ctx.device.type == "cpu"  # streaming updates (and so snapshots) run on CPU shards
    root = (Path(args.state_dir) if world // shards == 1 else Path(args.state_dir) / f"replica-{replica}")
    rs = admin.RankState(part, None, 0, state_dir_for(root, part.version) if cpu else None)
    try:  # the committed snapshot set: the leader reads it, every rank loads its own file
        if rank % shards == 0:
            try:
                seq = admin.read_commit(rs.state_dir)
            except LogError as err:
                if fanout is not None:
                    fanout.send({"op": "snapshot", "error": str(err)})
                raise
            if fanout is not None:
                fanout.send({"op": "snapshot", "seq": seq})
        else:
            msg = fanout.recv(args.heartbeat_s + args.timeout_s)
            if msg.get("op") != "snapshot" or "error" in msg:
                raise LogError(f"the leader could not read its snapshot commit file: {msg.get('error')}")
            seq = msg.get("seq")
        admin.load_snapshot(rs, seq)
    except (LogError, FanoutError) as err:
        print(f"error: rank {rank}: refusing to serve {args.artifact}: {err}", file=sys.stderr, flush=True)
        return 1

    try:  # warm-up, the same on every rank: the first forward loads the compiled search kernels,
        # which can take long on a busy host; the leader listens (is ready) only after it
        execute(part, {"users": [{}], "k": 1, "filters": None, "weights": None, "nprobe": None})
    except ShardPeerError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    if cpu:
        try:
            rs.catalog = admin.build_catalog(part)
        except ShardPeerError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 1
    env = {"rank": rank, "world_size": world, "group": groups[replica], "timeout_s": args.timeout_s,
           "state_root": root if cpu else None}
    if rank % shards == 0:
        return _lead(args, rs, fanout, replica, world // shards, env)
    return _follow(args, rs, fanout, env)


def _follow(args: argparse.Namespace, rs: Any, fanout: Any, env: dict[str, Any]) -> int:
    from silvertorch.distributed.sharded_retrieval import ShardPeerError

    from . import admin
    from .fanout import FanoutError
    from .leader import execute

    staged = None  # a hot swap's new state between swap_prepare and swap_commit / swap_abort
    while True:
        part, catalog = rs.part, rs.catalog
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
                (staged.catalog if msg.get("staged") else catalog).apply(msg["record"])
            except Exception as err:  # noqa: BLE001 - the leader checked it: this rank would diverge
                print(f"error: rank {part.shard}: update {msg['record'].get('op')} refused after the "
                      f"leader accepted it ({type(err).__name__}: {err}); stopping so all ranks restart",
                      file=sys.stderr, flush=True)
                return 1
            continue
        if op != "retrieve":
            try:
                if op == "compact":
                    seq = int(msg["seq"])
                    new, reason = admin.compact_shard(rs, seq)
                    admin.finish_compaction(rs, new, admin.vote(part.model, new is not None, reason), seq)
                elif op == "swap_prepare":
                    staged, reason = admin.load_staged(rs, msg, **env)
                    votes = admin.vote(part.model, staged is not None, reason)
                    if staged is None or not all(ok for ok, _ in votes):
                        staged = None
                    elif catalog is not None:
                        staged.catalog = admin.build_catalog(staged.part)
                elif op == "swap_commit" and staged is not None:
                    rs, staged = staged, None
                elif op == "swap_abort":
                    staged = None
            except ShardPeerError as err:
                print(f"error: {err}", file=sys.stderr, flush=True)
                return 1
            except Exception as err:  # noqa: BLE001 - voted already: this rank would diverge
                print(f"error: rank {part.shard}: {op} failed after the vote ({type(err).__name__}: "
                      f"{err}); stopping so all ranks restart", file=sys.stderr, flush=True)
                return 1
            continue
        try:
            execute(part, msg)
        except ShardPeerError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 1
        except ValueError as err:  # the leader refused the same batch identically
            log.warning("batch refused on this rank too: %s", err)


def _lead(args: argparse.Namespace, rs: Any, fanout: Any, replica: int, replicas: int, env: dict[str, Any]) -> int:
    import uvicorn

    from serve.metrics import Metrics
    from serve.server import _bind, _loop_and_http

    from .app import create_sharded_app
    from .leader import Leader

    metrics = Metrics()
    from serve.update_log import LogError

    from .fanout import FanoutError

    part = rs.part
    try:
        leader = Leader(part, fanout, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                        max_k=args.max_k, heartbeat_s=args.heartbeat_s, metrics=metrics, catalog=rs.catalog,
                        state_dir=env["state_root"], rank_state=rs, world_size=env["world_size"],
                        rank=env["rank"], group=env["group"], timeout_s=env["timeout_s"],
                        compaction_threshold=args.compaction_threshold)
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
            "shards": shards, "replica": replica, "version": part.version, "replayed": leader.replayed,
            "snapshot_seq": rs.snapshot_seq}
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
