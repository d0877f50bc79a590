"""The batching owner of a sharded replica, and the one step every rank runs per message.

:class:`Leader` (the replica's rank 0) validates requests on the host (so a bad request never reaches
the followers), micro-batches them (``max_batch_size`` / ``max_wait_ms``), groups a batch by
(candidate count, nprobe) as the single-process server does, and for each group broadcasts one
``{"op": "retrieve", ...}`` message and runs :func:`execute` itself; the followers run
:func:`execute` on the same message, so every rank calls the sharded forward with the same inputs.
While idle it sends ``{"op": "ping"}`` every ``heartbeat_s`` (a dead follower is noticed without
traffic). Any collective failure marks the leader **failed**: queued and later requests are answered
at once with :class:`ShardUnavailable` (the HTTP layer maps it to 503) and ``/healthz`` says why.

Item updates (upsert / delete / patch) are jobs of the same FIFO queue: a query batch closes when an
update is next in line, so every answer reads one generation on ALL ranks (read-after-write, no torn
reads). An update is validated completely on the leader (:mod:`.updates`), broadcast as
``{"op": "update", "record": ...}``, applied by every rank (:mod:`.catalog`), appended (fsynced) to
the leader's update log (``serve/update_log.py``) and only then acknowledged; at start-up the
leader replays its log to every rank before it serves (:meth:`Leader.replay`).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from serve.ids import ItemIds
from serve.served import RequestError, state_dir_for
from serve.update_log import UpdateLog
from silvertorch.distributed.sharded_retrieval import ShardPeerError
from silvertorch.export import encode_user_features
from silvertorch.export_sharded import ShardedPart
from silvertorch.index.expr import FilterSyntaxError, parse

from .catalog import ShardCatalog
from .fanout import Fanout, FanoutError
from .updates import UpdatePreparer

__all__ = ["ShardUnavailable", "BadRequest", "Leader", "Update", "execute"]

log = logging.getLogger("silvertorch.serve.sharded")


class ShardUnavailable(RuntimeError):
    """The replica lost a rank: nothing can be answered until every rank is restarted (503)."""


class BadRequest(ValueError):
    """A request that does not fit this artifact (400); the message names the field."""


def execute(part: ShardedPart, msg: dict[str, Any], plan: Any = None) -> Any:
    """Run one ``retrieve`` message on this rank: ``msg`` = ``{"users": [{feature: [values]}],
    "k", "filters": [str | None] | None, "weights": [[T floats]] | None, "nprobe"}`` ->
    ``RetrievalOutput``. ``plan``: the leader's already compiled filters (same expressions)."""
    model = part.model
    device = model.item_slot.device
    kjt = encode_user_features(part.user_vocab, msg["users"], keys=list(model.user_tower.feature_names))
    weights = None if msg.get("weights") is None else torch.tensor(msg["weights"], dtype=torch.float32,
                                                                      device=device)
    with torch.no_grad():
        return model(kjt.to(device), int(msg["k"]), plan if plan is not None else msg.get("filters"),
                     weights, msg.get("nprobe"))


@dataclass
class Query:
    users: dict[str, list[str]]
    k: int
    filter: str | None
    weights: list[float] | None
    nprobe: int | None
    future: Future = field(default_factory=Future)


@dataclass
class Update:
    """One item update: ``prepare(preparer) -> record`` runs on the owner thread; the future
    resolves to ``(record, seq, generation)``."""

    prepare: Callable[[UpdatePreparer], dict[str, Any]]
    future: Future = field(default_factory=Future)


