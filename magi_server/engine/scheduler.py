"""The engine's scheduler: which requests run, which share a model call, and when each one ends (no torch).

Owns: the :class:`Request` records (a job's params, limits and counters) and their status machine, the waiting
queue, admission (by a device memory budget, or by count when none is known), the choice of ONE batch of
shape-compatible model calls per engine round, fairness between shapes, cancellation at safe points and running-time
limits. It decides; the runner executes. The engine thread drives it in the vLLM v1 / nano-vllm loop::

    plan = scheduler.schedule()            # decide (microseconds, plain Python over counters)
    result = <the runner executes plan>    # report plan.ended, close plan.finish, prefill plan.prefill, step plan.step
    scheduler.update(plan, result)         # what happened: prefills, calls, closed outputs, failures

Nothing here touches tensors, threads, files or the environment, or a clock other than the injected one, so every
rule is tested in microseconds with hand-made results (tests/test_scheduler.py). Only the engine thread calls it.

Lifecycle::

    WAITING --admit--> PREFILLING --prefilled--> RUNNING --last call--> FINISHING --closed--> FINISHED
       |                   |                        |                       |
       +-- cancel ---------+-- cancel, time limit, -+-- output failed ------+--> CANCELLED / FAILED
                               runner failure

Semantics chosen where there was a choice:

* Every CANCELLED or FAILED ending, decided here or reported by the runner, is reported once, by the next plan's
  ``ended``; the engine frees what the runner holds for it, then tells the client. FINISHED is not in ``ended``:
  the runner's "closed" report is the finished event itself.
* A FINISHING request ran its last call; the next plan's ``finish`` tells the engine to close its output and free
  its tensors. It cannot be cancelled or time out any more (its output is complete but for the writing).
* :meth:`Scheduler.cancel` is binding: once it returned True the request ends CANCELLED, even if the step in flight
  was its last call or the runner reports a failure for it, so a client never sees "cancel accepted" followed by
  another ending.
* The running-time limit (``Request.timeout_s``) counts from admission, so a request that waited behind others is
  not failed for time it never ran.
* Once a request's ending is reported the scheduler forgets it (the job store is the durable record), so memory
  does not grow with the number of requests served.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import Enum

from magi_server.params import GenerationParams


class RequestStatus(Enum):
    WAITING = "waiting"  # submitted, not admitted
    PREFILLING = "prefilling"  # admitted; the runner prepares it (text, image/video encode, prefix K/V)
    RUNNING = "running"  # prefilled, has model calls left
    FINISHING = "finishing"  # all calls done; its output is being written
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.FAILED, RequestStatus.CANCELLED)


@dataclass(eq=False)
class Request:
    """One job as the engine sees it: what to generate, its limits, and the scheduler's counters.

    ``est_bytes`` is the runner's device-memory estimate (ignored when admission is by count). ``timeout_s`` limits
    running time, from admission. ``reserved``: the job holds one of the engine's queue slots until it leaves the
    queue (admitted or ended); the engine gives the slot back and clears the flag.
    """

    id: str
    params: GenerationParams
    timeout_s: float | None = None
    reserved: bool = False
    est_bytes: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # why it ended (FAILED / CANCELLED): a short code and the message a client reads
    error_code: str = ""
    error: str = ""
    error_param: str = ""
    # set by the scheduler: the runner's batch key and call count after prefill, the deadline after admission
    batch_key: Hashable | None = None
    calls_total: int = 0
    calls_done: int = 0
    deadline: float | None = None
    cancel_requested: bool = False
    # engine round of this request's last step (or of its prefill): "waited longest" is measured in rounds, which
    # never tie the way two readings of a coarse or fake clock do
    last_round: int = field(default=0, repr=False)
    seq: int = field(default=0, repr=False)  # submission order: queue order and the last tie-breaker

    @property
    def calls_left(self) -> int:
        return self.calls_total - self.calls_done


@dataclass(frozen=True)
class StepPlan:
    """What the engine does this round, in this order.

    ``ended``: report these CANCELLED/FAILED requests (``error_code``, ``error``) after freeing whatever the runner
    holds for them. ``finish``: ids that ran their last call; close their outputs, then free their tensors.
    ``prefill``: requests admitted this round, prefilled as one group. ``step``: ONE batch of ids whose next calls
    have the same ``batch_key`` and call index, run as one batched model call (empty when no call is due).
    """

    ended: tuple[Request, ...] = ()
    finish: tuple[str, ...] = ()
    prefill: tuple[Request, ...] = ()
    step: tuple[str, ...] = ()

    @property
    def is_idle(self) -> bool:
        return not (self.ended or self.finish or self.prefill or self.step)


@dataclass(frozen=True)
class Prefill:
    """A prefill's outcome: requests with equal ``batch_key`` can share calls of the same index."""

    batch_key: Hashable
    calls_total: int


@dataclass(frozen=True)
class Failure:
    """Why a request failed (or was cancelled), as the client is told."""

    error_code: str  # "invalid_input", "oom", "internal", ...
    error: str  # what the client reads
    param: str = ""  # the request parameter an "invalid_input" failure names


