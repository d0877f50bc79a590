"""The model-owner thread: micro-batches queries, applies updates between batches, swaps in
compactions and new artifacts.

Consistency model: ONE thread touches the model. It takes jobs from a FIFO queue:

- a query job opens a batch; further queries join it until ``max_batch_size`` or ``max_wait_ms``
  after the first, or until a non-query job is next in line (it runs right after the batch);
- update jobs (upsert / delete / patch) run back to back: each is validated, applied, and its
  record appended to the update log; one fsync covers the run, then every caller is answered
  (group commit). A response therefore means "durable and visible": a query sent after it queues
  behind it and sees it (read-after-write), and no query ever runs between an update's write and
  its fsync, so no answer reflects an update that a crash could lose;
- every batch runs between jobs, so each answer reads exactly one index generation.

Compaction runs ``compact_state`` on a snapshot of the state in a background thread and writes it
to disk; the owner thread then loads the compacted state, re-applies the updates that arrived
meanwhile (kept in memory, the same records as the log) and trims the log — queries wait only for
that swap. A hot swap loads and replays the new artifact in a background thread, then the owner
thread switches ``served`` between two batches.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from serve.config import ServeConfig
from serve.metrics import Metrics
from serve.served import Query, Served
from serve.snapshot import write_snapshot
from silvertorch.catalog import CatalogUpdater, compact_state

__all__ = ["Engine"]

log = logging.getLogger("silvertorch.serve")


@dataclass
class _QueryJob:
    """A query; answered through ``future`` (a thread-safe Future), or, when ``loop`` is set,
    through the asyncio future ``waiter`` of that event loop (one hand-off per batch and loop)."""

    query: Query
    as_json: bool = False
    future: Future | None = None
    loop: asyncio.AbstractEventLoop | None = None
    waiter: asyncio.Future | None = None

    def done(self) -> bool:
        return self.future.done() if self.future is not None else False


@dataclass
class _UpdateJob:
    """``prepare(served) -> record``; the record is applied then logged."""

    prepare: Callable[[Served], dict[str, Any]]
    future: Future = field(default_factory=Future)


@dataclass
class _CallJob:
    """Any function of the served state, run on the owner thread (compaction, swap, stats)."""

    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


def _settle(answers: list[tuple[_QueryJob, Any, BaseException | None]]) -> None:
    """On an event loop: resolve the asyncio futures of ``answers`` (a cancelled one is skipped:
    its client went away)."""
    for job, result, error in answers:
        if job.waiter is None or job.waiter.done():
            continue
        if error is not None:
            job.waiter.set_exception(error)
        else:
            job.waiter.set_result(result)


def _answer(answers: list[tuple[_QueryJob, Any, BaseException | None]]) -> None:
    """Answer query jobs: thread-safe Futures at once; asyncio futures with ONE
    ``call_soon_threadsafe`` per event loop (one loop wake-up per batch, not one per query)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_QueryJob, Any, BaseException | None]]] = {}
    for job, result, error in answers:
        if job.future is not None:
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
        elif job.loop is not None:
            by_loop.setdefault(job.loop, []).append((job, result, error))
    for loop, part in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, part)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


