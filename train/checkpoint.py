"""Checkpoints that resume exactly, are written atomically, and refuse to load when they do not fit.

File layout: ``MAGIC (8 bytes) | sha256 of payload (32 bytes) | payload`` where the payload is a
``torch.save`` of a dict holding only tensors and plain Python values (loaded with
``weights_only=True``). The digest catches any corruption or truncation; the file is written to a
temporary name in the same directory, fsync'ed and renamed into place, so a crash mid-write
leaves the previous checkpoint intact.

Payload: ``format_version``, ``config`` (flat dotted dict of the semantic keys), ``config_hash``,
``step``, ``epoch``, ``model`` (state_dict), ``optimizer`` (state_dict), ``loader`` (loader state),
``rng`` (torch CPU generator, Python ``random``, the negative sampler's generator), ``extra``.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.atomic import atomic_write

__all__ = [
    "CheckpointError",
    "TrainState",
    "save_checkpoint",
    "read_checkpoint",
    "restore_checkpoint",
    "capture_rng",
    "restore_rng",
    "latest_checkpoint",
]

MAGIC = b"SLVTCKP1"
FORMAT_VERSION = 1
_DIGEST = 32


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, corrupt, or does not match the model/config it is loaded into."""


@dataclass
class TrainState:
    """Everything besides parameters needed to continue a run exactly."""

    step: int = 0
    epoch: int = 0
    loader: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """RNG states of torch (CPU), Python ``random`` and the named generators."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _to_lists(random.getstate()),
    }
    for name, gen in (generators or {}).items():
        state[f"gen.{name}"] = gen.get_state()
    return state


def restore_rng(
    state: dict[str, Any], generators: dict[str, torch.Generator] | None = None
) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for name, gen in (generators or {}).items():
        key = f"gen.{name}"
        if key not in state:
            raise CheckpointError(f"checkpoint has no RNG state for generator '{name}'")
        gen.set_state(state[key])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    config: dict[str, Any],
    config_hash: str,
) -> Path:
    """Write a checkpoint atomically (tmp file in the same directory + fsync + rename)."""
    path = Path(path)
    payload = {
        "format_version": FORMAT_VERSION,
        "config": config,
        "config_hash": config_hash,
        "step": state.step,
        "epoch": state.epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "loader": state.loader,
        "rng": state.rng,
        "extra": state.extra,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    return atomic_write(path, MAGIC, hashlib.sha256(data).digest(), data)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint file; raises :class:`CheckpointError` saying why it is bad."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    raw = path.read_bytes()
    if len(raw) < len(MAGIC) + _DIGEST or raw[: len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path} is not a SilverTorch checkpoint (bad header)")
    digest = raw[len(MAGIC) : len(MAGIC) + _DIGEST]
    data = raw[len(MAGIC) + _DIGEST :]
    if hashlib.sha256(data).digest() != digest:
        raise CheckpointError(f"{path} is corrupt or truncated (sha256 mismatch); refusing to load")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"{path} cannot be deserialized: {err}") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        got = payload.get("format_version") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} has format version {got!r}, expected {FORMAT_VERSION}")
    return payload


def _config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: checkpoint={saved.get(k, '<absent>')!r} now={current.get(k, '<absent>')!r}"
        for k in keys
        if saved.get(k, "<absent>") != current.get(k, "<absent>")
    ]


def _check_shapes(saved: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    current = model.state_dict()
    problems = []
    for name in sorted(set(saved) | set(current)):
        if name not in current:
            problems.append(f"unexpected tensor '{name}'")
        elif name not in saved:
            problems.append(f"missing tensor '{name}'")
        elif tuple(saved[name].shape) != tuple(current[name].shape):
            problems.append(
                f"'{name}' has shape {tuple(saved[name].shape)} in the checkpoint, "
                f"{tuple(current[name].shape)} in the model"
            )
    if problems:
        raise CheckpointError(
            f"{path} does not fit this model: " + "; ".join(problems[:8])
            + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else "")
        )


def restore_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    config: dict[str, Any],
    config_hash: str,
) -> TrainState:
    """Verify ``path`` against ``config``/``model`` and load it into them (nothing is modified
    unless every check passes). Returns the :class:`TrainState` to continue from.

    Raises :class:`CheckpointError` naming the problem: corrupt file, config keys that differ,
    tensors with other shapes, or an optimizer state that does not fit.
    """
    path = Path(path)
    payload = read_checkpoint(path)
    if payload["config_hash"] != config_hash:
        diff = _config_diff(payload.get("config", {}), config)
        raise CheckpointError(
            f"{path} was written with a different config (hash {payload['config_hash']} != "
            f"{config_hash}): " + ("; ".join(diff[:8]) if diff else "unknown difference")
        )
    _check_shapes(payload["model"], model, path)
    if optimizer is not None:
        saved_groups = payload["optimizer"].get("param_groups", [])
        if [len(g["params"]) for g in saved_groups] != [
            len(g["params"]) for g in optimizer.param_groups
        ]:
            raise CheckpointError(f"{path}: optimizer parameter groups do not match this model")
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    return TrainState(
        step=int(payload["step"]),
        epoch=int(payload["epoch"]),
        loader=payload["loader"],
        rng=payload["rng"],
        extra=payload.get("extra", {}),
    )


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """``out_dir/checkpoint.pt`` if it exists."""
    p = Path(out_dir) / "checkpoint.pt"
    return p if p.is_file() else None
