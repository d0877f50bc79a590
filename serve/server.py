"""Build and run a server: load the artifact, restore its state (snapshot + log), start the
model-owner thread, bind the socket, run uvicorn (uvloop + httptools when installed)."""

from __future__ import annotations

import gc
import json
import logging
import socket
import sys
from pathlib import Path

from serve.config import ServeConfig
from serve.engine import Engine
from serve.metrics import Metrics
from serve.served import Served

__all__ = ["build_engine", "load_served", "serve_forever", "freeze_heap"]

log = logging.getLogger("silvertorch.serve")


def load_served(path: str | Path, config: ServeConfig) -> Served:
    """Load and verify the artifact at ``path`` and restore its state from ``config.state_dir``.

    Raises ``silvertorch.export.ArtifactError`` (unusable artifact) or ``serve.update_log.LogError``
    (state of another artifact, corrupt log / snapshot)."""
    from silvertorch.export import load_artifact

    return Served(load_artifact(path), config.state_dir, config.max_k)


def build_engine(artifact: str | Path, config: ServeConfig) -> tuple[Engine, Metrics]:
    metrics = Metrics()
    served = load_served(artifact, config)
    engine = Engine(served, config, metrics)
    return engine, metrics


def freeze_heap() -> None:
    """Collect garbage once, then exclude every object alive now from later cyclic collections
    (``gc.freeze()``): a full collection of the loaded server's ~350k objects takes ~170 ms, during
    which no request moves (``serve.gc_freeze``; ``docs/serving.md``, "Performance notes")."""
    gc.unfreeze()  # a second call (hot swap): let the collector see the old artifact's objects
    gc.collect()
    gc.freeze()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _loop_and_http() -> dict[str, str]:
    opts = {}
    try:
        import uvloop  # noqa: F401

        opts["loop"] = "uvloop"
    except ImportError:
        pass
    try:
        import httptools  # noqa: F401

        opts["http"] = "httptools"
    except ImportError:
        pass
    return opts


def serve_forever(artifact: str | Path, config: ServeConfig, port_file: str | None = None,
                  log_level: str = "warning") -> int:
    """Run until SIGINT / SIGTERM; returns the exit code. Prints one JSON line
    ``{"listening": "http://HOST:PORT", "port": PORT, "version": V, "replayed": N}`` once ready
    (and writes the port to ``port_file``)."""
    import uvicorn

    from serve.app import create_app

    # The event loop and the model-owner thread share the GIL: a 1 ms switch interval (default
    # 5 ms) lets the loop accept and answer requests while the owner thread runs a forward pass.
    sys.setswitchinterval(config.switch_interval_ms / 1000.0)
    engine, metrics = build_engine(artifact, config)
    if config.gc_freeze:
        freeze_heap()
    engine.start()
    app = create_app(engine, metrics, lambda p: load_served(p, config))
    sock = _bind(config.host, config.port)
    port = sock.getsockname()[1]
    host = f"[{config.host}]" if ":" in config.host else config.host
    uv = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_keep_alive=30,
                        **_loop_and_http())
    server = uvicorn.Server(uv)
    line = {"listening": f"http://{host}:{port}", "port": port, "version": engine.served.version,
            "replayed": engine.served.replayed, "state_dir": str(engine.served.dir)}
    print(json.dumps(line), flush=True)
    if port_file:
        tmp = Path(port_file).with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(port_file)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: silvertorch serve ARTIFACT (python -m launch.cli serve ARTIFACT)")
