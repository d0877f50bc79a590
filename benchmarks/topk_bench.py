"""Top-K selection cost: ``select_topk`` against one ``torch.topk``, interleaved in one run."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from silvertorch.index.topk import choose_method, select_topk

from .common import Timing, progress

__all__ = ["TopKRow", "bench_topk"]


@dataclass
class TopKRow:
    rows: int
    cols: int
    k: int
    method: str  # what select_topk's "auto" picked
    ours: Timing
    torch_topk: Timing

    @property
    def speedup(self) -> float:
        return self.torch_topk.median_s / self.ours.median_s


def bench_topk(shapes: list[tuple[int, int, int]], repeats: int, show: bool = True,
               seed: int = 0) -> list[TopKRow]:
    """For each ``(B, L, k)``: exactness check, then ``repeats`` rounds alternating both methods
    (so machine noise hits both alike). Scores are i.i.d. normal, like well-mixed candidates."""
    g = torch.Generator().manual_seed(seed)
    cache: dict[tuple[int, int], torch.Tensor] = {}
    out = []
    for B, L, k in progress(shapes, "top-k", show):
        if (B, L) not in cache:
            cache.clear()
            cache[(B, L)] = torch.randn(B, L, generator=g)
        x = cache[(B, L)]
        ours_v, _ = select_topk(x, k)  # also the warm-up
        ref_v, _ = torch.topk(x, min(k, L), dim=1)
        if not torch.equal(ours_v[:, : ref_v.shape[1]], ref_v):
            raise AssertionError(f"select_topk disagrees with torch.topk at B={B} L={L} k={k}")
        times: dict[str, list[float]] = {"ours": [], "torch": []}
        for _ in range(max(1, repeats)):
            for name, fn in (("ours", lambda: select_topk(x, k)), ("torch", lambda: torch.topk(x, k, dim=1))):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        t = {n: Timing(statistics.median(v), min(v), max(v), len(v)) for n, v in times.items()}
        out.append(TopKRow(B, L, k, choose_method(L, k), t["ours"], t["torch"]))
    return out