class Engine:
    """Owns ``served`` (see the module docstring). Thread-safe entry points return Futures."""

    def __init__(self, served: Served, config: ServeConfig, metrics: Metrics) -> None:
        self.served = served
        self.config = config
        self.metrics = metrics
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self.compacting = False
        self.last_compaction_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="silvertorch-model-owner", daemon=True)
        self.ready = False

    def start(self) -> None:
        self._refresh_gauges()
        self._thread.start()
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        self._stop.set()
        self._queue.put(_CallJob(lambda: None))
        self._thread.join(timeout=30)
        self.served.close()

    # ------------------------------------------------------------------------ entry points
    def query(self, query: Query, as_json: bool = False) -> Future:
        """Future of the answer: a dict, or its JSON bytes when ``as_json``
        (:meth:`serve.served.Served.run_queries`)."""
        job = _QueryJob(query, as_json, future=Future())
        self._queue.put(job)
        return job.future

    def query_async(self, query: Query, as_json: bool = True) -> asyncio.Future:
        """As :meth:`query`, from a coroutine of the running event loop: an asyncio future that the
        owner thread resolves for a whole batch with one ``call_soon_threadsafe``."""
        loop = asyncio.get_running_loop()
        job = _QueryJob(query, as_json, loop=loop, waiter=loop.create_future())
        self._queue.put(job)
        return job.waiter

    def update(self, prepare: Callable[[Served], dict[str, Any]]) -> Future:
        """Future of ``(record, seq, generation)`` once applied and durable."""
        job = _UpdateJob(prepare)
        self._queue.put(job)
        return job.future

    def call(self, fn: Callable[[], Any]) -> Future:
        job = _CallJob(fn)
        self._queue.put(job)
        return job.future

    # ------------------------------------------------------------------------ owner thread
    def _loop(self) -> None:
        torch.set_num_threads(self.config.threads)
        wait = self.config.max_wait_ms / 1000.0
        pending = None
        while not self._stop.is_set():
            job = pending if pending is not None else self._queue.get()
            pending = None
            inflight: list[Any] = [job]
            try:
                if isinstance(job, _QueryJob):
                    batch = inflight
                    deadline = time.monotonic() + wait
                    while len(batch) < self.config.max_batch_size:
                        left = deadline - time.monotonic()
                        try:
                            nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if isinstance(nxt, _QueryJob):
                            batch.append(nxt)
                        else:
                            pending = nxt
                            break
                    self._run_batch(batch)
                elif isinstance(job, _UpdateJob):
                    run = inflight
                    while True:  # group commit: consecutive updates share one fsync
                        try:
                            nxt = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if isinstance(nxt, _UpdateJob) and len(run) < 256:
                            run.append(nxt)
                        else:
                            pending = nxt
                            break
                    self._run_updates(run)
                else:
                    self._run_call(job)
            except BaseException as err:  # noqa: BLE001 - the owner thread must never die
                log.exception("model-owner thread: unexpected error")
                queries = [j for j in inflight if isinstance(j, _QueryJob)]
                _answer([(j, None, err) for j in queries if not j.done()])
                for j in inflight:
                    if not isinstance(j, _QueryJob) and not j.future.done():
                        j.future.set_exception(err)

    def _run_batch(self, batch: list[_QueryJob]) -> None:
        start = time.perf_counter()
        try:
            results = self.served.run_queries([j.query for j in batch], [j.as_json for j in batch])
        except Exception:  # noqa: BLE001 - isolate the failing row: answer the others
            log.exception("batch of %d failed; answering row by row", len(batch))
            answers: list[tuple[_QueryJob, Any, BaseException | None]] = []
            for j in batch:
                try:
                    answers.append((j, self.served.run_queries([j.query], j.as_json)[0], None))
                except Exception as err:  # noqa: BLE001
                    answers.append((j, None, err))
            _answer(answers)
            return
        _answer([(j, r, None) for j, r in zip(batch, results)])
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_seconds.observe(time.perf_counter() - start)

    def _run_updates(self, run: list[_UpdateJob]) -> None:
        served = self.served
        done: list[tuple[_UpdateJob, dict[str, Any]]] = []
        for job in run:
            try:
                record = job.prepare(served)
                served.apply_checked(record)
            except Exception as err:  # noqa: BLE001 - refused: nothing written, caller told
                job.future.set_exception(err)
                continue
            done.append((job, record))
        if not done:
            return
        try:
            seqs = served.log.append([r for _, r in done])
        except Exception as err:  # noqa: BLE001 - disk failure: callers get 500, state is suspect
            # the updates are applied but not durable: stop advertising readiness (/readyz 503) so
            # traffic drains; a restart replays what the log holds
            log.exception("update log append failed; marking the server not ready")
            self.ready = False
            for job, _ in done:
                job.future.set_exception(err)
            return
        for (job, record), seq in zip(done, seqs):
            record["seq"] = seq
            if self.compacting:  # re-applied on top of the compacted state when it swaps in
                served.tail.append(record)
            self.metrics.updates.labels(record["op"]).inc()
        generation = served.generation
        for (job, record), seq in zip(done, seqs):
            job.future.set_result((record, seq, generation))
        self._refresh_gauges()
        threshold = self.config.compaction_threshold
        if threshold and not self.compacting and (
                served.stats().get("fresh_items", 0) >= threshold
                or served.log.last_seq - served.snapshot_seq >= threshold):  # also bounds the log
            self.start_compaction()

    def _run_call(self, job: _CallJob) -> None:
        try:
            job.future.set_result(job.fn())
        except Exception as err:  # noqa: BLE001
            job.future.set_exception(err)

    def _refresh_gauges(self) -> None:
        try:
            self.metrics.set_index({**self.served.stats(), "generation": self.served.generation})
        except Exception:  # noqa: BLE001 - metrics never break serving
            log.exception("stats failed")

    # --------------------------------------------------------------------------- compaction
    def start_compaction(self) -> bool:
        """On the owner thread: snapshot the state and compact it in the background. False when
        one is already running."""
        if self.compacting:
            return False
        served = self.served
        snapshot = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                    for k, v in served.model.state_dict().items()}
        seq0 = served.log.last_seq
        ids0 = served.ids.to_state()
        served.tail = []  # the records after seq0 collect here until the swap
        self.compacting = True

        def work() -> None:
            try:
                new_state = compact_state(snapshot)
                write_snapshot(served.dir / "snapshot.pt", served.version, seq0, new_state, ids0)
            except Exception as err:  # noqa: BLE001
                log.exception("compaction failed")
                self.last_compaction_error = f"{type(err).__name__}: {err}"
                self.call(self._compaction_failed)
                return
            self.call(lambda: self._finish_compaction(served, new_state, seq0))

        threading.Thread(target=work, name="silvertorch-compaction", daemon=True).start()
        return True

    def _compaction_failed(self) -> None:
        self.compacting = False

    def _finish_compaction(self, served: Served, new_state: dict[str, Any], seq0: int) -> None:
        """On the owner thread: swap the compacted state in and re-apply what came after ``seq0``."""
        self.compacting = False
        if served is not self.served:  # the artifact was swapped meanwhile: nothing to do
            return
        later = list(served.tail)  # every record after seq0, in order
        generation = served.generation
        served.model.load_state_dict(new_state)
        served.updater = CatalogUpdater(served.model)
        for record in later:
            served.apply_record(record)
        served.tail = []
        served.snapshot_seq = seq0
        served.log.truncate_through(seq0, later)
        self.last_compaction_error = None
        self.metrics.compactions.inc()
        log.info("compaction swapped in (generation %d -> %d, %d updates re-applied)",
                 generation, served.generation, len(later))
        self._refresh_gauges()

    # ------------------------------------------------------------------------------ swap
    def swap(self, new: Served) -> str:
        """On the owner thread: serve ``new`` from the next batch on; returns the old version."""
        old = self.served
        self.served = new
        old.close()
        self._refresh_gauges()
        return old.version
