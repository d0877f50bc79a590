"""Models. ``TwoTower``: the training model (user tower, item tower, temperature, sampled softmax).

``RetrievalModel``: the one forward pass that serves — user tower -> query -> index search (probe ->
filter on the probed words -> fused scan -> top-K') -> the candidates' cached (index-stored,
dequantized) vectors and attributes -> OverArch -> value model -> (reranker) -> top-k.

Compile / export (measured with torch 2.13 CPU, torchrec 1.8; tests/test_retrieval_compile.py):

- The index search is the custom op ``silvertorch::ivf_search`` (:mod:`silvertorch.index.ops`) with
  a fake implementation, so ``torch.compile`` and ``torch.export`` see one opaque node with static
  ``(B, K')`` outputs, whatever scan engine ``ItemIndex.search`` picks; everything after it has
  static shapes. ``torch.compile(model)`` equals eager (ids and composite scores bit-identical with
  Inductor, task probabilities within 1e-7); Dynamo traces the whole forward, TorchRec EBC
  included, in one graph when no value weights are given (their finiteness check breaks the graph).
- ``torch.export.export`` works on the part after the user tower (:class:`RetrievalHead`: query ->
  :class:`RetrievalOutput`, dynamic batch), with a filter entering as the packed plan tensors of
  :func:`silvertorch.index.ops.pack_plan`; and on the whole model, TorchRec
  ``EmbeddingBagCollection`` and ``KeyedJaggedTensor`` input included, both ``strict=False`` and
  ``strict=True`` (static batch; TorchRec warns that KJT ``to_dict`` under non-strict export is slow).
  A ``FilterPlan`` is not a pytree, so the whole-model export takes no filter: use the head.
  While exporting, the data-dependent finiteness check of value weights is skipped (shapes are still
  checked): validate on the host with ``ValueModel.check_weights``. ``torch.export.save`` /
  ``load`` round-trip; loading needs ``import silvertorch.retrieval_ops`` first (torch only: it
  registers the op and the output pytree).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol

import torch
from torch import Tensor, nn
from torchrec import KeyedJaggedTensor

from silvertorch.config import check
from silvertorch.index.attributes import ItemAttributes
from silvertorch.index.ops import histogram_tensors, index_tensors, pack_plan
from silvertorch.index.plan import FilterPlan
from silvertorch.index.search import ItemIndex
from silvertorch.losses import LossConfig, LossOutput, mixed_log_q, sampled_softmax_loss
from silvertorch.modules.overarch import OverArch, OverArchConfig
from silvertorch.modules.reranker import Reranker, RerankerConfig
from silvertorch.modules.temperature import Temperature
from silvertorch.modules.towers import ItemTower, TowerConfig, UserTower
from silvertorch.modules.value_model import ValueModel, ValueModelConfig
from silvertorch.retrieval_ops import (
    RetrievalOutput,
    check_request,
    dequantize_candidates,
    gather_features,
    item_slots,
    padded_attribute,
    rerank_top_n,
    select_output,
)

__all__ = [
    "TwoTowerConfig",
    "TwoTower",
    "BatchLike",
    "RetrievalConfig",
    "RetrievalModel",
    "RetrievalHead",
    "RetrievalOutput",
]


@dataclass(kw_only=True)
class TwoTowerConfig:
    """``[model]``: the two towers, the temperature and the loss."""

    user_tower: TowerConfig
    item_tower: TowerConfig
    temperature: float = 0.05
    learn_temperature: bool = False
    temperature_min: float = 0.01
    temperature_max: float = 1.0
    loss: LossConfig = field(default_factory=LossConfig)

    def validate(self) -> None:
        check(self.temperature_min > 0, "temperature_min", f"> 0, got {self.temperature_min}")
        check(
            self.temperature_min <= self.temperature <= self.temperature_max,
            "temperature",
            f"in [temperature_min, temperature_max] = "
            f"[{self.temperature_min}, {self.temperature_max}], got {self.temperature}",
        )
        check(
            self.user_tower.output_dim == self.item_tower.output_dim,
            "item_tower.mlp_dims",
            f"the same output width as the user tower ({self.user_tower.output_dim}), "
            f"got {self.item_tower.output_dim}",
        )


class BatchLike(Protocol):
    """What :meth:`TwoTower.forward` reads from a ``silvertorch.data.batching.Batch``."""

    item_ids: Tensor  # (B,) int64
    user_features: KeyedJaggedTensor
    item_features: KeyedJaggedTensor


class TwoTower(nn.Module):
    """User tower + item tower trained with in-batch sampled softmax (:mod:`silvertorch.losses`).

    Args:
        config: the model config.
        user_cardinalities / item_cardinalities: vocabulary size per feature name.
        num_items: catalog size ``N`` (item ids lie in ``[0, N)``).
        device: parameter device (``meta`` for planning).

    Buffers: ``item_probs (N,) float32``, the training distribution of positives used by the logQ
    correction (uniform until :meth:`set_item_frequencies` is called).
    """

    def __init__(
        self,
        config: TwoTowerConfig,
        user_cardinalities: Mapping[str, int],
        item_cardinalities: Mapping[str, int],
        num_items: int,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        config.validate()
        if num_items <= 0:
            raise ValueError(f"num_items must be > 0, got {num_items}")
        self.config = config
        self.num_items = num_items
        self.user_tower = UserTower(
            config.user_tower, user_cardinalities, device=device, config_key="model.user_tower"
        )
        self.item_tower = ItemTower(
            config.item_tower, item_cardinalities, device=device, config_key="model.item_tower"
        )
        self.temperature = Temperature(
            config.temperature,
            learnable=config.learn_temperature,
            min_value=config.temperature_min,
            max_value=config.temperature_max,
            device=device,
        )
        self.register_buffer(
            "item_probs", torch.full((num_items,), 1.0 / num_items, device=device)
        )

    @property
    def embedding_dim(self) -> int:
        return self.user_tower.output_dim

    @torch.no_grad()
    def set_item_frequencies(self, counts: Tensor) -> None:
        """``counts (N,)``: how often each item is a training positive (e.g. train popularity)."""
        if counts.shape != (self.num_items,):
            raise ValueError(f"counts must be ({self.num_items},), got {tuple(counts.shape)}")
        counts = counts.to(self.item_probs.device, torch.float32)
        total = float(counts.sum())
        if total <= 0 or bool((counts < 0).any()):
            raise ValueError("item counts must be non-negative with a positive sum")
        self.item_probs.copy_(counts / total)

    def user_embeddings(self, user_features: KeyedJaggedTensor) -> Tensor:
        """``(B, D) float32`` query vectors."""
        return self.user_tower(user_features)

    def item_embeddings(self, item_features: KeyedJaggedTensor) -> Tensor:
        """``(N, D) float32`` item vectors."""
        return self.item_tower(item_features)

    def forward(
        self,
        batch: BatchLike,
        negatives: tuple[Tensor, KeyedJaggedTensor] | None = None,
    ) -> LossOutput:
        """Loss of one batch.

        Args:
            batch: ``B`` (user, positive item) pairs with their feature KJTs.
            negatives: optional ``(ids (M,) int64, item features KJT of batch size M)`` of extra
                negatives (uniform over the catalog, see ``config.loss.num_uniform_negatives``).
        Returns:
            :class:`LossOutput`; stats also carry ``temperature``.
        """
        cfg = self.config.loss
        query = self.user_tower(batch.user_features)
        positives = self.item_tower(batch.item_features)
        ids = batch.item_ids
        neg_emb = neg_ids = None
        if negatives is not None:
            neg_ids, neg_kjt = negatives
            neg_emb = self.item_tower(neg_kjt)
        log_q = None
        if cfg.logq_correction:
            cand_ids = ids if neg_ids is None else torch.cat([ids, neg_ids])
            m = 0 if neg_ids is None else neg_ids.numel()
            log_q = mixed_log_q(cand_ids, self.item_probs, ids.numel(), m)
        tau = self.temperature()
        out = sampled_softmax_loss(
            query,
            positives,
            ids,
            tau,
            negatives=neg_emb,
            negative_ids=neg_ids,
            log_q=log_q,
            mask_accidental_hits=cfg.mask_accidental_hits,
        )
        out.stats["temperature"] = float(tau)
        return out


# ------------------------------------------------------------------------------ RetrievalModel
def _default_value_model() -> ValueModelConfig:
    return ValueModelConfig(tasks=["liked", "rated"], weights=[1.0, 1.0])


@dataclass(kw_only=True)
class RetrievalConfig:
    """``[retrieval]``: candidates scored per query, search defaults and the scoring stack.

    ``k_prime`` candidates come out of the index and are scored (``max(k, k_prime)`` when a request
    asks for more); ``nprobe`` is the default clusters probed; ``max_k`` bounds a request's ``k``;
    ``verify`` re-checks filters exactly on the candidates (drops Bloom false positives).
    ``fresh_capacity`` sizes the fresh segment that streaming inserts create
    (:mod:`silvertorch.catalog`): 0 = ``max(1024, 5% of the catalog)`` rounded up to 64 slots.
    ``min_candidates_factor`` / ``max_nprobe``: selectivity-aware probing of filtered requests
    (:mod:`silvertorch.index.selectivity`): probe beyond ``nprobe``, in centroid order, until the
    estimated eligible items reach ``min_candidates_factor * max(k, k_prime)``, at most
    ``max_nprobe`` clusters (0 = nlist); ``min_candidates_factor = 0`` (the default, so the sharded
    twin, which has no histograms yet, answers the same) = fixed ``nprobe``; ``docs/index.md``
    ("Filtered recall") measures the recommended value. Needs an index with histograms (built by
    ``ItemIndex.build`` since this option exists); unfiltered requests are unaffected.
    """

    k_prime: int = 200
    nprobe: int = 16
    max_k: int = 1000
    overarch: OverArchConfig = field(default_factory=OverArchConfig)
    value_model: ValueModelConfig = field(default_factory=_default_value_model)
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    verify: bool = True
    fresh_capacity: int = 0
    min_candidates_factor: float = 0.0
    max_nprobe: int = 128

    def validate(self) -> None:
        check(self.k_prime >= 1, "k_prime", f">= 1, got {self.k_prime}")
        check(self.fresh_capacity >= 0, "fresh_capacity", f">= 0 (0 = automatic), got {self.fresh_capacity}")
        check(self.nprobe >= 1, "nprobe", f">= 1, got {self.nprobe}")
        check(self.min_candidates_factor >= 0, "min_candidates_factor",
              f">= 0 (0 = off), got {self.min_candidates_factor}")
        check(self.max_nprobe >= 0, "max_nprobe", f">= 0 (0 = nlist), got {self.max_nprobe}")
        check(self.max_k >= 1, "max_k", f">= 1, got {self.max_k}")
        self.overarch.validate()
        self.value_model.validate()
        self.reranker.validate()
        check(
            list(self.value_model.tasks) == list(self.overarch.tasks),
            "value_model.tasks",
            f"the OverArch tasks in the same order {self.overarch.tasks}, got {self.value_model.tasks}",
        )


class RetrievalModel(nn.Module):
    """The whole retrieval path as one module (see the module docstring for the data flow).

    Args:
        user_tower: features -> ``(B, D)`` query.
        index: the item index (``ItemIndex``; its eligibility index serves filters).
        overarch / value_model / reranker: the scoring stack (``reranker`` None = no reranking).
        item_attributes: attributes of items ``0..N-1`` in ITEM-ID order (the index's ids must lie
            in ``[0, N)``); the OverArch features are stored as padded ``(N + 1, L)`` buffers.
        config: the retrieval config.

    Unknown feature values map to the out-of-vocabulary row 0 of every table: the data layer
    encodes them so (``silvertorch.data``), user features for the tower as well as item attributes.

    Buffers (all in ``state_dict``, moved by ``.to()``): the index's (``index.ivf.*``,
    ``index.eligibility.*``), ``item_slot (N,) int64`` (slot of each item id) and
    ``item_feature_<name> (N + 1, L) int64`` per OverArch item feature, and
    ``catalog_generation () int64``: the number of catalog mutations applied (streaming updates,
    :class:`silvertorch.catalog.CatalogUpdater`; 0 for a freshly built index). ``N`` may exceed the
    largest item id (headroom for new items): ids with ``item_slot == -1`` are not in the index.
    """

    item_slot: Tensor
    catalog_generation: Tensor

    def __init__(
        self,
        user_tower: UserTower,
        index: ItemIndex,
        overarch: OverArch,
        value_model: ValueModel,
        reranker: Reranker | None,
        item_attributes: ItemAttributes,
        config: RetrievalConfig,
    ) -> None:
        super().__init__()
        config.validate()
        dim = index.ivf.dim
        if user_tower.output_dim != dim or overarch.query_dim != dim:
            raise ValueError(
                f"dimensions disagree: user tower {user_tower.output_dim}, index {dim}, "
                f"OverArch {overarch.query_dim}"
            )
        if overarch.tasks != value_model.tasks:
            raise ValueError(f"OverArch tasks {overarch.tasks} != value model tasks {value_model.tasks}")
        if reranker is not None and (reranker.dim != dim or reranker.num_tasks != overarch.num_tasks):
            raise ValueError(f"reranker built for D={reranker.dim}, T={reranker.num_tasks}")
        self.config = config
        self.user_tower, self.index = user_tower, index
        self.overarch, self.value_model, self.reranker = overarch, value_model, reranker
        self.num_items = item_attributes.num_items
        self.register_buffer("item_slot", item_slots(index.ivf.slot_ids, self.num_items))
        self.register_buffer("catalog_generation", torch.zeros((), dtype=torch.int64))
        self.feature_buffers: dict[str, str] = {}
        for name in overarch.feature_names:
            if name not in item_attributes:
                raise ValueError(
                    f"OverArch item feature '{name}' is not among the item attributes "
                    f"{sorted(item_attributes.features)}"
                )
            attr = item_attributes[name]
            if attr.cardinality > overarch.cardinalities[name]:
                raise ValueError(
                    f"item feature '{name}' has {attr.cardinality} values, the OverArch table "
                    f"{overarch.cardinalities[name]}"
                )
            buffer = f"item_feature_{name}"
            self.register_buffer(buffer, padded_attribute(attr, overarch.padding_id(name)))
            self.feature_buffers[name] = buffer

    @classmethod
    def build(
        cls,
        config: RetrievalConfig,
        user_tower: UserTower,
        index: ItemIndex,
        item_attributes: ItemAttributes,
    ) -> RetrievalModel:
        """Fresh OverArch / value model / reranker (when ``config.reranker.enabled``) around a
        trained user tower and a built index; OverArch tables sized by ``item_attributes``."""
        config.validate()
        cards = {n: a.cardinality for n, a in item_attributes.features.items()}
        dim = index.ivf.dim
        overarch = OverArch(config.overarch, dim, cards)
        reranker = Reranker(config.reranker, dim, overarch.num_tasks) if config.reranker.enabled else None
        return cls(user_tower, index, overarch, ValueModel(config.value_model), reranker,
                   item_attributes, config)

    # ------------------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:  # type: ignore[no-untyped-def]
        # catalog-sized buffers take the incoming shapes (another catalog of the same schema loads)
        for name in ["item_slot", *self.feature_buffers.values()]:
            if prefix + name in state_dict:
                src, dev = state_dict[prefix + name], self._buffers[name].device
                self._buffers[name] = torch.empty(src.shape, dtype=src.dtype, device=dev)
        if prefix + "item_slot" in state_dict:
            self.num_items = state_dict[prefix + "item_slot"].shape[0]
        n_missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        gen = prefix + "catalog_generation"
        if gen not in state_dict and gen in missing_keys[n_missing:]:
            missing_keys.remove(gen)  # a state saved before streaming updates existed: generation 0
            self.catalog_generation.zero_()

    @property
    def generation(self) -> int:
        """Catalog mutations applied so far (streaming updates); carried by ``state_dict``."""
        return int(self.catalog_generation)

    def feature_tables(self) -> dict[str, Tensor]:
        """OverArch feature name -> its ``(N + 1, L) int64`` padded attribute buffer."""
        return {name: self._buffers[b] for name, b in self.feature_buffers.items()}

    # ---------------------------------------------------------------------------- scoring
    def score_candidates(self, query: Tensor, item_vectors: Tensor, item_ids: Tensor) -> Tensor:
        """Differentiable OverArch logits of given candidates (training).

        ``query (B, D) f32``, ``item_vectors (B, K, D) f32`` (to train for an int8 index, pass
        ``fake_quantize_int8_ste`` of the item tower's output), ``item_ids (B, K) int64`` (``-1`` =
        padding, embedded as no attributes) -> ``(B, K, T) f32`` logits.
        """
        feats = gather_features(self.feature_tables(), item_ids)
        return self.overarch(query, item_vectors, feats)

    def candidate_vectors(self, ids: Tensor) -> Tensor:
        """The index's stored vectors of items ``ids (B, K) int64``, dequantized -> ``(B, K, D) f32``
        (zeros for ``-1``): the "cached item embedding" the OverArch scores in serving."""
        ivf = self.index.ivf
        return dequantize_candidates(ivf.vectors, ivf.scales, self.item_slot, ids)

    # ---------------------------------------------------------------------------- forward
    def forward(
        self,
        user_features: KeyedJaggedTensor,
        k: int,
        filter_plan: FilterPlan | None = None,
        value_weights: Tensor | None = None,
        nprobe: int | None = None,
    ) -> RetrievalOutput:
        """One request batch: ``user_features`` (KJT, batch ``B``) -> :class:`RetrievalOutput`.

        ``k`` in ``[1, config.max_k]``; ``filter_plan`` from ``index.eligibility.compile`` (``B``
        rows) or None; ``value_weights (T,) | (B, T)`` overrides the value model's weights;
        ``nprobe`` overrides ``config.nprobe``. Raises ``ValueError`` on bad ``k`` / weights.
        """
        check_request(k, self.config.max_k, nprobe)
        query = self.user_tower(user_features)
        return self.retrieve_from_query(query, k, filter_plan, value_weights, nprobe)

    def retrieve_from_query(
        self,
        query: Tensor,
        k: int,
        filter_plan: FilterPlan | None = None,
        value_weights: Tensor | None = None,
        nprobe: int | None = None,
    ) -> RetrievalOutput:
        """Everything after the user tower: ``query (B, D) f32`` -> :class:`RetrievalOutput`."""
        check_request(k, self.config.max_k, nprobe)
        B = query.shape[0]
        if filter_plan is not None and filter_plan.num_rows != B:
            raise ValueError(f"filter plan has {filter_plan.num_rows} rows, expected {B} (one per query)")
        if torch.compiler.is_exporting():  # data-dependent checks cannot be traced: shapes only
            if value_weights is not None and value_weights.shape[-1] != self.value_model.num_tasks:
                raise ValueError(f"value weights must have {self.value_model.num_tasks} columns")
        else:
            self.value_model.check_weights(value_weights, batch_size=B)
        plan_tensors, plan_ints = pack_plan(filter_plan)
        return self.search_and_score(query, k, plan_tensors, plan_ints, value_weights, nprobe)

    def search_and_score(
        self,
        query: Tensor,
        k: int,
        plan_tensors: list[Tensor],
        plan_ints: list[int],
        value_weights: Tensor | None,
        nprobe: int | None,
    ) -> RetrievalOutput:
        """The traced core (no data-dependent checks: call :meth:`retrieve_from_query` instead
        unless inputs are validated): ``query (B, D)``, ``k``, a packed plan
        (:func:`silvertorch.index.ops.pack_plan`; empty lists = no filter) -> :class:`RetrievalOutput`."""
        cfg = self.config
        k_cand = max(k, cfg.k_prime)
        ivf_buf, metric, elig_buf = index_tensors(self.index)
        if plan_tensors and not elig_buf:
            raise ValueError("a filter was given but the index was built without attributes")
        retrieval, ids = torch.ops.silvertorch.ivf_search(
            query.detach(), ivf_buf, metric, elig_buf, plan_tensors, plan_ints, k_cand,
            cfg.nprobe if nprobe is None else nprobe, cfg.verify, False,
            *histogram_tensors(self.index), float(cfg.min_candidates_factor), int(cfg.max_nprobe),
        )  # (B, K') f32, (B, K') int64
        valid = ids >= 0
        items = self.candidate_vectors(ids)  # (B, K', D)
        logits = self.score_candidates(query, items, ids)  # (B, K', T)
        composite = self.value_model(logits, value_weights)
        composite = torch.where(valid, composite, torch.full_like(composite, float("-inf")))
        if self.reranker is not None:
            composite = rerank_top_n(self.reranker, query, items, logits, composite, valid)
        return select_output(composite, ids, logits, retrieval, k)

    # --------------------------------------------------------------------------- host API
    def retrieve(
        self,
        user_features: KeyedJaggedTensor,
        k: int,
        filters: list[str | None] | None = None,
        value_weights: Tensor | None = None,
        nprobe: int | None = None,
    ) -> RetrievalOutput:
        """Host convenience: compile filter expressions (one per row, or one for all) and run
        :meth:`forward`. A filter that matches nothing gives an all-padding result."""
        check_request(k, self.config.max_k, nprobe)
        plan = None
        if filters is not None and any(f for f in filters):
            if self.index.eligibility is None:
                raise ValueError("filters were given but the index was built without attributes")
            B = user_features.stride()
            exprs = list(filters) * B if len(filters) == 1 and B != 1 else list(filters)
            if len(exprs) != B:
                raise ValueError(f"{len(filters)} filter expressions, expected 1 or {B} (one per query)")
            plan = self.index.eligibility.compile(exprs)
        return self(user_features, k, plan, value_weights, nprobe)


class RetrievalHead(nn.Module):
    """The exportable part of :class:`RetrievalModel`: ``query (B, D) f32`` -> :class:`RetrievalOutput`.

    ``k`` and ``nprobe`` are fixed at construction (they size the outputs); a filter enters as the
    packed plan (:func:`silvertorch.index.ops.pack_plan`): ``plan_tensors`` as inputs, ``plan_ints``
    fixed (they describe the program's shape).
    """

    def __init__(self, model: RetrievalModel, k: int, nprobe: int | None = None,
                 plan_ints: list[int] | None = None) -> None:
        super().__init__()
        check_request(k, model.config.max_k, nprobe)
        self.model, self.k, self.nprobe = model, k, nprobe
        self.plan_ints = list(plan_ints or [])

    def forward(self, query: Tensor, value_weights: Tensor | None = None,
                plan_tensors: list[Tensor] | None = None) -> RetrievalOutput:
        """``query (B, D)``, ``value_weights (B, T) | (T,) | None``, packed plan tensors or None."""
        tensors = list(plan_tensors or [])
        if bool(tensors) != bool(self.plan_ints):
            raise ValueError("plan_tensors and plan_ints must be given together")
        return self.model.search_and_score(query, self.k, tensors, self.plan_ints, value_weights, self.nprobe)
