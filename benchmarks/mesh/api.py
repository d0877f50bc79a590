"""The public request/response of ``POST /v1/retrieve``, mirrored from ``serve/schemas.py``.

Request JSON: ``{"user": {feature: value | [values]}, "k": int (default 10), "filter": str | null,
"value_weights": [T floats] | {task: float} | null, "nprobe": int | null}``; the mesh also takes
``"exact": bool`` (probe every list: ``nprobe = nlist``, which is how SilverTorch's IVF search
becomes exhaustive). Response JSON: ``{"items": [{"id", "title", "score", "task_scores": {task: p},
"retrieval_score"}], "version", "generation", "warnings"}`` (padding results are left out).

Type errors answer 422, out-of-range values and unknown features / bad filters 400, with a message
naming the field (:class:`ApiError`). Used by the orchestrator and the in-process stand-in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from silvertorch.export import ServingArtifact
from silvertorch.index.expr import parse as parse_filter


__all__ = ["ApiError", "RetrieveRequest", "RequestCodec"]

_FIELDS = {"user", "k", "filter", "value_weights", "nprobe", "exact"}


class ApiError(Exception):
    """A rejected request: HTTP ``status`` and a ``detail`` naming the field."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail

    def body(self) -> bytes:
        return orjson.dumps({"detail": self.detail})


@dataclass
class RetrieveRequest:
    user: dict[str, list[str]]
    k: int
    filter: str | None
    weights: np.ndarray | None  # (T,) float32
    nprobe: int


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, f"{name}: expected an integer, got {type(value).__name__}")
    return value


class RequestCodec:
    """Validates requests against one artifact and builds responses."""

    def __init__(self, artifact: ServingArtifact, max_k: int) -> None:
        model = artifact.model
        self.artifact = artifact
        self.version = artifact.version
        self.tasks = list(model.value_model.tasks)
        self.max_k = min(max_k, model.config.max_k)
        self.k_prime = model.config.k_prime
        self.nprobe = model.config.nprobe
        self.nlist = model.index.ivf.nlist
        self.user_keys = list(model.user_tower.feature_names)
        self.vocab = {k: {v: i for i, v in enumerate(artifact.user_vocab[k])} for k in self.user_keys}
        self.known_user = set(artifact.user_vocab)
        elig = model.index.eligibility
        self.filter_features = set(elig.schema().names) if elig is not None else set()
        self.raw_ids = [str(r) for r in artifact.item_raw_ids]
        titles = list(artifact.item_titles)
        self.titles = titles if len(titles) == len(self.raw_ids) else [""] * len(self.raw_ids)

    # ------------------------------------------------------------------ requests
    def parse(self, body: bytes) -> RetrieveRequest:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as err:
            raise ApiError(400, f"body: malformed JSON ({err})") from None
        if not isinstance(data, dict):
            raise ApiError(422, "body: expected a JSON object")
        extra = sorted(set(data) - _FIELDS)
        if extra:
            raise ApiError(422, f"{extra[0]}: unknown field (expected {sorted(_FIELDS)})")
        user = data.get("user")
        if not isinstance(user, dict):
            raise ApiError(422, "user: expected an object {feature: value or [values]}")
        clean: dict[str, list[str]] = {}
        for f, v in user.items():
            vals = [v] if isinstance(v, str) else v
            if not isinstance(vals, list) or not all(isinstance(x, str) for x in vals):
                raise ApiError(422, f"user.{f}: expected a string or a list of strings")
            clean[f] = vals
        unknown = sorted(set(clean) - self.known_user)
        if unknown:
            raise ApiError(400, f"user: unknown feature(s) {unknown}; the model knows {sorted(self.known_user)}")
        k = _int(data.get("k", 10), "k")
        if not 1 <= k <= self.max_k:
            raise ApiError(400, f"k: must lie in [1, {self.max_k}], got {k}")
        flt = data.get("filter")
        if flt is not None and not isinstance(flt, str):
            raise ApiError(422, "filter: expected a string or null")
        if flt:
            try:
                node = parse_filter(flt)
            except ValueError as err:
                raise ApiError(400, f"filter: {err}") from None
            if node is not None and not self.filter_features:
                raise ApiError(400, "filter: the artifact has no item attributes")
            bad = sorted(_features(node) - self.filter_features) if node is not None else []
            if bad:
                raise ApiError(400, f"filter: unknown feature(s) {bad}; known {sorted(self.filter_features)}")
        weights = self._weights(data.get("value_weights"))
        nprobe = data.get("nprobe")
        nprobe = self.nprobe if nprobe is None else _int(nprobe, "nprobe")
        if nprobe < 1:
            raise ApiError(400, f"nprobe: must be >= 1, got {nprobe}")
        exact = data.get("exact", False)
        if not isinstance(exact, bool):
            raise ApiError(422, "exact: expected a boolean")
        if exact:
            nprobe = self.nlist
        return RetrieveRequest(clean, k, flt or None, weights, min(nprobe, self.nlist))

    def _weights(self, raw: Any) -> np.ndarray | None:
        if raw is None:
            return None
        if isinstance(raw, dict):
            unknown = sorted(set(raw) - set(self.tasks))
            if unknown or len(raw) != len(self.tasks):
                raise ApiError(400, f"value_weights: expected one weight per task {self.tasks}, got {sorted(raw)}")
            raw = [raw[t] for t in self.tasks]
        if not isinstance(raw, list) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in raw):
            raise ApiError(422, "value_weights: expected a list of numbers or {task: number}")
        if len(raw) != len(self.tasks):
            raise ApiError(400, f"value_weights: expected {len(self.tasks)} weights for {self.tasks}, got {len(raw)}")
        if not all(math.isfinite(w) for w in raw):
            raise ApiError(400, "value_weights: must be finite")
        return np.asarray(raw, dtype=np.float32)

    def k_candidates(self, k: int) -> int:
        """Candidates out of the ANN stage: ``max(k, k_prime)``, as in ``RetrievalModel``."""
        return max(k, self.k_prime)

    def encode_users(self, reqs: list[RetrieveRequest]) -> tuple[np.ndarray, np.ndarray]:
        """``(lengths (F * B,) int64, values (nnz,) int64)`` key-major; unknown values -> 0 (OOV)."""
        lengths, values = [], []
        for key in self.user_keys:
            table = self.vocab[key]
            for r in reqs:
                vals = r.user.get(key, ())
                lengths.append(len(vals))
                values.extend(table.get(v, 0) for v in vals)
        return np.asarray(lengths, dtype=np.int64), np.asarray(values, dtype=np.int64)

    # ----------------------------------------------------------------- responses
    def response(self, ids: np.ndarray, scores: np.ndarray, task_scores: np.ndarray,
                 retrieval: np.ndarray, generation: int = 0) -> bytes:
        """One row's results (``(k,)``, ``(k,)``, ``(k, T)``, ``(k,)``) -> the response JSON."""
        keep = ids >= 0
        items = [
            {"id": self.raw_ids[i], "title": self.titles[i], "score": float(s),
             "task_scores": dict(zip(self.tasks, map(float, t))), "retrieval_score": float(rs)}
            for i, s, t, rs in zip(ids[keep].tolist(), scores[keep], task_scores[keep], retrieval[keep])
        ]
        return orjson.dumps({"items": items, "version": self.version, "generation": generation,
                             "warnings": []})


def _features(node: Any) -> set[str]:
    if hasattr(node, "feature"):
        return {node.feature}
    if hasattr(node, "child"):
        return _features(node.child)
    return set().union(*(_features(c) for c in node.children))


