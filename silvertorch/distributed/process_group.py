"""Process-group setup from the torchrun / torchx environment (``torch.distributed`` only).

torchrun, torchelastic and every torchx scheduler export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and starts the default
process group: **gloo** on CPU, **nccl** on CUDA. Collectives get a finite ``timeout``: a rank that
dies makes its peers fail (gloo sees the closed connection at once; a silent hang ends at the
timeout) instead of waiting forever, so the launcher can tear the job down and restart it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "destroy_distributed", "env_world"]

_REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` in ``[0, world_size)``, ``local_rank`` on its host,
    the compute ``device`` and the process-group ``backend`` ("gloo" / "nccl")."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, progress files and prints."""
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the environment; raises ``RuntimeError`` naming the
    missing or malformed variables (launch with torchrun / torchx, which set them)."""
    missing = [k for k in _REQUIRED_ENV if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"distributed environment incomplete: {missing} not set; launch with "
            "`torchrun --nproc_per_node N ...` or `torchx run ... launch/components.py:train`"
        )
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as err:
        raise RuntimeError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {err}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise RuntimeError(f"need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, got "
                           f"RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")  # fmt: skip
    return rank, world, local


def init_distributed(
    device: str = "cpu", *, backend: str | None = None, timeout_s: float = 300.0
) -> DistContext:
    """Start (or reuse) the default process group and pick this rank's device.

    Args:
        device: ``"cpu"`` or ``"cuda"`` (each rank takes ``cuda:LOCAL_RANK``).
        backend: override the backend (default gloo on CPU, nccl on CUDA).
        timeout_s: collective timeout in seconds (> 0); a dead peer fails the job after at most this.
    Returns:
        the :class:`DistContext` of this process.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    rank, world, local = env_world()
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but torch.cuda.is_available() is False")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=timeout,
            store=_attempt_store(rank, world, timeout),
        )  # fmt: skip
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(
            f"a process group is already initialized with rank {dist.get_rank()} of "
            f"{dist.get_world_size()}, but the environment says {rank} of {world}"
        )
    return DistContext(rank, world, local, dev, dist.get_backend())


def _attempt_store(rank: int, world: int, timeout: timedelta) -> dist.Store | None:
    """Under torchelastic (``TORCHELASTIC_RESTART_COUNT`` set) a store whose keys are private to
    this restart attempt; None otherwise (``init_process_group`` builds the usual env:// store).

    Without it, killing a rank under ``--max_restarts`` made the restarted group fail in gloo's
    connect with "Connection refused" (observed); most likely a rank of the new attempt read the
    dead peer's address left in the store, which torchrun's c10d rendezvous keeps across restarts,
    since the process group's keys carry no attempt number. With the prefix the restart resumes.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
        is_master=not agent_hosts_store and rank == 0, timeout=timeout,
    )  # fmt: skip
    return dist.PrefixStore(f"silvertorch/attempt_{attempt}", base)


def destroy_distributed() -> None:
    """Tear down the default process group if one exists (safe to call twice)."""
    if dist.is_initialized():
        dist.destroy_process_group()
