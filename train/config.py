"""The training recipe's config: ``[data]``, ``[model]``, ``[optim]``, ``[train]``, ``[eval]``,
and the optional ``[retrieval]`` (the served :class:`~silvertorch.model.RetrievalModel`: K', nprobe,
OverArch, value model, reranker) and ``[joint]`` (training with the index in the loop) sections.

Loaded with :func:`load_train_config` from one TOML file plus ``section.key=value`` overrides;
every error names the dotted key and happens before any data is read or model built.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from silvertorch.config import check, load_config, to_dict
from silvertorch.model import RetrievalConfig, TwoTowerConfig

__all__ = [
    "DataConfig",
    "OptimConfig",
    "LoopConfig",
    "EvalConfig",
    "JointConfig",
    "TrainConfig",
    "load_train_config",
    "config_hash",
    "RESUMABLE_KEYS",
]


@dataclass(kw_only=True)
class DataConfig:
    """Which dataset, how it is split, and which train interactions count as positives."""

    dataset: Literal["movielens_100k", "movielens_small"] = "movielens_100k"
    test_fraction: float = 0.1
    # "rated": every train interaction is a positive; "liked": only rating >= like_threshold.
    positives: Literal["rated", "liked"] = "rated"
    like_threshold: float = 4.0
    # Keep only users with dense index < max_users (quick experiments and tests); None = all.
    max_users: int | None = None

    def validate(self) -> None:
        frac = self.test_fraction
        check(0.0 < frac < 1.0, "test_fraction", f"in (0, 1), got {frac}")
        users = self.max_users
        check(users is None or users > 0, "max_users", f"> 0, got {users}")


@dataclass(kw_only=True)
class OptimConfig:
    """One optimizer over all parameters; embedding tables may get their own learning rate."""

    name: Literal["adam", "adagrad", "adamw"] = "adam"
    lr: float = 1e-3
    embedding_lr: float | None = None  # None = lr
    weight_decay: float = 0.0
    grad_clip_norm: float | None = None

    def validate(self) -> None:
        check(self.lr > 0, "lr", f"> 0, got {self.lr}")
        check(
            self.embedding_lr is None or self.embedding_lr > 0,
            "embedding_lr",
            f"> 0, got {self.embedding_lr}",
        )
        check(self.weight_decay >= 0, "weight_decay", f">= 0, got {self.weight_decay}")
        check(
            self.grad_clip_norm is None or self.grad_clip_norm > 0,
            "grad_clip_norm",
            f"> 0, got {self.grad_clip_norm}",
        )


@dataclass(kw_only=True)
class LoopConfig:
    """``[train]``: epochs, batching, seed, logging and checkpoints."""

    epochs: int = 10
    batch_size: int = 1024
    seed: int = 0
    log_every: int = 50  # steps between log lines (the progress bar updates every step)
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end of each epoch
    out_dir: str = "runs/default"
    deterministic: bool = True  # torch.use_deterministic_algorithms
    max_steps: int | None = None  # stop early after this many optimizer steps in total
    progress: bool = True  # tqdm progress bar
    device: str = "cpu"  # "cpu", "cuda", "cuda:1" ...

    def validate(self) -> None:
        check(self.epochs > 0, "epochs", f"> 0, got {self.epochs}")
        check(self.batch_size > 1, "batch_size", f"> 1 (in-batch negatives), got {self.batch_size}")
        check(self.seed >= 0, "seed", f">= 0, got {self.seed}")
        check(self.log_every > 0, "log_every", f"> 0, got {self.log_every}")
        check(self.checkpoint_every >= 0, "checkpoint_every", f">= 0, got {self.checkpoint_every}")
        check(bool(self.out_dir), "out_dir", "a directory path")
        steps = self.max_steps
        check(steps is None or steps > 0, "max_steps", f"> 0, got {steps}")


@dataclass(kw_only=True)
class EvalConfig:
    """``[eval]``: held-out metrics by exact full-catalog scan."""

    recall_ks: list[int] = field(default_factory=lambda: [10, 50, 100])
    ndcg_ks: list[int] = field(default_factory=lambda: [10])
    user_chunk: int = 1024  # users scored at once (scores are (chunk, num_items) float32)
    min_rating: float | None = None  # count a held-out item as relevant only if rated >= this

    def validate(self) -> None:
        check(len(self.recall_ks) + len(self.ndcg_ks) > 0, "recall_ks", "at least one metric")
        for i, k in enumerate(self.recall_ks):
            check(k > 0, f"recall_ks[{i}]", f"> 0, got {k}")
        for i, k in enumerate(self.ndcg_ks):
            check(k > 0, f"ndcg_ks[{i}]", f"> 0, got {k}")
        check(self.user_chunk > 0, "user_chunk", f"> 0, got {self.user_chunk}")

    @property
    def k_max(self) -> int:
        return max([*self.recall_ks, *self.ndcg_ks])


@dataclass(kw_only=True)
class JointConfig:
    """``[joint]``: train towers and OverArch together with the item index in the loop.

    - ``enabled``: ``silvertorch train`` / ``demo`` use the joint recipe (``train/joint.py``).
    - ``head_loss_weight``: lambda in ``loss = sampled softmax + lambda * BCE(heads)``.
    - ``hard_negative_weight``: weight of an extra softmax over the index-mined candidates the user
      never rated (scores ``q . STE(item_tower(c)) / tau`` recomputed with autograd); 0 = off.
    - ``index_refresh_every``: epochs between rebuilds of the index from the current item tower.
    - ``nlist`` / ``index_dtype``: the IVF index (training and ``build-index``).
    - ``mine_k``: candidates mined per user for the heads (None = ``retrieval.k_prime``, the
      candidates the heads score when served; fewer cost ranking quality at depth).
    - ``head_rows``: rows of each batch whose mined candidates train the heads (cost control).
    - ``head_polish_epochs``: after joint training, epochs of the heads alone on the final index
      with the towers frozen (the heads last saw moving towers; this fits them to the served ones).
    - ``warmup_epochs``: the first epochs of ``train.epochs`` train the towers alone (the two-tower
      loss and optimizer of ``train/loop.py``, no index); the index enters the loop after them.
    - ``head_tower_grad``: scale of the head loss's gradient into the towers (0 = stop-gradient:
      the heads train on the index's candidates without moving the towers; 1 = full).
    - ``skip_seen``: mined candidates the user rated in train get weight 0 in the head loss (the
      heads learn the positive against retrieved unrated items, what they rank when served); false
      = they are labelled from the train ratings.
    - ``baseline_head_epochs``: heads-only epochs of the two-stage baseline (None = ``train.epochs``).
    """

    enabled: bool = False
    head_loss_weight: float = 0.5
    hard_negative_weight: float = 0.0
    index_refresh_every: int = 1
    nlist: int = 32
    index_dtype: Literal["int8", "fp32", "bf16", "fp16"] = "int8"
    mine_k: int | None = None
    head_rows: int = 32
    head_polish_epochs: int = 0
    warmup_epochs: int = 0
    head_tower_grad: float = 1.0
    skip_seen: bool = False
    baseline_head_epochs: int | None = None

    def validate(self) -> None:
        check(self.warmup_epochs >= 0, "warmup_epochs", f">= 0, got {self.warmup_epochs}")
        check(self.head_tower_grad >= 0, "head_tower_grad", f">= 0, got {self.head_tower_grad}")
        base = self.baseline_head_epochs
        check(base is None or base >= 1, "baseline_head_epochs", f">= 1 or unset, got {base}")
        check(self.head_polish_epochs >= 0, "head_polish_epochs", f">= 0, got {self.head_polish_epochs}")
        check(self.head_loss_weight >= 0, "head_loss_weight", f">= 0, got {self.head_loss_weight}")
        check(
            self.hard_negative_weight >= 0,
            "hard_negative_weight", f">= 0, got {self.hard_negative_weight}",
        )
        check(
            self.index_refresh_every >= 1,
            "index_refresh_every", f">= 1 (epochs), got {self.index_refresh_every}",
        )
        check(self.nlist >= 1, "nlist", f">= 1, got {self.nlist}")
        check(self.mine_k is None or self.mine_k >= 1, "mine_k", f">= 1, got {self.mine_k}")
        check(self.head_rows >= 1, "head_rows", f">= 1, got {self.head_rows}")


@dataclass(kw_only=True)
class TrainConfig:
    """The whole run. ``[retrieval]`` and ``[joint]`` are optional (defaults: joint off)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: TwoTowerConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    joint: JointConfig = field(default_factory=JointConfig)


def load_train_config(path: str | Path | None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read ``path`` (TOML), apply ``a.b=value`` overrides, validate; raises ``ConfigError``."""
    return load_config(TrainConfig, path, list(overrides))


# Keys that may change between a checkpoint and its resumption (they do not change the math).
RESUMABLE_KEYS: tuple[str, ...] = (
    "train.epochs",
    "train.max_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.out_dir",
    "train.progress",
    "train.device",
    "eval",
)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: d}


def semantic_config(config: TrainConfig) -> dict[str, Any]:
    """Flat ``{dotted key: value}`` of the keys that define the training trajectory."""
    flat = _flatten(to_dict(config))
    return {
        k: v
        for k, v in flat.items()
        if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)
    }


def config_hash(config: TrainConfig) -> str:
    """sha256 (hex, 16 chars) of :func:`semantic_config`."""
    blob = json.dumps(semantic_config(config), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
