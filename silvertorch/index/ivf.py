"""IVF: the k-means coarse quantizer and the slot-ordered item store, all in registered buffers.

Buffers (see docs/architecture.md): ``centroids (C, d) f32``, ``cluster_offsets (C+1,) int64``
(64-aligned), ``slot_ids (S,) int64`` (original id, -1 = padding), ``vectors (S, d)`` in the storage
dtype, ``scales (S,) f32`` (int8 per-item scale, 1 otherwise; padding slots hold zero vectors, scale 1),
``live_words (S/64,) int64``. The metric travels in the module's extra state.

Fresh segment (streaming updates, :mod:`silvertorch.index.fresh`): once an item is added after the
build, ``cluster_offsets`` has ``C + 2`` entries: ``[off[C], off[C+1])`` is the *fresh cluster*
(the used part of the fresh region, 64-aligned), which every IVF search scans next to its probed
clusters, and slots ``[off[C+1], S)`` are unused headroom (dead). Without updates the layout is
exactly the build's (``C + 1`` offsets, ``off[C] == S``). ``slot_ids`` holds ``-1`` for padding and
:data:`~silvertorch.index.layout.TOMBSTONE` (``-2``) for a deleted item's slot.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .kmeans import KMeansConfig, assign, kmeans
from .layout import SLOT_ALIGN, build_layout, live_words_from_ids
from .quantize import encode, parse_dtype

__all__ = ["METRICS", "IVFIndex", "check_vectors", "check_queries"]

METRICS = ("ip", "cosine")
_BUFFERS = ("centroids", "cluster_offsets", "slot_ids", "vectors", "scales", "live_words")


def check_vectors(x: Tensor, what: str = "item vectors") -> None:
    """Reject non-2-D, non-float or non-finite vectors with a message naming count and first row."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"{what} must be a 2-D tensor (N, d), got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be floating point (N, d), got dtype {x.dtype}")
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()
        raise ValueError(
            f"{what}: {rows.numel()} row(s) contain NaN or inf (first bad row: {int(rows[0])})"
        )


def check_queries(q: Tensor, dim: int) -> None:
    """Queries must be ``(B, dim)`` floating point and finite."""
    if not isinstance(q, Tensor) or q.dim() != 2 or q.shape[1] != dim:
        raise ValueError(
            f"queries must have shape (B, {dim}), got {tuple(getattr(q, 'shape', ())) or type(q)}"
        )
    if not q.is_floating_point():
        raise TypeError(f"queries must be a floating point tensor of shape (B, {dim}), got {q.dtype}")
    if not bool(torch.isfinite(q).all()):
        raise ValueError("queries contain NaN or inf")


