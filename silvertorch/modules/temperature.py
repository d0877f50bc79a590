"""Softmax temperature, fixed or learned (log-parametrized, clamped to a range)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["Temperature"]


class Temperature(nn.Module):
    """``forward() -> () float32`` temperature ``tau``; logits are ``similarity / tau``.

    Learned: ``tau = exp(clamp(log_tau, log(min), log(max)))`` with ``log_tau`` a parameter (the
    clamp stops the gradient at the bounds, so tau never collapses to 0). Fixed: a buffer, so it is
    still saved in the ``state_dict`` and moves with ``.to()``.
    """

    def __init__(
        self,
        init: float,
        *,
        learnable: bool = False,
        min_value: float = 1e-3,
        max_value: float = 10.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not 0 < min_value <= init <= max_value:
            raise ValueError(
                f"temperature must satisfy 0 < min ({min_value}) <= init ({init}) "
                f"<= max ({max_value})"
            )
        self.learnable = learnable
        self.log_min = math.log(min_value)
        self.log_max = math.log(max_value)
        log_init = torch.tensor(math.log(init), dtype=torch.float32, device=device)
        if learnable:
            self.log_tau = nn.Parameter(log_init)
        else:
            self.register_buffer("log_tau", log_init)

    def forward(self) -> Tensor:
        return self.log_tau.clamp(self.log_min, self.log_max).exp()

    def extra_repr(self) -> str:
        lo, hi = math.exp(self.log_min), math.exp(self.log_max)
        return f"learnable={self.learnable}, range=[{lo:.4g}, {hi:.4g}]"
