"""Scheduler rules with hand-made runner results: no model, no torch, a fake clock (microseconds each)."""
from __future__ import annotations

import pytest

from magi_server.engine.scheduler import (
    Failure,
    Prefill,
    Request,
    RequestStatus,
    Scheduler,
    StepPlan,
    StepResult,
)
from magi_server.params import GenerationParams

GiB = 1 << 30
PARAMS = GenerationParams(prompts=("a cat",), width=480, height=480, num_frames=24, num_inference_steps=8, seed=1)
OOM = Failure("oom", "the GPU ran out of memory")


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(rid: str, *, est: int = GiB, **kw) -> Request:
    return Request(rid, PARAMS, est_bytes=est, **kw)


def sched(clock=None, *, budget: int | None = 8 * GiB, max_batch_size=4) -> Scheduler:
    return Scheduler(budget, max_batch_size=max_batch_size, clock=clock or FakeClock())


def ids(requests) -> tuple[str, ...]:
    return tuple(r.id for r in requests)


def prefilled(keys: dict[str, object], calls: int) -> StepResult:
    return StepResult(prefilled={rid: Prefill(key, calls) for rid, key in keys.items()})


class Rounds:
    """Drives a scheduler the way the engine does: each round updates with the last plan and a result, then
    schedules."""

    def __init__(self, s: Scheduler) -> None:
        self.s = s
        self.plan = StepPlan()

    def __call__(self, result: StepResult | None = None, *, admit: bool = True) -> StepPlan:
        self.s.update(self.plan, result or StepResult())
        self.plan = self.s.schedule(admit=admit)
        return self.plan


def admit_and_prefill(s: Scheduler, keys: dict[str, object], calls: int = 4) -> Rounds:
    """A round that admits the waiting requests, then the report that every admitted one is prefilled."""
    rounds = Rounds(s)
    plan = rounds()
    assert set(ids(plan.prefill)) == set(keys) and plan.step == ()
    rounds.s.update(plan, prefilled(keys, calls))
    rounds.plan = StepPlan()
    return rounds


# ------------------------------------------------------------------------------------------------------------------
# Admission
# ------------------------------------------------------------------------------------------------------------------


def test_admission_by_budget_stops_at_first_misfit():
    s = sched(budget=10 * GiB)
    s.add(make("a", est=4 * GiB))
    s.add(make("big", est=7 * GiB))  # does not fit next to "a"
    s.add(make("small", est=1 * GiB))  # would fit, but must not jump the head
    rounds = Rounds(s)
    plan = rounds()
    assert ids(plan.prefill) == ("a",) and plan.prefill[0] is s.get("a")
    assert s.get("a").status is RequestStatus.PREFILLING
    assert s.waiting == ("big", "small")
    assert s.used == 4 * GiB and s.running_count == 1

    # still no room: nothing admitted, "small" keeps waiting behind "big"
    assert rounds().prefill == ()

    # "a" runs its only call: FINISHING holds no memory, so the head is admitted in the round that finishes "a"
    assert rounds(prefilled({"a": "k"}, 1)).step == ("a",)
    plan = rounds()
    assert plan.finish == ("a",) and s.get("a").status is RequestStatus.FINISHING
    assert ids(plan.prefill) == ("big", "small")  # 7 + 1 <= 10
    assert s.used == 8 * GiB and s.running_count == 3
    rounds(StepResult(closed=["a"]))
    assert s.get("a") is None and s.running_count == 2


def test_admission_by_count_counts_finishing_requests():
    """No budget known: at most max_batch_size requests admitted, one whose output is still written included."""
    s = sched(budget=None, max_batch_size=2)
    for rid in "abc":
        s.add(make(rid, est=100 * GiB))  # the estimate does not matter
    rounds = Rounds(s)
    assert ids(rounds().prefill) == ("a", "b") and s.waiting == ("c",)
    assert rounds(prefilled({"a": "k", "b": "k"}, 1)).step == ("a", "b")
    plan = rounds()
    assert plan.finish == ("a", "b") and plan.prefill == ()  # still writing their outputs
    assert rounds(StepResult(closed=["a"])).prefill == (s.get("c"),)
    assert s.used == 2


def test_no_admission_while_the_engine_holds_it():
    s = sched()
    s.add(make("a"))
    rounds = Rounds(s)
    assert rounds(admit=False).prefill == () and s.waiting == ("a",)
    assert ids(rounds().prefill) == ("a",)


def test_request_larger_than_budget_is_rejected():
    s = sched(budget=2 * GiB)
    with pytest.raises(ValueError, match="whole budget"):
        s.add(make("huge", est=3 * GiB))
    assert s.get("huge") is None and s.waiting == ()
    s.add(make("x"))
    with pytest.raises(ValueError, match="already known"):
        s.add(make("x"))


# ------------------------------------------------------------------------------------------------------------------
# Batching and fairness
# ------------------------------------------------------------------------------------------------------------------


