"""A plain multi-layer perceptron: ``Linear -> activation (-> dropout)`` blocks, last layer linear.

Used on top of the pooled embeddings of a tower. Device-agnostic; constructible on ``meta``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["MLP", "Activation"]

Activation = Literal["relu", "gelu", "silu"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class MLP(nn.Module):
    """``in_dim -> dims[0] -> ... -> dims[-1]``; every layer but the last is followed by the
    activation (and dropout when ``dropout > 0``). The last layer is linear, so the output can be
    normalized or scored without a clipped range.

    Args:
        in_dim: input width ``D_in``.
        dims: output widths of the layers; ``dims[-1]`` is the output width ``D_out``.
            An empty list makes the MLP the identity (``D_out == D_in``).
        activation: hidden activation.
        dropout: dropout probability after each hidden activation.
        device: where to allocate the weights (``meta`` allocates nothing).
    """

    def __init__(
        self,
        in_dim: int,
        dims: list[int],
        *,
        activation: Activation = "relu",
        dropout: float = 0.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_dim <= 0 or any(d <= 0 for d in dims):
            raise ValueError(f"MLP widths must be positive, got in_dim={in_dim}, dims={dims}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {sorted(_ACTIVATIONS)}")
        layers: list[nn.Module] = []
        width = in_dim
        for i, out in enumerate(dims):
            layers.append(nn.Linear(width, out, device=device))
            if i < len(dims) - 1:
                layers.append(_ACTIVATIONS[activation]())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
            width = out
        self.layers = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = width

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, D_in) float32 -> (B, D_out) float32``."""
        return self.layers(x)
