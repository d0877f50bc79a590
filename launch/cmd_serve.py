"""``silvertorch serve ARTIFACT``: the HTTP retrieval server (code in ``serve/``).

Settings come from ``--config`` (its ``[serve]`` table, see ``configs/serve.toml``), then
``--set key=value`` overrides, then the flags. Exit codes: 2 = bad config or flags, 1 = the
artifact or its saved state cannot be served (the message says why).
"""

from __future__ import annotations

import argparse
import sys


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
    from serve.server import serve_forever

    try:
        return serve_forever(args.artifact, cfg, port_file=args.port_file, log_level=args.log_level)
    except (ArtifactError, LogError) as err:
        print(f"error: refusing to serve {args.artifact}: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
