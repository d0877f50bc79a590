"""k-means in torch for the IVF coarse quantizer.

Assignment is a batched GEMM in chunks; initialization is k-means++ on a small sub-sample; clusters
that end up empty are repaired by splitting the largest ones; large catalogs train on a random sample
of at most ``max_points_per_centroid * k`` points. ``metric="ip"`` assigns by largest inner product
(as the probe does), ``metric="l2"`` by smallest distance, and ``spherical=True`` keeps unit centroids
(cosine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KMeansConfig", "assign", "kmeans"]


@dataclass(kw_only=True)
class KMeansConfig:
    niter: int = 20
    max_points_per_centroid: int = 256
    init_points_per_centroid: int = 16  # k-means++ runs on at most this many points per centroid
    spherical: bool = False
    metric: str = "ip"  # "ip" or "l2"
    chunk: int = 65536
    seed: int = 0


def _scores(x: Tensor, centroids: Tensor, c_norm2: Tensor | None) -> Tensor:
    s = x @ centroids.T
    if c_norm2 is not None:  # l2: argmax of 2 x.c - |c|^2 == argmin of |x - c|^2
        s = 2 * s - c_norm2
    return s


def assign(x: Tensor, centroids: Tensor, metric: str = "ip", chunk: int = 65536) -> Tensor:
    """Nearest centroid of every row: ``x (n, d) f32, centroids (k, d) f32 -> (n,) int64``."""
    c_norm2 = (centroids * centroids).sum(1) if metric == "l2" else None
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for i in range(0, x.shape[0], chunk):
        out[i : i + chunk] = _scores(x[i : i + chunk].float(), centroids, c_norm2).argmax(1)
    return out


def _kmeans_pp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding (D² sampling) on ``x (n, d)``: ``-> (k, d)`` f32."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than k: pick any
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial(d2 / total, 1, generator=gen))
        centroids.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    return torch.stack(centroids)


def _repair_empty(centroids: Tensor, counts: Tensor, gen: torch.Generator) -> int:
    """Split the largest clusters into the empty ones, in place; returns how many were repaired."""
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if not empty:
        return 0
    counts = counts.clone().float()
    for e in empty:
        big = int(counts.argmax())
        if counts[big] <= 1:
            break
        eps = 1e-4 * (1 + centroids[big].abs().max())
        noise = eps * torch.randn(centroids.shape[1], generator=gen)
        centroids[e] = centroids[big] + noise
        centroids[big] = centroids[big] - noise
        counts[e] = counts[big] / 2
        counts[big] = counts[big] / 2
    return len(empty)


def kmeans(x: Tensor, k: int, config: KMeansConfig | None = None) -> Tensor:
    """Train ``k`` centroids on ``x (n, d) f32``: ``-> (k, d) f32``.

    With ``n <= k`` every point becomes a centroid and the remaining centroids copy random points
    (their clusters stay empty, which the slot layout allows).
    """
    cfg = config or KMeansConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    x = x.float()
    n, d = x.shape
    if n == 0:
        return torch.zeros(k, d)
    if n <= k:
        extra = x[torch.randint(n, (k - n,), generator=gen)] if k > n else x[:0]
        return torch.cat([x, extra]).contiguous()
    if n > cfg.max_points_per_centroid * k:
        x = x[torch.randperm(n, generator=gen)[: cfg.max_points_per_centroid * k]]
        n = x.shape[0]
    m = min(n, cfg.init_points_per_centroid * k)
    init_sample = x[torch.randperm(n, generator=gen)[:m]]
    centroids = _kmeans_pp(init_sample, k, gen)
    if cfg.spherical:
        centroids = torch.nn.functional.normalize(centroids, dim=1)
    for _ in range(cfg.niter):
        a = assign(x, centroids, cfg.metric, cfg.chunk)
        counts = torch.bincount(a, minlength=k)
        sums = torch.zeros(k, d).index_add_(0, a, x)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None].float()
        _repair_empty(centroids, counts, gen)
        if cfg.spherical:
            centroids = torch.nn.functional.normalize(centroids, dim=1)
    return centroids.contiguous()
