"""Optimizers of a sharded run, built from ``[optim]`` with the single-process semantics.

``train/builders.build_optimizer`` makes two groups: embedding tables (``embedding_lr``, no weight
decay) and the rest (``lr``, ``weight_decay``). Sharded, the tables are updated by TorchRec's fused
FBGEMM optimizer inside backward (registered with ``apply_optimizer_in_backward`` BEFORE sharding),
and the dense parameters by a ``KeyedOptimizerWrapper`` (state keyed by parameter name, so DCP can
save and reshard it).

Sparse vs dense updates: FBGEMM updates only the rows looked up in a batch. For SGD and Adagrad that
is exactly the dense update (a zero gradient leaves the row and its state unchanged); for Adam it is
"lazy Adam" (rows not in the batch keep their moments and do not move), the standard choice for
large tables, which differs from ``torch.optim.Adam`` on a whole table. ``adamw`` tables use Adam
(the embedding group has no weight decay, where AdamW equals Adam). FBGEMM's CPU kernels implement
only exact Adagrad, exact row-wise Adagrad and SGD: an Adam config on CPU gets Adagrad tables (warned).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from train.config import OptimConfig

__all__ = [
    "TABLE_OPTIMIZERS",
    "table_optimizer_name",
    "fuse_embedding_optimizer",
    "fuse_overarch_optimizer",
    "dense_optimizer",
    "combined_optimizer",
]

# table optimizer name -> (torch / torchrec optimizer class, extra kwargs); TorchRec maps the class
# to FBGEMM's EmbOptimType (torchrec.distributed.utils._OPTIMIZER_CLASS_TO_EMB_OPT_TYPE)
_TABLE_OPT: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adam": (torch.optim.Adam, {}),
    "adagrad": (torch.optim.Adagrad, {"eps": 1e-10}),  # torch.optim.Adagrad's default eps
    "rowwise_adagrad": (RowWiseAdagrad, {"eps": 1e-10}),
    "sgd": (torch.optim.SGD, {}),
}
# FBGEMM's CPU TBE implements only exact (row-wise) Adagrad and SGD (fbgemm_gpu 1.x asserts so)
TABLE_OPTIMIZERS: dict[str, tuple[str, ...]] = {
    "cpu": ("adagrad", "rowwise_adagrad", "sgd"),
    "cuda": ("adam", "adagrad", "rowwise_adagrad", "sgd"),
}


def table_optimizer_name(cfg: OptimConfig, device_type: str, requested: str = "auto") -> str:
    """The fused optimizer of the embedding tables. ``requested="auto"``: the config's optimizer
    (``adamw`` -> ``adam``: the table group has no weight decay), except Adam on CPU, which FBGEMM
    does not implement: then exact Adagrad, with a warning. Raises ``ValueError`` for a requested
    optimizer the device cannot run."""
    valid = TABLE_OPTIMIZERS.get(device_type)
    if valid is None:
        raise ValueError(f"device type must be one of {sorted(TABLE_OPTIMIZERS)}, got {device_type!r}")
    if requested != "auto":
        if requested not in valid:
            raise ValueError(
                f"table optimizer {requested!r} is not available for fused tables on "
                f"{device_type} (FBGEMM supports {list(valid)})"
            )
        return requested
    name = "adam" if cfg.name in ("adam", "adamw") else cfg.name
    if name not in valid:
        warnings.warn(
            f"optim.name={cfg.name!r}: FBGEMM has no fused {name} for embedding tables on "
            f"{device_type}; the tables use exact Adagrad (lr = optim.embedding_lr or optim.lr), "
            "the dense parts keep the configured optimizer. Choose explicitly with "
            "--table-optimizer (see docs/distributed.md)",
            stacklevel=2,
        )
        name = "adagrad"
    return name


def fuse_embedding_optimizer(
    cfg: OptimConfig, model: nn.Module, name: str, lr: float | None = None
) -> None:
    """Attach table optimizer ``name`` (see :func:`table_optimizer_name`; ``lr`` default
    ``embedding_lr or lr``) to every ``EmbeddingBagCollection`` parameter of ``model``
    (unsharded, before ``DistributedModelParallel``). Raises ``ValueError`` for settings a fused
    optimizer cannot honour (gradient clipping needs every gradient before any update)."""
    if cfg.grad_clip_norm is not None:
        raise ValueError(
            "optim.grad_clip_norm is not supported by sharded training: the embedding tables are "
            "updated inside backward (TorchRec fused optimizer), before a global norm exists; "
            "remove the key (or set it to null) for torchrun/torchx runs"
        )
    if name not in _TABLE_OPT:
        raise ValueError(f"unknown table optimizer {name!r}; known: {sorted(_TABLE_OPT)}")
    cls, extra = _TABLE_OPT[name]
    params = [p for m in model.modules() if isinstance(m, EmbeddingBagCollection) for p in m.parameters()]
    apply_optimizer_in_backward(cls, params, {"lr": lr or cfg.embedding_lr or cfg.lr, **extra})


def fuse_overarch_optimizer(
    cfg: OptimConfig, overarch: nn.Module, name: str, lr: float | None = None
) -> None:
    """Attach table optimizer ``name`` to the OverArch's attribute tables (the EBC of a
    ``ShardableOverArch``, unsharded, before DMP). Single-process training keeps them in the DENSE
    group (``train/builders.build_optimizer``: ``optim.lr``), so the default lr is ``optim.lr``
    (``lr`` overrides). With ``optim.weight_decay > 0`` single-process decays every row of these
    tables each step, a fused sparse optimizer does not: warned."""
    if cfg.weight_decay:
        warnings.warn(
            f"optim.weight_decay={cfg.weight_decay}: single-process joint training decays the "
            "OverArch attribute tables (dense group); their fused sharded optimizer does not",
            stacklevel=2,
        )
    if name not in _TABLE_OPT:
        raise ValueError(f"unknown table optimizer {name!r}; known: {sorted(_TABLE_OPT)}")
    cls, extra = _TABLE_OPT[name]
    params = [p for m in overarch.modules() if isinstance(m, EmbeddingBagCollection) for p in m.parameters()]
    if params:
        apply_optimizer_in_backward(cls, params, {"lr": lr or cfg.lr, **extra})


def dense_optimizer(cfg: OptimConfig, sharded: nn.Module) -> KeyedOptimizerWrapper:
    """The optimizer of every parameter without an in-backward optimizer (``lr``, ``weight_decay``)."""
    params = dict(in_backward_optimizer_filter(sharded.named_parameters()))
    if cfg.name == "adam":
        factory = lambda ps: torch.optim.Adam(ps, lr=cfg.lr, weight_decay=cfg.weight_decay)  # noqa: E731
    elif cfg.name == "adamw":
        factory = lambda ps: torch.optim.AdamW(ps, lr=cfg.lr, weight_decay=cfg.weight_decay)  # noqa: E731
    else:
        factory = lambda ps: torch.optim.Adagrad(ps, lr=cfg.lr, weight_decay=cfg.weight_decay)  # noqa: E731
    return KeyedOptimizerWrapper(params, factory)


def combined_optimizer(sharded: Any, dense: KeyedOptimizerWrapper) -> CombinedOptimizer:
    """DMP's fused (table) optimizer + the dense one: one ``state_dict`` for checkpoints; ``step``
    updates the dense parameters (the tables were updated in backward)."""
    return CombinedOptimizer([("fused", sharded.fused_optimizer), ("dense", dense)])
