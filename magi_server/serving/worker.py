"""A GPU worker's link to the shared queue (`magi-server worker`): it claims jobs from the PostgreSQL job store for
its local engine, holds their leases, stops what was cancelled or taken away, and writes what the engine reports
back to the store, fenced by its lease.

The engine and the event path are `serve`'s own (engine/loop.py, events.on_engine_event); what differs is where
jobs come from and how writes are guarded:

* :class:`WorkerLink` claims (``FOR UPDATE SKIP LOCKED``) while the worker holds fewer than ``capacity`` jobs, so
  a busy worker leaves the queue to the others; it wakes on the store's notifications (a job queued, re-queued or
  freed here) and polls every tick in case one was lost. It renews its jobs' leases every ``lease_s / 3``; a renewal
  refused (the job was cancelled, or its lease lapsed and the job went back to the queue) stops that job here at
  once, as does a "cancelled" notification (a cancel on any replica reaches the running job within a notification's
  latency, not a renewal period). A job claimed again after a dead worker's attempt first loses that attempt's
  partial files.
* :class:`FencedStore` is the store the event path writes through: every write names this worker and takes effect
  only while the job is leased to it (jobs_postgres fences them), so a worker that lost a job (paused past its
  lease, partitioned) can no longer complete or fail it. A cancel is never written from here (the replica that
  received it wrote it).
* :class:`ForwardingHub` publishes the engine's progress and chunk events to every replica (NOTIFY); status changes
  need no forwarding, the store's transitions announce them.
* :class:`OutputPublisher` moves each finished MP4, chunk preview and kept latents file from the local folder the
  engine wrote it in to the object store (``--outputs s3://...``) before its event is recorded, so a row never
  points at an object that is not there yet. (`serve` uses it too when its outputs live in an object store.)

Torch-free: this is the HTTP layer's side of the worker; the composition root adds the model and the engine.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path

from magi_server.engine.loop import EngineEvent, EventKind
from magi_server.params import kept_latents_name
from magi_server.serving.events import EventHub, JobEvent
from magi_server.serving.jobs import Job, JobStatus, JobStoreError

log = logging.getLogger("magi_server.serving.worker")

_ENDS = (EventKind.FINISHED, EventKind.FAILED, EventKind.CANCELLED)


class FencedStore:
    """The job store as one worker may write it (see the module docstring); reads and everything else pass
    through."""

    def __init__(self, store, worker_id: str) -> None:
        self._store = store
        self.worker_id = worker_id

    def __getattr__(self, name):
        return getattr(self._store, name)

    def mark_running(self, job_id: str) -> Job | None:
        """The claim made it RUNNING already: the job while this worker still holds it, else None."""
        job = self._store.get(job_id)
        return job if job is not None and job.status is JobStatus.RUNNING else None

    def update_progress(self, job_id: str, done: int, total: int) -> Job | None:
        return self._store.update_progress(job_id, done, total, worker_id=self.worker_id)

    def complete(self, job_id: str, outputs, inference_ms: int | None, *,
                 meta_updates: dict | None = None) -> Job | None:
        return self._store.complete(job_id, outputs, inference_ms, worker_id=self.worker_id,
                                    meta_updates=meta_updates)

    def fail(self, job_id: str, error: str, error_code: str, error_param: str = "") -> Job | None:
        return self._store.fail(job_id, error, error_code, error_param, worker_id=self.worker_id)

    def cancel(self, job_id: str) -> Job | None:
        return None  # the engine stops a job only when its row was cancelled or taken away: nothing to write


class ForwardingHub(EventHub):
    """The worker's hub: progress and chunk events also go to every replica through the store (best effort: a
    replica that misses one re-reads the job's progress on its next tick)."""

    def __init__(self, store, **kw) -> None:
        super().__init__(**kw)
        self._store = store

    def publish(self, job_id: str, kind: str, **data) -> JobEvent | None:
        event = super().publish(job_id, kind, **data)
        if event is not None and kind in ("progress", "chunk"):
            try:
                self._store.publish(job_id, kind, **data)
            except JobStoreError as exc:
                log.debug("job %s: %s event not forwarded: %s", job_id, kind, exc)
        return event


