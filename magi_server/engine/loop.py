"""The engine: one thread that owns the GPU, driving the scheduler and the model runner in a loop.

Each round is *update -> schedule -> execute* (vLLM v1): the scheduler takes in what happened since the last plan
(that plan's model call, and the runner's background work collected by ``poll()``), decides which jobs to report
ended, finish, prefill and step together, and the runner executes that on the device. Every change becomes an
:class:`EngineEvent` handed to ``on_event`` (the HTTP layer persists it and tells streaming clients). Other threads
only talk to the engine through :meth:`Engine.submit` / :meth:`Engine.cancel` (an inbox) and read a few counters;
they never touch the scheduler or a tensor.

Only model calls block this thread. A prefill (prompt encoding, image/video encoding) and a finished chunk's output
(VAE decode, MP4 append, preview, the final close) run on the runner's worker threads while the running jobs keep
stepping; the runner reports them through ``poll()`` at the start of a round (waking the loop through the inbox): a
job joins the running set when its prefill is reported, a "chunk" event follows the chunk's write, "finished" the
MP4's close. While a prefill is in flight nothing new is admitted: the prefill worker does one group at a time, so
those jobs could not start earlier, and jobs admitted together share model calls.

Admission: :meth:`try_reserve` holds a queue slot before the HTTP layer stores a job, so a full queue is refused
(429) before anything is written; the slot is given back when the job leaves the queue. Jobs recovered from the
store after a restart bypass the bound. With no device memory budget configured, the scheduler admits by count
(at most ``max_batch_size`` jobs processing) so that waiting jobs stay queued and keep their slots.

Failure handling: bad input found during prefill fails that job; running out of device memory fails the jobs of
that step and the engine goes on; a chunk output that cannot be written fails that job; any other exception fails
the jobs involved, and an error that leaves the device unusable (a CUDA error other than out-of-memory) stops the
loop, once those failures are reported, so readiness turns false and a supervisor restarts the process.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from magi_server.engine.scheduler import (
    Failure, Prefill, Request, RequestStatus, Scheduler, StepPlan, StepResult,
)
from magi_server.params import GenerationParams, ParamError

log = logging.getLogger("magi_server.engine.loop")


class EventKind(StrEnum):
    STARTED = "started"  # admitted: its prefill begins
    PROGRESS = "progress"  # prefilled: chunks_total is known
    CHUNK = "chunk"  # a chunk's frames are written (chunk_index, num_frames so far, preview)
    FINISHED = "finished"  # the output is closed (output, num_frames, inference_ms)
    FAILED = "failed"  # error, error_code
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class EngineEvent:
    """One change of one job, handed to ``on_event`` on the engine thread in the order it happened."""

    kind: EventKind
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
    error_param: str = ""  # the request parameter an "invalid_input" failure names
    # "finished": whether the safety checker looked at the output's chunks, and whether it flagged any of them
    safety_checked: bool = False
    nsfw: bool = False


UNKNOWN_MEMORY_BUDGET = 1 << 62  # ServerSettings' default: no budget configured


class QueueFullError(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"the queue is full; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class _Cancel:
    job_id: str


class Engine:
    """The loop thread and its inbox. ``runner`` is a :class:`magi_server.runtime.model_runner.ModelRunner` or
    anything with its methods: ``request_memory_bytes``, ``start_prefill``, ``prefilling``, ``step``, ``finish``,
    ``release``, ``poll``, ``set_wakeup``, ``empty_device_cache`` and ``shutdown``."""

    def __init__(
        self,
        runner,
        *,
        on_event: Callable[[EngineEvent], None],
        max_queue: int = 64,
        memory_budget_bytes: int | None = None,
        max_batch_size: int = 4,
        job_timeout_s: float | None = None,
        retry_after_s: float = 10.0,
        idle_wait_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner
        self.on_event = on_event
        self.max_queue = max_queue
        self.job_timeout_s = job_timeout_s
        self.retry_after_s = retry_after_s
        self.idle_wait_s = idle_wait_s
        self.clock = clock
        if memory_budget_bytes is not None and memory_budget_bytes >= UNKNOWN_MEMORY_BUDGET:
            memory_budget_bytes = None
        self._scheduler = Scheduler(memory_budget_bytes, max_batch_size, clock)
        self._inbox: queue.Queue = queue.Queue()  # Request (submit), _Cancel, or None (a wake-up)
        self._lock = threading.Lock()
        # read by other threads, under the lock
        self._reserved = 0  # queue slots held by jobs that have not left the queue
        self._positions: dict[str, int] = {}  # a snapshot of the queue, refreshed every round
        self._running = 0  # a snapshot of the jobs started and not ended, refreshed every round
        self._device_error: str | None = None  # set by a failure that left the device unusable (engine thread)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._draining = threading.Event()  # set by drain(): nothing new starts, the running jobs go on
        self._heartbeat = clock()
        self.dead_reason: str | None = None
        self.steps_run = 0
        runner.set_wakeup(lambda: self._inbox.put(None))

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
            self._positions[job_id] = len(self._positions)
        timeout_s = timeout_s if timeout_s is not None else self.job_timeout_s
        self._inbox.put(Request(job_id, params, timeout_s=timeout_s, reserved=reserved))

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
            return self._running

    def alive(self, max_silence_s: float = 60.0) -> bool:
        """The loop thread runs and finished a round recently (a long model call counts as activity)."""
        if self.dead_reason is not None or self._thread is None or not self._thread.is_alive():
            return False
        return self.clock() - self._heartbeat < max_silence_s

    def accepting(self) -> bool:
        """The loop runs and has not given up, so a job handed over now will be run. Unlike :meth:`alive`, a long
        model call does not count against it: only a dead or stopped loop refuses work."""
        return (self.dead_reason is None and not self._stop.is_set() and not self._draining.is_set()
                and self._thread is not None and self._thread.is_alive())

    def drain(self) -> None:
        """Start no more jobs (a graceful stop is coming): the running ones go on to their end, queued ones wait
        for the next process; :meth:`accepting` turns false so no new job is taken."""
        self._draining.set()
        self._inbox.put(None)

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="magi-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # still inside a model call: the runner is in use, leave its workers alone
        self.runner.shutdown()

    # -------------------------------------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        plan, result = StepPlan(), StepResult()
        try:
            while not self._stop.is_set():
                self._heartbeat = self.clock()
                # after a round that did nothing, wait for a submit, a cancel or a worker's result (a wake) rather
                # than spin; idle_wait_s bounds the wait so that time limits are still reaped
                self._drain_inbox(block=plan.is_idle)
                if self._stop.is_set():
                    break
                self._collect(result)
                self._scheduler.update(plan, result)
                plan = self._scheduler.schedule(admit=not self.runner.prefilling and not self._draining.is_set())
                result = self._execute(plan)
                with self._lock:
                    self._positions = {job_id: i for i, job_id in enumerate(self._scheduler.waiting)}
                    self._running = self._scheduler.running_count
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
            if isinstance(item, Request):
                self._add(item)
            elif isinstance(item, _Cancel) and self._scheduler.cancel(item.job_id):
                log.info("cancel requested for job %s", item.job_id)

    def _add(self, request: Request) -> None:
        try:
            request.est_bytes = self.runner.request_memory_bytes(request.params)
            self._scheduler.add(request)
        except Exception as exc:  # e.g. larger than the whole memory budget: it can never run
            self._leave_queue(request)
            self._emit(EngineEvent(EventKind.FAILED, request.id, error=str(exc), error_code="invalid_input",
                                   error_param=exc.param if isinstance(exc, ParamError) else ""))

    def _collect(self, result: StepResult) -> None:
        """Add the runner's finished background work to ``result``; chunk writes and closes are events at once."""
        for record in self.runner.poll():
            job_id = record.job_id
            if record.kind == "prefilled":
                info = record.info
                result.prefilled[job_id] = Prefill(info.batch_key, info.calls_total)
                self._emit(EngineEvent(EventKind.PROGRESS, job_id, chunks_total=info.chunks_total))
            elif record.kind == "chunk":
                self._emit(EngineEvent(EventKind.CHUNK, job_id, chunks_done=record.chunk_index + 1,
                                       chunks_total=record.chunks_total, chunk_index=record.chunk_index,
                                       preview=record.preview, num_frames=record.frames_total))
            elif record.kind == "finished":
                result.closed.append(job_id)
                self._emit(EngineEvent(EventKind.FINISHED, job_id, chunks_done=record.chunks_total,
                                       chunks_total=record.chunks_total, output=record.output,
                                       num_frames=record.num_frames, inference_ms=record.inference_ms,
                                       safety_checked=record.safety_checked, nsfw=record.nsfw))
            elif record.kind == "failed":  # bad input found by the prefill, or an output that could not be written
                result.fail(job_id, self._failure(record.error))

    def _execute(self, plan: StepPlan) -> StepResult:
        result = StepResult()
        for request in plan.ended:
            self._leave_queue(request)
            self.runner.release(request.id)  # before the report: a client told "cancelled" finds no partial output
            kind = EventKind.CANCELLED if request.status is RequestStatus.CANCELLED else EventKind.FAILED
            self._emit(EngineEvent(kind, request.id, error=request.error, error_code=request.error_code,
                                   error_param=request.error_param))
        if self._device_error is not None:
            raise _DeviceLost(self._device_error)  # the jobs it failed are reported; nothing more can run
        for job_id in plan.finish:
            try:
                self.runner.finish(job_id)  # "finished" comes from poll() once the output is closed
            except Exception as exc:
                result.fail(job_id, self._failure(exc))
            self.runner.release(job_id)
        if plan.prefill:
            for request in plan.prefill:
                self._leave_queue(request)
                self._emit(EngineEvent(EventKind.STARTED, request.id))
            try:
                self.runner.start_prefill([(request.id, request.params) for request in plan.prefill])
            except Exception as exc:  # could not even be handed over
                failure = self._failure(exc)
                for request in plan.prefill:
                    result.fail(request.id, failure)
        if plan.step:
            self.steps_run += 1
            try:
                self.runner.step(list(plan.step))
            except Exception as exc:
                failure = self._failure(exc)
                for job_id in plan.step:
                    result.fail(job_id, failure)
                    self.runner.release(job_id)  # now, so that the memory is free for the cache to return
                if failure.error_code == "oom":
                    self.runner.empty_device_cache()
        return result

    # ----------------------------------------------------------------------------------------------- helpers
    def _failure(self, exc: Exception) -> Failure:
        """What a client is told about ``exc``; notes a device error, after which the loop must stop."""
        text = str(exc)
        # an error marked device_lost (a context-parallel group that broke) leaves the device as unusable as a CUDA one
        if ("CUDA error" in text and "out of memory" not in text.lower()) or getattr(exc, "device_lost", False):
            self._device_error = self._device_error or f"device error: {text}"
        log.error("job failed", exc_info=exc)
        if isinstance(exc, ParamError):
            return Failure("invalid_input", text, exc.param)
        name = type(exc).__name__
        if name == "OutOfMemoryError" or "out of memory" in text.lower():
            return Failure("oom", "the GPU ran out of memory for this job; try fewer frames, a lower resolution or "
                                  "fewer steps")
        return Failure("internal", f"internal error ({name}); see the server log")

    def _leave_queue(self, request: Request) -> None:
        """The job is admitted or ended: it gives back its queue slot and leaves the queue snapshot."""
        with self._lock:
            if request.reserved:
                request.reserved = False
                self._reserved = max(0, self._reserved - 1)
            self._positions.pop(request.id, None)

    def _emit(self, event: EngineEvent) -> None:
        try:
            self.on_event(event)
        except Exception:  # the listener is the HTTP layer; its failure must not stop the GPU loop
            log.exception("event listener failed for %s", event)


class _DeviceLost(RuntimeError):
    pass
