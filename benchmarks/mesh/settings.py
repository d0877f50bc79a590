"""The mesh's settings: micro-batching and threads taken from the SilverTorch server's defaults
(``serve.config.ServeConfig``) so both systems run with the same knobs (the honesty rule)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["MeshSettings", "server_defaults"]

AnnKind = Literal["flat", "sq8"]


def server_defaults() -> dict[str, Any]:
    """``max_batch_size``, ``max_wait_ms``, ``threads``, ``max_k`` of the SilverTorch server config."""
    try:
        from serve.config import ServeConfig
    except ImportError:  # the server package is optional for the mesh
        return {"max_batch_size": 64, "max_wait_ms": 2.0, "threads": 2, "max_k": 1000}
    cfg = ServeConfig()
    return {"max_batch_size": cfg.max_batch_size, "max_wait_ms": cfg.max_wait_ms,
            "threads": cfg.threads, "max_k": cfg.max_k}


@dataclass(kw_only=True)
class MeshSettings:
    """Settings shared by every mesh service.

    - ``max_batch_size`` / ``max_wait_ms``: every service (and the orchestrator) closes a micro-batch
      at this many queries or this long after its first query (same as ``silvertorch serve``).
    - ``threads``: torch intra-op threads and faiss OpenMP threads per service process.
    - ``max_k``: the largest ``k`` a request may ask for.
    - ``ann``: ``"flat"`` = faiss ``IndexIVFFlat`` over the artifact's stored vectors (dequantized;
      queries quantized like SilverTorch's int8 path), the same centroids and cluster assignment:
      the same candidates as SilverTorch; ``"sq8"`` = ``IndexIVFScalarQuantizer`` QT_8bit (one byte
      per dimension like our int8, faiss's per-dimension ranges), the same centroids / assignment.
    - ``max_body_bytes``: larger bodies answer 413.
    """

    max_batch_size: int = 64
    max_wait_ms: float = 2.0
    threads: int = 2
    max_k: int = 1000
    ann: AnnKind = "flat"
    max_body_bytes: int = 64 << 20

    @classmethod
    def like_server(cls, **overrides: Any) -> MeshSettings:
        """The SilverTorch server's defaults, then ``overrides``."""
        return cls(**{**server_defaults(), **overrides})

    def validate(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not 0 <= self.max_wait_ms <= 1000:
            raise ValueError(f"max_wait_ms must lie in [0, 1000], got {self.max_wait_ms}")
        if self.threads < 1 or self.max_k < 1:
            raise ValueError(f"threads and max_k must be >= 1, got {self.threads}, {self.max_k}")
        if self.ann not in ("flat", "sq8"):
            raise ValueError(f"ann must be 'flat' or 'sq8', got {self.ann!r}")

    def to_args(self) -> list[str]:
        """Command-line flags for a service process (:mod:`benchmarks.mesh.run_service`)."""
        return [f"--{k.replace('_', '-')}={v}" for k, v in asdict(self).items()]
