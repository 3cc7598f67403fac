"""The engine's scheduler: which requests run, which share a model call, and when each one ends (no torch).

Owns: the :class:`Request` records and their status machine, the bounded waiting queue, admission by a device
memory budget, the choice of ONE batch of shape-compatible model calls per engine round, fairness between shapes,
cancellation at safe points and deadlines. It decides; the runner executes. The engine thread drives it in the
vLLM v1 / nano-vllm loop::

    plan = scheduler.schedule()            # decide (microseconds, plain Python over counters)
    result = runner.execute(plan)          # free plan.release, prefill plan.prefill, run plan.step as one batch
    scheduler.on_prefilled(...) / on_prefill_failed(...) / on_step_done(...) / on_step_failed(...)   # update

Nothing here touches tensors, threads, clocks other than the injected one, files or the environment, so every rule
is tested in microseconds with hand-made outcomes (tests/test_scheduler.py). Only the engine thread calls it.

Lifecycle (terminal states carry a reason string)::

    WAITING --admit--> PREFILLING --on_prefilled--> RUNNING --last call done--> FINISHED
       |                   |  on_prefill_failed         |  on_step_failed
       |                   +--------------------------> FAILED  (also "timeout", decided here)
       +---cancel / deadline---------------------------> CANCELLED / FAILED

Semantics chosen where there was a choice:

* A request ends FINISHED inside :meth:`Scheduler.on_step_done`, which returns the ids that finished so the engine
  can emit "finished" at once; their runner state is freed through the *next* plan's ``release`` (one freeing path
  for every ending).
* ``StepPlan.release`` lists only requests that were admitted (the runner may hold state for them); a request that
  ends while WAITING never reached the runner and appears only in ``StepPlan.failed``. The runner's release must
  tolerate an id it holds nothing for (a prefill that failed half-way).
* ``StepPlan.failed`` lists the endings the scheduler decided itself: ("timeout") and ("cancelled"). Failures the
  runner reported (``on_prefill_failed``, ``on_step_failed``) are already known to the engine and appear only in
  ``release``.
* :meth:`Scheduler.cancel` is binding: once it returned True the request ends CANCELLED, even if the step in flight
  was its last call, so the client never sees "cancel accepted" followed by "finished".
* Once a plan has reported a request's ending the scheduler forgets it (the job store is the durable record), so
  memory does not grow with the number of requests served.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum


class RequestStatus(Enum):
    WAITING = "waiting"  # submitted, not admitted
    PREFILLING = "prefilling"  # admitted; the runner must prefill it (text, image/video encode, prefix K/V)
    RUNNING = "running"  # prefilled, has model calls left
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.FAILED, RequestStatus.CANCELLED)

    @property
    def is_admitted(self) -> bool:
        return self in (RequestStatus.PREFILLING, RequestStatus.RUNNING)


# Reasons the scheduler writes itself; other reasons come from the runner through the engine.
REASON_CANCELLED = "cancelled"
REASON_TIMEOUT = "timeout"
REASON_FINISHED = "finished"


@dataclass
class Request:
    """One generation as the scheduler sees it: identity, ordering, limits, and counters.

    ``batch_hint`` (``GenerationParams.shape_key()``) is all that is known before prefill; the runner's
    ``batch_key`` replaces it after prefill and is the only thing batching compares. ``est_bytes`` is the engine's
    device-memory estimate (the engine computes it with :func:`magi_server.runtime.memory_model.request_memory_estimate`); 0 means "free", so the engine should always set it.
    ``deadline`` is absolute, on the scheduler's clock.
    """

    id: str
    batch_hint: tuple
    arrival: float
    priority: int = 0  # higher is admitted first; ties by arrival
    deadline: float | None = None
    est_bytes: int = 0
    # counters, set by the scheduler from the runner's reports
    batch_key: Hashable | None = None
    calls_total: int = 0
    calls_done: int = 0
    chunks_total: int = 0
    chunks_done: int = 0
    status: RequestStatus = RequestStatus.WAITING
    reason: str | None = None
    # scheduler bookkeeping (not constructor arguments)
    admitted_at: float | None = field(default=None, init=False)
    cancel_requested: bool = field(default=False, init=False)
    # engine round of this request's last step (or of its prefill): "waited longest" is measured in rounds, which
    # never tie the way two readings of a coarse or fake clock do
    last_round: int = field(default=0, init=False, repr=False)
    seq: int = field(default=0, init=False, repr=False)  # submission order: the last tie-breaker

    @property
    def calls_left(self) -> int:
        return self.calls_total - self.calls_done


@dataclass(frozen=True)
class StepPlan:
    """What the runner does this round, in this order: free ``release``, prefill ``prefill``, run ``step``.

    ``step`` is ONE batch: requests whose next calls have the same ``batch_key`` and call index, run as one batched
    model call (empty when idle). ``failed`` holds the (id, reason) endings the scheduler decided itself ("timeout",
    "cancelled"); those that had been admitted are in ``release`` too.
    """

    prefill: tuple[str, ...] = ()
    step: tuple[str, ...] = ()
    release: tuple[str, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()

    @property
    def is_idle(self) -> bool:
        return not (self.prefill or self.step or self.release or self.failed)


class QueueFull(Exception):
    """The waiting queue is at ``max_waiting``; nothing was stored. Answer 429/503 with ``Retry-After``."""

    def __init__(self, waiting: int, max_waiting: int, retry_after_s: float) -> None:
        super().__init__(
            f"queue full: {waiting} request(s) waiting (max_waiting={max_waiting}); retry in {retry_after_s:g}s"
        )
        self.waiting = waiting
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s


class Scheduler:
    """Admission by memory budget, one compatible batch per round, fairness, cancellation and deadlines.

    ``memory_budget_bytes`` is the device memory left for per-request state once weights and fixed workspaces are
    loaded; admitted (PREFILLING + RUNNING) requests' ``est_bytes`` never sum above it. ``retry_after_s`` is the hint
    carried by :class:`QueueFull`.
    """

    def __init__(
        self,
        max_waiting: int,
        memory_budget_bytes: int,
        max_batch_size: int = 4,
        clock: Callable[[], float] = time.monotonic,
        *,
        retry_after_s: float = 5.0,
    ) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        if memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes must be > 0, got {memory_budget_bytes}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {retry_after_s}")
        self.max_waiting = max_waiting
        self.memory_budget_bytes = memory_budget_bytes
        self.max_batch_size = max_batch_size
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._requests: dict[str, Request] = {}  # every request not yet forgotten, terminal ones included
        self._waiting: list[Request] = []  # WAITING, in admission order (priority desc, arrival, seq)
        self._admitted: dict[str, Request] = {}  # PREFILLING + RUNNING, in admission order
        # endings decided between two plans, reported by the next one
        self._pending_release: list[str] = []
        self._pending_failed: list[tuple[str, str]] = []
        self._in_flight: set[str] = set()  # ids of the last plan's step not yet reported
        self._round = 0
        self._seq = 0

    # ----------------------------------------------------------------------------------------------------------------
    # Submissions and cancels
    # ----------------------------------------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a new request (WAITING). Raises ValueError if it can never run, QueueFull if the queue is full;
        in both cases nothing is stored."""
        # 1. requests that can never run: fail loudly, they are not a capacity problem
        if request.id in self._requests:
            raise ValueError(f"request {request.id!r} is already known to the scheduler")
        if request.status is not RequestStatus.WAITING or request.calls_done or request.chunks_done:
            raise ValueError(f"request {request.id!r} must be new (WAITING, no progress), got {request.status.name}")
        if request.est_bytes < 0:
            raise ValueError(f"request {request.id!r}: est_bytes must be >= 0, got {request.est_bytes}")
        if request.est_bytes > self.memory_budget_bytes:
            raise ValueError(
                f"request {request.id!r} needs about {request.est_bytes} bytes of device memory but the whole budget "
                f"is {self.memory_budget_bytes}; ask for fewer frames or a smaller size"
            )
        # 2. capacity: a bounded queue answers overflow at once instead of buffering without limit
        if len(self._waiting) >= self.max_waiting:
            raise QueueFull(len(self._waiting), self.max_waiting, self.retry_after_s)
        self._seq += 1
        request.seq = self._seq
        self._requests[request.id] = request
        self._insert_waiting(request)

    def cancel(self, request_id: str) -> bool:
        """Cancel a request. WAITING: leaves the queue at once (reported by the next plan's ``failed``).
        PREFILLING/RUNNING: marked, ended and released at the next :meth:`schedule` (the next safe point between
        model calls; a call in flight completes). Unknown, terminal or already cancelled: False."""
        request = self._requests.get(request_id)
        if request is None or request.status.is_terminal or request.cancel_requested:
            return False
        if request.status is RequestStatus.WAITING:
            self._waiting.remove(request)
            self._end(request, RequestStatus.CANCELLED, REASON_CANCELLED)
            self._pending_failed.append((request.id, REASON_CANCELLED))
        else:
            request.cancel_requested = True
        return True

    # ----------------------------------------------------------------------------------------------------------------
    # One round
    # ----------------------------------------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Decide one engine round: reap, admit, then pick one batch."""
        if self._in_flight:
            # stepping a request again before its last call was reported would run the same call twice
            raise RuntimeError(f"schedule() before the last step was reported: {sorted(self._in_flight)}")
        now = self._clock()
        release, failed = self._pending_release, self._pending_failed
        self._pending_release, self._pending_failed = [], []

        # 1. reap before any compute: cancelled and timed-out requests must not get another call
        for request in list(self._waiting):
            if _expired(request, now):
                self._waiting.remove(request)
                self._end(request, RequestStatus.FAILED, REASON_TIMEOUT)
                failed.append((request.id, REASON_TIMEOUT))
        for request in list(self._admitted.values()):
            if request.cancel_requested:
                ending = (RequestStatus.CANCELLED, REASON_CANCELLED)
            elif _expired(request, now):
                ending = (RequestStatus.FAILED, REASON_TIMEOUT)
            else:
                continue
            self._end(request, *ending)
            failed.append((request.id, ending[1]))
            release.append(request.id)

        # 2. admission by budget, in queue order: take while it fits, stop at the first misfit so a stream of small
        # requests cannot starve a big one at the head (TGI's rule)
        used = self.used_bytes
        prefill: list[str] = []
        while self._waiting and used + self._waiting[0].est_bytes <= self.memory_budget_bytes:
            request = self._waiting.pop(0)
            used += request.est_bytes
            request.status = RequestStatus.PREFILLING
            request.admitted_at = now
            self._admitted[request.id] = request
            prefill.append(request.id)

        # 3. one batch
        step = self._pick_batch()
        if step:
            self._round += 1
            for request in step:
                request.last_round = self._round
            self._in_flight = {r.id for r in step}

        # the plan reports these endings; the job store keeps the record from here on
        for rid in release:
            self._requests.pop(rid, None)
        for rid, _ in failed:
            self._requests.pop(rid, None)
        return StepPlan(
            prefill=tuple(prefill),
            step=tuple(r.id for r in step),
            release=tuple(release),
            failed=tuple(failed),
        )

    def _pick_batch(self) -> list[Request]:
        """The batch of this round: the group (batch_key, call index) of the request that waited longest since its
        last step (ties: oldest arrival), that request first, then the others of its group by the same order, at
        most ``max_batch_size``. Stepping the longest-waiting request every round interleaves shapes round-robin:
        a running request waits at most as many rounds as there are running requests."""
        runnable = [r for r in self._admitted.values() if r.status is RequestStatus.RUNNING and r.calls_left > 0]
        if not runnable:
            return []
        runnable.sort(key=_wait_order)
        head = runnable[0]
        group = [r for r in runnable if r.batch_key == head.batch_key and r.calls_done == head.calls_done]
        return group[: self.max_batch_size]

    # ----------------------------------------------------------------------------------------------------------------
    # Runner reports (update)
    # ----------------------------------------------------------------------------------------------------------------

    def on_prefilled(self, request_id: str, batch_key: Hashable, calls_total: int, chunks_total: int) -> None:
        """PREFILLING -> RUNNING, with the call and chunk counts the runner's plan fixed."""
        request = self._expect(request_id, RequestStatus.PREFILLING)
        if calls_total < 1:
            raise ValueError(f"request {request_id!r}: calls_total must be >= 1, got {calls_total}")
        if chunks_total < 0:
            raise ValueError(f"request {request_id!r}: chunks_total must be >= 0, got {chunks_total}")
        request.batch_key = batch_key
        request.calls_total = calls_total
        request.chunks_total = chunks_total
        request.status = RequestStatus.RUNNING
        # it joins the rotation as if stepped this round: it goes after requests already waiting for a call
        request.last_round = self._round

    def on_prefill_failed(self, request_id: str, reason: str) -> None:
        """PREFILLING -> FAILED (released next plan). A cancel already accepted still wins (ends CANCELLED)."""
        request = self._expect(request_id, RequestStatus.PREFILLING)
        if not request.cancel_requested:
            self._end(request, RequestStatus.FAILED, reason)
            self._pending_release.append(request.id)

    def on_step_done(self, ids: Iterable[str], finished_chunks: Mapping[str, int] | None = None) -> tuple[str, ...]:
        """Count one call for each of ``ids`` (part or all of the last plan's step) and the chunks it made clean.

        Returns the ids that finished with this call: they are FINISHED now and released by the next plan.
        Everything is checked before anything changes, so a bad report leaves the counters as they were.
        """
        ids = tuple(ids)
        finished_chunks = dict(finished_chunks or {})
        self._check_in_flight(ids)
        stray = set(finished_chunks) - set(ids)
        if stray:
            raise ValueError(f"finished_chunks names requests that were not in this step: {sorted(stray)}")
        for rid in ids:
            request = self._requests[rid]
            n = finished_chunks.get(rid, 0)
            if n < 0 or request.chunks_done + n > request.chunks_total:
                raise ValueError(
                    f"request {rid!r}: {n} finished chunk(s) on top of {request.chunks_done} exceeds its "
                    f"{request.chunks_total}"
                )
        finished = []
        for rid in ids:
            request = self._requests[rid]
            self._in_flight.discard(rid)
            request.calls_done += 1
            request.chunks_done += finished_chunks.get(rid, 0)
            # a cancel accepted earlier is binding: the request is reaped as CANCELLED instead
            if request.calls_left == 0 and not request.cancel_requested:
                self._end(request, RequestStatus.FINISHED, REASON_FINISHED)
                self._pending_release.append(rid)
                finished.append(rid)
        return tuple(finished)

    def on_step_failed(self, ids: Iterable[str], reason: str) -> None:
        """The call failed for ``ids`` only (a failing batch fails its own entries, nobody else's): FAILED, released
        by the next plan. Ids of the step not named here are still in flight and must be reported too."""
        ids = tuple(ids)
        self._check_in_flight(ids)
        for rid in ids:
            request = self._requests[rid]
            self._in_flight.discard(rid)
            if not request.cancel_requested:
                self._end(request, RequestStatus.FAILED, reason)
                self._pending_release.append(rid)

    # ----------------------------------------------------------------------------------------------------------------
    # Introspection (metrics, status routes)
    # ----------------------------------------------------------------------------------------------------------------

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def queue_position(self, request_id: str) -> int | None:
        """0-based place among WAITING requests in admission order; None if not waiting."""
        request = self._requests.get(request_id)
        if request is None or request.status is not RequestStatus.WAITING:
            return None
        return self._waiting.index(request)

    def progress(self, request_id: str) -> tuple[int, int] | None:
        """(chunks_done, chunks_total); (0, 0) before prefill; None if unknown or forgotten."""
        request = self._requests.get(request_id)
        return None if request is None else (request.chunks_done, request.chunks_total)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    @property
    def running_count(self) -> int:
        """Admitted requests (PREFILLING + RUNNING)."""
        return len(self._admitted)

    @property
    def used_bytes(self) -> int:
        """Sum of ``est_bytes`` of admitted requests."""
        return sum(r.est_bytes for r in self._admitted.values())

    @property
    def has_work(self) -> bool:
        """False when a schedule() would return an idle plan and nothing is admitted: the engine may block on its
        inbox instead of spinning. (Deadlines of waiting requests still pass; wake up for them with a timeout.)"""
        return bool(self._waiting or self._admitted or self._pending_release or self._pending_failed)

    # ----------------------------------------------------------------------------------------------------------------
    # Internals
    # ----------------------------------------------------------------------------------------------------------------

    def _insert_waiting(self, request: Request) -> None:
        key = _queue_order(request)
        i = len(self._waiting)
        # new requests usually go last; walk back past the ones they outrank (priority)
        while i > 0 and _queue_order(self._waiting[i - 1]) > key:
            i -= 1
        self._waiting.insert(i, request)

    def _end(self, request: Request, status: RequestStatus, reason: str) -> None:
        request.status = status
        request.reason = reason
        self._admitted.pop(request.id, None)

    def _expect(self, request_id: str, status: RequestStatus) -> Request:
        request = self._requests.get(request_id)
        if request is None:
            raise KeyError(f"unknown request {request_id!r}")
        if request.status is not status:
            raise ValueError(f"request {request_id!r} is {request.status.name}, expected {status.name}")
        return request

    def _check_in_flight(self, ids: tuple[str, ...]) -> None:
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate ids in a step report: {ids}")
        unknown = [rid for rid in ids if rid not in self._in_flight]
        if unknown:
            raise ValueError(f"not in the step in flight: {unknown}")


def _expired(request: Request, now: float) -> bool:
    return request.deadline is not None and now >= request.deadline


def _queue_order(request: Request) -> tuple:
    return (-request.priority, request.arrival, request.seq)


def _wait_order(request: Request) -> tuple:
    return (request.last_round, request.arrival, request.seq)
