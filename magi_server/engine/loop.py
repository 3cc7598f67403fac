"""The engine: one thread that owns the GPU, driving the scheduler and the executor in a loop.

Each round is *schedule -> execute -> update* (vLLM v1): the scheduler decides which jobs to free, prefill and
step together; the executor runs that on the device; the outcomes go back to the scheduler, and every change
becomes an :class:`EngineEvent` handed to ``on_event`` (the HTTP layer persists it and tells streaming clients).
Other threads only talk to the engine through :meth:`Engine.submit` / :meth:`Engine.cancel` (an inbox) and read a
few counters; they never touch the scheduler or a tensor.

Only model calls block this thread. A prefill (prompt encoding, image/video encoding) and a finished chunk's output
(VAE decode, MP4 append, preview, the final close) run on the executor's worker threads while the running jobs keep
stepping; the executor reports them through ``poll()`` at the start of a round (waking the loop through the inbox)
and the engine turns them into scheduler updates and events then: a job joins the running set when its prefill is
reported, a "chunk" event follows the chunk's write, "finished" the MP4's close. While a prefill is in flight, new
submits wait here ("queued", holding their queue slot) and are admitted together once it is reported: the prefill
worker does one group at a time, so they could not start earlier, and jobs admitted together share model calls.
With admission by count (no memory budget), a job whose MP4 is still being closed keeps its place until then.

Admission: :meth:`try_reserve` holds a queue slot before the HTTP layer stores a job, so a full queue is refused
(429) before anything is written; jobs recovered from the store after a restart bypass the bound.
Failure handling: bad input found during prefill fails that job; running out of device memory fails the jobs of
that step and the engine goes on; a chunk output that cannot be written fails that job; any other exception fails
the jobs involved, and an error that leaves the device unusable (a CUDA error other than out-of-memory) stops the
loop so readiness turns false and a supervisor restarts the process.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from magi_server.params import GenerationParams, ParamError
from magi_server.engine.scheduler import Request, RequestStatus, Scheduler, StepPlan

log = logging.getLogger("magi_server.engine.loop")


@dataclass(frozen=True)
class EngineEvent:
    kind: str  # "started" | "progress" | "chunk" | "finished" | "failed" | "cancelled"
    job_id: str
    chunks_done: int = 0
    chunks_total: int = 0
    chunk_index: int | None = None
    preview: str | None = None  # file name of the finished chunk's frames (streaming)
    output: str | None = None
    num_frames: int = 0
    inference_ms: int | None = None
    error: str = ""
    error_code: str = ""


UNKNOWN_MEMORY_BUDGET = 1 << 62  # ServerSettings' default: no budget configured


class QueueFullError(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"the queue is full; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class _Submit:
    job_id: str
    params: GenerationParams
    timeout_s: float | None
    reserved: bool


@dataclass(frozen=True)
class _Cancel:
    job_id: str


@dataclass(frozen=True)
class _Wake:
    """Put in the inbox by the executor's workers: a result is ready for ``poll()``."""


