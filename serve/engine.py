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
    query: Query
    future: Future = field(default_factory=Future)


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
    def query(self, query: Query) -> Future:
        job = _QueryJob(query)
        self._queue.put(job)
        return job.future

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
                for j in inflight:
                    if not j.future.done():
                        j.future.set_exception(err)

    def _run_batch(self, batch: list[_QueryJob]) -> None:
        start = time.perf_counter()
        try:
            results = self.served.run_queries([j.query for j in batch])
        except Exception:  # noqa: BLE001 - isolate the failing row: answer the others
            log.exception("batch of %d failed; answering row by row", len(batch))
            for j in batch:
                try:
                    j.future.set_result(self.served.run_queries([j.query])[0])
                except Exception as err:  # noqa: BLE001
                    j.future.set_exception(err)
            return
        for j, r in zip(batch, results):
            j.future.set_result(r)
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
