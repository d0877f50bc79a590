"""Value model: one composite score from the per-task predictions.

``composite[b, k] = sum_t w[b, t] * transform(logit[b, k, t])`` with ``transform`` the sigmoid
(probabilities, the default) or the identity on logits. The weights come from the config (the
product's default trade-off) and may be overridden per request: ``(T,)`` for the whole batch or
``(B, T)`` per row. :meth:`ValueModel.check_weights` validates an override on the host (the server
calls it before queuing a request) and raises ``ValueError`` naming what is wrong.

Config (TOML)::

    [model.value_model]
    tasks = ["liked", "rated"]
    weights = [1.0, 0.5]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from silvertorch.config import check

__all__ = ["ValueModelConfig", "ValueModel"]


@dataclass(kw_only=True)
class ValueModelConfig:
    """Default weight per task (same order as the OverArch tasks) and the transform."""

    tasks: list[str]
    weights: list[float]
    transform: Literal["sigmoid", "logit"] = "sigmoid"

    def validate(self) -> None:
        check(len(self.tasks) > 0, "tasks", "at least one task name")
        check(len(set(self.tasks)) == len(self.tasks), "tasks", f"distinct names, got {self.tasks}")
        check(
            len(self.weights) == len(self.tasks),
            "weights", f"one weight per task ({len(self.tasks)}: {self.tasks}), got {len(self.weights)}",
        )
        for i, w in enumerate(self.weights):
            check(math.isfinite(w), f"weights[{i}]", f"a finite number, got {w}")
        check(self.transform in ("sigmoid", "logit"), "transform", "sigmoid | logit")


class ValueModel(nn.Module):
    """``logits (B, K, T) -> composite (B, K)``. Buffer: ``weights (T,) float32``."""

    weights: Tensor

    def __init__(self, config: ValueModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.tasks = list(config.tasks)
        self.transform = config.transform
        self.register_buffer("weights", torch.tensor(config.weights, dtype=torch.float32))

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def check_weights(self, weights: Tensor | None, batch_size: int | None = None) -> None:
        """Raise ``ValueError`` unless ``weights`` is ``None``, ``(T,)`` or ``(B, T)``, float, finite.

        ``batch_size``: when given, a 2-D override must have exactly that many rows.
        """
        if weights is None:
            return
        T = self.num_tasks
        if not isinstance(weights, Tensor):
            raise ValueError(
                f"value weights must be a tensor of shape ({T},) or (B, {T}) for tasks "
                f"{self.tasks}, got {type(weights).__name__}"
            )
        shape = tuple(weights.shape)
        if weights.dim() not in (1, 2) or weights.shape[-1] != T:
            raise ValueError(
                f"value weights must have shape ({T},) or (B, {T}) (one weight per task "
                f"{self.tasks}), got {shape}"
            )
        if weights.dim() == 2 and batch_size is not None and weights.shape[0] != batch_size:
            raise ValueError(
                f"value weights have {weights.shape[0]} rows, expected one per query ({batch_size})"
            )
        if not weights.is_floating_point():
            raise ValueError(f"value weights must be floating point, got {weights.dtype}")
        bad = ~torch.isfinite(weights)
        if bool(bad.any()):
            where = torch.nonzero(bad)[0].tolist()
            raise ValueError(f"value weights must be finite, got {weights[tuple(where)].item()} at {where}")

    def forward(self, logits: Tensor, weights: Tensor | None = None) -> Tensor:
        """``logits (B, K, T) f32``, ``weights (B, T) | (T,) f32 | None`` -> ``(B, K) f32``.

        Shapes are checked here; call :meth:`check_weights` for the finiteness check (it reads data,
        so the exported / compiled path leaves it to the caller).
        """
        T = self.num_tasks
        if logits.dim() != 3 or logits.shape[-1] != T:
            raise ValueError(f"logits must be (B, K, {T}) for tasks {self.tasks}, got {tuple(logits.shape)}")
        w = self.weights if weights is None else weights.to(logits.dtype)
        if w.dim() not in (1, 2) or w.shape[-1] != T:
            raise ValueError(f"value weights must be ({T},) or (B, {T}), got {tuple(w.shape)}")
        values = torch.sigmoid(logits) if self.transform == "sigmoid" else logits
        if w.dim() == 1:
            return values @ w
        return torch.einsum("bkt,bt->bk", values, w)