def test_same_batch_key_in_lock_step_is_batched_every_call():
    s = sched()
    s.add(make("a"))
    s.add(make("b"))
    rounds = admit_and_prefill(s, {"a": "k", "b": "k"}, calls=5)
    for call in range(5):
        plan = rounds()
        assert plan.step == ("a", "b") and plan.finish == ()
    plan = rounds()
    assert plan.finish == ("a", "b") and plan.step == () and plan.ended == ()
    assert s.get("a").status is RequestStatus.FINISHING and s.get("a").calls_done == 5
    rounds(StepResult(closed=["a", "b"]))
    assert s.get("a") is None and s.running_count == 0  # forgotten once closed
    assert rounds().is_idle


def test_different_call_index_is_not_batched():
    s = sched()
    s.add(make("a"))
    rounds = admit_and_prefill(s, {"a": "k"}, calls=10)
    assert rounds().step == ("a",)
    s.add(make("b"))
    plan = rounds()  # "a" is one call ahead
    assert ids(plan.prefill) == ("b",) and plan.step == ("a",)
    # a is at call 2, b at call 0: same key, different structure, never one batch; they alternate
    assert rounds(prefilled({"b": "k"}, 10)).step == ("a",)
    assert [rounds().step for _ in range(4)] == [("b",), ("a",), ("b",), ("a",)]


def test_different_shapes_interleave_without_starvation():
    s = sched(budget=100 * GiB)
    keys = {"x1": "X", "x2": "X", "y": "Y", "z": "Z"}
    for rid in keys:
        s.add(make(rid))
    rounds = admit_and_prefill(s, keys, calls=1000)
    last_step = {rid: 0 for rid in keys}
    steps = {rid: 0 for rid in keys}
    order = []
    for rnd in range(1, 101):
        plan = rounds()
        assert plan.step
        assert len({keys[r] for r in plan.step}) == 1  # one shape per batch
        order.append(keys[plan.step[0]])
        for rid in plan.step:
            assert rnd - last_step[rid] <= 3  # never more rounds than there are groups
            last_step[rid] = rnd
            steps[rid] += 1
    assert order[:6] == ["X", "Y", "Z", "X", "Y", "Z"]
    assert steps["x1"] == steps["x2"]  # lock-step partners always together
    assert min(steps.values()) >= 33 and max(steps.values()) <= 34


def test_max_batch_size_respected():
    s = sched(budget=100 * GiB, max_batch_size=2)
    keys = {f"r{i}": "k" for i in range(5)}
    for rid in keys:
        s.add(make(rid))
    rounds = admit_and_prefill(s, keys, calls=3)
    plan = rounds()
    assert plan.step == ("r0", "r1")  # oldest first
    seen, finished = [], []
    while not plan.is_idle:
        assert len(plan.step) <= 2
        seen.extend(plan.step)
        finished.extend(plan.finish)
        plan = rounds(StepResult(closed=list(plan.finish)))
    assert sorted(seen) == sorted(list(keys) * 3)  # every call of every request ran exactly once
    assert sorted(finished) == sorted(keys) and all(s.get(r) is None for r in keys)


# ------------------------------------------------------------------------------------------------------------------
# Cancellation, time limits, failures
# ------------------------------------------------------------------------------------------------------------------


def test_cancel_waiting_request_is_never_prefilled():
    s = sched(budget=GiB)
    for rid in "abc":
        s.add(make(rid))
    rounds = Rounds(s)
    assert ids(rounds().prefill) == ("a",)
    assert s.cancel("b") is True
    assert s.get("b").status is RequestStatus.CANCELLED and s.get("b").error_code == "cancelled"
    assert s.waiting == ("c",)
    assert s.cancel("b") is False  # already cancelled
    plan = rounds()
    assert ids(plan.ended) == ("b",) and plan.ended[0].error == "cancelled by the client"
    assert plan.prefill == ()
    assert s.get("b") is None
    assert s.cancel("nope") is False


def test_cancel_running_request_is_ended_at_next_safe_point():
    s = sched()
    s.add(make("a"))
    s.add(make("b"))
    rounds = admit_and_prefill(s, {"a": "k", "b": "k"}, calls=4)
    plan = rounds()
    assert plan.step == ("a", "b")
    # cancel arrives while the call is in flight: nothing changes mid-step
    assert s.cancel("a") is True
    assert s.get("a").status is RequestStatus.RUNNING
    assert s.cancel("a") is False  # second cancel: already marked
    plan = rounds()
    assert ids(plan.ended) == ("a",) and plan.ended[0].status is RequestStatus.CANCELLED
    assert plan.ended[0].calls_done == 1  # the call in flight completed
    assert plan.step == ("b",)  # reaped before compute: the cancelled one gets no further call
    assert s.get("a") is None and s.running_count == 1


def test_cancel_is_binding_even_on_the_last_call():
    s = sched()
    s.add(make("a"))
    rounds = admit_and_prefill(s, {"a": "k"}, calls=1)
    rounds()
    s.cancel("a")
    plan = rounds()
    assert plan.finish == () and ids(plan.ended) == ("a",) and plan.ended[0].status is RequestStatus.CANCELLED


