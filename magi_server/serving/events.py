"""Job events: from the engine thread to the durable job record, the metrics and the clients that wait.

:func:`on_engine_event` is the engine's only listener: it writes each event to the job store, counts it, and
publishes it to the :class:`EventHub`. The hub keeps a short, numbered history per job in provider-neutral terms
(a status is a :class:`JobStatus`; each adapter maps it to its own words) and hands every new event straight to the
asyncio tasks waiting for that job (SSE streams, sync-mode requests) on their own loops, so no waiter polls the
store. :func:`wait_for_terminal` is that wait for a job's end.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from magi_server.engine.loop import EngineEvent
from magi_server.serving.jobs import TERMINAL, Job, JobStatus

if TYPE_CHECKING:
    from magi_server.serving.common import ServerContext

log = logging.getLogger("magi_server.serving.events")


@dataclass(frozen=True)
class JobEvent:
    """One event of one job. ``id`` counts up from 1 per job (a stream's ``id:``, resumable by Last-Event-ID).

    ``kind`` and ``data``: "status" (``status``: a JobStatus), "progress" (``chunks_done``, ``chunks_total``) or
    "chunk" (``index``, ``chunks_done``, ``chunks_total``, ``frames``, and ``preview``: the file name of the chunk's
    frames when they were written)."""

    id: int
    kind: str
    data: dict
    ts: float = field(default_factory=time.time)  # wall-clock time of publication

    @property
    def ends_job(self) -> bool:
        return self.kind == "status" and self.data["status"] in TERMINAL


_Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Future]


@dataclass(eq=False)
class _JobEvents:
    """One job's history and the futures of the tasks waiting for its next event."""

    history: deque[JobEvent]
    next_id: int = 1
    waiters: list[_Waiter] = field(default_factory=list)
    ended: bool = False

    def after(self, event_id: int) -> list[JobEvent]:
        return [e for e in self.history if e.id > event_id]


def _wake(waiters: list[_Waiter]) -> None:
    for loop, future in waiters:
        try:
            loop.call_soon_threadsafe(_resolve, future)
        except RuntimeError:  # that loop has closed, and its waiter with it
            pass


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class EventHub:
    """Per-job event histories and hand-offs: any thread publishes, asyncio tasks :meth:`wait`.

    Bounded: a job keeps its last ``max_events_per_job`` events; an ended job's history is dropped
    ``keep_ended_s`` after its end; at ``max_jobs`` jobs the longest-ended one goes, else the oldest."""

    def __init__(self, max_events_per_job: int = 1000, max_jobs: int = 10_000, keep_ended_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._jobs: dict[str, _JobEvents] = {}  # in order of first event: the oldest first
        self._ended: deque[tuple[float, str]] = deque()  # (when, job id) in order of ending
        self._lock = threading.Lock()
        self._max_events = max_events_per_job
        self._max_jobs = max_jobs
        self._keep_ended_s = keep_ended_s
        self._clock = clock

    def publish(self, job_id: str, kind: str, **data) -> JobEvent | None:
        """Record an event and wake the job's waiters. Nothing follows a job's end: later events are dropped (None)."""
        with self._lock:
            job = self._job(job_id)
            if job.ended:
                return None
            event = JobEvent(job.next_id, kind, data)
            job.next_id += 1
            job.history.append(event)
            if event.ends_job:
                job.ended = True
                self._ended.append((self._clock(), job_id))
            waiters, job.waiters = job.waiters, []
        _wake(waiters)
        return event

    def since(self, job_id: str, after: int = 0) -> list[JobEvent]:
        """The job's kept events with an id above ``after``, oldest first."""
        with self._lock:
            job = self._jobs.get(job_id)
            return job.after(after) if job else []

    async def wait(self, job_id: str, after: int, timeout_s: float) -> list[JobEvent]:
        """:meth:`since`, waiting up to ``timeout_s`` for the next event when there is none yet ([] on timeout)."""
        loop = asyncio.get_running_loop()
        waiter = (loop, loop.create_future())
        with self._lock:
            job = self._job(job_id)
            ready = job.after(after)
            if ready:
                return ready
            job.waiters.append(waiter)
        try:
            await asyncio.wait((waiter[1],), timeout=timeout_s)
        finally:
            with self._lock:
                if waiter in job.waiters:  # timed out or cancelled: nobody will resolve it
                    job.waiters.remove(waiter)
        return self.since(job_id, after)

    def _job(self, job_id: str) -> _JobEvents:
        """The job's entry, made (and room made for it) on first use. Call with the lock held."""
        job = self._jobs.get(job_id)
        if job is None:
            expired = self._clock() - self._keep_ended_s
            while self._ended and (self._ended[0][0] <= expired or len(self._jobs) >= self._max_jobs):
                self._jobs.pop(self._ended.popleft()[1], None)
            if len(self._jobs) >= self._max_jobs:  # every kept job is live: the oldest goes, its waiters find nothing
                _wake(self._jobs.pop(next(iter(self._jobs))).waiters)
            job = self._jobs[job_id] = _JobEvents(deque(maxlen=self._max_events))
        return job


async def wait_for_terminal(ctx: "ServerContext", job_id: str, timeout_s: float) -> Job | None:
    """The job once it has ended, or as it stands when ``timeout_s`` runs out (None: no such job).

    Reads the store once before waiting and once when the hub hands over the job's end: the engine thread writes
    the store before it publishes, so an end that comes between the two reads is still seen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    seen = ctx.hub.since(job_id)
    after = seen[-1].id if seen else 0
    job = ctx.store.get(job_id)
    while job is not None and not job.is_terminal:
        left = deadline - loop.time()
        if left <= 0:
            break
        events = await ctx.hub.wait(job_id, after, left)
        if events:
            after = events[-1].id
            if events[-1].ends_job:
                job = ctx.store.get(job_id)
    return job


def on_engine_event(ctx: "ServerContext", event: EngineEvent) -> None:
    """Engine thread -> durable job record, SSE hub and metrics (the engine never touches the store itself)."""
    store, hub, metrics = ctx.store, ctx.hub, ctx.metrics
    job_id = event.job_id
    if event.kind != "progress":
        level = logging.WARNING if event.kind == "failed" else logging.INFO
        detail = f" ({event.error_code}: {event.error[:200]})" if event.error else ""
        log.log(level, "job %s %s%s", job_id, event.kind, detail,
                extra={"job_id": job_id, "event": event.kind, "error_code": event.error_code or None})
    if event.kind == "started":
        if store.mark_running(job_id) is not None:  # else an API cancel ended it first: it never runs
            hub.publish(job_id, "status", status=JobStatus.RUNNING)
    elif event.kind in ("progress", "chunk"):
        store.update_progress(job_id, event.chunks_done, event.chunks_total)
        hub.publish(job_id, "progress", chunks_done=event.chunks_done, chunks_total=event.chunks_total)
        if event.kind == "chunk":
            hub.publish(job_id, "chunk", index=event.chunk_index, chunks_done=event.chunks_done,
                        chunks_total=event.chunks_total, frames=event.num_frames, preview=event.preview)
    elif event.kind in ("finished", "failed", "cancelled"):
        # The engine reports every job's end exactly once; the row may already be final because an API cancel
        # wrote it first (the engine stops such a job at its next safe point, or it had just finished). Count the
        # ending the row holds, so a cancel made through an API is counted too, once.
        if event.kind == "finished":
            job = store.complete(job_id, [event.output], event.inference_ms)
            if job is not None and metrics is not None:
                metrics.generation_seconds.observe((event.inference_ms or 0) / 1000.0)
        elif event.kind == "cancelled":
            job = store.cancel(job_id)
        else:
            job = store.fail(job_id, event.error, event.error_code, event.error_param)
        if job is None:
            job = store.get(job_id)
            if job is not None and job.status is JobStatus.CANCELLED and event.output:
                # cancelled while its last call ran: the client was told "cancelled", so no output may appear
                (ctx.outputs_dir / event.output).unlink(missing_ok=True)
        if job is not None and job.is_terminal:
            hub.publish(job_id, "status", status=job.status)  # wakes the job's waiters; the row is final already
        if job is not None and job.is_terminal and metrics is not None:
            metrics.jobs_finished.labels(outcome=job.status.value).inc()