class OutputPublisher:
    """Engine events -> the same events once their files are in the output store (see the module docstring).

    Runs on the engine thread, like the event's store write: an upload of a finished MP4 delays the next step by
    its upload time (a 720p video is a few MB; seconds on a slow link). A preview that cannot be stored is dropped
    from its event (the stream goes on without its URL); an output that cannot be stored fails the job."""

    def __init__(self, output_store, local_dir: str | Path) -> None:
        self.output_store = output_store
        self.local_dir = Path(local_dir)

    def __call__(self, event: EngineEvent) -> EngineEvent:
        if event.kind is EventKind.CHUNK and event.preview:
            try:
                self.output_store.publish(self.local_dir / event.preview, event.preview)
            except Exception as exc:  # noqa: BLE001 - serving.outputs.OutputStoreError, one line
                log.warning("job %s: chunk preview not stored: %s", event.job_id, exc, extra={"job_id": event.job_id})
                (self.local_dir / event.preview).unlink(missing_ok=True)
                return replace(event, preview=None)
        elif event.kind is EventKind.FINISHED and event.output:
            try:
                self.output_store.publish(self.local_dir / event.output, event.output)
            except Exception as exc:  # noqa: BLE001
                (self.local_dir / event.output).unlink(missing_ok=True)
                (self.local_dir / kept_latents_name(event.job_id)).unlink(missing_ok=True)
                return replace(event, kind=EventKind.FAILED, output=None, error_code="internal",
                               error=f"the finished video could not be stored: {exc}")
            self._publish_kept_latents(event.job_id)
        return event

    def _publish_kept_latents(self, job_id: str) -> None:
        """The job's kept latents (continue_from) beside its video; one that cannot be stored only means the job
        cannot be continued (the API says so), so the job still completes."""
        name = kept_latents_name(job_id)
        if not (self.local_dir / name).is_file():
            return
        try:
            self.output_store.publish(self.local_dir / name, name)
        except Exception as exc:  # noqa: BLE001 - serving.outputs.OutputStoreError, one line
            log.warning("job %s: kept latents not stored: %s", job_id, exc, extra={"job_id": job_id})
            (self.local_dir / name).unlink(missing_ok=True)


