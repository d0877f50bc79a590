"""``silvertorch serve ARTIFACT``: the HTTP retrieval server (code in ``serve/``).

Settings come from ``--config`` (its ``[serve]`` table, see ``configs/serve.toml``), then
``--set key=value`` overrides, then the flags. Exit codes: 2 = bad config or flags, 1 = the
artifact or its saved state cannot be served (the message says why).

A **sharded** artifact (``silvertorch export --plan PLAN`` / ``--shards N``; its manifest's format is
``silvertorch-sharded-artifact``) is served by one process per shard (``serve/sharded/``): run
under torchrun / torchx (``RANK`` set) this process becomes that rank's worker; typed by a user it
re-executes itself under ``python -m torch.distributed.run --standalone --nproc_per_node N`` with
the same settings (``N`` = ``--nproc``, default the artifact's shard count), so one command starts
the whole replica. Its exit code is the launcher's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="artifact directory written by `silvertorch export`")
    parser.add_argument("--config", default=None, help="TOML file with a [serve] table")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None, help="0 = any free port (printed)")
    parser.add_argument("--state-dir", default=None, help="update log and snapshots (per artifact version)")
    parser.add_argument("--port-file", default=None, help="write the bound port here once listening")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a [serve] key, e.g. --set max_batch_size=32 (repeatable)")
    g = parser.add_argument_group("sharded artifacts")
    g.add_argument("--nproc", type=int, default=None,
                   help="ranks to start (default: the artifact's shards; shards x replicas for replicas)")
    g.add_argument("--plan", default=None, help="refuse the artifact unless it was exported for this plan")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="rank device (cuda: nccl)")
    g.add_argument("--timeout-s", type=float, default=30.0, help="collective timeout between ranks")
    g.add_argument("--heartbeat-s", type=float, default=5.0, help="leader ping interval while idle")


def sharded_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest at ``path`` when it is a sharded artifact's, else None (unreadable or another
    format: the single-process server reports what is wrong)."""
    from silvertorch.export_sharded import SHARDED_FORMAT

    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == SHARDED_FORMAT else None


def worker_argv(args: argparse.Namespace, cfg: Any) -> list[str]:
    """The ``serve.sharded.worker`` flags for these settings (the same on every rank)."""
    argv = [str(args.artifact), "--host", cfg.host, "--port", str(cfg.port), "--device", args.device,
            "--timeout-s", str(args.timeout_s), "--heartbeat-s", str(args.heartbeat_s),
            "--max-batch-size", str(cfg.max_batch_size), "--max-wait-ms", str(cfg.max_wait_ms),
            "--max-k", str(cfg.max_k), "--max-upsert-batch", str(cfg.max_upsert_batch),
            "--state-dir", str(cfg.state_dir), "--log-level", args.log_level,
            "--compaction-threshold", str(cfg.compaction_threshold)]
    if args.plan:
        argv += ["--plan", str(args.plan)]
    if args.port_file:
        argv += ["--port-file", str(args.port_file)]
    return argv


def _launch(nproc: int, argv: list[str]) -> int:
    """Run the ranks under torchrun (standalone rendezvous on a free port); forward SIGTERM /
    SIGINT to it (it stops the workers) and return its exit code (0 after a forwarded stop)."""
    import serve

    root = str(Path(serve.__file__).resolve().parents[1])  # so every rank imports this checkout
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "serve.sharded.worker", *argv]
    proc = subprocess.Popen(cmd, env=env)
    previous = {}
    stopped: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        stopped.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread: the launcher gets signals from its group
            pass
    try:
        rc = proc.wait()
        # a stop that was asked for (SIGTERM / Ctrl-C) is a clean exit, though torchrun reports it as 1
        return 0 if stopped and rc != 0 else rc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    from serve.config import load_serve_config
    from serve.update_log import LogError
    from silvertorch.config import ConfigError
    from silvertorch.export import ArtifactError

    try:
        cfg = load_serve_config(args.config, args.overrides, host=args.host, port=args.port,
                                state_dir=args.state_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    manifest = sharded_manifest(args.artifact)
    if manifest is not None:
        argv = worker_argv(args, cfg)
        if os.environ.get("RANK") is not None:  # already a rank of torchrun / torchx
            from serve.sharded.worker import main as worker_main

            return worker_main(argv)
        nproc = args.nproc if args.nproc is not None else int(manifest["shards"])
        if nproc < 1 or args.timeout_s <= 0 or args.heartbeat_s <= 0:
            print("error: --nproc must be >= 1, --timeout-s and --heartbeat-s > 0", file=sys.stderr)
            return 2
        return _launch(nproc, argv)
    from serve.server import serve_forever

    try:
        return serve_forever(args.artifact, cfg, port_file=args.port_file, log_level=args.log_level)
    except (ArtifactError, LogError) as err:
        print(f"error: refusing to serve {args.artifact}: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
