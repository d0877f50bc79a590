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

Compaction and hot swap (:mod:`.admin`) are jobs of the same queue too: the leader broadcasts
``{"op": "compact", "seq"}`` or ``{"op": "swap_prepare", ...}``, every rank does its part, the ranks
vote over the process group, and all of them switch (or all keep the old state) before the next
batch is fanned out: no answer ever mixes old and new shards.
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
from serve.update_log import LogError, UpdateLog
from silvertorch.distributed.sharded_retrieval import ShardPeerError
from silvertorch.export import encode_user_features
from silvertorch.export_sharded import ShardedPart
from silvertorch.index.expr import FilterSyntaxError, parse

from . import admin
from .admin import RankState
from .catalog import ShardCatalog
from .fanout import Fanout, FanoutError
from .updates import UpdatePreparer

__all__ = ["ShardUnavailable", "BadRequest", "Leader", "Update", "Call", "execute"]

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


@dataclass
class Call:
    """An admin job (compaction, hot swap) run on the owner thread: ``fn() -> result``."""

    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


class Leader:
    """See the module doc. ``fanout`` None = a world of one rank (nothing to broadcast).

    ``state_dir``: this replica's state root (the log and snapshots live in its per-version
    sub-directory); ``rank_state``: this rank's state when a snapshot was loaded at start-up;
    ``world_size`` / ``rank`` / ``group`` / ``timeout_s``: for loading a new artifact's part."""

    def __init__(self, part: ShardedPart, fanout: Fanout | None, *, max_batch_size: int = 64,
                 max_wait_ms: float = 2.0, max_k: int = 1000, heartbeat_s: float = 5.0,
                 metrics: Any = None, catalog: ShardCatalog | None = None,
                 state_dir: str | Path | None = None, rank_state: RankState | None = None,
                 world_size: int | None = None, rank: int = 0, group: Any = None,
                 timeout_s: float = 30.0, compaction_threshold: int = 0) -> None:
        self.fanout, self.metrics = fanout, metrics
        # compact automatically once this many new items or log records came since the last
        # snapshot (0 = only on POST /v1/admin/compact)
        self.compaction_threshold = int(compaction_threshold)
        self.new_items = 0
        self.max_k_flag = int(max_k)
        self.max_batch_size, self.max_wait_s = int(max_batch_size), float(max_wait_ms) / 1000.0
        self.heartbeat_s = float(heartbeat_s)
        self.state_root = Path(state_dir) if state_dir is not None and catalog is not None else None
        self.world_size = int(world_size or part.manifest["shards"])
        self.rank, self.group, self.timeout_s = int(rank), group, float(timeout_s)
        rs = rank_state or RankState(part, catalog)
        rs.catalog = catalog
        log = None
        if self.state_root is not None:
            log = UpdateLog(state_dir_for(self.state_root, part.version) / "log.jsonl", part.version)
        self._adopt(rs, log)
        self.replayed = 0
        self.compactions = 0
        self._queue: queue.Queue[Query | Update | Call | None] = queue.Queue()
        self._held: Query | Update | Call | None = None  # a job that closed a query batch
        self._thread = threading.Thread(target=self._loop, name="sharded-leader", daemon=True)
        self._stopping = False
        self.ready = False

    def _adopt(self, rs: RankState, log: UpdateLog | None) -> None:
        """Serve ``rs`` (its part, catalog and snapshot) with update log ``log`` from now on."""
        part = rs.part
        self.rs, self.part, self.model = rs, part, part.model
        self.max_k = min(self.max_k_flag, int(self.model.config.max_k))
        self.k_prime = int(self.model.config.k_prime)
        self.tasks = list(self.model.overarch.tasks)
        self.ids = (ItemIds.from_state(rs.ids_state) if rs.ids_state
                    else ItemIds(part.item_raw_ids, part.item_titles or None))
        # updates: the catalog (owner map) and the durable log; None = a read-only replica
        self.catalog = rs.catalog
        self.preparer = UpdatePreparer(part, rs.catalog, self.ids) if rs.catalog is not None else None
        self.log = log
        self.new_items = 0
        if log is not None:  # a log truncated by a compaction restarts numbering after the snapshot
            log.last_seq = max(log.last_seq, rs.snapshot_seq)

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
        records = [r for r in self.log.replayed if int(r["seq"]) > self.rs.snapshot_seq]
        for record in records:
            self._broadcast_and_apply(record)
        self.replayed = len(records)
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
            if isinstance(first, Call):
                self._run_call(first)
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
                if isinstance(nxt, (Update, Call)):  # the batch closes; the job runs right after it
                    self._held = nxt
                    break
                batch.append(nxt)
            self._run(batch)

    # ------------------------------------------------------------------------------ updates
    def _broadcast_and_apply(self, record: dict[str, Any], catalog: ShardCatalog | None = None,
                             preparer: UpdatePreparer | None = None) -> int:
        """Every rank applies ``record`` (followers via one broadcast); the new generation.
        Checked first: a record the leader refuses reaches no rank. ``catalog`` / ``preparer``:
        a staged (hot swap) catalog instead of the served one."""
        staged = catalog is not None
        catalog = catalog or self.catalog
        preparer = preparer or self.preparer
        catalog.check(record)  # type: ignore[union-attr]
        if self.fanout is not None:
            self.fanout.send({"op": "update", "record": record, "staged": staged})
        generation = catalog.apply(record)  # type: ignore[union-attr]
        preparer.assign_ids(record)  # type: ignore[union-attr]
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
        fresh = sum(1 for r in record["items"] if not self.catalog.is_live(int(r["id"]))) \
            if record["op"] == "upsert" else 0  # type: ignore[union-attr]
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
        self.new_items += fresh
        threshold = self.compaction_threshold
        if threshold and self.log is not None and (
                self.new_items >= threshold or self.log.last_seq - self.rs.snapshot_seq >= threshold):
            try:  # the caller is answered already; queries wait for this one compaction
                self._compact()
            except (ShardPeerError, FanoutError) as err:
                log.error("automatic compaction: %s", err)
            except Exception:  # noqa: BLE001 - refused: every rank kept its state; try again later
                log.exception("automatic compaction failed")

    # --------------------------------------------------------------------- compaction, swap
    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the owner thread between batches; the future resolves to its result."""
        job = Call(fn)
        if not self.healthy:
            job.future.set_exception(ShardUnavailable(self.failure))
        else:
            self._queue.put(job)
        return job.future

    def compact(self) -> Future:
        """Compact every rank's shard at the current log position (see :mod:`.admin`); the future
        resolves to ``{"started", "generation", "detail", "seq"}``."""
        return self.call(self._compact)

    def swap(self, path: str, plan: str | None = None) -> Future:
        """Hot swap to the sharded artifact at ``path`` on every rank at one batch boundary; the
        future resolves to ``{"version", "previous_version", "generation", "replayed"}`` or raises
        ``RequestError`` (400 refused naming the mismatch / 409 already served) with the old model
        still serving."""
        return self.call(lambda: self._swap(path, plan))

    def _run_call(self, job: Call) -> None:
        if not self.healthy:
            job.future.set_exception(ShardUnavailable(self.failure))
            return
        try:
            job.future.set_result(job.fn())
        except (ShardPeerError, FanoutError) as err:
            job.future.set_exception(ShardUnavailable(str(err)))
        except Exception as err:  # noqa: BLE001 - answered to the caller, the loop goes on
            job.future.set_exception(err)

    def _compact(self) -> dict[str, Any]:
        if self.catalog is None:
            raise RequestError(501, "compaction runs on CPU ranks that serve item updates; this "
                                    "replica serves none (--device cuda)")
        seq = self.log.last_seq if self.log is not None else 0
        gen = self.model.generation
        if self.fanout is not None:
            self.fanout.send({"op": "compact", "seq": seq})
        start = time.perf_counter()
        new, reason = admin.compact_shard(self.rs, seq, ids=self.ids.to_state())
        votes = admin.vote(self.model, new is not None, reason)
        if not admin.finish_compaction(self.rs, new, votes, seq):
            raise RequestError(500, f"compaction refused, every rank keeps its state: {admin.refusals(votes)}")
        if self.log is not None:
            try:  # the commit point of the snapshot set, then the log holds only what follows it
                admin.write_commit(self.rs.state_dir, seq)  # type: ignore[arg-type]
                self.log.truncate_through(seq, [])
                admin.prune_snapshots(self.rs.state_dir, self.part.shard, {seq})
            except Exception:  # noqa: BLE001 - compacted but not durable: drain traffic
                log.exception("snapshot commit failed; marking the replica not ready")
                self.ready = False
                raise
        self.compactions += 1
        self.new_items = 0
        if self.metrics is not None:
            self.metrics.compactions.inc()
        log.info("compaction at seq %d on %d rank(s) in %.2fs", seq, len(votes), time.perf_counter() - start)
        return {"started": True, "generation": gen, "seq": seq,
                "detail": f"compacted on all {len(votes)} rank(s) at log position {seq} (synchronously)"}

    def _swap(self, path: str, plan: str | None) -> dict[str, Any]:
        from silvertorch.export import ArtifactError
        from silvertorch.export_sharded import read_sharded_manifest, world_layout

        old = self.part
        still = f"still serving {old.version}"
        try:
            manifest = read_sharded_manifest(path)
            world_layout(self.world_size, manifest["shards"], manifest["replicas"])
        except (ArtifactError, ValueError) as err:
            raise RequestError(400, f"path: artifact refused, {still}: {err}") from None
        if manifest["shards"] != old.manifest["shards"]:
            raise RequestError(400, f"path: artifact refused, {still}: shards: the new artifact has "
                                    f"{manifest['shards']} shard(s) per replica, this job runs "
                                    f"{old.manifest['shards']}")
        if str(manifest.get("version_id")) == old.version:
            raise RequestError(409, f"path: artifact version {old.version} is already being served")
        new_log, seq = None, None
        if self.state_root is not None:
            sdir = state_dir_for(self.state_root, str(manifest["version_id"]))
            try:
                seq = admin.read_commit(sdir)
                new_log = UpdateLog(sdir / "log.jsonl", str(manifest["version_id"]))
            except LogError as err:
                raise RequestError(400, f"path: artifact refused, {still}: {err}") from None
        msg = {"op": "swap_prepare", "path": str(path), "plan": plan, "seq": seq}
        try:
            if self.fanout is not None:
                self.fanout.send(msg)
            staged, reason = admin.load_staged(self.rs, msg, rank=self.rank, world_size=self.world_size,
                                               group=self.group, timeout_s=self.timeout_s,
                                               state_root=self.state_root)
            votes = admin.vote(self.model, staged is not None, reason)
            if staged is None or not all(ok for ok, _ in votes):
                raise RequestError(400, f"path: artifact refused, {still}: {admin.refusals(votes)}")
            if self.catalog is not None:  # collective on the new model: every rank builds its own
                staged.catalog = admin.build_catalog(staged.part)
            ids = (ItemIds.from_state(staged.ids_state) if staged.ids_state
                   else ItemIds(staged.part.item_raw_ids, staged.part.item_titles or None))
            preparer = UpdatePreparer(staged.part, staged.catalog, ids) if staged.catalog is not None else None
            records = [] if new_log is None else [r for r in new_log.replayed if int(r["seq"]) > staged.snapshot_seq]
            try:
                for record in records:
                    self._broadcast_and_apply(record, staged.catalog, preparer)
            except (KeyError, ValueError, TypeError) as err:
                if self.fanout is not None:
                    self.fanout.send({"op": "swap_abort"})
                raise RequestError(400, f"path: artifact refused, {still}: its update log does not "
                                        f"replay ({type(err).__name__}: {err})") from None
            if self.fanout is not None:
                self.fanout.send({"op": "swap_commit"})
        except BaseException:
            if new_log is not None:
                new_log.close()
            raise
        old_log = self.log
        if new_log is not None:
            new_log.replayed = []
        staged.ids_state = ids.to_state()
        self._adopt(staged, new_log)
        if old_log is not None:
            old_log.close()
        self.replayed = len(records)
        if self.metrics is not None:
            self.metrics.swaps.labels("ok").inc()
        return {"version": self.part.version, "previous_version": old.version,
                "generation": self.model.generation, "replayed": len(records)}

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
