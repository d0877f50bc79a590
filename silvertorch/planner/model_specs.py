"""The model's tensors as sizes, from a config and a catalog size, without materialising anything.

Towers are built on the ``meta`` device (their TorchRec ``EmbeddingBagCollection`` tables go to
TorchRec's planner as they are); the index, eligibility and scoring tensors are pure arithmetic over
the same layout the index builds (``docs/architecture.md``), so an 80M-item plan takes milliseconds.

Inputs: :class:`ModelDescription` — built by :func:`describe` from the ``[model]``, ``[retrieval]``,
``[joint]`` and ``[planner]`` sections of a run config plus data facts (catalog size, vocabularies,
attributes) that ``launch/cmd_plan.py`` reads from the data set or from ``[planner]``.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from silvertorch.config import ConfigError, check, from_dict
from silvertorch.index.eligibility import EligibilityConfig
from silvertorch.index.selectivity import DEFAULT_BUDGET_BYTES as HISTOGRAM_BUDGET_BYTES
from silvertorch.model import RetrievalConfig, TwoTowerConfig
from silvertorch.modules.towers import ItemTower, UserTower
from silvertorch.planner.types import TensorSpec

__all__ = [
    "AttributeSpec",
    "PlannerConfig",
    "ModelDescription",
    "DTYPE_BYTES",
    "describe",
    "load_description",
    "model_specs",
    "build_tower_tables",
]

DTYPE_BYTES: dict[str, int] = {"int8": 1, "fp16": 2, "bf16": 2, "fp32": 4}
IndexDtype = Literal["int8", "fp32", "bf16", "fp16"]
SLOT_ALIGN = 64  # silvertorch.index.layout.SLOT_ALIGN (every cluster starts at a multiple of 64)
VOCAB_BYTES_PER_VALUE = 16  # one int64 offset + the value's name (about 8 bytes of text)


@dataclass(kw_only=True)
class AttributeSpec:
    """One item attribute feature: vocabulary size and mean values per item (CSR nnz / items)."""

    name: str
    cardinality: int
    values_per_item: float = 1.0

    def validate(self) -> None:
        check(self.cardinality >= 1, "cardinality", f">= 1, got {self.cardinality}")
        check(self.values_per_item >= 0, "values_per_item", f">= 0, got {self.values_per_item}")


@dataclass(kw_only=True)
class PlannerConfig:
    """``[planner]``: catalog facts and planning knobs (all optional for a data-backed config).

    - ``num_items``: catalog size (``--items`` overrides; a data set supplies it otherwise).
    - ``nlist`` / ``index_dtype``: default to ``[joint]``'s.
    - ``fresh_fraction``: fresh-segment headroom, as a fraction of the catalog.
    - ``filter_terms``: ``fid:value`` terms of a typical filter expression.
    - ``min_throughput_qps``: the demand; a policy step is accepted only if its replicas serve it
      (0 = no demand: the first step that fits memory and latency wins).
    - ``min_nprobe``: the recall floor the tuner never goes below (default ``retrieval.nprobe``);
      ``tune_nprobe`` / ``tune_dtypes``: what ``--tune`` may try (defaults: x1, x2, x4 of the floor;
      the configured dtype only — add a dtype here only after checking its recall).
    - ``cardinalities``: vocabulary size per model feature (tables without ``num_embeddings``).
    - ``pooling_factors``: mean ids per row per feature (default 1).
    - ``attributes``: the item attributes the eligibility index and OverArch read.
    """

    num_items: int | None = None
    nlist: int | None = None
    index_dtype: IndexDtype | None = None
    fresh_fraction: float = 0.05
    filter_terms: int = 2
    min_nprobe: int | None = None
    min_throughput_qps: float = 0.0
    tune_nprobe: list[int] = field(default_factory=list)
    tune_dtypes: list[IndexDtype] = field(default_factory=list)
    cardinalities: dict[str, int] = field(default_factory=dict)
    pooling_factors: dict[str, float] = field(default_factory=dict)
    attributes: list[AttributeSpec] = field(default_factory=list)
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)

    def validate(self) -> None:
        check(self.num_items is None or self.num_items >= 1, "num_items", f">= 1, got {self.num_items}")
        check(self.nlist is None or self.nlist >= 1, "nlist", f">= 1, got {self.nlist}")
        check(0.0 <= self.fresh_fraction <= 1.0, "fresh_fraction", f"in [0, 1], got {self.fresh_fraction}")
        check(self.min_throughput_qps >= 0, "min_throughput_qps", f">= 0, got {self.min_throughput_qps}")
        check(self.filter_terms >= 0, "filter_terms", f">= 0, got {self.filter_terms}")
        check(self.min_nprobe is None or self.min_nprobe >= 1, "min_nprobe", f">= 1, got {self.min_nprobe}")
        for i, n in enumerate(self.tune_nprobe):
            check(n >= 1, f"tune_nprobe[{i}]", f">= 1, got {n}")
        for name, n in self.cardinalities.items():
            check(n >= 1, f"cardinalities.{name}", f">= 1, got {n}")
        for name, p in self.pooling_factors.items():
            check(p > 0, f"pooling_factors.{name}", f"> 0, got {p}")
        self.eligibility.validate()


@dataclass(kw_only=True)
class _PlanFile:
    """What the planner reads from a run config; other sections are ignored (the train recipe
    validates them). ``data`` may name a data set the train recipe does not know (``synthetic``)."""

    model: TwoTowerConfig
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    joint_nlist: int = 32
    joint_index_dtype: IndexDtype = "int8"
    planner: PlannerConfig = field(default_factory=PlannerConfig)


@dataclass(kw_only=True)
class ModelDescription:
    """Everything the planner needs about one model, resolved (no ``None`` left)."""

    name: str
    model: TwoTowerConfig
    retrieval: RetrievalConfig
    num_items: int
    nlist: int
    index_dtype: IndexDtype
    nprobe: int
    min_nprobe: int
    min_throughput_qps: float
    cardinalities: dict[str, int]
    pooling_factors: dict[str, float]
    attributes: list[AttributeSpec]
    eligibility: EligibilityConfig
    fresh_fraction: float
    filter_terms: int
    tune_nprobe: list[int]
    tune_dtypes: list[str]

    @property
    def dim(self) -> int:
        return self.model.item_tower.output_dim

    def with_knobs(self, *, nprobe: int | None = None, index_dtype: str | None = None) -> "ModelDescription":
        """A copy with other search knobs (the tuner's moves)."""
        return replace(
            self,
            nprobe=self.nprobe if nprobe is None else int(nprobe),
            index_dtype=self.index_dtype if index_dtype is None else index_dtype,  # type: ignore[arg-type]
        )

    # -- layout arithmetic (matches silvertorch/index/layout.py) ---------------------------
    @property
    def num_slots(self) -> int:
        """Slots of the main index: items plus the expected padding (half an alignment per
        cluster), plus the fresh-segment headroom (``retrieval.fresh_capacity`` slots when set,
        else ``planner.fresh_fraction`` of the catalog), rounded up to whole 64-slot words."""
        padded = self.num_items + self.nlist * (SLOT_ALIGN // 2)
        explicit = int(getattr(self.retrieval, "fresh_capacity", 0) or 0)  # retrieval.fresh_capacity
        fresh = explicit or int(math.ceil(self.num_items * self.fresh_fraction))
        return int(math.ceil((padded + fresh) / 64) * 64)

    @property
    def num_words(self) -> int:
        return self.num_slots // 64

    def eligibility_modes(self) -> dict[str, str]:
        cards = {a.name: a.cardinality for a in self.attributes}
        return self.eligibility.choose_modes(cards, self.num_slots) if cards else {}


def describe(
    data: dict[str, Any],
    *,
    name: str,
    num_items: int | None = None,
    cardinalities: dict[str, int] | None = None,
    attributes: list[AttributeSpec] | None = None,
) -> ModelDescription:
    """Resolve a parsed run config (TOML dict) plus data facts into a :class:`ModelDescription`.

    ``num_items`` (e.g. ``--items``) overrides ``planner.num_items``; ``cardinalities`` and
    ``attributes`` (from a data set) fill what ``[planner]`` does not give. Raises ``ConfigError``
    naming the missing key (no catalog size, a table without a vocabulary size).
    """
    if "model" not in data:
        raise ConfigError("model", "the config has no [model] section")
    joint = data.get("joint", {})
    plan_file = from_dict(
        _PlanFile,
        {
            "model": data["model"],
            "retrieval": data.get("retrieval", {}),
            "joint_nlist": joint.get("nlist", 32),
            "joint_index_dtype": joint.get("index_dtype", "int8"),
            "planner": data.get("planner", {}),
        },
    )
    pcfg = plan_file.planner
    items = num_items if num_items is not None else pcfg.num_items
    if items is None:
        raise ConfigError("planner.num_items", "the catalog size: set it in [planner] or pass --items N")
    if items < 1:
        raise ConfigError("planner.num_items", f">= 1 items, got {items}")
    cards = dict(cardinalities or {})
    cards.update(pcfg.cardinalities)
    for tower_key, tower in (("user_tower", plan_file.model.user_tower),
                             ("item_tower", plan_file.model.item_tower)):
        for t, table in enumerate(tower.tables):
            for feat in table.features:
                if feat not in cards and table.num_embeddings is None:
                    raise ConfigError(
                        f"model.{tower_key}.tables[{t}].num_embeddings",
                        f"table '{table.name}' needs a size: set num_embeddings or "
                        f"planner.cardinalities.{feat}",
                    )
                cards.setdefault(feat, table.num_embeddings or 1)
    if "item_id" in cards and num_items is not None:
        cards["item_id"] = max(cards["item_id"], num_items)
    attrs = list(pcfg.attributes) if pcfg.attributes else list(attributes or [])
    known = {a.name for a in attrs}
    for i, feat in enumerate(plan_file.retrieval.overarch.item_features):
        if feat not in known:
            raise ConfigError(
                f"retrieval.overarch.item_features[{i}]",
                f"'{feat}' is not an item attribute (known: {sorted(known)}); "
                f"add it under [[planner.attributes]]",
            )
    nprobe = plan_file.retrieval.nprobe
    floor = pcfg.min_nprobe if pcfg.min_nprobe is not None else nprobe
    nlist = pcfg.nlist if pcfg.nlist is not None else plan_file.joint_nlist
    dtype = pcfg.index_dtype or plan_file.joint_index_dtype
    if nprobe > nlist:
        raise ConfigError("retrieval.nprobe", f"<= nlist ({nlist}), got {nprobe}")
    if nprobe < floor:
        raise ConfigError("retrieval.nprobe", f">= planner.min_nprobe ({floor}), got {nprobe}")
    tune_nprobe = sorted({n for n in (pcfg.tune_nprobe or [floor, 2 * floor, 4 * floor])
                          if floor <= n <= nlist})
    return ModelDescription(
        name=name,
        model=plan_file.model,
        retrieval=plan_file.retrieval,
        num_items=int(items),
        nlist=int(nlist),
        index_dtype=dtype,
        nprobe=int(nprobe),
        min_nprobe=int(floor),
        min_throughput_qps=float(pcfg.min_throughput_qps),
        cardinalities=cards,
        pooling_factors=dict(pcfg.pooling_factors),
        attributes=attrs,
        eligibility=pcfg.eligibility,
        fresh_fraction=pcfg.fresh_fraction,
        filter_terms=pcfg.filter_terms,
        tune_nprobe=tune_nprobe or [int(floor)],
        tune_dtypes=list(pcfg.tune_dtypes or [dtype]),
    )


def load_description(path: str | Path, *, num_items: int | None = None,
                     cardinalities: dict[str, int] | None = None,
                     attributes: list[AttributeSpec] | None = None) -> ModelDescription:
    """:func:`describe` on a TOML file (the name is the file's stem)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("", f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("", f"{p} is not valid TOML: {err}") from None
    return describe(data, name=p.stem, num_items=num_items, cardinalities=cardinalities,
                    attributes=attributes)


def build_tower_tables(desc: ModelDescription) -> nn.Module:
    """The user and item towers on ``meta`` (no memory): what TorchRec's planner shards."""
    meta = torch.device("meta")
    module = nn.Module()
    module.user_tower = UserTower(desc.model.user_tower, desc.cardinalities, device=meta,
                                  config_key="model.user_tower")
    module.item_tower = ItemTower(desc.model.item_tower, desc.cardinalities, device=meta,
                                  config_key="model.item_tower")
    return module


def _mlp_params(dims: list[int]) -> int:
    return sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))


