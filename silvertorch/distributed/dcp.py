"""Atomic, sharded, resharding checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout under a checkpoint root::

    root/step_000000120/      one DCP checkpoint: .metadata + one __R_0.distcp file per rank
        meta.json             plain progress (step, epoch, loader, config hash ...), rank 0 writes
        rng.pt                RNG states (torch.save, rank 0)
    root/latest               the name of the newest COMPLETE checkpoint ("step_000000120")

Atomic: every rank writes into ``root/.step_000000120.partial``; only after DCP finished (its own
barrier + rank 0's ``.metadata``) does rank 0 add ``meta.json``, fsync, rename the directory into
place and then replace ``latest`` (write a temp file, ``os.replace``). A save killed at any point
leaves the previous checkpoint and ``latest`` untouched; the partial directory is removed by the
next save of that step. Resharding: DCP stores global tensor metadata (shapes, shard offsets), so a
checkpoint written by W ranks loads into any other world size and sharding plan.
The root must be visible to every rank (a shared filesystem on multi-host jobs).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

__all__ = ["save_sharded", "load_sharded", "find_latest", "CheckpointNotFound", "META", "RNG"]

META = "meta.json"
RNG = "rng.pt"
LATEST = "latest"


class CheckpointNotFound(FileNotFoundError):
    """No complete checkpoint under the root (or the one named is incomplete)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / META).is_file()


def save_sharded(
    root: str | Path,
    step: int,
    state: dict[str, Any],
    meta: dict[str, Any],
    *,
    rng: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Save ``state`` (``{"model": sharded state_dict, "optim": ...}``) as checkpoint ``step``.

    Collective: every rank calls it with its own shards. ``meta`` (JSON-able) and ``rng`` (any
    ``torch.save``-able dict) are rank 0's. ``keep``: complete checkpoints kept (>= 1), older ones
    are deleted after the new one is in place. Returns the checkpoint directory.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    name = f"step_{step:09d}"
    partial, final = root / f".{name}.partial", root / name
    main = dist.get_rank() == 0
    if main:
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
        partial.mkdir(parents=True)
    dist.barrier()
    dcp.save(state, checkpoint_id=partial)
    if main:
        if rng is not None:
            buf = partial / RNG
            torch.save(rng, buf)
        _write_file(partial / META, json.dumps({"step": step, **meta}, sort_keys=True).encode())
        _fsync_dir(partial)
        old = root / f".{name}.old"
        if final.exists():  # the same step saved again: keep it until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(root)
        _write_file(root / LATEST, name.encode())
        _fsync_dir(root)
        done = sorted(p for p in root.glob("step_*") if p.is_dir() and _complete(p))
        for old in done[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``latest`` first, else the highest complete
    ``step_*``), or None. Local filesystem read; call on one rank and broadcast."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _complete(named):
            return named
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and _complete(p))
    return done[-1] if done else None


def load_sharded(path: str | Path, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load checkpoint ``path`` into ``state`` in place (DCP reshards to this world size / plan).

    Returns ``(meta, rng)`` read from the checkpoint (``rng`` is ``{}`` when absent). Raises
    :class:`CheckpointNotFound` when ``path`` is not a complete checkpoint.
    """
    path = Path(path)
    if not _complete(path):
        raise CheckpointNotFound(f"{path} is not a complete checkpoint (.metadata and {META} needed)")
    dcp.load(state, checkpoint_id=path)
    meta = json.loads((path / META).read_text())
    rng = torch.load(path / RNG, weights_only=True) if (path / RNG).is_file() else {}
    return meta, rng