@dataclass
class StepResult:
    """What happened since the last update, per request. Every id of the plan's ``step`` not in ``failed`` ran its
    call; the others are reports of the runner's background work (prefills, outputs) from any earlier plan."""

    prefilled: dict[str, Prefill] = field(default_factory=dict)
    closed: list[str] = field(default_factory=list)  # outputs written and closed: FINISHING -> FINISHED
    failed: dict[str, Failure] = field(default_factory=dict)

    def fail(self, request_id: str, failure: Failure) -> None:
        self.failed.setdefault(request_id, failure)  # the first failure reported is the one the client reads


CANCELLED_BY_CLIENT = Failure("cancelled", "cancelled by the client")
TIME_LIMIT_EXCEEDED = Failure("timeout", "job timeout: exceeded its time limit")


class Scheduler:
    """Admission, one compatible batch per round, fairness, cancellation and running-time limits.

    ``memory_budget_bytes`` is the device memory left for per-request state once weights and fixed workspaces are
    loaded: PREFILLING and RUNNING requests' ``est_bytes`` never sum above it. ``None`` (no budget known) admits by
    count instead: at most ``max_batch_size`` requests are admitted, FINISHING ones included, since a job whose
    output is still being written is still processing (and would be re-run after a crash).
    """

    def __init__(
        self,
        memory_budget_bytes: int | None,
        max_batch_size: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if memory_budget_bytes is not None and memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes must be > 0, got {memory_budget_bytes}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.memory_budget_bytes = memory_budget_bytes
        self.max_batch_size = max_batch_size
        self._clock = clock
        self._requests: dict[str, Request] = {}  # every request whose ending is not reported yet
        self._waiting: dict[str, Request] = {}  # WAITING, in submission order
        self._admitted: dict[str, Request] = {}  # PREFILLING, RUNNING and FINISHING, in admission order
        self._ended: list[Request] = []  # endings decided since the last plan, reported by the next one
        self._to_finish: list[str] = []  # became FINISHING since the last plan
        self._in_flight: tuple[str, ...] = ()  # the last plan's step, until its update
        self._round = 0
        self._seq = 0

    # ----------------------------------------------------------------------------------------------------------------
    # Submissions and cancels
    # ----------------------------------------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a new request (WAITING). Raises ValueError, storing nothing, if it can never run."""
        if request.id in self._requests:
            raise ValueError(f"request {request.id!r} is already known to the scheduler")
        if request.status is not RequestStatus.WAITING or request.calls_done:
            raise ValueError(f"request {request.id!r} must be new (WAITING, no progress), got {request.status.name}")
        if request.est_bytes < 0:
            raise ValueError(f"request {request.id!r}: est_bytes must be >= 0, got {request.est_bytes}")
        if self.memory_budget_bytes is not None and request.est_bytes > self.memory_budget_bytes:
            raise ValueError(
                f"request {request.id!r} needs about {request.est_bytes} bytes of device memory but the whole budget "
                f"is {self.memory_budget_bytes}; ask for fewer frames or a smaller size"
            )
        self._seq += 1
        request.seq = self._seq
        self._requests[request.id] = request
        self._waiting[request.id] = request

    def cancel(self, request_id: str) -> bool:
        """Cancel a request. WAITING: leaves the queue at once. PREFILLING/RUNNING: ends at the next
        :meth:`schedule` (the next safe point between model calls; a call in flight completes). Either way the next
        plan reports it. Unknown, FINISHING, ended or already cancelled: False."""
        request = self._requests.get(request_id)
        if request is None or request.cancel_requested or request.status not in (
            RequestStatus.WAITING, RequestStatus.PREFILLING, RequestStatus.RUNNING
        ):
            return False
        if request.status is RequestStatus.WAITING:
            self._end(request, RequestStatus.CANCELLED, CANCELLED_BY_CLIENT)
        else:
            request.cancel_requested = True
        return True

    # ----------------------------------------------------------------------------------------------------------------
    # One round: schedule, then update
    # ----------------------------------------------------------------------------------------------------------------

    def schedule(self, *, admit: bool = True) -> StepPlan:
        """Decide one engine round: reap, admit (unless ``admit`` is False), then pick one batch."""
        if self._in_flight:
            # stepping a request again before its last call was reported would run the same call twice
            raise RuntimeError(f"schedule() before the last step was reported: {sorted(self._in_flight)}")
        now = self._clock()
        # 1. reap before any compute: cancelled and timed-out requests must not get another call
        for request in list(self._admitted.values()):
            if request.status is RequestStatus.FINISHING:
                continue
            if request.cancel_requested:
                self._end(request, RequestStatus.CANCELLED, CANCELLED_BY_CLIENT)
            elif request.deadline is not None and now >= request.deadline:
                self._end(request, RequestStatus.FAILED, TIME_LIMIT_EXCEEDED)

        # 2. admission in queue order: take while it fits, stop at the first misfit so a stream of small requests
        # cannot starve a big one at the head (TGI's rule)
        prefill: list[Request] = []
        capacity = self.max_batch_size if self.memory_budget_bytes is None else self.memory_budget_bytes
        used = self.used
        while admit and self._waiting:
            request = next(iter(self._waiting.values()))
            cost = 1 if self.memory_budget_bytes is None else request.est_bytes
            if used + cost > capacity:
                break
            used += cost
            del self._waiting[request.id]
            request.status = RequestStatus.PREFILLING
            if request.timeout_s is not None:
                request.deadline = now + request.timeout_s
            self._admitted[request.id] = request
            prefill.append(request)

        # 3. one batch
        step = self._pick_batch()
        if step:
            self._round += 1
            for request in step:
                request.last_round = self._round
            self._in_flight = tuple(r.id for r in step)

        ended, self._ended = tuple(self._ended), []
        finish, self._to_finish = tuple(self._to_finish), []
        for request in ended:
            del self._requests[request.id]  # reported now; the job store keeps the record from here on
        return StepPlan(ended=ended, finish=finish, prefill=tuple(prefill), step=self._in_flight)

    def _pick_batch(self) -> list[Request]:
        """The batch of this round: the group (batch_key, call index) of the request that waited longest since its
        last step (ties: submission order), that request first, then the others of its group by the same order, at
        most ``max_batch_size``. Stepping the longest-waiting request every round interleaves shapes round-robin:
        a running request waits at most as many rounds as there are running requests."""
        runnable = [r for r in self._admitted.values() if r.status is RequestStatus.RUNNING and r.calls_left > 0]
        if not runnable:
            return []
        runnable.sort(key=lambda r: (r.last_round, r.seq))
        head = runnable[0]
        group = [r for r in runnable if r.batch_key == head.batch_key and r.calls_done == head.calls_done]
        return group[: self.max_batch_size]

    def update(self, plan: StepPlan, result: StepResult) -> None:
        """Apply what happened since ``plan`` (the last plan) was made. Everything is checked before anything
        changes, so a report that does not fit the requests' states raises ValueError and changes nothing."""
        if plan.step != self._in_flight:
            raise ValueError(f"update for a step other than the one in flight: {plan.step} != {self._in_flight}")
        for rid, prefill in result.prefilled.items():
            self._expect(rid, RequestStatus.PREFILLING)
            if prefill.calls_total < 1:
                raise ValueError(f"request {rid!r}: calls_total must be >= 1, got {prefill.calls_total}")
        for rid in result.closed:
            self._expect(rid, RequestStatus.FINISHING)
            if rid in result.failed:
                raise ValueError(f"request {rid!r} reported both closed and failed")
        for rid in result.failed:
            self._expect(rid, RequestStatus.PREFILLING, RequestStatus.RUNNING, RequestStatus.FINISHING)
        self._in_flight = ()

        for rid, prefill in result.prefilled.items():
            request = self._requests[rid]
            request.batch_key = prefill.batch_key
            request.calls_total = prefill.calls_total
            request.status = RequestStatus.RUNNING
            # it joins the rotation as if stepped this round: it goes after requests already waiting for a call
            request.last_round = self._round
        for rid, failure in result.failed.items():
            request = self._requests[rid]
            if not request.cancel_requested:  # an accepted cancel wins: reaped as CANCELLED by the next plan
                self._end(request, RequestStatus.FAILED, failure)
        for rid in plan.step:
            if rid in result.failed:
                continue
            request = self._requests[rid]
            request.calls_done += 1
            if request.calls_left == 0 and not request.cancel_requested:
                request.status = RequestStatus.FINISHING
                self._to_finish.append(rid)
        for rid in result.closed:
            request = self._requests.pop(rid)
            request.status = RequestStatus.FINISHED
            del self._admitted[rid]

    # ----------------------------------------------------------------------------------------------------------------
    # Introspection
    # ----------------------------------------------------------------------------------------------------------------

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    @property
    def waiting(self) -> tuple[str, ...]:
        """Ids of the WAITING requests, in admission order."""
        return tuple(self._waiting)

    @property
    def running_count(self) -> int:
        """Admitted requests (PREFILLING, RUNNING and FINISHING)."""
        return len(self._admitted)

    @property
    def used(self) -> int:
        """Admission capacity in use: ``est_bytes`` of PREFILLING and RUNNING requests, or with admission by count
        the number of admitted requests."""
        if self.memory_budget_bytes is None:
            return len(self._admitted)
        return sum(r.est_bytes for r in self._admitted.values() if r.status is not RequestStatus.FINISHING)

    # ----------------------------------------------------------------------------------------------------------------
    # Internals
    # ----------------------------------------------------------------------------------------------------------------

    def _end(self, request: Request, status: RequestStatus, why: Failure) -> None:
        request.status = status
        request.error_code, request.error, request.error_param = why.error_code, why.error, why.param
        self._waiting.pop(request.id, None)
        self._admitted.pop(request.id, None)
        self._ended.append(request)

    def _expect(self, request_id: str, *statuses: RequestStatus) -> None:
        request = self._requests.get(request_id)
        if request is None:
            raise ValueError(f"unknown request {request_id!r}")
        if request.status not in statuses:
            expected = " or ".join(s.name for s in statuses)
            raise ValueError(f"request {request_id!r} is {request.status.name}, expected {expected}")
