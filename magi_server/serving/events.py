"""Job events: from the engine thread to the durable job record, the metrics and the clients that wait.

:func:`on_engine_event` is the engine's only listener: it writes each event to the job store, counts it, and
publishes it to the :class:`EventHub`, which keeps a short per-job history for streaming clients.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from magi_server.engine.loop import EngineEvent
from magi_server.serving.jobs import JobStatus

if TYPE_CHECKING:
    from magi_server.serving.common import ServerContext

log = logging.getLogger("magi_server.serving.events")


class EventHub:
    """Per-job event history for streaming clients. The engine thread publishes; SSE handlers poll."""

    def __init__(self, max_events_per_job: int = 1000, max_jobs: int = 10_000) -> None:
        self._events: dict[str, deque] = {}
        self._lock = threading.Lock()
        self._max_events = max_events_per_job
        self._max_jobs = max_jobs

    def publish(self, job_id: str, event: dict) -> None:
        with self._lock:
            if job_id not in self._events and len(self._events) >= self._max_jobs:
                self._events.pop(next(iter(self._events)))  # forget the oldest job's stream
            self._events.setdefault(job_id, deque(maxlen=self._max_events)).append({**event, "ts": time.time()})

    def since(self, job_id: str, index: int) -> list[dict]:
        with self._lock:
            events = self._events.get(job_id)
            return list(events)[index:] if events else []


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
        store.mark_running(job_id)
        hub.publish(job_id, {"event": "status", "status": "processing"})
    elif event.kind == "progress":
        store.update_progress(job_id, event.chunks_done, event.chunks_total)
        hub.publish(job_id, {"event": "progress", "chunks_done": event.chunks_done, "chunks_total": event.chunks_total})
    elif event.kind == "chunk":
        store.update_progress(job_id, event.chunks_done, event.chunks_total)
        payload = {"event": "chunk", "index": event.chunk_index, "chunks_done": event.chunks_done,
                   "chunks_total": event.chunks_total, "frames": event.num_frames}
        if event.preview:
            payload["url"] = ctx.file_url(event.preview)
        hub.publish(job_id, {"event": "progress", "chunks_done": event.chunks_done, "chunks_total": event.chunks_total})
        hub.publish(job_id, payload)
    elif event.kind in ("finished", "failed", "cancelled"):
        # The engine reports every job's end exactly once; the row may already be final because an API cancel
        # wrote it first (the engine stops such a job at its next safe point, or it had just finished). Count the
        # ending the row holds, so a cancel made through an API is counted too, once.
        if event.kind == "finished":
            job = store.complete(job_id, [event.output], event.inference_ms)
            if job is not None and metrics is not None:
                metrics.observe("magi_generation_seconds", (event.inference_ms or 0) / 1000.0)
        elif event.kind == "cancelled":
            job = store.cancel(job_id)
        else:
            job = store.fail(job_id, event.error, event.error_code)
        if job is None:
            job = store.get(job_id)
            if job is not None and job.status is JobStatus.CANCELLED and event.output:
                # cancelled while its last call ran: the client was told "cancelled", so no output may appear
                (ctx.outputs_dir / event.output).unlink(missing_ok=True)
        if job is not None and job.is_terminal and metrics is not None:
            metrics.inc("magi_jobs_finished_total", {"outcome": job.status.value})