class IVFIndex(nn.Module):
    """Inverted-file index over slot-ordered, optionally int8-quantized item vectors."""

    centroids: Tensor
    cluster_offsets: Tensor
    slot_ids: Tensor
    vectors: Tensor
    scales: Tensor
    live_words: Tensor

    def __init__(
        self, dim: int, nlist: int, dtype: str | torch.dtype = "int8", metric: str = "ip"
    ) -> None:
        """An empty index (no items); fill it with :meth:`build` or ``load_state_dict``."""
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"metric '{metric}' not supported; expected one of {METRICS}")
        if nlist < 1 or dim < 1:
            raise ValueError(f"nlist and dim must be >= 1, got nlist={nlist}, dim={dim}")
        self.metric = metric
        sdt = parse_dtype(dtype)
        self.register_buffer("centroids", torch.zeros(nlist, dim))
        self.register_buffer("cluster_offsets", torch.zeros(nlist + 1, dtype=torch.int64))
        self.register_buffer("slot_ids", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("vectors", torch.zeros(0, dim, dtype=sdt))
        self.register_buffer("scales", torch.zeros(0))
        self.register_buffer("live_words", torch.zeros(0, dtype=torch.int64))

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        vectors: Tensor,
        ids: Tensor | None = None,
        *,
        nlist: int = 1024,
        dtype: str | torch.dtype = "int8",
        metric: str = "ip",
        seed: int = 0,
        kmeans_config: KMeansConfig | None = None,
    ) -> IVFIndex:
        """Train k-means on ``vectors (N, d) f32`` and lay the items out in slots.

        ``ids (N,) int64 >= 0`` are the ids returned by search (default ``arange(N)``).
        Training uses a sample of at most ``max_points_per_centroid * nlist`` points, then one
        chunked assignment pass over all items.
        """
        check_vectors(vectors)
        n, d = vectors.shape
        if ids is None:
            ids = torch.arange(n, dtype=torch.int64)
        if ids.shape != (n,) or ids.dtype != torch.int64:
            raise ValueError(f"ids must be an int64 tensor of shape ({n},), got {ids.dtype} {tuple(ids.shape)}")
        if n and int(ids.min()) < 0:
            raise ValueError("ids must be >= 0 (-1 marks padding slots)")
        index = cls(d, nlist, dtype, metric)
        x = vectors.detach().float().cpu()
        if metric == "cosine":
            x = nn.functional.normalize(x, dim=1)
        cfg = kmeans_config or KMeansConfig()
        cfg = KMeansConfig(**{**cfg.__dict__, "seed": seed, "spherical": metric == "cosine" or cfg.spherical})
        centroids = kmeans(x, nlist, cfg)
        a = assign(x, centroids, cfg.metric, cfg.chunk) if n else torch.zeros(0, dtype=torch.int64)
        index._fill(centroids, a, x, ids.cpu())
        return index.to(vectors.device)

    def _fill(self, centroids: Tensor, a: Tensor, x: Tensor, ids: Tensor) -> None:
        nlist, d = centroids.shape
        order, offsets, slots = build_layout(a, nlist)
        s = int(offsets[-1])
        sdt = self.vectors.dtype
        codes, scales = encode(x[order], sdt)
        vec = torch.zeros(s, d, dtype=sdt)
        vec[slots] = codes
        sc = torch.ones(s)
        sc[slots] = scales
        slot_ids = torch.full((s,), -1, dtype=torch.int64)
        slot_ids[slots] = ids[order]
        self.centroids = centroids.float().contiguous()
        self.cluster_offsets = offsets
        self.slot_ids = slot_ids
        self.vectors = vec
        self.scales = sc
        self.live_words = live_words_from_ids(slot_ids)

    # ----------------------------------------------------------- properties
    @property
    def nlist(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    @property
    def num_slots(self) -> int:
        return self.slot_ids.numel()

    @property
    def ntotal(self) -> int:
        """Number of live items."""
        return int((self.slot_ids >= 0).sum())

    @property
    def has_fresh(self) -> bool:
        """True when a fresh region exists (``cluster_offsets`` has ``C + 2`` entries)."""
        b = self._buffers  # direct access: this is on the search path
        return b["cluster_offsets"].shape[0] == b["centroids"].shape[0] + 2

    @property
    def main_slots(self) -> int:
        """Slots of the main clusters (``cluster_offsets[C]``); the fresh region follows them."""
        return int(self.cluster_offsets[self.nlist])

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.vectors.dtype

    def spans(self) -> Tensor:
        """``(C,) int64`` slots owned by each cluster (a multiple of 64); ``(C + 1,)`` with the
        fresh cluster last when a fresh region exists."""
        return self.cluster_offsets[1:] - self.cluster_offsets[:-1]

    # --------------------------------------------------------------- search
    def prepare(self, queries: Tensor) -> Tensor:
        """Validate queries ``(B, d)`` and apply the metric (cosine normalizes): ``-> (B, d) f32``."""
        check_queries(queries, self.dim)
        q = queries.to(self.centroids.device, torch.float32)
        return nn.functional.normalize(q, dim=1) if self.metric == "cosine" else q

    def probe(self, queries: Tensor, nprobe: int) -> Tensor:
        """Nearest centroids by inner product: ``queries (B, d) f32 -> (B, min(nprobe, C)) int64``.

        ``nprobe`` larger than ``nlist`` is clamped to ``nlist``; ``nprobe < 1`` is an error.
        Queries are used as given (call :meth:`prepare` first for cosine).
        """
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        p = min(int(nprobe), self.nlist)
        sims = queries.float() @ self.centroids.T
        if p == self.nlist:
            return torch.sort(sims, dim=1, descending=True).indices
        return torch.topk(sims, p, dim=1).indices

    # ------------------------------------------------------------ state dict
    def get_extra_state(self) -> dict[str, Any]:
        return {"metric": self.metric, "slot_align": SLOT_ALIGN, "version": 1}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("slot_align", SLOT_ALIGN) != SLOT_ALIGN:
            raise ValueError(f"state has slot_align {state.get('slot_align')}, expected {SLOT_ALIGN}")
        metric = state.get("metric", "ip")
        if metric not in METRICS:
            raise ValueError(f"state has unknown metric '{metric}'")
        self.metric = metric

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:  # type: ignore[no-untyped-def]
        # Buffers take the incoming shapes and dtypes: an index of any size or storage dtype loads.
        for name in _BUFFERS:
            key = prefix + name
            if key in state_dict:
                src = state_dict[key]
                dev = self._buffers[name].device
                self._buffers[name] = torch.empty(src.shape, dtype=src.dtype, device=dev)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        try:
            self.validate()
        except ValueError as e:
            error_msgs.append(f"{prefix or 'IVFIndex'}: inconsistent state: {e}")

    def validate(self) -> None:
        """Check the buffers against each other and the slot layout contract."""
        c, d = self.centroids.shape
        s = self.num_slots
        off = self.cluster_offsets
        fresh = off.shape == (c + 2,)
        if not fresh and (off.shape != (c + 1,) or int(off[-1]) != s):
            raise ValueError(f"cluster_offsets must be ({c + 1},) from 0 to {s} (or ({c + 2},) with a "
                             f"fresh cluster), got {tuple(off.shape)}")
        if int(off[0]) != 0 or int(off[-1]) > s:
            raise ValueError(f"cluster_offsets must start at 0 and end at most at {s} slots")
        if bool((off % SLOT_ALIGN != 0).any()) or bool((off[1:] < off[:-1]).any()):
            raise ValueError(f"cluster_offsets must be non-decreasing multiples of {SLOT_ALIGN}")
        if self.vectors.shape != (s, d):
            raise ValueError(f"vectors must be ({s}, {d}), got {tuple(self.vectors.shape)}")
        if self.scales.shape != (s,) or self.live_words.shape != (s // SLOT_ALIGN,):
            raise ValueError(f"scales must be ({s},) and live_words ({s // SLOT_ALIGN},)")
        parse_dtype(self.vectors.dtype)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], prefix: str = "", assign: bool = False) -> IVFIndex:
        """An index of the right size and dtype for ``state`` (as saved by ``state_dict()``);
        ``assign``: holding ``state``'s tensors themselves instead of copies."""
        cent = state[prefix + "centroids"]
        extra = state.get(prefix + "_extra_state", {})
        index = cls(cent.shape[1], cent.shape[0], state[prefix + "vectors"].dtype, extra.get("metric", "ip"))
        index.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                              assign=assign)
        return index
