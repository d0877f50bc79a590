"""Leader -> followers messages over ``torch.distributed`` broadcasts, every wait bounded.

A message is a JSON object sent as two broadcasts from the replica's rank 0: its byte length
(``(1,) int64``) then its bytes (``(n,) uint8``). Every broadcast is posted with ``async_op=True`` and
waited at most ``timeout_s``; a failure raises :class:`FanoutError` and the channel stays broken (a
process group that lost a peer cannot be trusted again: restart all ranks).

While idle the leader sends ``{"op": "ping"}`` every ``heartbeat_s``: followers then never wait
longer than ``heartbeat_s + timeout_s`` for a message, and the leader learns of a dead follower
within one heartbeat even when no request arrives.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["FanoutError", "Fanout"]


class FanoutError(RuntimeError):
    """A broadcast to / from the other ranks of the replica failed (a rank died, hung or left)."""


class Fanout:
    """``send`` (leader) / ``recv`` (followers) of JSON messages within one replica group.

    ``group``: the replica's process group (None = the default group); ``leader``: the global
    rank of the group's rank 0; ``rank``: this process's global rank.
    """

    def __init__(self, *, rank: int, leader: int, group: Any = None, timeout_s: float = 30.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.rank, self.leader, self.group, self.timeout_s = rank, leader, group, float(timeout_s)
        self.failure: str | None = None

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    def _broadcast(self, t: torch.Tensor, timeout_s: float, what: str) -> None:
        if self.failure is not None:
            raise FanoutError(self.failure)
        try:
            work = dist.broadcast(t, src=self.leader, group=self.group, async_op=True)
            if not work.wait(timeout=timedelta(seconds=timeout_s)):
                raise TimeoutError(f"no answer within {timeout_s:g}s")
        except Exception as err:  # noqa: BLE001 - any failure of the collective is fatal
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            self.failure = (f"rank {self.rank}: broadcast of the {what} from leader rank "
                            f"{self.leader} failed: {type(err).__name__}: {first} -- a rank of this "
                            "replica is dead, hung or unreachable; restart all ranks")
            raise FanoutError(self.failure) from err

    def send(self, message: dict[str, Any]) -> None:
        """Leader: broadcast ``message`` (JSON-serialisable) to every follower."""
        data = json.dumps(message, separators=(",", ":")).encode()
        self._broadcast(torch.tensor([len(data)], dtype=torch.int64), self.timeout_s, "message length")
        self._broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), self.timeout_s, "message")

    def recv(self, wait_s: float) -> dict[str, Any]:
        """Follower: the next message, waiting at most ``wait_s`` for it to start."""
        n = torch.zeros(1, dtype=torch.int64)
        self._broadcast(n, wait_s, "message length")
        buf = torch.empty(int(n[0]), dtype=torch.uint8)
        self._broadcast(buf, self.timeout_s, "message")
        return json.loads(bytes(buf.tolist()) if buf.numel() < 64 else buf.numpy().tobytes())