def _dense_param_bytes(desc: ModelDescription, towers: nn.Module) -> dict[str, int]:
    """fp32 bytes of the replicated dense parts (MLPs, OverArch, value model, reranker)."""
    out: dict[str, int] = {}
    for name in ("user_tower", "item_tower"):
        mlp = getattr(towers, name).mlp
        out[f"{name}.mlp"] = sum(p.numel() for p in mlp.parameters()) * 4
    oa = desc.retrieval.overarch
    cards = {a.name: a.cardinality for a in desc.attributes}
    d = desc.dim
    in_dim = 3 * d + 1 + len(oa.item_features) * oa.feature_embedding_dim
    out["overarch.mlp"] = _mlp_params([in_dim, *oa.hidden_dims, len(oa.tasks)]) * 4
    out["overarch.embeddings"] = sum(
        (cards[f] + 1) * oa.feature_embedding_dim * 4 for f in oa.item_features
    )
    out["value_model"] = len(desc.retrieval.value_model.tasks) * 4
    rr = desc.retrieval.reranker
    if rr.enabled:
        h = rr.hidden_dim
        # silvertorch.modules.reranker.Reranker: the token projection of [e, q * e, logits,
        # composite], attention (q, k, v, out), the layer norm and the 2-layer head
        out["reranker"] = (_mlp_params([2 * d + len(oa.tasks) + 1, h]) + 4 * (h * h + h) + 2 * h
                           + _mlp_params([h, h, 1])) * 4
    return out


