"""Compaction snapshots: the compacted model state plus the item-id map, written atomically.

A snapshot holds every update up to log record ``seq``; on restart the server loads the newest
snapshot and replays only the log records after it. File: ``torch.save`` of
``{"format", "artifact_version", "seq", "state_dict", "ids"}`` written to a temporary file, fsynced,
renamed over ``snapshot.pt`` (a crash leaves either the old snapshot or the new one).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from serve.update_log import LogError, fsync_dir

__all__ = ["write_snapshot", "read_snapshot"]

FORMAT = 1


def write_snapshot(path: str | Path, artifact_version: str, seq: int,
                   state_dict: dict[str, torch.Tensor], ids: dict[str, Any]) -> Path:
    """Write the snapshot atomically; ``ids`` is :meth:`serve.ids.ItemIds.to_state`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "artifact_version": artifact_version, "seq": int(seq),
                "state_dict": state_dict, "ids": ids}, buf)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def read_snapshot(path: str | Path, artifact_version: str) -> dict[str, Any] | None:
    """The snapshot at ``path`` (None when absent). :class:`LogError` when it is unreadable or was
    written for another artifact version."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure = unusable snapshot
        raise LogError(f"{path} is not a readable snapshot: {err}") from None
    if not isinstance(snap, dict) or snap.get("format") != FORMAT:
        raise LogError(f"{path} is not a SilverTorch serving snapshot (format {FORMAT})")
    if snap.get("artifact_version") != artifact_version:
        raise LogError(f"{path} was written for artifact version {snap.get('artifact_version')!r}, "
                       f"the artifact being served is {artifact_version!r}")
    return snap
