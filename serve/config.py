"""``[serve]``: the server's settings, from a TOML file's ``[serve]`` table plus flags/overrides.

Every key is checked before any work (unknown keys, wrong types and impossible values raise
:class:`silvertorch.config.ConfigError` naming the key ``serve.<name>``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from silvertorch.config import ConfigError, apply_overrides, check, from_dict

__all__ = ["ServeConfig", "load_serve_config"]


@dataclass(kw_only=True)
class ServeConfig:
    """The HTTP server.

    - ``host`` / ``port``: where to listen (port 0 = any free port, printed at start).
    - ``max_batch_size`` / ``max_wait_ms``: the micro-batcher closes a batch at this many queries or
      this long after its first query, whichever comes first.
    - ``max_k``: the largest ``k`` a request may ask for (also bounded by the artifact's own max_k).
    - ``max_body_bytes``: larger request bodies answer 413. ``max_upsert_batch``: the most items in
      one ``PUT /v1/items`` (more answer 413).
    - ``compaction_threshold``: fresh-segment items that trigger an automatic compaction (0 = only
      on ``POST /v1/admin/compact``).
    - ``state_dir``: the durable update log and compaction snapshots, one sub-directory per
      artifact version.
    - ``threads``: torch intra-op threads of the model-owner thread.
    - ``switch_interval_ms``: Python's GIL switch interval (default 5 ms in CPython): lower lets
      the event loop answer while the owner thread runs Python code between torch kernels.
    - ``gc_freeze``: after loading (and after each hot swap) run one garbage collection and move
      every object alive then (modules, model, vocabularies: ~350k objects) out of the cyclic
      collector's reach (``gc.freeze()``), so a full collection no longer stalls every request
      for ~170 ms; the old artifact's objects are collected before the freeze of a swap.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 64
    max_wait_ms: float = 2.0
    max_k: int = 1000
    max_body_bytes: int = 1 << 20
    max_upsert_batch: int = 1000
    compaction_threshold: int = 50_000
    state_dir: str = "runs/serve_state"
    threads: int = 2
    switch_interval_ms: float = 1.0
    gc_freeze: bool = True

    def validate(self) -> None:
        check(0 <= self.port <= 65535, "serve.port", f"in [0, 65535], got {self.port}")
        check(self.max_batch_size >= 1, "serve.max_batch_size", f">= 1, got {self.max_batch_size}")
        check(0 <= self.max_wait_ms <= 1000, "serve.max_wait_ms", f"in [0, 1000], got {self.max_wait_ms}")
        check(self.max_k >= 1, "serve.max_k", f">= 1, got {self.max_k}")
        check(self.max_body_bytes >= 1024, "serve.max_body_bytes", f">= 1024, got {self.max_body_bytes}")
        check(self.max_upsert_batch >= 1, "serve.max_upsert_batch", f">= 1, got {self.max_upsert_batch}")
        check(self.compaction_threshold >= 0, "serve.compaction_threshold",
              f">= 0 (0 = manual only), got {self.compaction_threshold}")
        check(bool(self.state_dir), "serve.state_dir", "a directory path")
        check(self.threads >= 1, "serve.threads", f">= 1, got {self.threads}")
        check(0.05 <= self.switch_interval_ms <= 100, "serve.switch_interval_ms",
              f"in [0.05, 100], got {self.switch_interval_ms}")


def load_serve_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                      **flags: Any) -> ServeConfig:
    """The ``[serve]`` table of TOML ``path`` (other tables are ignored), then ``serve.key=value``
    overrides (the ``serve.`` prefix is optional), then keyword ``flags`` that are not None."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("", f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError("", f"{p} is not valid TOML: {err}") from None
    table = data.get("serve", {})
    if not isinstance(table, dict):
        raise ConfigError("serve", "expected a table")
    fixed = [o if o.startswith("serve.") else f"serve.{o}" for o in overrides]
    table = apply_overrides({"serve": dict(table)}, fixed)["serve"]
    table.update({k: v for k, v in flags.items() if v is not None})
    try:
        cfg = from_dict(ServeConfig, table)
    except ConfigError as err:
        if err.key and not err.key.startswith("serve"):
            raise ConfigError(f"serve.{err.key}", str(err).split(": ", 1)[-1]) from None
        raise
    cfg.validate()
    return cfg