class WorkerLink:
    """Claims, leases and stops (see the module docstring). ``engine``: the local Engine; ``variants``: the model
    variants this worker runs (None: any job); ``outputs_dir``: where the engine writes, to clear a dead attempt's
    partial files."""

    def __init__(self, store, engine, *, worker_id: str, capacity: int, lease_s: float,
                 outputs_dir: str | Path, variants: list[str] | None = None, poll_s: float = 1.0,
                 output_store=None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.store = store
        self.engine = engine
        self.worker_id = worker_id
        self.capacity = capacity
        self.lease_s = lease_s
        self.outputs_dir = Path(outputs_dir)
        self.variants = variants
        self.poll_s = poll_s
        self.output_store = output_store  # where API replicas on other machines share input images, if anywhere
        self._held: set[str] = set()  # claimed here and not yet ended (engine events)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._claiming = threading.Event()
        self._claiming.set()
        self._threads: list[threading.Thread] = []

    # ---------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        for target, name in ((self._claim_loop, "magi-claim"), (self._renew_loop, "magi-lease")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop_claiming(self) -> None:
        """Take no more jobs (a drain): the held ones go on."""
        self._claiming.clear()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)

    @property
    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def give_back(self) -> list[str]:
        """Put every job still held back in the queue (its attempt refunded: a drain is not the job's fault);
        returns their ids. Call once the engine has stopped."""
        returned = []
        for job_id in self.held:
            try:
                if self.store.requeue(job_id, worker_id=self.worker_id) is not None:
                    returned.append(job_id)
            except JobStoreError as exc:  # the lease lapses instead, and a sweeper re-queues it
                log.error("job %s could not be put back in the queue: %s", job_id, exc)
        with self._lock:
            self._held.clear()
        return returned

    # ---------------------------------------------------------------------------------------------- callbacks
    def on_engine_event(self, event: EngineEvent) -> None:
        """After the event path wrote ``event``: a job that ended here frees its place for the next claim."""
        if event.kind in _ENDS:
            with self._lock:
                self._held.discard(event.job_id)
            self._wake.set()

    def on_message(self, message: dict) -> None:
        """A store notification: a job queued wakes the claimer; one of ours cancelled or failed elsewhere stops."""
        if message.get("kind") != "status":
            return
        status, job_id = message.get("status"), message.get("id")
        if status == JobStatus.QUEUED.value:
            self._wake.set()
        elif status in (JobStatus.CANCELLED.value, JobStatus.FAILED.value):
            with self._lock:
                ours = job_id in self._held
            if ours:
                log.info("job %s was %s elsewhere: stopping it here", job_id, status, extra={"job_id": job_id})
                self.engine.cancel(job_id)

    def on_tick(self) -> None:
        """Every listener tick: claim in case a notification was lost."""
        self._wake.set()

    # ------------------------------------------------------------------------------------------------ threads
    def _claim_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            while (not self._stop.is_set() and self._claiming.is_set() and self.engine.accepting()
                   and len(self.held) < self.capacity):
                try:
                    job = self.store.claim(self.worker_id, self.variants, self.lease_s)
                except JobStoreError as exc:
                    log.warning("claim failed: %s", exc)
                    break
                if job is None:
                    break
                self._start(job)

    def _start(self, job: Job) -> None:
        with self._lock:
            self._held.add(job.id)
        if job.attempts > 1:
            self._clear_partial_files(job.id)
        log.info("job %s claimed (attempt %d)", job.id, job.attempts, extra={"job_id": job.id})
        self.engine.submit(job.id, self._local_inputs(job.params), reserved=False)

    def _local_inputs(self, params):
        """``params`` with the inputs another machine stored (an image, a prefix video, a continuation's latents:
        not here) fetched from the object store into this worker's uploads folder. One that cannot be fetched is
        left as it is: the prefill then fails the job naming the input."""
        if self.output_store is None:
            return params
        fetched = {}
        for field in ("image_path", "video_path", "prefix_latents_path"):
            stored = getattr(params, field)
            if not stored or Path(stored).exists():
                continue
            name = Path(stored).name
            local = self.outputs_dir / "uploads" / name
            try:
                data = self.output_store.read(f"uploads/{name}")
                if data is None:
                    continue
                local.parent.mkdir(parents=True, exist_ok=True)
                part = local.with_name(f".{name}.part")
                part.write_bytes(data)
                part.replace(local)
            except Exception as exc:  # noqa: BLE001 - serving.outputs.OutputStoreError or a local write error
                log.warning("input %s not fetched: %s", name, exc)
                continue
            fetched[field] = str(local)
        return replace(params, **fetched) if fetched else params

    def _clear_partial_files(self, job_id: str) -> None:
        """A dead attempt's half-written MP4 and chunk previews (its lease lapsed, so nobody writes them now)."""
        for pattern in (f".{job_id}.*.part", f"{job_id}.chunk*.mp4"):
            for path in self.outputs_dir.glob(pattern):
                try:
                    path.unlink()
                except OSError as exc:
                    log.warning("could not remove %s: %s", path, exc)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            for job_id in self.held:
                try:
                    kept = self.store.renew_lease(job_id, self.worker_id, self.lease_s)
                except JobStoreError as exc:  # keep running: the store may be back before the lease lapses
                    log.warning("job %s: lease not renewed: %s", job_id, exc, extra={"job_id": job_id})
                    continue
                if kept is None:
                    log.warning("job %s is no longer leased to this worker (cancelled, or its lease lapsed): "
                                "stopping it", job_id, extra={"job_id": job_id})
                    self.engine.cancel(job_id)
