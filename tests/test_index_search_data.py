"""Small synthetic clustered catalogs shared by the index tests."""

from __future__ import annotations

import torch


def clustered(n: int, d: int, centers: int, nq: int, noise: float = 0.4, seed: int = 0):
    """``(items (n, d) f32, queries (nq, d) f32)`` around ``centers`` random unit centers."""
    g = torch.Generator().manual_seed(seed)
    c = torch.nn.functional.normalize(torch.randn(centers, d, generator=g), dim=1)
    x = c[torch.randint(centers, (n,), generator=g)] + noise * torch.randn(n, d, generator=g) / d**0.5
    q = c[torch.randint(centers, (nq,), generator=g)] + noise * torch.randn(nq, d, generator=g) / d**0.5
    return x, q


def recall(ids: torch.Tensor, truth: torch.Tensor) -> float:
    """Fraction of ``truth (B, k)`` ids found in ``ids (B, k)`` (ignoring -1)."""
    hit = sum(len(set(a.tolist()) & set(b.tolist()) - {-1}) for a, b in zip(ids, truth))
    return hit / max(int((truth >= 0).sum()), 1)