def test_cancel_prefilling_request():
    s = sched()
    s.add(make("a"))
    rounds = Rounds(s)
    assert ids(rounds().prefill) == ("a",)
    assert s.cancel("a") is True
    plan = rounds()  # reaped before its prefill is reported: the engine frees what the runner prepared
    assert ids(plan.ended) == ("a",) and plan.ended[0].error_code == "cancelled" and plan.step == ()


def test_cancel_wins_over_a_reported_failure_and_finishing_cannot_be_cancelled():
    s = sched()
    s.add(make("a"))
    s.add(make("b"))
    rounds = admit_and_prefill(s, {"a": "k", "b": "j"}, calls=1)
    s.cancel("a")
    plan = rounds(StepResult(failed={"a": OOM}))
    assert ids(plan.ended) == ("a",) and plan.ended[0].status is RequestStatus.CANCELLED
    assert plan.step == ("b",)
    assert rounds().finish == ("b",)
    assert s.cancel("b") is False  # its calls are done; its output is being written
    assert rounds(StepResult(closed=["b"])).is_idle


def test_time_limit_counts_from_admission():
    clock = FakeClock(0.0)
    s = sched(clock, budget=GiB)
    s.add(make("run", timeout_s=10.0))
    s.add(make("next", timeout_s=10.0))  # waits behind "run" (budget): its time does not run while it waits
    rounds = admit_and_prefill(s, {"run": "k"}, calls=100)
    for _ in range(3):
        rounds()
    clock.now = 10.0
    plan = rounds()
    assert ids(plan.ended) == ("run",) and plan.ended[0].error_code == "timeout" and plan.step == ()
    assert "time limit" in plan.ended[0].error
    assert ids(plan.prefill) == ("next",) and s.get("next").deadline == 20.0  # admitted in the round it was freed
    clock.now = 19.9
    assert rounds(prefilled({"next": "k"}, 100)).step == ("next",)
    clock.now = 20.0
    plan = rounds()
    assert ids(plan.ended) == ("next",) and s.running_count == 0 and s.used == 0


def test_failed_step_fails_its_requests_and_nobody_else():
    s = sched(budget=100 * GiB)
    keys = {"a": "X", "b": "X", "c": "Y"}
    for rid in keys:
        s.add(make(rid))
    rounds = admit_and_prefill(s, keys, calls=3)
    plan = rounds()
    assert plan.step == ("a", "b")
    plan = rounds(StepResult(failed={"a": OOM}))  # one entry failed, the other completed its call
    assert ids(plan.ended) == ("a",)
    assert (plan.ended[0].status, plan.ended[0].error_code, plan.ended[0].error) == (
        RequestStatus.FAILED, "oom", "the GPU ran out of memory")
    assert s.get("b").status is RequestStatus.RUNNING and s.get("b").calls_done == 1
    assert plan.step == ("c",)
    plan = rounds(StepResult(failed={"c": Failure("internal", "nan in output")}))
    assert ids(plan.ended) == ("c",) and plan.step == ("b",)


def test_prefill_failure_frees_budget():
    s = sched(budget=GiB)
    s.add(make("a"))
    s.add(make("b"))
    rounds = Rounds(s)
    assert ids(rounds().prefill) == ("a",)
    plan = rounds(StepResult(failed={"a": Failure("invalid_input", "image: not an image")}))
    assert ids(plan.ended) == ("a",) and plan.ended[0].error_code == "invalid_input"
    assert ids(plan.prefill) == ("b",)


def test_output_failure_of_a_finishing_request_ends_it_failed():
    s = sched()
    s.add(make("a"))
    rounds = admit_and_prefill(s, {"a": "k"}, calls=1)
    rounds()
    assert rounds().finish == ("a",)
    plan = rounds(StepResult(failed={"a": Failure("internal", "disk full")}))
    assert ids(plan.ended) == ("a",) and plan.ended[0].status is RequestStatus.FAILED and s.running_count == 0


def test_reports_are_checked():
    s = sched()
    s.add(make("a"))
    s.add(make("b"))
    rounds = admit_and_prefill(s, {"a": "k", "b": "j"}, calls=2)
    plan = rounds()
    assert plan.step == ("a",)
    with pytest.raises(RuntimeError, match="before the last step was reported"):
        s.schedule()  # would step "a" twice for the same call
    with pytest.raises(ValueError, match="other than the one in flight"):
        s.update(StepPlan(step=("b",)), StepResult())
    with pytest.raises(ValueError, match="expected PREFILLING"):
        s.update(plan, prefilled({"a": "k"}, 1))
    with pytest.raises(ValueError, match="expected FINISHING"):
        s.update(plan, StepResult(closed=["b"]))
    with pytest.raises(ValueError, match="unknown request"):
        s.update(plan, StepResult(failed={"ghost": OOM}))
    assert s.get("a").calls_done == 0  # a rejected report changes nothing
    s.update(plan, StepResult())
    assert s.get("a").calls_done == 1