def model_specs(desc: ModelDescription, towers: nn.Module | None = None) -> list[TensorSpec]:
    """Every tensor of the served model as a :class:`TensorSpec` (bytes only; access costs are
    added by ``estimate.py``). Tables of the towers are one spec each, ``kind="table"``."""
    towers = towers if towers is not None else build_tower_tables(desc)
    S, W, d = desc.num_slots, desc.num_words, desc.dim
    vec_bytes = DTYPE_BYTES[desc.index_dtype]
    modes = desc.eligibility_modes()
    n_bitmap_rows = sum(a.cardinality for a in desc.attributes if modes.get(a.name) == "bitmap")
    has_bloom = any(m == "bloom" for m in modes.values())
    rows = n_bitmap_rows + (desc.eligibility.bloom_width if has_bloom else 0) + 1
    nnz = sum(a.values_per_item for a in desc.attributes) * desc.num_items
    bloom_nnz = sum(a.values_per_item for a in desc.attributes
                    if modes.get(a.name) == "bloom") * desc.num_items
    n_feat = len(desc.attributes)
    vocab_values = sum(a.cardinality for a in desc.attributes)
    bloom_values = sum(a.cardinality for a in desc.attributes if modes.get(a.name) == "bloom")
    specs = [
        TensorSpec(name="index.centroids", kind="dense", bytes=desc.nlist * d * 4 + (desc.nlist + 1) * 8,
                   hot=True, note=f"({desc.nlist}, {d}) f32 + cluster_offsets"),
        TensorSpec(name="index.vectors", kind="index", bytes=S * (d * vec_bytes + 4), shardable=True,
                   note=f"({S}, {d}) {desc.index_dtype} + scales f32"),
        TensorSpec(name="index.slot_ids", kind="index", bytes=S * 8 + W * 8, shardable=True,
                   note="(S,) int64 + live_words"),
        TensorSpec(name="item_slot", kind="dense", bytes=desc.num_items * 8,
                   note=f"({desc.num_items},) int64: the slot of each item id (updates)"),
        TensorSpec(name="eligibility.table", kind="index", bytes=rows * W * 8, shardable=True,
                   note=f"({rows}, {W}) int64: {n_bitmap_rows} bitmap rows"
                        + (f" + {desc.eligibility.bloom_width} Bloom rows" if has_bloom else "") + " + ones"),
        TensorSpec(name="eligibility.csr", kind="index",
                   bytes=int(n_feat * (S + 1) * 8 + nnz * 8 + vocab_values * VOCAB_BYTES_PER_VALUE),
                   shardable=True, note="exact attribute CSR (verification) + vocabularies"),
        TensorSpec(name="eligibility.csc", kind="index",
                   bytes=int(bloom_nnz * 8 + (bloom_values + n_feat) * 8), shardable=True,
                   note="Bloom value postings (exact negation)"),
    ]
    if desc.attributes:
        # silvertorch.index.selectivity.ClusterHistogram: (C + 1, T) int32 counts over the
        # features taken by ascending cardinality while they fit its budget, + col_base (F,) int64
        cols = 0
        for card in sorted(a.cardinality for a in desc.attributes):
            if (desc.nlist + 1) * (cols + card) * 4 <= HISTOGRAM_BUDGET_BYTES:
                cols += card
        specs.append(TensorSpec(
            name="index.selectivity", kind="index", bytes=(desc.nlist + 1) * cols * 4 + n_feat * 8,
            shardable=True, sharded_drops=True,
            note=f"({desc.nlist + 1}, {cols}) int32 per-cluster value counts"))
    for name, nbytes in sorted(_dense_param_bytes(desc, towers).items()):
        specs.append(TensorSpec(name=name, kind="dense", bytes=int(nbytes), hot=True))
    for tower_name in ("user_tower", "item_tower"):
        for cfg in getattr(towers, tower_name).ebc.embedding_bag_configs():
            specs.append(TensorSpec(
                name=f"{tower_name}.{cfg.name}", kind="table",
                bytes=cfg.num_embeddings * cfg.embedding_dim * 4,
                note=f"({cfg.num_embeddings}, {cfg.embedding_dim}) f32",
            ))
    return specs
