"""One served artifact: the model, its catalog updater, the raw-id map and its durable state.

:class:`Served` is touched only by the model-owner thread of :class:`serve.engine.Engine` once it
serves (building one — loading the artifact, reading the snapshot, replaying the log — happens on
any thread before it is handed over). Updates are validated completely before anything is written
(:class:`RequestError` = the client's fault, nothing changed).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from serve.ids import ItemIds
from serve.response import ResponseEncoder
from serve.snapshot import read_snapshot
from serve.update_log import UpdateLog
from silvertorch.catalog import CatalogUpdater
from silvertorch.export import ServingArtifact, encode_item_features, encode_user_features
from silvertorch.index.expr import FilterSyntaxError, parse

__all__ = ["RequestError", "Query", "Served", "state_dir_for", "ID_FEATURE", "upsert_rows",
           "check_attribute_names"]

# the item tower feature that holds the raw item id (when the tower has one): an upsert by
# features that omits it gets the item's own raw id (a new id maps to out-of-vocabulary)
ID_FEATURE = "item_id"


class RequestError(Exception):
    """A request the server refuses: ``status`` (400 / 404 / 409 / 413) and a message naming the
    field that is wrong and what was expected."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


@dataclass
class Query:
    """One parsed retrieve request (validated by :meth:`Served.parse_query`)."""

    user: dict[str, list[str]]
    k: int
    filter: str | None
    weights: list[float] | None
    nprobe: int | None


def state_dir_for(root: str | Path, version: str) -> Path:
    """The state sub-directory of artifact ``version`` under ``root``."""
    return Path(root) / re.sub(r"[^A-Za-z0-9._-]", "_", version)


def _values(raw: Any) -> list[str]:
    return [raw] if isinstance(raw, str) else [str(v) for v in raw]


def check_attribute_names(where: str, attrs: dict[str, list[str]], names: set[str]) -> None:
    """:class:`RequestError` 400 naming ``where`` when ``attrs`` has features the index lacks."""
    unknown = sorted(set(attrs) - names)
    if unknown:
        raise RequestError(400, f"{where}: unknown attribute(s) {unknown}; the index has {sorted(names)}")


@torch.no_grad()
def upsert_rows(items: Sequence[Any], *, dim: int, tower: Any,
                encode: Callable[[list[dict[str, list[str]]]], Any], ids: ItemIds,
                attribute_names: set[str]) -> list[dict[str, Any]]:
    """The checked rows of an upsert record (single-process and sharded servers alike).

    ``items``: ``schemas.ItemUpsert``-like objects, each with exactly one of ``vector`` (``dim``
    finite numbers) or ``features`` (encoded by ``encode`` and embedded by the item ``tower``).
    Raises :class:`RequestError` 400 naming the item; nothing is written.
    """
    raws = [str(it.id) for it in items]
    if not raws:
        raise RequestError(400, "items: at least one item is needed")
    dup = sorted({r for r in raws if raws.count(r) > 1})
    if dup:
        raise RequestError(400, f"items: duplicate id(s) {dup[:5]} in one request")
    vectors = torch.empty(len(items), dim, dtype=torch.float32)
    by_features = []
    for i, it in enumerate(items):
        if (it.features is None) == (it.vector is None):
            raise RequestError(400, f"items[{i}]: give exactly one of 'features' or 'vector'")
        if it.vector is None:
            by_features.append(i)
            continue
        if len(it.vector) != dim:
            raise RequestError(400, f"items[{i}].vector: expected {dim} numbers, got {len(it.vector)}")
        if not all(math.isfinite(x) for x in it.vector):
            raise RequestError(400, f"items[{i}].vector: must be finite (no NaN / inf)")
        vectors[i] = torch.tensor(it.vector, dtype=torch.float32)
    if by_features:
        feats = [{n: _values(v) for n, v in items[i].features.items()} for i in by_features]
        if ID_FEATURE in tower.feature_names:
            for i, f in zip(by_features, feats):  # the id embedding of a known item counts
                f.setdefault(ID_FEATURE, [raws[i]])
        try:
            kjt = encode(feats)
        except ValueError as err:
            raise RequestError(400, f"items[{by_features[0]}].features: {err}") from None
        vecs = tower(kjt).float()
        if not bool(torch.isfinite(vecs).all()):
            raise RequestError(400, "items: the item tower produced non-finite vectors")
        vectors[by_features] = vecs
    internal = ids.peek_new(raws)
    rows = []
    for i, it in enumerate(items):
        attrs = it.attributes
        if attrs is None and it.features is not None:
            attrs = {n: _values(v) for n, v in it.features.items() if n in attribute_names}
        if attrs is not None:
            check_attribute_names(f"items[{i}].attributes", attrs, attribute_names)
        rows.append({"raw": raws[i], "id": internal[i], "vector": vectors[i].tolist(),
                     "attributes": attrs, "title": it.title})
    return rows