class Engine:
    """The loop thread and its inbox. ``executor`` is a :class:`magi_server.runtime.model_runner.PipelineExecutor` or anything
    with its methods: ``request_memory_bytes``, ``start_prefill``, ``prefilling``, ``step``, ``finish``, ``release``,
    ``poll``, ``set_wakeup``, ``empty_device_cache`` and ``shutdown``."""

    def __init__(
        self,
        executor,
        *,
        on_event: Callable[[EngineEvent], None],
        max_queue: int = 64,
        memory_budget_bytes: int = UNKNOWN_MEMORY_BUDGET,
        max_batch_size: int = 4,
        job_timeout_s: float | None = None,
        retry_after_s: float = 10.0,
        idle_wait_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.executor = executor
        self.on_event = on_event
        self.max_queue = max_queue
        self.job_timeout_s = job_timeout_s
        self.retry_after_s = retry_after_s
        self.idle_wait_s = idle_wait_s
        self.clock = clock
        # With no device memory budget configured (the default, 2^62 = "unknown") the scheduler's only admission
        # rule would let every waiting job in at once: all of them prefilled and holding state, all reported
        # "processing", each burning a restart attempt on kill -9, and reservations released at prefill so the
        # queue bound (429) could never be reached. Admit by count instead: every job costs one unit of a budget
        # of max_batch_size units, so at most max_batch_size jobs run and the rest wait in order.
        self._count_admission = memory_budget_bytes >= UNKNOWN_MEMORY_BUDGET
        # the queue bound is enforced by reservations; the scheduler itself must accept recovered jobs too
        self._scheduler = Scheduler(
            max_waiting=1 << 30, max_batch_size=max_batch_size, clock=clock, retry_after_s=retry_after_s,
            memory_budget_bytes=max_batch_size if self._count_admission else memory_budget_bytes,
        )
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._reserved = 0  # queue slots held by submits that are not yet admitted
        self._waiting_reserved: set[str] = set()
        self._positions: dict[str, int] = {}
        self._running: set[str] = set()  # started, ending not reported yet (a finished job's MP4 may be closing)
        self._params: dict[str, GenerationParams] = {}  # jobs the scheduler holds (engine thread only)
        self._timeouts: dict[str, float] = {}  # run-time limits of jobs not yet started (engine thread only)
        self._held: list[_Submit] = []  # submits waiting for the prefill in flight to be reported (engine thread)
        # jobs whose failure was reported while running (their output failed); the scheduler ends them through a
        # cancel, whose "cancelled" ending must not be reported on top (engine thread only)
        self._quiet_endings: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._heartbeat = clock()
        self.dead_reason: str | None = None
        self.steps_run = 0
        self.last_batch_size = 0
        executor.set_wakeup(lambda: self._inbox.put(_Wake()))

    # ------------------------------------------------------------------------------------------- other threads
    def try_reserve(self) -> None:
        """Hold a queue slot for a submit about to be stored; raises QueueFullError when the queue is full."""
        with self._lock:
            if self._reserved >= self.max_queue:
                raise QueueFullError(self.retry_after_s)
            self._reserved += 1

    def unreserve(self) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - 1)

    def submit(self, job_id: str, params: GenerationParams, *, reserved: bool, timeout_s: float | None = None) -> None:
        """Hand a stored job to the engine (``reserved``: it holds a slot from :meth:`try_reserve`)."""
        with self._lock:
            if reserved:
                self._waiting_reserved.add(job_id)
            self._positions[job_id] = len(self._positions)
        self._inbox.put(_Submit(job_id, params, timeout_s if timeout_s is not None else self.job_timeout_s, reserved))

    def cancel(self, job_id: str) -> None:
        self._inbox.put(_Cancel(job_id))

    def queue_position(self, job_id: str) -> int | None:
        """0-based place among the jobs not yet running (a snapshot refreshed every round)."""
        with self._lock:
            return self._positions.get(job_id)

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._positions)

    @property
    def running_count(self) -> int:
        with self._lock:
            return len(self._running)

    def alive(self, max_silence_s: float = 60.0) -> bool:
        """The loop thread runs and finished a round recently (a long model call counts as activity)."""
        if self.dead_reason is not None or self._thread is None or not self._thread.is_alive():
            return False
        return self.clock() - self._heartbeat < max_silence_s

    def accepting(self) -> bool:
        """The loop runs and has not given up, so a job handed over now will be run. Unlike :meth:`alive`, a long
        model call does not count against it: only a dead or stopped loop refuses work."""
        return (self.dead_reason is None and not self._stop.is_set() and self._thread is not None
                and self._thread.is_alive())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="magi-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # still inside a model call: the executor is in use, leave its workers alone
        self.executor.shutdown()

    # -------------------------------------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        idle = True
        try:
            while not self._stop.is_set():
                self._heartbeat = self.clock()
                # after a round that did nothing, wait for a submit, a cancel or a worker's result (a wake) rather
                # than spin; idle_wait_s bounds the wait so that deadlines are still reaped
                self._drain_inbox(block=idle)
                if self._stop.is_set():
                    break
                self._collect()
                if not self.executor.prefilling:
                    self._admit_held()
                plan = self._scheduler.schedule()
                self._execute(plan)
                idle = plan.is_idle
                self._refresh_positions()
        except _DeviceLost as exc:
            self.dead_reason = str(exc)
            log.critical("engine stopped: %s", exc)
        except Exception as exc:  # a bug in the loop itself: stop serving rather than hang silently
            self.dead_reason = f"engine loop crashed: {exc!r}"
            log.exception("engine loop crashed")

    def _drain_inbox(self, block: bool) -> None:
        timeout = self.idle_wait_s if block else 0.0
        while True:
            try:
                item = self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
            except queue.Empty:
                return
            timeout = 0.0
            if item is None:
                return
            if isinstance(item, _Submit):
                self._held.append(item)  # admitted at the start of the round, unless a prefill is in flight
            elif isinstance(item, _Cancel):
                self._cancel(item.job_id)

    def _admit(self, item: _Submit) -> None:
        try:
            est = self.executor.request_memory_bytes(item.params)
            if self._count_admission:
                est = 1
            # the limit is on running time (--job-timeout "seconds a job may run"): its clock starts at prefill,
            # so a job that waited behind others is not failed as "exceeded its time limit" before it ever ran
            if item.timeout_s is not None:
                self._timeouts[item.job_id] = item.timeout_s
            self._scheduler.add(Request(item.job_id, item.params.shape_key(), self.clock(), deadline=None,
                                        est_bytes=est))
            self._params[item.job_id] = item.params
        except Exception as exc:  # e.g. larger than the whole memory budget: it can never run
            self._release_reservation(item.job_id)
            self._forget(item.job_id)
            self._emit(EngineEvent("failed", item.job_id, error=str(exc), error_code="invalid_input"))

    def _admit_held(self) -> None:
        """Hand the held submits to the scheduler, in arrival order."""
        room = len(self._held)
        if self._count_admission:
            # Admission by count means at most max_batch_size jobs *processing*. A job whose calls are done but
            # whose last chunks are still being written has left the scheduler, yet it is still processing (and
            # would be re-run after a crash), so it still takes its place.
            room = self._scheduler.max_batch_size - len(self._running) - self._scheduler.waiting_count
        take = max(0, room)
        admitted, self._held = self._held[:take], self._held[take:]
        for item in admitted:
            self._admit(item)

    def _cancel(self, job_id: str) -> None:
        for item in self._held:
            if item.job_id == job_id:  # never reached the scheduler: it ends here
                self._held.remove(item)
                self._release_reservation(job_id)
                self._forget(job_id)
                self._emit(EngineEvent("cancelled", job_id, error="cancelled by the client", error_code="cancelled"))
                return
        request = self._scheduler.get(job_id)
        if request is None:
            return
        if self._scheduler.cancel(job_id):
            log.info("cancel requested for job %s", job_id)

    def _execute(self, plan: StepPlan) -> None:
        for job_id, reason in plan.failed:
            self._release_reservation(job_id)
            self._forget(job_id)
            self.executor.release(job_id)  # before the report: a client told "cancelled" finds no partial output
            if job_id in self._quiet_endings:
                self._quiet_endings.discard(job_id)
            elif reason == "cancelled":
                self._emit(EngineEvent("cancelled", job_id, error="cancelled by the client", error_code="cancelled"))
            else:
                self._emit(EngineEvent("failed", job_id, error=f"job {reason}: exceeded its time limit"
                                       if reason == "timeout" else reason, error_code=reason))
        for job_id in plan.release:
            # finished, failed or cancelled jobs: every ending was reported when it happened; free the tensors
            self.executor.release(job_id)
            self._forget(job_id)
        if plan.prefill:
            self._prefill(list(plan.prefill))
        if plan.step:
            self._step(list(plan.step))

    def _prefill(self, job_ids: list[str]) -> None:
        """Start the prefill of the jobs admitted this round, as one group on the executor's prefill worker."""
        group = []
        for job_id in job_ids:
            self._release_reservation(job_id)
            timeout_s = self._timeouts.pop(job_id, None)
            request = self._scheduler.get(job_id)
            if timeout_s is not None and request is not None:
                request.deadline = self.clock() + timeout_s  # reaped by the scheduler at the next safe point
            with self._lock:
                self._running.add(job_id)
                self._positions.pop(job_id, None)
            self._emit(EngineEvent("started", job_id))
            group.append((job_id, self._params.get(job_id)))
        try:
            self.executor.start_prefill(group)
        except Exception as exc:  # could not even be handed over
            code, message = self._classify(exc)
            for job_id, _ in group:
                self._scheduler.on_prefill_failed(job_id, code)
                self._emit(EngineEvent("failed", job_id, error=message, error_code=code))
            self._raise_if_fatal(exc)

    def _collect(self) -> None:
        """Turn the executor's finished background work into scheduler updates and events."""
        for record in self.executor.poll():
            if record.kind == "prefilled":
                self._on_prefilled(record.job_id, record.info)
            elif record.kind == "chunk":
                self._emit(EngineEvent("chunk", record.job_id, chunks_done=record.chunk_index + 1,
                                       chunks_total=record.chunks_total, chunk_index=record.chunk_index,
                                       preview=record.preview, num_frames=record.frames_total))
            elif record.kind == "finished":
                self._emit(EngineEvent("finished", record.job_id, chunks_done=record.chunks_total,
                                       chunks_total=record.chunks_total, output=record.output,
                                       num_frames=record.num_frames, inference_ms=record.inference_ms))
            elif record.kind == "failed":
                if record.stage == "prefill":
                    self._on_prefill_failed(record.job_id, record.error)
                else:
                    self._on_output_failed(record.job_id, record.error)

    def _on_prefilled(self, job_id: str, info) -> None:
        request = self._scheduler.get(job_id)
        if request is None or request.status is not RequestStatus.PREFILLING:
            self.executor.release(job_id)  # it ended while being prepared; that ending was reported
            return
        self._scheduler.on_prefilled(job_id, info.batch_key, info.calls_total, info.chunks_total)
        self._emit(EngineEvent("progress", job_id, chunks_done=0, chunks_total=info.chunks_total))

    def _on_prefill_failed(self, job_id: str, exc: Exception) -> None:
        request = self._scheduler.get(job_id)
        if request is None or request.status is not RequestStatus.PREFILLING:
            return  # it ended while being prepared; that ending was reported
        code, message = self._classify(exc)
        self._scheduler.on_prefill_failed(job_id, code)
        if not request.cancel_requested:  # otherwise the cancel wins and is reported at the next round
            self._emit(EngineEvent("failed", job_id, error=message, error_code=code))
        self._raise_if_fatal(exc)

    def _on_output_failed(self, job_id: str, exc: Exception) -> None:
        """A chunk's decode/encode or the final close failed: the job fails, its remaining calls are dropped."""
        self.executor.release(job_id)
        request = self._scheduler.get(job_id)
        code, message = self._classify(exc)
        if request is not None and not request.status.is_terminal:
            if request.cancel_requested:
                return  # the cancel wins and is reported at the next round
            # no scheduler report ends a running job between steps but a cancel; this failure is its ending
            self._scheduler.cancel(job_id)
            self._quiet_endings.add(job_id)
        self._emit(EngineEvent("failed", job_id, error=message, error_code=code))
        self._raise_if_fatal(exc)

    def _step(self, job_ids: list[str]) -> None:
        self.last_batch_size = len(job_ids)
        self.steps_run += 1
        try:
            chunk_jobs = self.executor.step(job_ids)
        except Exception as exc:
            code, message = self._classify(exc)
            self._scheduler.on_step_failed(job_ids, code)
            for job_id in job_ids:
                # released now, not at the next plan: output of its earlier chunks must not be reported after this
                self.executor.release(job_id)
                self._emit(EngineEvent("failed", job_id, error=message, error_code=code))
            if code == "oom":
                self.executor.empty_device_cache()
            self._raise_if_fatal(exc)
            return
        finished_chunks = {job_id: 1 for job_id in chunk_jobs}
        finished = self._scheduler.on_step_done(job_ids, finished_chunks)
        # the chunks' "chunk" events come when their output is written, "finished" when the MP4 is closed
        for job_id in finished:
            try:
                self.executor.finish(job_id)
            except Exception as exc:
                code, message = self._classify(exc)
                self.executor.release(job_id)
                self._emit(EngineEvent("failed", job_id, error=message, error_code=code))
                self._raise_if_fatal(exc)

    # ----------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _classify(exc: Exception) -> tuple[str, str]:
        if isinstance(exc, ParamError):
            return "invalid_input", str(exc)
        name = type(exc).__name__
        if name == "OutOfMemoryError" or "out of memory" in str(exc).lower():
            return "oom", "the GPU ran out of memory for this job; try fewer frames, a lower resolution or fewer steps"
        return "internal", f"internal error ({name}); see the server log"

    @staticmethod
    def _raise_if_fatal(exc: Exception) -> None:
        text = str(exc)
        if "CUDA error" in text and "out of memory" not in text.lower():
            raise _DeviceLost(f"device error: {text}") from exc
        log.exception("job failed", exc_info=exc)

    def _release_reservation(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._waiting_reserved:
                self._waiting_reserved.discard(job_id)
                self._reserved = max(0, self._reserved - 1)

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._positions.pop(job_id, None)
        self._params.pop(job_id, None)
        self._timeouts.pop(job_id, None)

    def _refresh_positions(self) -> None:
        waiting = []
        for job_id in list(self._params):
            position = self._scheduler.queue_position(job_id)
            if position is not None:
                waiting.append((position, job_id))
        # held submits arrived after every job the scheduler holds: they come last, in arrival order
        order = [job_id for _, job_id in sorted(waiting)] + [item.job_id for item in self._held]
        with self._lock:
            self._positions = {job_id: i for i, job_id in enumerate(order)}

    def _emit(self, event: EngineEvent) -> None:
        if event.kind in ("finished", "failed", "cancelled"):
            with self._lock:
                self._running.discard(event.job_id)
        try:
            self.on_event(event)
        except Exception:  # the listener is the HTTP layer; its failure must not stop the GPU loop
            log.exception("event listener failed for %s", event)


class _DeviceLost(RuntimeError):
    pass
