"""Neural reranker: candidates attend to each other, then a residual corrects the composite.

Each candidate becomes a token ``Linear([e, q * e, task_logits, composite]) (hidden_dim)``; one
multi-head self-attention block (padding candidates masked as keys) with a residual and layer norm
mixes the set, and an MLP turns every token into a score residual:
``new[b, k] = composite[b, k] + residual[b, k]``; padding candidates get ``-inf``.
The output layer starts at zero, so an untrained reranker returns the composite unchanged.
``RetrievalModel`` applies it to the ``top_n`` best candidates by composite.

Config (TOML)::

    [model.reranker]
    enabled = true
    num_heads = 2
    hidden_dim = 64
    top_n = 100
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from silvertorch.config import check

__all__ = ["RerankerConfig", "Reranker"]


@dataclass(kw_only=True)
class RerankerConfig:
    """Whether ``RetrievalModel`` reranks, and the size of the attention block."""

    enabled: bool = False
    num_heads: int = 2
    hidden_dim: int = 64
    top_n: int = 100

    def validate(self) -> None:
        check(self.num_heads > 0, "num_heads", f"> 0, got {self.num_heads}")
        check(
            self.hidden_dim > 0 and self.hidden_dim % self.num_heads == 0,
            "hidden_dim", f"a positive multiple of num_heads ({self.num_heads}), got {self.hidden_dim}",
        )
        check(self.top_n > 0, "top_n", f"> 0, got {self.top_n}")


class Reranker(nn.Module):
    """``(query, candidates, task logits, composite, valid) -> (B, K)`` reranked scores.

    Args:
        config: sizes (``enabled`` is read by ``RetrievalModel``, not here).
        dim: ``D``, the width of the query and item vectors.
        num_tasks: ``T``, the number of OverArch tasks.
    """

    def __init__(self, config: RerankerConfig, dim: int, num_tasks: int) -> None:
        super().__init__()
        config.validate()
        if dim <= 0 or num_tasks <= 0:
            raise ValueError(f"dim and num_tasks must be > 0, got {dim}, {num_tasks}")
        self.config = config
        self.dim, self.num_tasks = dim, num_tasks
        h = config.hidden_dim
        self.embed = nn.Linear(2 * dim + num_tasks + 1, h)
        self.attention = nn.MultiheadAttention(h, config.num_heads, batch_first=True)
        self.norm = nn.LayerNorm(h)
        self.head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(
        self, query: Tensor, items: Tensor, task_logits: Tensor, composite: Tensor, valid: Tensor
    ) -> Tensor:
        """``query (B, D) f32``, ``items (B, K, D) f32``, ``task_logits (B, K, T) f32``,
        ``composite (B, K) f32``, ``valid (B, K) bool`` -> ``(B, K) f32`` (``-inf`` where invalid)."""
        B, K, D = items.shape
        if query.shape != (B, D) or task_logits.shape != (B, K, self.num_tasks):
            raise ValueError(
                f"Reranker expects query (B, D), items (B, K, D), task_logits (B, K, "
                f"{self.num_tasks}); got {tuple(query.shape)}, {tuple(items.shape)}, "
                f"{tuple(task_logits.shape)}"
            )
        base = torch.where(valid, composite, torch.zeros_like(composite))  # no inf/NaN into the MLP
        x = torch.cat([items, query.unsqueeze(1) * items, task_logits, base.unsqueeze(-1)], dim=-1)
        x = torch.where(valid.unsqueeze(-1), x, torch.zeros_like(x))
        tokens = self.embed(x)
        # a row with no valid candidate would attend to nothing (NaN): let it attend to everything
        key_pad = ~valid & valid.any(dim=1, keepdim=True)
        mixed, _ = self.attention(tokens, tokens, tokens, key_padding_mask=key_pad, need_weights=False)
        tokens = self.norm(tokens + mixed)
        residual = self.head(tokens).squeeze(-1)
        return torch.where(valid, base + residual, torch.full_like(base, float("-inf")))