class Served:
    """See the module docstring. ``max_k``: the server's bound (the artifact's own applies too)."""

    def __init__(self, artifact: ServingArtifact, state_root: str | Path, max_k: int) -> None:
        self.artifact = artifact
        self.version = artifact.version
        self.model = artifact.model.eval()
        self.tasks: list[str] = list(self.model.overarch.tasks)
        self.dim = int(self.model.index.ivf.dim)
        self.max_k = min(int(max_k), int(self.model.config.max_k))
        self.k_prime = int(self.model.config.k_prime)
        self.encoder = ResponseEncoder(self.tasks, self.version)
        self.user_features: set[str] = set(artifact.user_vocab)  # names a request may send
        elig = self.model.index.eligibility
        self.attribute_names: set[str] = set(elig.schema().names) if elig is not None else set()
        self.dir = state_dir_for(state_root, self.version)
        self.ids = ItemIds(artifact.item_raw_ids, artifact.item_titles or None)
        self.snapshot_seq = 0
        snap = read_snapshot(self.dir / "snapshot.pt", self.version)
        if snap is not None:
            self.model.load_state_dict(snap["state_dict"])
            self.ids = ItemIds.from_state(snap["ids"])
            self.snapshot_seq = int(snap["seq"])
        self.updater = CatalogUpdater(self.model)
        self.log = UpdateLog(self.dir / "log.jsonl", self.version)
        # a compaction that emptied the log leaves no record to count from: new records must get
        # seqs after the snapshot's, or the next restart would skip them as already applied
        self.log.last_seq = max(self.log.last_seq, self.snapshot_seq)
        replay = [r for r in self.log.replayed if int(r["seq"]) > self.snapshot_seq]
        for record in replay:
            self.apply_record(record)
        self.replayed = len(replay)
        self.log.replayed = []
        # records acknowledged while a compaction runs (the engine fills it): re-applied on top
        # of the compacted state when it swaps in
        self.tail: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------ state
    @property
    def generation(self) -> int:
        return int(self.updater.generation)

    def stats(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.updater.stats().items() if isinstance(v, (int, float))}

    def close(self) -> None:
        self.log.close()

    # ---------------------------------------------------------------------------- queries
    def parse_query(self, user: dict[str, Any], k: int, filter: str | None,
                    value_weights: dict[str, float] | list[float] | None, nprobe: int | None) -> Query:
        """Validate one request against this artifact; :class:`RequestError` (400) naming the field."""
        if isinstance(k, bool) or not 1 <= k <= self.max_k:
            raise RequestError(400, f"k: must lie in [1, {self.max_k}], got {k}")
        if nprobe is not None and not 1 <= nprobe <= int(self.model.index.ivf.nlist):
            raise RequestError(400, f"nprobe: must lie in [1, {int(self.model.index.ivf.nlist)}] "
                                    f"(the index's nlist), got {nprobe}")
        weights = None
        if value_weights is not None:
            if isinstance(value_weights, dict):
                unknown = sorted(set(value_weights) - set(self.tasks))
                if unknown or len(value_weights) != len(self.tasks):
                    raise RequestError(400, f"value_weights: expected one weight per task {self.tasks}, "
                                            f"got keys {sorted(value_weights)}")
                weights = [float(value_weights[t]) for t in self.tasks]
            else:
                weights = [float(w) for w in value_weights]
                if len(weights) != len(self.tasks):
                    raise RequestError(400, f"value_weights: expected {len(self.tasks)} weights "
                                            f"(tasks {self.tasks}), got {len(weights)}")
            if not all(math.isfinite(w) for w in weights):
                raise RequestError(400, f"value_weights: must be finite numbers, got {weights}")
        users = {name: _values(v) for name, v in user.items()}
        unknown = sorted(set(users) - self.user_features)  # what encoding would refuse, without
        if unknown:                                       # building a tensor per request
            raise RequestError(400, f"user: unknown user feature(s) {unknown}; the model knows "
                                    f"{sorted(self.user_features)}")
        expr = filter if filter and filter.strip() else None
        if expr is not None:
            if self.model.index.eligibility is None:
                raise RequestError(400, "filter: this artifact's index has no item attributes")
            try:
                parse(expr)  # syntax only (pure): the batch compiles it against the index
            except FilterSyntaxError as err:
                raise RequestError(400, f"filter: {err}") from None
        return Query(users, int(k), expr, weights, nprobe)

    @torch.no_grad()
    def run_queries(self, queries: Sequence[Query], as_json: bool | Sequence[bool] = False
                    ) -> list[Any]:
        """Answer ``queries`` with as few forward passes as possible: one per distinct
        (candidate count, nprobe), each over all the rows that share it. Every answer reads this
        one generation.

        Each answer is a dict (``{"items", "version", "generation", "warnings"}``), or, where
        ``as_json`` (one flag for all, or one per query) is true, the same answer as JSON bytes
        (:class:`serve.response.ResponseEncoder`: what the HTTP route sends, without a dict per item).
        """
        flags = [bool(as_json)] * len(queries) if isinstance(as_json, bool) else [bool(f) for f in as_json]
        if len(flags) != len(queries):
            raise ValueError(f"as_json: expected {len(queries)} flags, got {len(flags)}")
        groups: dict[tuple[int, int | None], list[int]] = {}
        for i, q in enumerate(queries):
            groups.setdefault((max(q.k, self.k_prime), q.nprobe), []).append(i)
        out: list[Any] = [None] * len(queries)
        generation = self.generation
        for (_, nprobe), rows in groups.items():
            group = [queries[i] for i in rows]
            kmax = max(q.k for q in group)
            kjt = encode_user_features(self.artifact, [q.user for q in group])
            plan = None
            if any(q.filter for q in group):
                plan = self.model.index.eligibility.compile([q.filter for q in group])
            weights = None
            if any(q.weights is not None for q in group):
                default = self.model.value_model.weights.tolist()
                weights = torch.tensor([q.weights or default for q in group], dtype=torch.float32)
            res = self.model(kjt, kmax, plan, weights, nprobe)
            ids = res.ids[:, :kmax].tolist()
            numbers = None  # (B, kmax, 2 + T) float64, only when some answer is bytes
            if any(flags[i] for i in rows):
                numbers = torch.cat([res.scores[:, :kmax, None], res.task_scores[:, :kmax],
                                     res.retrieval_scores[:, :kmax, None]], dim=2).double().numpy()
            lists = None  # Python floats, only when some answer is a dict
            for j, (i, q) in enumerate(zip(rows, group)):
                row = ids[j][:q.k]
                n = next((r for r, item in enumerate(row) if item < 0), len(row))
                warnings = [str(w) for w in plan.warnings[j]] if plan is not None and plan.warnings else []
                if flags[i]:
                    out[i] = self.encoder.encode(self.ids, row[:n], numbers[j, :n], generation, warnings)
                    continue
                if lists is None:
                    lists = (res.scores.tolist(), res.task_scores.tolist(), res.retrieval_scores.tolist())
                scores, tasks, ann = lists
                items = [{"id": self.ids.raw[item], "title": self.ids.titles[item],
                          "score": scores[j][r], "task_scores": dict(zip(self.tasks, tasks[j][r])),
                          "retrieval_score": ann[j][r]} for r, item in enumerate(row[:n])]
                out[i] = {"items": items, "version": self.version, "generation": generation,
                          "warnings": warnings}
        return out

    # ---------------------------------------------------------------------------- updates
    def _internal(self, raw: str) -> int:
        internal = self.ids.get(raw)
        if internal is None or not self.updater.is_live(internal):
            raise RequestError(404, f"item '{raw}' is not in the index")
        return internal

    def _check_attributes(self, where: str, attrs: dict[str, list[str]]) -> None:
        check_attribute_names(where, attrs, self.attribute_names)

    def prepare_upsert(self, items: Sequence[Any]) -> dict[str, Any]:
        """Validate a batch upsert (``schemas.ItemUpsert``-like objects) and compute its vectors;
        returns the log record (nothing is written). :class:`RequestError` 400 naming the item."""
        rows = upsert_rows(items, dim=self.dim, tower=self.artifact.item_tower,
                           encode=lambda feats: encode_item_features(self.artifact, feats),
                           ids=self.ids, attribute_names=self.attribute_names)
        return {"op": "upsert", "items": rows}

    def prepare_delete(self, raw: str) -> dict[str, Any]:
        return {"op": "delete", "raw": raw, "id": self._internal(raw)}

    def prepare_patch(self, raw: str, attributes: dict[str, list[str]]) -> dict[str, Any]:
        internal = self._internal(raw)
        self._check_attributes("attributes", attributes)
        return {"op": "patch", "raw": raw, "id": internal, "attributes": attributes}

    def apply_record(self, record: dict[str, Any]) -> None:
        """Apply one update record to the model (the updater validates before writing: a
        ``ValueError`` / ``KeyError`` means nothing was written)."""
        op = record["op"]
        if op == "upsert":
            rows = record["items"]
            for with_attrs in (True, False):
                part = [r for r in rows if (r["attributes"] is not None) == with_attrs]
                if not part:
                    continue
                ids = torch.tensor([r["id"] for r in part], dtype=torch.int64)
                vecs = torch.tensor([r["vector"] for r in part], dtype=torch.float32)
                self.updater.upsert(ids, vecs, [r["attributes"] for r in part] if with_attrs else None)
            for r in rows:
                self.ids.assign(r["raw"], r["id"], r.get("title"))
        elif op == "delete":
            self.updater.delete(torch.tensor([record["id"]], dtype=torch.int64))
        elif op == "patch":
            self.updater.patch_attributes(torch.tensor([record["id"]], dtype=torch.int64),
                                          [record["attributes"]])
        else:
            raise ValueError(f"unknown update record op {op!r}")

    def apply_checked(self, record: dict[str, Any]) -> None:
        """:meth:`apply_record` for a client's update: the updater's refusals become 400 / 404."""
        try:
            self.apply_record(record)
        except KeyError as err:
            raise RequestError(404, f"{err.args[0] if err.args else err}") from None
        except (ValueError, TypeError) as err:
            raise RequestError(400, str(err)) from None
