"""Scheduler rules with hand-made runner outcomes: no model, no torch, a fake clock (microseconds each)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from magi_server.engine.scheduler import (
    QueueFull,
    Request,
    RequestStatus,
    Scheduler,
    StepPlan,
)

GiB = 1 << 30


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(rid: str, *, arrival: float = 0.0, est: int = GiB, hint: tuple = ("t2v", 480, 480), **kw) -> Request:
    return Request(id=rid, batch_hint=hint, arrival=arrival, est_bytes=est, **kw)


def sched(clock=None, *, max_waiting=16, budget=8 * GiB, max_batch_size=4) -> Scheduler:
    return Scheduler(max_waiting, budget, max_batch_size=max_batch_size, clock=clock or FakeClock())


def admit_and_prefill(s: Scheduler, keys: dict[str, tuple], calls: int = 4, chunks: int = 2) -> StepPlan:
    """One round that admits waiting requests, then reports every admitted one prefilled."""
    plan = s.schedule()
    for rid in plan.prefill:
        s.on_prefilled(rid, keys[rid], calls_total=calls, chunks_total=chunks)
    assert plan.step == ()  # nothing was RUNNING before this round in these tests
    return plan


# ------------------------------------------------------------------------------------------------------------------
# Admission
# ------------------------------------------------------------------------------------------------------------------


def test_admission_by_budget_stops_at_first_misfit():
    s = sched(budget=10 * GiB)
    s.add(make("a", arrival=1, est=4 * GiB))
    s.add(make("big", arrival=2, est=7 * GiB))  # does not fit next to "a"
    s.add(make("small", arrival=3, est=1 * GiB))  # would fit, but must not jump the head
    plan = s.schedule()
    assert plan.prefill == ("a",)
    assert s.get("a").status is RequestStatus.PREFILLING
    assert s.queue_position("big") == 0 and s.queue_position("small") == 1
    assert s.used_bytes == 4 * GiB and s.running_count == 1 and s.waiting_count == 2

    # still no room: nothing admitted, "small" keeps waiting behind "big"
    assert s.schedule().prefill == ()

    # "a" finishes: its memory is free in the same round that releases it, and the head goes first
    s.on_prefilled("a", "k", calls_total=1, chunks_total=1)
    plan = s.schedule()
    assert plan.step == ("a",)
    assert s.on_step_done(["a"], {"a": 1}) == ("a",)
    plan = s.schedule()
    assert plan.release == ("a",)
    assert plan.prefill == ("big", "small")  # 7 + 1 <= 10
    assert s.used_bytes == 8 * GiB


def test_priority_orders_admission_then_arrival():
    s = sched(budget=GiB)
    s.add(make("old", arrival=1))
    s.add(make("urgent", arrival=5, priority=2))
    s.add(make("mid", arrival=3, priority=1))
    s.add(make("old2", arrival=2))
    assert [s.queue_position(r) for r in ("urgent", "mid", "old", "old2")] == [0, 1, 2, 3]
    assert s.schedule().prefill == ("urgent",)


def test_queue_full_at_max_waiting_stores_nothing():
    s = sched(max_waiting=2)
    s.add(make("a"))
    s.add(make("b"))
    with pytest.raises(QueueFull) as info:
        s.add(make("c"))
    assert info.value.retry_after_s > 0
    assert s.get("c") is None and s.waiting_count == 2 and s.queue_position("c") is None
    # admitted requests do not count against the queue bound
    s.schedule()
    assert s.waiting_count == 0
    s.add(make("c"))
    assert s.queue_position("c") == 0


def test_request_larger_than_budget_is_rejected():
    s = sched(budget=2 * GiB)
    with pytest.raises(ValueError, match="whole budget"):
        s.add(make("huge", est=3 * GiB))
    assert s.get("huge") is None and s.waiting_count == 0
    s.add(make("x"))
    with pytest.raises(ValueError, match="already known"):
        s.add(make("x"))


# ------------------------------------------------------------------------------------------------------------------
# Batching and fairness
# ------------------------------------------------------------------------------------------------------------------


def test_same_batch_key_in_lock_step_is_batched_every_call():
    s = sched()
    s.add(make("a", arrival=1))
    s.add(make("b", arrival=2))
    admit_and_prefill(s, {"a": "k", "b": "k"}, calls=5, chunks=3)
    emitted = {1: 0, 3: 1, 4: 2}  # calls that make chunks clean (hand-made)
    for call in range(5):
        plan = s.schedule()
        assert plan.step == ("a", "b")
        n = {"a": 1, "b": 1} if call in emitted else {}
        finished = s.on_step_done(plan.step, n)
        assert finished == (("a", "b") if call == 4 else ())
    assert s.get("a").status is RequestStatus.FINISHED and s.progress("a") == (3, 3)
    plan = s.schedule()
    assert plan.release == ("a", "b") and plan.step == () and plan.failed == ()
    assert s.get("a") is None  # forgotten once reported
    assert s.schedule().is_idle and not s.has_work


def test_different_call_index_is_not_batched():
    s = sched()
    s.add(make("a", arrival=1))
    admit_and_prefill(s, {"a": "k"}, calls=10)
    s.on_step_done(s.schedule().step)  # a is one call ahead
    s.add(make("b", arrival=2))
    plan = s.schedule()
    assert plan.prefill == ("b",) and plan.step == ("a",)
    s.on_prefilled("b", "k", calls_total=10, chunks_total=1)
    s.on_step_done(plan.step)
    # a is at call 2, b at call 0: same key, different structure, never one batch
    for _ in range(6):
        plan = s.schedule()
        assert len(plan.step) == 1
        s.on_step_done(plan.step)


def test_different_shapes_interleave_without_starvation():
    s = sched(budget=100 * GiB)
    keys = {"x1": "X", "x2": "X", "y": "Y", "z": "Z"}
    for i, rid in enumerate(keys):
        s.add(make(rid, arrival=i))
    admit_and_prefill(s, keys, calls=1000)
    last_step = {rid: 0 for rid in keys}
    steps = {rid: 0 for rid in keys}
    order = []
    for rnd in range(1, 101):
        plan = s.schedule()
        assert plan.step
        assert len({keys[r] for r in plan.step}) == 1  # one shape per batch
        order.append(keys[plan.step[0]])
        for rid in plan.step:
            assert rnd - last_step[rid] <= 3  # never more rounds than there are groups
            last_step[rid] = rnd
            steps[rid] += 1
        s.on_step_done(plan.step)
    assert order[:6] == ["X", "Y", "Z", "X", "Y", "Z"]
    assert steps["x1"] == steps["x2"]  # lock-step partners always together
    assert min(steps.values()) >= 33 and max(steps.values()) <= 34


def test_max_batch_size_respected():
    s = sched(budget=100 * GiB, max_batch_size=2)
    keys = {f"r{i}": "k" for i in range(5)}
    for i, rid in enumerate(keys):
        s.add(make(rid, arrival=i))
    admit_and_prefill(s, keys, calls=3)
    plan = s.schedule()
    assert plan.step == ("r0", "r1")  # oldest first
    seen = []
    while plan.step:
        assert len(plan.step) <= 2
        seen.extend(plan.step)
        s.on_step_done(plan.step)
        plan = s.schedule()
    assert sorted(seen) == sorted(list(keys) * 3)  # every call of every request ran exactly once
    assert all(s.get(r) is None for r in keys)  # all finished and released


# ------------------------------------------------------------------------------------------------------------------
# Cancellation, deadlines, failures
# ------------------------------------------------------------------------------------------------------------------


def test_cancel_waiting_request_is_never_prefilled():
    s = sched(budget=GiB)
    s.add(make("a", arrival=1))
    s.add(make("b", arrival=2))
    s.add(make("c", arrival=3))
    assert s.schedule().prefill == ("a",)
    assert s.cancel("b") is True
    assert s.get("b").status is RequestStatus.CANCELLED and s.get("b").reason == "cancelled"
    assert s.queue_position("b") is None and s.queue_position("c") == 0 and s.waiting_count == 1
    assert s.cancel("b") is False  # already cancelled
    plan = s.schedule()
    assert plan.failed == (("b", "cancelled"),)
    assert "b" not in plan.release and "b" not in plan.prefill  # the runner never held anything for it
    assert s.get("b") is None
    assert s.cancel("nope") is False


def test_cancel_running_request_is_released_at_next_safe_point():
    s = sched()
    s.add(make("a", arrival=1))
    s.add(make("b", arrival=2))
    admit_and_prefill(s, {"a": "k", "b": "k"}, calls=4)
    plan = s.schedule()
    assert plan.step == ("a", "b")
    # cancel arrives while the call is in flight: nothing changes mid-step
    assert s.cancel("a") is True
    assert s.get("a").status is RequestStatus.RUNNING
    assert s.cancel("a") is False  # second cancel: already marked
    s.on_step_done(plan.step)
    assert s.get("a").calls_done == 1
    plan = s.schedule()
    assert plan.failed == (("a", "cancelled"),) and plan.release == ("a",)
    assert plan.step == ("b",)  # reaped before compute: the cancelled one gets no further call
    assert s.get("a") is None and s.running_count == 1


def test_cancel_is_binding_even_on_the_last_call():
    s = sched()
    s.add(make("a"))
    admit_and_prefill(s, {"a": "k"}, calls=1)
    plan = s.schedule()
    s.cancel("a")
    assert s.on_step_done(plan.step) == ()
    assert s.schedule().failed == (("a", "cancelled"),)


def test_cancel_prefilling_request():
    s = sched()
    s.add(make("a"))
    assert s.schedule().prefill == ("a",)
    assert s.cancel("a") is True
    s.on_prefilled("a", "k", calls_total=3, chunks_total=1)
    plan = s.schedule()
    assert plan.failed == (("a", "cancelled"),) and plan.release == ("a",) and plan.step == ()


def test_deadline_fails_with_timeout_and_releases():
    clock = FakeClock(0.0)
    s = sched(clock, budget=GiB)
    s.add(make("run", arrival=0, deadline=10.0))
    s.add(make("wait", arrival=1, deadline=5.0))  # stuck behind "run" (budget), times out in the queue
    admit_and_prefill(s, {"run": "k"}, calls=100)
    for _ in range(3):
        s.on_step_done(s.schedule().step)
    clock.now = 5.0
    plan = s.schedule()
    assert plan.failed == (("wait", "timeout"),) and plan.release == ()  # never admitted: nothing to free
    s.on_step_done(plan.step)
    clock.now = 10.0
    plan = s.schedule()
    assert plan.failed == (("run", "timeout"),) and plan.release == ("run",) and plan.step == ()
    assert s.running_count == 0 and s.used_bytes == 0


def test_failed_step_fails_only_its_own_ids():
    s = sched(budget=100 * GiB)
    keys = {"a": "X", "b": "X", "c": "Y"}
    for i, rid in enumerate(keys):
        s.add(make(rid, arrival=i))
    admit_and_prefill(s, keys, calls=3)
    plan = s.schedule()
    assert plan.step == ("a", "b")
    s.on_step_failed(["a"], "CUDA out of memory")  # one entry failed ...
    s.on_step_done(["b"])  # ... the other completed
    assert s.get("a").status is RequestStatus.FAILED and s.get("a").reason == "CUDA out of memory"
    assert s.get("b").status is RequestStatus.RUNNING and s.get("b").calls_done == 1
    assert s.get("c").status is RequestStatus.RUNNING
    plan = s.schedule()
    assert plan.release == ("a",) and plan.failed == ()  # the engine already knows why
    assert plan.step == ("c",)
    s.on_step_failed(plan.step, "nan in output")
    plan = s.schedule()
    assert plan.release == ("c",) and plan.step == ("b",)


def test_prefill_failure_frees_budget():
    s = sched(budget=GiB)
    s.add(make("a", arrival=1))
    s.add(make("b", arrival=2))
    assert s.schedule().prefill == ("a",)
    s.on_prefill_failed("a", "image decode failed")
    assert s.get("a").status is RequestStatus.FAILED
    plan = s.schedule()
    assert plan.release == ("a",) and plan.prefill == ("b",)


def test_reports_are_checked():
    s = sched()
    s.add(make("a"))
    s.add(make("b"))
    admit_and_prefill(s, {"a": "k", "b": "j"}, calls=2, chunks=1)
    plan = s.schedule()
    assert plan.step == ("a",)
    with pytest.raises(RuntimeError, match="before the last step was reported"):
        s.schedule()  # would step "a" twice for the same call
    with pytest.raises(ValueError, match="not in the step"):
        s.on_step_done(["b"])
    with pytest.raises(ValueError, match="exceeds"):
        s.on_step_done(["a"], {"a": 2})
    assert s.get("a").calls_done == 0  # a rejected report changes nothing
    with pytest.raises(ValueError, match="expected PREFILLING"):
        s.on_prefilled("a", "k", calls_total=1, chunks_total=1)
    with pytest.raises(KeyError):
        s.on_prefill_failed("ghost", "x")
    s.on_step_done(["a"], {"a": 1})


# ------------------------------------------------------------------------------------------------------------------
# Introspection
# ------------------------------------------------------------------------------------------------------------------


def test_queue_position_after_admissions_and_cancels():
    s = sched(budget=2 * GiB)
    for i, rid in enumerate("abcde"):
        s.add(make(rid, arrival=i))
    assert [s.queue_position(r) for r in "abcde"] == [0, 1, 2, 3, 4]
    s.schedule()  # admits a, b
    assert s.queue_position("a") is None and s.queue_position("c") == 0 and s.queue_position("e") == 2
    s.cancel("d")
    assert s.queue_position("e") == 1 and s.waiting_count == 2
    s.add(make("f", arrival=10))
    assert s.queue_position("f") == 2
    assert s.queue_position("unknown") is None


def test_progress_counters():
    s = sched()
    s.add(make("a"))
    assert s.progress("a") == (0, 0)  # chunk count unknown before prefill
    admit_and_prefill(s, {"a": "k"}, calls=4, chunks=2)
    assert s.progress("a") == (0, 2)
    for n in (0, 1, 0, 1):
        s.on_step_done(s.schedule().step, {"a": n} if n else {})
    r = s.get("a")
    assert s.progress("a") == (2, 2) and r.calls_done == 4 and r.status is RequestStatus.FINISHED
    assert r.reason == "finished"
    s.schedule()
    assert s.progress("a") is None


# ------------------------------------------------------------------------------------------------------------------
# Memory estimate and layering
# ------------------------------------------------------------------------------------------------------------------


def test_scheduler_is_torch_free_and_self_contained():
    source = Path(__file__).resolve().parents[1] / "magi_server" / "scheduler.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not any(m.split(".")[0] in {"torch", "numpy", "threading", "os"} for m in imported)
    assert all(m == "magi_server.params" for m in imported if m.startswith("magi_server"))
