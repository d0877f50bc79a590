"""``ShardedRetrievalModel``: the sharded twin of :class:`silvertorch.model.RetrievalModel`.

Every rank holds the replicated small parts (user tower, OverArch, value model, reranker, the
``(N + 1, L)`` OverArch item-feature tables) and **one item shard** of the index
(:mod:`silvertorch.distributed.sharded_index`: all centroids, its own clusters' slots, eligibility
over its own slots). One request batch, identical on every rank (SPMD):

1. user tower -> ``query (B, D)`` (replicated: the same bits on every rank);
2. the rank's shard is searched with the same custom op as the unsharded model
   (``silvertorch::ivf_search``: probe the global centroids -> filter the probed words of *its*
   clusters -> fused scan -> top-``K'``) -> ``(B, K')`` scores and ids; filters are compiled
   per rank from the expressions (a compiled plan is shard-specific: it sizes its words);
3. the rank runs the **OverArch on its own** ``K'`` candidates (their stored vectors are local) ->
   ``(B, K', T)`` task logits; the OverArch is per candidate, so a candidate's logits do not depend
   on which other candidates are scored with it;
4. each rank packs ``(score, id, global slot, T task logits)`` of its ``K'`` candidates into one
   ``(B, K', 5 + T) int32`` tensor (bit views, no conversion; :mod:`~silvertorch.distributed.wire`
   has the byte count the planner uses) and **one all-gather** brings all ``R`` of them to every
   rank -- no item vector crosses the wire;
5. every rank merges the ``R * K'`` candidates into the global top-``K'``: order by score
   descending, ties by the smaller **global slot** (the order the fused CPU scan uses), so the merge
   is deterministic and the same on every rank;
6. value model -> (reranker) -> top-``k`` on the merged candidates' logits, exactly the tail of
   ``RetrievalModel.search_and_score`` -> the same :class:`RetrievalOutput`. The reranker alone
   needs vectors (it mixes the candidates with attention): the ``n = min(top_n, K')`` best by
   composite are fetched from their owners with **one all-reduce** of ``(B, n, D)`` (each rank fills
   the rows it owns, zeros elsewhere; summed as int32 bit views, so the bits are exact).

**Equality.** The global top-``K'`` is contained in the union of the per-shard top-``K'`` (a
candidate beaten by ``K'`` others on its own shard is beaten by them globally), every candidate's
score is computed from the same stored row and the same query with the same kernel (per-item
scores do not depend on which other clusters are scanned), its task logits from the same
dequantized row and attributes with the same per-candidate OverArch, and the reranker sees the same
vectors; so ids, composite scores, task scores and retrieval scores equal the unsharded model's bit
for bit, with two caveats documented in ``docs/sharded_serving.md``: (a) items whose score ties at
the ``K'``-th place may be chosen differently where the unsharded selection breaks ties
arbitrarily; (b) with Bloom filters the unsharded model verifies its best ``2K'+32`` candidates while
each shard verifies its own, so a sharded answer can only be *better* when more than ``K'+32`` Bloom
false positives crowd the unsharded candidate list.

**Failure.** Every collective runs with ``async_op=True`` and waits at most ``timeout_s``: a dead
peer (closed connection) fails at once, a silent one at the timeout; either raises
:class:`ShardPeerError` naming this rank, the world size and the cause, and the model stays
**failed** (every later call raises the same error at once, :attr:`healthy` is False) because the
process group is no longer usable — restart all ranks. Bad input (k, nprobe, filter syntax, value
weights) is rejected before the collective, identically on every rank, so it never desynchronizes
the ranks.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from silvertorch.distributed.sharded_index import ShardAssignment, local_to_global_slots
from silvertorch.distributed.wire import HEADER_WORDS
from silvertorch.index.ops import index_tensors, pack_plan
from silvertorch.index.plan import FilterPlan
from silvertorch.index.search import ItemIndex
from silvertorch.model import RetrievalConfig, RetrievalModel
from silvertorch.retrieval_ops import (
    RetrievalOutput,
    check_request,
    dequantize_candidates,
    gather_features,
    item_slots,
    rerank_top_n,
    select_output,
)

__all__ = [
    "ShardPeerError",
    "ShardedRetrievalModel",
    "pack_candidates",
    "unpack_candidates",
    "merge_candidates",
    "combine_owned",
]

_HEADER = HEADER_WORDS  # int32 columns before the payload: score (1), id (2), global slot (2)


class ShardPeerError(RuntimeError):
    """A collective of sharded retrieval failed: a peer rank is dead, hung or unreachable."""


# ------------------------------------------------------------------------------ pure functions
def pack_candidates(scores: Tensor, ids: Tensor, gslots: Tensor, payload: Tensor) -> Tensor:
    """``scores (B, K) f32, ids (B, K) int64, gslots (B, K) int64, payload (B, K, E) f32`` ->
    ``(B, K, 5 + E) int32`` (bit views: unpacking gives the exact same bits back). In the forward
    pass the payload is the ``T`` task logits (:func:`silvertorch.distributed.wire.candidate_words`)."""
    B, K = scores.shape
    if ids.shape != (B, K) or gslots.shape != (B, K) or payload.dim() != 3 or payload.shape[:2] != (B, K):
        raise ValueError(f"pack_candidates expects scores, ids, gslots (B, K) and payload (B, K, E); got "
                         f"{tuple(scores.shape)}, {tuple(ids.shape)}, {tuple(gslots.shape)}, "
                         f"{tuple(payload.shape)}")
    parts = [
        scores.float().contiguous().view(torch.int32).reshape(B, K, 1),
        ids.contiguous().view(torch.int32).reshape(B, K, 2),
        gslots.contiguous().view(torch.int32).reshape(B, K, 2),
        payload.float().contiguous().view(torch.int32),
    ]
    return torch.cat(parts, dim=2)


def unpack_candidates(packed: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inverse of :func:`pack_candidates`: ``(..., K, 5 + E) int32`` -> scores ``(..., K) f32``,
    ids ``(..., K) int64``, global slots ``(..., K) int64``, payload ``(..., K, E) f32``."""
    if packed.dtype != torch.int32 or packed.dim() < 2 or packed.shape[-1] < _HEADER:
        raise ValueError(f"packed candidates must be (..., K, >= {_HEADER}) int32, got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    scores = packed[..., 0].contiguous().view(torch.float32)
    ids = packed[..., 1:3].contiguous().view(torch.int64).squeeze(-1)
    gslots = packed[..., 3:5].contiguous().view(torch.int64).squeeze(-1)
    payload = packed[..., _HEADER:].contiguous().view(torch.float32)
    return scores, ids, gslots, payload


def merge_candidates(
    scores: Tensor, ids: Tensor, gslots: Tensor, payload: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Global top-``k`` of every rank's candidates.

    ``scores (R, B, K) f32``, ``ids (R, B, K) int64`` (``-1`` padding), ``gslots (R, B, K) int64``,
    ``payload (R, B, K, E) f32`` -> ``scores (B, k) f32`` (``-inf`` padding), ``ids (B, k) int64``
    (``-1``), ``payload (B, k, E) f32`` (zeros). Order: score descending, then global slot
    ascending (deterministic; the same on every rank).
    """
    R, B, K = scores.shape
    E = payload.shape[-1]
    s = scores.permute(1, 0, 2).reshape(B, R * K)
    i = ids.permute(1, 0, 2).reshape(B, R * K)
    g = gslots.permute(1, 0, 2).reshape(B, R * K)
    v = payload.permute(1, 0, 2, 3).reshape(B, R * K, E)
    valid = i >= 0
    s = torch.where(valid, s, torch.full_like(s, float("-inf")))
    big = torch.iinfo(torch.int64).max
    g = torch.where(valid, g, torch.full_like(g, big))
    by_slot = torch.sort(g, dim=1, stable=True).indices
    s1 = s.gather(1, by_slot)
    by_score = torch.sort(s1, dim=1, descending=True, stable=True).indices
    order = by_slot.gather(1, by_score)
    if order.shape[1] < k:  # fewer candidates than asked (R * K < k): pad
        pad = torch.full((B, k - order.shape[1]), -1, dtype=torch.int64, device=order.device)
        order = torch.cat([order, pad], dim=1)
    order = order[:, :k]
    ok = order >= 0
    pos = order.clamp_min(0)
    top_s = s.gather(1, pos)
    keep = ok & (top_s > float("-inf"))
    top_s = torch.where(keep, top_s, torch.full_like(top_s, float("-inf")))
    top_i = torch.where(keep, i.gather(1, pos), torch.full_like(pos, -1))
    top_v = v.gather(1, pos.unsqueeze(-1).expand(B, k, E))
    top_v = torch.where(keep.unsqueeze(-1), top_v, torch.zeros_like(top_v))
    return top_s, top_i, top_v


def combine_owned(owned: Tensor) -> Tensor:
    """``owned (R, ...) f32``, every element non-zero on at most one rank (the owner's row, zeros
    elsewhere) -> ``(...) f32`` with the owner's exact bits: the sum of the int32 bit views, which is
    what the rerank fetch's all-reduce computes (a float sum would turn ``-0.0`` into ``0.0``)."""
    if owned.dtype != torch.float32 or owned.dim() < 1:
        raise ValueError(f"owned must be (R, ...) float32, got {owned.dtype} {tuple(owned.shape)}")
    return owned.contiguous().view(torch.int32).sum(0, dtype=torch.int32).view(torch.float32)


# ---------------------------------------------------------------------------------- the model
class ShardedRetrievalModel(nn.Module):
    """One rank of a sharded :class:`~silvertorch.model.RetrievalModel` (see module doc).

    Args:
        user_tower / overarch / value_model / reranker: the replicated modules (``reranker`` may
            be None).
        shard: this rank's item shard (an ``ItemIndex`` from
            :func:`~silvertorch.distributed.sharded_index.shard_index`).
        feature_tables: OverArch feature name -> ``(N + 1, L) int64`` padded table (item-id order,
            replicated: it is small next to the vectors and saves a second gather).
        config: the retrieval config (``k_prime``, ``nprobe``, ``max_k``, ``verify``).
        global_offsets: the source index's ``cluster_offsets`` (``(C+1,)`` or ``(C+2,)`` int64).
        rank / world_size: this rank and the number of shards (``world_size == 1`` needs no
            process group).
        group: the ``torch.distributed`` process group (None = the default group).
        timeout_s: how long the all-gather may wait for the peers (> 0).

    Buffers: ``index.*`` (the shard), ``item_slot (N,) int64`` (shard slot of each item id, -1 when
    the item lives on another shard), ``global_offsets``, ``item_feature_<name>``,
    ``catalog_generation () int64``.
    """

    item_slot: Tensor
    global_offsets: Tensor
    catalog_generation: Tensor

    def __init__(
        self,
        user_tower: nn.Module,
        shard: ItemIndex,
        overarch: nn.Module,
        value_model: nn.Module,
        reranker: nn.Module | None,
        feature_tables: Mapping[str, Tensor],
        config: RetrievalConfig,
        global_offsets: Tensor,
        *,
        num_items: int,
        rank: int,
        world_size: int,
        group: dist.ProcessGroup | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        super().__init__()
        config.validate()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        off = shard.ivf.cluster_offsets
        C = shard.ivf.nlist
        if global_offsets.dim() != 1 or global_offsets.numel() not in (C + 1, C + 2) \
                or off.numel() > global_offsets.numel():
            raise ValueError(f"global_offsets must be (C+1,) or (C+2,) with C={C} and cover the "
                             f"shard's {off.numel()} offsets, got {tuple(global_offsets.shape)}")
        if config.min_candidates_factor > 0:
            # every rank would need the GLOBAL per-cluster histogram to probe the clusters the
            # unsharded model probes; until it has one, refuse rather than answer differently
            raise ValueError(
                f"selectivity-aware probing (retrieval.min_candidates_factor="
                f"{config.min_candidates_factor}) is not supported by the sharded model yet: "
                "export the sharded artifact from a config with min_candidates_factor = 0")
        dim = shard.ivf.dim
        if getattr(user_tower, "output_dim", dim) != dim:
            raise ValueError(f"user tower outputs {user_tower.output_dim} dims, the shard holds {dim}")
        self.config = config
        self.user_tower, self.index = user_tower, shard
        self.overarch, self.value_model, self.reranker = overarch, value_model, reranker
        self.rank, self.world_size, self.group, self.timeout_s = rank, world_size, group, float(timeout_s)
        self.num_items = int(num_items)
        self.register_buffer("item_slot", item_slots(shard.ivf.slot_ids, self.num_items))
        self.register_buffer("global_offsets", global_offsets.detach().to(torch.int64).clone())
        self.register_buffer("catalog_generation", torch.zeros((), dtype=torch.int64))
        self.feature_buffers: dict[str, str] = {}
        for name in getattr(overarch, "feature_names", list(feature_tables)):
            if name not in feature_tables:
                raise ValueError(f"OverArch item feature '{name}' has no table among {sorted(feature_tables)}")
            self.register_buffer(f"item_feature_{name}", feature_tables[name])
            self.feature_buffers[name] = f"item_feature_{name}"
        self._failure: str | None = None

    @classmethod
    def from_model(
        cls,
        model: RetrievalModel,
        shard: ItemIndex,
        assignment: ShardAssignment,
        *,
        rank: int,
        group: dist.ProcessGroup | None = None,
        timeout_s: float = 30.0,
    ) -> ShardedRetrievalModel:
        """Rank ``rank``'s model around ``shard`` of ``model.index`` (replicated modules are shared,
        not copied). ``assignment`` gives the world size and the global slot layout."""
        out = cls(
            model.user_tower, shard, model.overarch, model.value_model, model.reranker,
            model.feature_tables(), model.config, assignment.global_offsets,
            num_items=model.num_items, rank=rank, world_size=assignment.num_shards,
            group=group, timeout_s=timeout_s,
        )
        out.catalog_generation.fill_(model.generation)
        return out

    # ------------------------------------------------------------------------------ state
    @property
    def healthy(self) -> bool:
        """False once a collective failed (a peer died): the model cannot serve until restarted."""
        return self._failure is None

    @property
    def failure(self) -> str | None:
        """Why the model is failed (None while healthy)."""
        return self._failure

    @property
    def generation(self) -> int:
        return int(self.catalog_generation)

    def feature_tables(self) -> dict[str, Tensor]:
        return {name: self._buffers[b] for name, b in self.feature_buffers.items()}

    # ---------------------------------------------------------------------------- host API
    def compile_filters(self, filters: list[str | None] | FilterPlan | None, batch_size: int
                        ) -> FilterPlan | None:
        """Expressions (one per row, or one for all) -> this shard's plan, or None for no filter.
        A plan compiled by :meth:`compile_filters` of *this* shard passes through (row count
        checked). Raises ``ValueError`` / ``FilterSyntaxError`` (same on every rank: same schema)."""
        if isinstance(filters, FilterPlan):
            if filters.num_rows != batch_size:
                raise ValueError(f"filter plan has {filters.num_rows} rows, expected {batch_size}")
            return filters
        if filters is None or not any(f for f in filters):
            return None
        if isinstance(filters, str):
            raise TypeError("filters must be a list of expressions (one per row, or one for all)")
        if self.index.eligibility is None:
            raise ValueError("filters were given but the index was built without attributes")
        exprs = list(filters) * batch_size if len(filters) == 1 and batch_size != 1 else list(filters)
        if len(exprs) != batch_size:
            raise ValueError(f"{len(filters)} filter expressions, expected 1 or {batch_size} (one per query)")
        return self.index.eligibility.compile(exprs)

    def forward(
        self,
        user_features: object,
        k: int,
        filters: list[str | None] | FilterPlan | None = None,
        value_weights: Tensor | None = None,
        nprobe: int | None = None,
    ) -> RetrievalOutput:
        """One request batch (the same on every rank): ``user_features`` (KJT, batch ``B``),
        ``k`` in ``[1, max_k]``, filter expressions, ``value_weights (T,) | (B, T)``, ``nprobe``
        -> :class:`RetrievalOutput`, equal to ``RetrievalModel.retrieve`` with the same arguments."""
        check_request(k, self.config.max_k, nprobe)
        self._check_healthy()
        B = user_features.stride()  # type: ignore[attr-defined]
        plan = self.compile_filters(filters, B)
        self.value_model.check_weights(value_weights, batch_size=B)
        query = self.user_tower(user_features)
        return self._retrieve(query, k, plan, value_weights, nprobe)

    retrieve = forward

    def retrieve_from_query(
        self,
        query: Tensor,
        k: int,
        filters: list[str | None] | FilterPlan | None = None,
        value_weights: Tensor | None = None,
        nprobe: int | None = None,
    ) -> RetrievalOutput:
        """Everything after the user tower: ``query (B, D) f32`` -> :class:`RetrievalOutput`."""
        check_request(k, self.config.max_k, nprobe)
        self._check_healthy()
        plan = self.compile_filters(filters, query.shape[0])
        self.value_model.check_weights(value_weights, batch_size=query.shape[0])
        return self._retrieve(query, k, plan, value_weights, nprobe)

    # ------------------------------------------------------------------------------ stages
    def local_candidates(self, query: Tensor, k_cand: int, plan: FilterPlan | None,
                         nprobe: int | None) -> Tensor:
        """This shard's top-``k_cand``, scored by the OverArch here: ``query (B, D)`` -> packed
        ``(B, k_cand, 5 + T) int32`` (:func:`pack_candidates` of retrieval score, id, global slot
        and the ``T`` task logits of the candidate's stored vector and attributes)."""
        cfg = self.config
        ivf_buf, metric, elig_buf = index_tensors(self.index)
        tensors, ints = pack_plan(plan)
        scores, ids = torch.ops.silvertorch.ivf_search(
            query.detach(), ivf_buf, metric, elig_buf, tensors, ints, k_cand,
            cfg.nprobe if nprobe is None else nprobe, cfg.verify, False,
        )  # (B, K') f32, (B, K') int64
        valid = ids >= 0
        local = self.item_slot.index_select(0, ids.clamp_min(0).reshape(-1)).reshape(ids.shape)
        local = torch.where(valid, local, torch.full_like(local, -1))
        gslots = local_to_global_slots(self.index.ivf.cluster_offsets, self.global_offsets, local)
        ivf = self.index.ivf
        vectors = dequantize_candidates(ivf.vectors, ivf.scales, self.item_slot, ids)  # (B, K', D)
        logits = self.overarch(query, vectors, gather_features(self.feature_tables(), ids))  # (B, K', T)
        return pack_candidates(scores, ids, gslots, logits)

    def owned_vectors(self, ids: Tensor) -> Tensor:
        """``ids (B, n) int64`` (``-1`` padding) -> ``(B, n, D) f32``: the dequantized stored vector
        of every id this shard holds, zeros for ids held elsewhere and for padding (one rank's part
        of the rerank fetch; :func:`combine_owned` of all ranks' parts gives every vector)."""
        ivf = self.index.ivf
        slot = self.item_slot.index_select(0, ids.clamp_min(0).reshape(-1)).reshape(ids.shape)
        mine = (ids >= 0) & (slot >= 0)
        vec = dequantize_candidates(ivf.vectors, ivf.scales, self.item_slot, ids)
        return torch.where(mine.unsqueeze(-1), vec, torch.zeros_like(vec))

    def fetch_vectors(self, ids: Tensor) -> Tensor:
        """``ids (B, n) int64`` -> ``(B, n, D) f32`` stored vectors from their owners: one
        all-reduce of :meth:`owned_vectors` (int32 bit views, exact). A collective: every rank must
        call it with the same ``ids``."""
        owned = self.owned_vectors(ids)
        if self.world_size == 1:
            return owned
        summed = self._collective(
            "the rerank fetch of vectors",
            lambda out, inp: dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group, async_op=True),
            owned.contiguous().view(torch.int32).clone(), None,
        )
        return summed.view(torch.float32)

    def score_merged(self, query: Tensor, retrieval: Tensor, ids: Tensor, logits: Tensor, k: int,
                     value_weights: Tensor | None,
                     fetch: Callable[[Tensor], Tensor] | None = None) -> RetrievalOutput:
        """The unsharded model's tail on merged candidates: ``query (B, D)``, ``retrieval (B, K')``,
        ``ids (B, K')``, ``logits (B, K', T)`` -> :class:`RetrievalOutput` with ``k`` columns.

        ``fetch``: ``ids (B, n)`` -> their stored vectors ``(B, n, D)``, called only when a reranker
        is configured (default :meth:`fetch_vectors`, a collective)."""
        valid = ids >= 0
        composite = self.value_model(logits, value_weights)
        composite = torch.where(valid, composite, torch.full_like(composite, float("-inf")))
        if self.reranker is not None:
            n = min(self.reranker.config.top_n, composite.shape[1])
            pos = torch.topk(composite, n, dim=1).indices  # the rows rerank_top_n will read
            top_ids = ids.gather(1, pos)
            fetched = (fetch or self.fetch_vectors)(top_ids)  # (B, n, D)
            B, K = ids.shape
            D = fetched.shape[-1]
            items = torch.zeros((B, K, D), dtype=fetched.dtype, device=fetched.device)
            items.scatter_(1, pos.unsqueeze(-1).expand(B, n, D), fetched)
            composite = rerank_top_n(self.reranker, query, items, logits, composite, valid)
        return select_output(composite, ids, logits, retrieval, k)

    def _retrieve(self, query: Tensor, k: int, plan: FilterPlan | None, value_weights: Tensor | None,
                  nprobe: int | None) -> RetrievalOutput:
        k_cand = max(k, self.config.k_prime)
        packed = self.local_candidates(query, k_cand, plan, nprobe)
        everyone = self.all_gather(packed)  # (R, B, K', 5 + T)
        retrieval, top_ids, logits = merge_candidates(*unpack_candidates(everyone), k_cand)
        return self.score_merged(query, retrieval, top_ids, logits, k, value_weights)

    # -------------------------------------------------------------------------- collectives
    def _check_healthy(self) -> None:
        if self._failure is not None:
            raise ShardPeerError(self._failure)

    def all_gather(self, packed: Tensor) -> Tensor:
        """``packed (...)`` from every rank -> ``(R, ...)`` in rank order, waiting at most
        ``timeout_s``; raises :class:`ShardPeerError` (and marks the model failed) otherwise."""
        if self.world_size == 1:
            return packed.unsqueeze(0)
        W = self.world_size
        out = torch.empty((W * packed.shape[0], *packed.shape[1:]), dtype=packed.dtype, device=packed.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._collective(
            "the all-gather of candidates",
            lambda o, inp: gather(o, inp, group=self.group, async_op=True),
            out, packed.contiguous(),
        )
        return out.view(W, *packed.shape)

    def _collective(self, what: str, start_op: Callable[[Tensor, Tensor | None], dist.Work],
                    out: Tensor, inp: Tensor | None) -> Tensor:
        """Run ``start_op(out, inp)`` (an ``async_op=True`` collective) and wait at most
        ``timeout_s``; ``out`` is returned. Any failure marks the model failed and raises
        :class:`ShardPeerError` naming this rank, the world size, ``what`` and the cause."""
        self._check_healthy()
        start = time.monotonic()
        try:
            if not dist.is_initialized():
                raise RuntimeError("torch.distributed is not initialized (call init_distributed first)")
            if dist.get_world_size(self.group) != self.world_size:
                raise RuntimeError(f"the process group has {dist.get_world_size(self.group)} ranks, "
                                   f"the model was sharded for {self.world_size}")
            work = start_op(out, inp)
            if not work.wait(timeout=timedelta(seconds=self.timeout_s)):
                raise TimeoutError(f"no answer within {self.timeout_s:g}s")
        except Exception as err:  # noqa: BLE001 - every failure of the collective is fatal here
            waited = time.monotonic() - start
            self._failure = (
                f"sharded retrieval on rank {self.rank} of {self.world_size}: {what} "
                f"failed after {waited:.1f}s (timeout {self.timeout_s:g}s): "
                f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                " -- a peer rank is dead, hung or unreachable; restart all ranks"
            )
            raise ShardPeerError(self._failure) from err
        return out
