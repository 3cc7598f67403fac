"""The API replica's side of scale-out (`magi-server api`): no model and no engine here; the queue lives in the
PostgreSQL job store, GPU workers (`magi-server worker`, serving/worker.py) claim from it, and what they report
comes back by LISTEN/NOTIFY.

* :class:`SharedQueue` stands where `serve`'s engine stands for the HTTP layer (``ctx.engine``): it admits while the
  replica is not draining, keeps no slots of its own (the queue bound is the store's, checked in the insert's own
  transaction: ``ServerContext.store_queue_bound``), and answers queue depth and positions from the store. A submit
  or a cancel needs no hand-over: the store's insert and its cancel notify the workers themselves.
* :class:`StoreEventBridge` turns the store's notifications into this replica's :class:`EventHub` events, so SSE
  streams and sync requests on any replica hear every job's status, progress and chunks; and, every tick, it re-reads
  the jobs someone here is waiting on, so a notification lost while the listening connection was down (they are not
  queued for an absent listener) costs a second of delay, never a stuck stream.
* :class:`LeaseSweeper`: every replica and worker runs one; it re-queues (or fails, past max attempts) the jobs
  whose worker stopped renewing its lease. The store makes concurrent sweeps safe (SKIP LOCKED).

Torch-free: this is the HTTP layer.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from magi_server.serving.events import EventHub
from magi_server.serving.jobs import JobStatus, JobStoreError

log = logging.getLogger("magi_server.serving.cluster")


class SharedQueue:
    """The engine as an API replica sees it (see the module docstring). Nothing runs in this process, so
    :attr:`running_count` is 0 and a drain has nothing to wait for; queue depth and running jobs are read from the
    store at most once per ``cache_s`` (metrics and /health/ready poll them)."""

    dead_reason: str | None = None

    def __init__(self, store, *, retry_after_s: float = 10.0, cache_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.retry_after_s = retry_after_s
        self._cache_s = cache_s
        self._clock = clock
        self._draining = threading.Event()
        self._depth: tuple[float, int] | None = None
        self._store_ok: tuple[float, bool] | None = None

    # the engine's admission interface (serving.common.admitted)
    def accepting(self) -> bool:
        return not self._draining.is_set()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def drain(self) -> None:
        self._draining.set()

    def try_reserve(self) -> None:
        """No slot to hold here: the store refuses the insert past the bound (QueueFull)."""

    def unreserve(self) -> None:
        pass

    def submit(self, job_id: str, params, *, reserved: bool, timeout_s: float | None = None) -> None:
        """Nothing to hand over: the insert notified the workers."""

    def cancel(self, job_id: str) -> None:
        """Nothing to hand over: the store's cancel notified the worker running it."""

    def stop(self, timeout: float = 10.0) -> None:
        pass

    # what health, metrics and the fal status read
    def alive(self, max_silence_s: float = 60.0) -> bool:
        """The job store answers (this replica's readiness: without it no submit can be stored)."""
        now = self._clock()
        if self._store_ok is None or now - self._store_ok[0] > self._cache_s:
            try:
                self.store.queue_depth()
                ok = True
            except JobStoreError:
                ok = False
            self._store_ok = (now, ok)
        return self._store_ok[1]

    @property
    def queue_depth(self) -> int:
        now = self._clock()
        if self._depth is None or now - self._depth[0] > self._cache_s:
            try:
                self._depth = (now, self.store.queue_depth())
            except JobStoreError:
                return self._depth[1] if self._depth else 0
        return self._depth[1]

    @property
    def running_count(self) -> int:
        return 0  # jobs run on the workers

    def queue_position(self, job_id: str) -> int | None:
        try:
            return self.store.queue_position(job_id)
        except JobStoreError:
            return None


class StoreEventBridge:
    """Store notifications -> this replica's hub (see the module docstring). ``on_message`` and ``on_tick`` are the
    :class:`~magi_server.serving.jobs_postgres.StoreListener`'s callbacks."""

    def __init__(self, store, hub: EventHub) -> None:
        self.store = store
        self.hub = hub

    def on_message(self, message: dict) -> None:
        job_id, kind = message.get("id"), message.get("kind")
        if not isinstance(job_id, str):
            return
        if kind == "status":
            self._status(job_id, message.get("status"))
        elif kind in ("progress", "chunk"):
            data = {k: v for k, v in message.items() if k not in ("id", "kind")}
            self.hub.publish(job_id, kind, **data)

    def on_tick(self) -> None:
        """Re-read the jobs someone here waits on: a status or progress the notifications missed is published."""
        for job_id in self.hub.watched():
            try:
                job = self.store.get(job_id)
            except JobStoreError:
                return  # the store is down too: the next tick tries again
            if job is None:
                continue
            if job.status is JobStatus.RUNNING and job.progress_total:
                last = self.hub.last(job_id, "progress")
                if last is None or last.data.get("chunks_done") != job.progress_done:
                    self.hub.publish(job_id, "progress", chunks_done=job.progress_done,
                                     chunks_total=job.progress_total)
            self._status(job_id, job.status.value)

    def _status(self, job_id: str, status) -> None:
        try:
            status = JobStatus(status)
        except ValueError:
            return
        last = self.hub.last(job_id, "status")
        if last is None or last.data["status"] is not status:  # the local submit or cancel may have said it already
            self.hub.publish(job_id, "status", status=status)


class LeaseSweeper:
    """Calls the store's :meth:`requeue_expired_leases` at most every ``every_s`` (from a listener's tick)."""

    def __init__(self, store, *, max_attempts: int, every_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.max_attempts = max_attempts
        self.every_s = every_s
        self._clock = clock
        self._last = float("-inf")

    def maybe_sweep(self) -> tuple[list[str], list[str]]:
        now = self._clock()
        if now - self._last < self.every_s:
            return [], []
        self._last = now
        try:
            requeued, failed = self.store.requeue_expired_leases(self.max_attempts)
        except JobStoreError as exc:
            log.warning("lease sweep skipped: %s", exc)
            return [], []
        if requeued or failed:
            log.warning("jobs whose worker stopped renewing its lease: %d re-queued, %d failed as interrupted",
                        len(requeued), len(failed), extra={"requeued": requeued, "failed": failed})
        return requeued, failed