class Leader:
    """See the module doc. ``fanout`` None = a world of one rank (nothing to broadcast)."""

    def __init__(self, part: ShardedPart, fanout: Fanout | None, *, max_batch_size: int = 64,
                 max_wait_ms: float = 2.0, max_k: int = 1000, heartbeat_s: float = 5.0,
                 metrics: Any = None, catalog: ShardCatalog | None = None,
                 state_dir: str | Path | None = None) -> None:
        self.part, self.fanout, self.metrics = part, fanout, metrics
        self.model = part.model
        self.max_batch_size, self.max_wait_s = int(max_batch_size), float(max_wait_ms) / 1000.0
        self.max_k = min(int(max_k), int(self.model.config.max_k))
        self.k_prime = int(self.model.config.k_prime)
        self.heartbeat_s = float(heartbeat_s)
        self.tasks = list(self.model.overarch.tasks)
        self.ids = ItemIds(part.item_raw_ids, part.item_titles or None)
        # updates: the catalog (owner map) and the durable log; None = a read-only replica
        self.catalog = catalog
        self.preparer = UpdatePreparer(part, catalog, self.ids) if catalog is not None else None
        self.log: UpdateLog | None = None
        if catalog is not None and state_dir is not None:
            self.log = UpdateLog(state_dir_for(state_dir, part.version) / "log.jsonl", part.version)
        self.replayed = 0
        self._queue: queue.Queue[Query | Update | None] = queue.Queue()
        self._held: Query | Update | None = None  # an update that closed a query batch
        self._thread = threading.Thread(target=self._loop, name="sharded-leader", daemon=True)
        self._stopping = False
        self.ready = False

    # ------------------------------------------------------------------------------ state
    @property
    def failure(self) -> str | None:
        """Why the replica cannot serve (None while healthy)."""
        if self.model.failure is not None:
            return self.model.failure
        return self.fanout.failure if self.fanout is not None else None

    @property
    def healthy(self) -> bool:
        return self.failure is None

    def start(self) -> None:
        self._thread.start()
        self.ready = True

    def replay(self) -> int:
        """Before :meth:`start`: apply the update log to every rank (the followers get each record
        as an ``update`` message); returns the number of records replayed."""
        if self.log is None:
            return 0
        for record in self.log.replayed:
            self._broadcast_and_apply(record)
        self.replayed = len(self.log.replayed)
        self.log.replayed = []
        return self.replayed

    def stop(self) -> None:
        """Stop the owner thread; tell the followers to exit (when they can still hear it)."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout=30)
        if self.fanout is not None and self.healthy:
            try:
                self.fanout.send({"op": "stop"})
            except FanoutError:
                pass
        if self.log is not None:
            self.log.close()

    # ---------------------------------------------------------------------------- requests
    def parse(self, user: dict[str, Any], k: int, filter: str | None, value_weights: Any,
              nprobe: int | None) -> Query:
        """Validate one request; :class:`BadRequest` naming the field."""
        if isinstance(k, bool) or not 1 <= k <= self.max_k:
            raise BadRequest(f"k: must lie in [1, {self.max_k}], got {k}")
        nlist = int(self.model.index.ivf.nlist)
        if nprobe is not None and not 1 <= nprobe <= nlist:
            raise BadRequest(f"nprobe: must lie in [1, {nlist}] (the index's nlist), got {nprobe}")
        weights = None
        if value_weights is not None:
            if isinstance(value_weights, dict):
                if set(value_weights) != set(self.tasks):
                    raise BadRequest(f"value_weights: expected one weight per task {self.tasks}, "
                                     f"got keys {sorted(value_weights)}")
                weights = [float(value_weights[t]) for t in self.tasks]
            else:
                weights = [float(w) for w in value_weights]
                if len(weights) != len(self.tasks):
                    raise BadRequest(f"value_weights: expected {len(self.tasks)} weights (tasks "
                                     f"{self.tasks}), got {len(weights)}")
            if not all(math.isfinite(w) for w in weights):
                raise BadRequest(f"value_weights: must be finite numbers, got {weights}")
        users = {name: ([v] if isinstance(v, str) else [str(x) for x in v]) for name, v in user.items()}
        try:
            encode_user_features(self.part.user_vocab, [users], keys=list(self.model.user_tower.feature_names))
        except ValueError as err:
            raise BadRequest(f"user: {err}") from None
        expr = filter if filter and filter.strip() else None
        if expr is not None:
            if self.model.index.eligibility is None:
                raise BadRequest("filter: this artifact's index has no item attributes")
            try:
                parse(expr)
            except FilterSyntaxError as err:
                raise BadRequest(f"filter: {err}") from None
        return Query(users, int(k), expr, weights, nprobe)

    def submit(self, query: Query) -> Future:
        """Queue a parsed query; the future resolves to the answer dict or raises."""
        if not self.healthy:
            query.future.set_exception(ShardUnavailable(self.failure))
        else:
            self._queue.put(query)
        return query.future

    def update(self, prepare: Callable[[UpdatePreparer], dict[str, Any]]) -> Future:
        """Queue an item update (``prepare`` builds its record on the owner thread); the future
        resolves to ``(record, seq, generation)`` or raises ``RequestError`` / ``ShardUnavailable``."""
        job = Update(prepare)
        if self.preparer is None:
            job.future.set_exception(RequestError(501, "this sharded replica serves no item updates"))
        elif not self.healthy:
            job.future.set_exception(ShardUnavailable(self.failure))
        else:
            self._queue.put(job)
        return job.future

    # ------------------------------------------------------------------------------- owner
    def _next(self, timeout: float | None) -> Query | Update | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()

    def _loop(self) -> None:
        while not self._stopping:
            try:
                first = self._next(self.heartbeat_s)
            except queue.Empty:
                self._ping()
                continue
            if first is None:
                break
            if isinstance(first, Update):
                self._run_update(first)
                continue
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                left = deadline - time.monotonic()
                try:
                    nxt = self._next(left if left > 0 else 0)
                except queue.Empty:
                    break
                if nxt is None:
                    self._stopping = True
                    break
                if isinstance(nxt, Update):  # the batch closes; the update runs right after it
                    self._held = nxt
                    break
                batch.append(nxt)
            self._run(batch)

    # ------------------------------------------------------------------------------ updates
    def _broadcast_and_apply(self, record: dict[str, Any]) -> int:
        """Every rank applies ``record`` (followers via one broadcast); the new generation.
        Checked first: a record the leader refuses reaches no rank."""
        self.catalog.check(record)  # type: ignore[union-attr]
        if self.fanout is not None:
            self.fanout.send({"op": "update", "record": record})
        generation = self.catalog.apply(record)  # type: ignore[union-attr]
        self.preparer.assign_ids(record)  # type: ignore[union-attr]
        return generation

    def _run_update(self, job: Update) -> None:
        if not self.healthy:
            job.future.set_exception(ShardUnavailable(self.failure))
            return
        try:
            record = job.prepare(self.preparer)  # type: ignore[arg-type]
        except Exception as err:  # noqa: BLE001 - refused before any rank wrote anything
            job.future.set_exception(err)
            return
        try:
            generation = self._broadcast_and_apply(record)
        except FanoutError as err:
            job.future.set_exception(ShardUnavailable(str(err)))
            return
        except Exception as err:  # noqa: BLE001 - checked already: a bug; the ranks may differ now
            log.exception("update failed after validation; marking the replica not ready")
            self.ready = False
            job.future.set_exception(err)
            return
        seq = 0
        if self.log is not None:
            try:
                seq = self.log.append([record])[0]
            except Exception as err:  # noqa: BLE001 - applied but not durable: drain traffic
                log.exception("update log append failed; marking the replica not ready")
                self.ready = False
                job.future.set_exception(err)
                return
        if self.metrics is not None:
            self.metrics.updates.labels(record["op"]).inc()
        job.future.set_result(({**record, "seq": seq}, seq, generation))

    def _ping(self) -> None:
        if self.fanout is None or not self.healthy:
            return
        try:
            self.fanout.send({"op": "ping"})
        except FanoutError as err:
            log.error("%s", err)

    def _run(self, batch: list[Query]) -> None:
        if not self.healthy:
            for q in batch:
                q.future.set_exception(ShardUnavailable(self.failure))
            return
        groups: dict[tuple[int, int | None], list[Query]] = {}
        for q in batch:
            groups.setdefault((max(q.k, self.k_prime), q.nprobe), []).append(q)
        for (_, nprobe), group in groups.items():
            start = time.perf_counter()
            try:
                answers = self._run_group(group, nprobe)
            except (ShardPeerError, FanoutError) as err:
                for q in group:
                    q.future.set_exception(ShardUnavailable(str(err)))
                continue
            except ValueError as err:  # validated already: a request the model still refused
                for q in group:
                    q.future.set_exception(BadRequest(str(err)))
                continue
            for q, a in zip(group, answers):
                q.future.set_result(a)
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(group))
                self.metrics.batch_seconds.observe(time.perf_counter() - start)

    def _run_group(self, group: list[Query], nprobe: int | None) -> list[dict[str, Any]]:
        kmax = max(q.k for q in group)
        filters = [q.filter for q in group] if any(q.filter for q in group) else None
        weights = None
        if any(q.weights is not None for q in group):
            default = self.model.value_model.weights.tolist()
            weights = [q.weights or default for q in group]
        msg = {"op": "retrieve", "users": [q.users for q in group], "k": kmax, "filters": filters,
               "weights": weights, "nprobe": nprobe}
        plan = self.model.compile_filters(filters, len(group))  # before the fan-out: bad -> nobody runs
        if self.fanout is not None:
            self.fanout.send(msg)
        res = execute(self.part, msg, plan)
        ids, scores = res.ids.tolist(), res.scores.tolist()
        tasks, ann = res.task_scores.tolist(), res.retrieval_scores.tolist()
        raw, titles = self.ids.raw, self.ids.titles
        out = []
        for j, q in enumerate(group):
            items = []
            for r in range(q.k):
                item = ids[j][r]
                if item < 0:
                    break
                items.append({"id": raw[item] if item < len(raw) else str(item),
                              "title": titles[item] if item < len(titles) else "",
                              "score": scores[j][r], "task_scores": dict(zip(self.tasks, tasks[j][r])),
                              "retrieval_score": ann[j][r]})
            warnings = list(plan.warnings[j]) if plan is not None and plan.warnings else []
            out.append({"items": items, "version": self.part.version, "generation": self.model.generation,
                        "warnings": [str(w) for w in warnings]})
        return out
