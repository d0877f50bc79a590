"""The scoring service: ``POST /v1/score`` (query, candidates) -> the top-k by composite score.

Holds what scoring needs from the artifact: the index's stored item vectors (the "cached item
embeddings", dequantized per candidate), the OverArch's item feature tables, the OverArch, the
value model and the reranker. Computes exactly SilverTorch's post-search steps with the same
modules: ``candidate_vectors`` -> OverArch logits -> value model -> (reranker) -> top-k
(:func:`silvertorch.retrieval_ops.select_output`).

Request: ``query (B, D) f32``, ``ids (B, K') int64`` (-1 padding), ``retrieval (B, K') f32``
(ANN scores, -inf padding), ``params (1,) int64 = [k]``, optional ``weights (B, T) f32``
(value-model weights; absent = the artifact's). Response: ``ids (B, k) int64``,
``scores (B, k) f32``, ``task_scores (B, k, T) f32``, ``retrieval (B, k) f32``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from silvertorch.model import RetrievalModel
from silvertorch.retrieval_ops import rerank_top_n, select_output

from .protocol import ProtocolError, require
from .service import BinaryService

__all__ = ["ScoringService", "ScoreItem"]


@dataclass
class ScoreItem:
    query: np.ndarray  # (B, D)
    ids: np.ndarray  # (B, K')
    retrieval: np.ndarray  # (B, K')
    k: int
    weights: np.ndarray | None  # (B, T)


class ScoringService(BinaryService[ScoreItem]):
    name = "scoring"

    def __init__(self, model: RetrievalModel) -> None:
        self.model = model.eval()
        self.dim = model.index.ivf.dim
        self.num_items = model.num_items
        self.tasks = model.value_model.num_tasks
        self.default_weights = model.value_model.weights.numpy()

    def parse(self, arrays: dict[str, np.ndarray]) -> ScoreItem:
        q = require(arrays, "query", "float32", 2)
        ids = require(arrays, "ids", "int64", 2)
        ret = require(arrays, "retrieval", "float32", 2)
        params = require(arrays, "params", "int64", 1)
        B = q.shape[0]
        if B == 0 or q.shape[1] != self.dim:
            raise ProtocolError(f"query must be (B >= 1, {self.dim}) float32, got {q.shape}")
        if ids.shape[0] != B or ret.shape != ids.shape or ids.shape[1] == 0:
            raise ProtocolError(f"ids and retrieval must both be ({B}, K' >= 1), got {ids.shape}, {ret.shape}")
        if not np.isfinite(q).all():
            raise ValueError("query contains NaN or inf")
        if np.isnan(ret).any():
            raise ValueError("retrieval scores contain NaN")
        if ((ids < -1) | (ids >= self.num_items)).any():
            raise ValueError(f"candidate ids must lie in [-1, {self.num_items})")
        if params.shape != (1,) or not 1 <= int(params[0]) <= ids.shape[1]:
            raise ProtocolError(f"params must be [k] with 1 <= k <= K'={ids.shape[1]}, got {params.tolist()}")
        w = None
        if "weights" in arrays:
            w = require(arrays, "weights", "float32", 2)
            if w.shape != (B, self.tasks) or not np.isfinite(w).all():
                raise ValueError(f"weights must be finite ({B}, {self.tasks}) float32, got {w.shape}")
        return ScoreItem(q, ids, ret, int(params[0]), w)

    def key(self, item: ScoreItem) -> tuple[int, int]:
        return (item.k, item.ids.shape[1])

    def rows(self, item: ScoreItem) -> int:
        return item.query.shape[0]

    @torch.no_grad()
    def run(self, items: list[ScoreItem]) -> list[dict[str, np.ndarray]]:
        m = self.model
        k = items[0].k
        query = torch.from_numpy(np.concatenate([it.query for it in items]))
        ids = torch.from_numpy(np.concatenate([it.ids for it in items]))
        retrieval = torch.from_numpy(np.concatenate([it.retrieval for it in items]))
        weights = None
        if any(it.weights is not None for it in items):
            weights = torch.from_numpy(np.concatenate([
                it.weights if it.weights is not None
                else np.broadcast_to(self.default_weights, (it.query.shape[0], self.tasks))
                for it in items]).astype(np.float32))
        valid = ids >= 0
        vectors = m.candidate_vectors(ids)  # (B, K', D)
        logits = m.score_candidates(query, vectors, ids)  # (B, K', T)
        composite = m.value_model(logits, weights)
        composite = torch.where(valid, composite, torch.full_like(composite, float("-inf")))
        if m.reranker is not None:
            composite = rerank_top_n(m.reranker, query, vectors, logits, composite, valid)
        out = select_output(composite, ids, logits, retrieval, k)
        res, pos = [], 0
        for it in items:
            n = it.query.shape[0]
            sl = slice(pos, pos + n)
            res.append({"ids": out.ids[sl].numpy(), "scores": out.scores[sl].numpy(),
                        "task_scores": out.task_scores[sl].numpy(),
                        "retrieval": out.retrieval_scores[sl].numpy()})
            pos += n
        return res
