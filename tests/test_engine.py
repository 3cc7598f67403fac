"""The engine loop: update -> schedule -> execute, with a fake runner and with the tiny model."""
from __future__ import annotations

import hashlib
import threading
import time

import pytest

from magi_server.engine.loop import Engine, EngineEvent, EventKind, QueueFullError
from magi_server.runtime.model_runner import ChunkDone, Finished, JobFailed, PrefillInfo, Prefilled
from magi_server.params import GenerationParams
from magi_server.media import InputError


class FakeRunner:
    """Three calls per job, one chunk at the last; failure modes chosen by the prompt ("bad": bad input) or the job
    id ("oom", "fatal": the step raises; "wfail": its output cannot be written after its first call). Background
    work finishes at once (its records are ready for the next poll), unless ``hold_prefill`` keeps the prefills in
    flight until :meth:`end_prefill`."""

    def __init__(self, step_delay: float = 0.0, hold_prefill: bool = False):
        self.calls: dict[str, int] = {}
        self.batches: list[list[str]] = []
        self.released: list[str] = []
        self.step_delay = step_delay
        self.gate = threading.Event()
        self.gate.set()
        self.hold_prefill = hold_prefill
        self._in_prefill: list[list] = []  # held groups: in flight until end_prefill(), released jobs or not
        self._records: list = []
        self._lock = threading.Lock()
        self._wakeup = lambda: None

    @property
    def prefilling(self):
        return bool(self._in_prefill)

    def set_wakeup(self, wakeup):
        self._wakeup = wakeup

    def request_memory_bytes(self, params):
        return params.num_frames << 20  # 1 MiB a frame

    def start_prefill(self, jobs):
        records = []
        for job_id, params in jobs:
            if params.prompts[0] == "bad":
                records.append(JobFailed(job_id, "prefill", InputError("image", "not a PNG, JPEG or WebP image")))
                continue
            self.calls[job_id] = 0
            records.append(Prefilled(job_id, PrefillInfo(params.shape_key(), 3, 1)))
        with self._lock:
            if self.hold_prefill:
                self._in_prefill.append(records)
            else:
                self._records += records
        self._wakeup()

    def end_prefill(self):
        with self._lock:
            self._records += [r for group in self._in_prefill for r in group if r.job_id not in self.released]
            self._in_prefill = []
        self._wakeup()

    def poll(self):
        with self._lock:
            records, self._records = self._records, []
        return records

    def step(self, job_ids):
        self.gate.wait(5)
        time.sleep(self.step_delay)
        self.batches.append(list(job_ids))
        if any(j.startswith("oom") for j in job_ids):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
        if any(j.startswith("fatal") for j in job_ids):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        out = []
        for job_id in job_ids:
            self.calls[job_id] += 1
            if job_id.startswith("wfail") and self.calls[job_id] == 1:
                self._records.append(JobFailed(job_id, "output", OSError("disk full")))
            if self.calls[job_id] == 3:
                out.append(job_id)
                self._records.append(ChunkDone(job_id, 0, 1, 24, None))
        return out

    def finish(self, job_id):
        self._records.append(Finished(job_id, f"{job_id}.mp4", 24, 5, 1))

    def release(self, job_id):
        self.released.append(job_id)  # nothing is reported for it from now on

    def empty_device_cache(self):
        pass

    def shutdown(self):
        pass


def _params(prompt="a cat", frames=24, **kw):
    return GenerationParams(prompts=(prompt,), width=64, height=64, num_frames=frames, num_inference_steps=8, seed=1,
                            **kw)


class Recorder:
    def __init__(self):
        self.events: list[EngineEvent] = []
        self.cv = threading.Condition()

    def __call__(self, event):
        with self.cv:
            self.events.append(event)
            self.cv.notify_all()

    def wait_for(self, job_id, kinds=("finished", "failed", "cancelled"), timeout=30.0) -> EngineEvent:
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                for e in self.events:
                    if e.job_id == job_id and e.kind in kinds:
                        return e
                left = deadline - time.monotonic()
                assert left > 0, f"no {kinds} event for {job_id}: {self.events}"
                self.cv.wait(left)

    def kinds(self, job_id):
        return [e.kind for e in self.events if e.job_id == job_id]


def _until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def engine_factory():
    engines = []

    def make(runner, **kw):
        rec = Recorder()
        engine = Engine(runner, on_event=rec, idle_wait_s=0.01, **kw)
        engine.start()
        engines.append(engine)
        return engine, rec

    yield make
    for engine in engines:
        engine.stop()


def test_two_jobs_of_one_shape_share_every_call(engine_factory):
    runner = FakeRunner()
    runner.gate.clear()  # hold the loop so both jobs are admitted in the same round
    engine, rec = engine_factory(runner)
    engine.submit("a", _params(), reserved=False)
    engine.submit("b", _params(), reserved=False)
    time.sleep(0.1)
    runner.gate.set()
    for job in "ab":
        assert rec.wait_for(job).kind is EventKind.FINISHED
        assert rec.kinds(job) == ["started", "progress", "chunk", "finished"]
    assert runner.batches == [["a", "b"]] * 3
    finished = rec.wait_for("a")
    assert (finished.output, finished.num_frames, finished.chunks_done, finished.chunks_total) == ("a.mp4", 24, 1, 1)


def test_queue_bound_by_reservation(engine_factory):
    engine, _ = engine_factory(FakeRunner(), max_queue=2)
    engine.try_reserve()
    engine.try_reserve()
    with pytest.raises(QueueFullError) as info:
        engine.try_reserve()
    assert info.value.retry_after_s > 0
    engine.unreserve()
    engine.try_reserve()


def test_admission_by_count_keeps_waiting_jobs_queued_holding_their_slots(engine_factory):
    """No memory budget: at most max_batch_size jobs run; the others wait, each holding its queue slot until it
    starts, so the queue bound (429) holds while they wait."""
    runner = FakeRunner()
    runner.gate.clear()
    engine, rec = engine_factory(runner, max_queue=2, max_batch_size=1)
    for job_id in ("a", "b"):
        engine.try_reserve()
        engine.submit(job_id, _params(), reserved=True)
    rec.wait_for("a", kinds=("progress",))
    _until(lambda: engine.running_count == 1 and engine.queue_depth == 1)
    assert engine.queue_position("b") == 0 and "started" not in rec.kinds("b")
    engine.try_reserve()  # "a" gave its slot back when it started
    with pytest.raises(QueueFullError):
        engine.try_reserve()
    engine.unreserve()
    runner.gate.set()
    assert rec.wait_for("a").kind == "finished" and rec.wait_for("b").kind == "finished"
    _until(lambda: engine.running_count == 0 and engine.queue_depth == 0)
    engine.try_reserve()
    engine.try_reserve()  # every slot is back


def test_memory_budget_admits_what_fits_and_refuses_what_never_can(engine_factory):
    runner = FakeRunner()
    runner.gate.clear()
    engine, rec = engine_factory(runner, max_queue=4, memory_budget_bytes=60 << 20)  # 60 frames of the fake
    engine.try_reserve()
    engine.submit("huge", _params(frames=96), reserved=True)
    failed = rec.wait_for("huge")
    assert failed.kind == "failed" and failed.error_code == "invalid_input" and "whole budget" in failed.error
    for job_id in ("a", "b", "c"):
        engine.submit(job_id, _params(frames=24), reserved=False)
    rec.wait_for("b", kinds=("progress",))
    time.sleep(0.05)
    assert "started" not in rec.kinds("c") and engine.queue_position("c") == 0  # 24 + 24 + 24 > 60
    runner.gate.set()
    assert all(rec.wait_for(j).kind == "finished" for j in "abc")
    assert [["a", "b"]] * 3 + [["c"]] * 3 == runner.batches
    for _ in range(4):
        engine.try_reserve()  # the refused job's slot was given back


def test_bad_input_fails_only_that_job(engine_factory):
    engine, rec = engine_factory(FakeRunner())
    engine.submit("x", _params("bad"), reserved=False)
    engine.submit("y", _params(), reserved=False)
    failed = rec.wait_for("x")
    assert failed.kind == "failed" and failed.error_code == "invalid_input" and failed.error.startswith("image:")
    assert failed.error_param == "image"  # the parameter travels as data, not only in the text
    assert rec.wait_for("y").kind == "finished"


def test_oom_fails_the_step_and_the_engine_goes_on(engine_factory):
    runner = FakeRunner()
    engine, rec = engine_factory(runner)
    engine.submit("oom1", _params(frames=48), reserved=False)
    assert rec.wait_for("oom1").error_code == "oom"
    assert "oom1" in runner.released
    engine.submit("ok", _params(), reserved=False)
    assert rec.wait_for("ok").kind == "finished"
    assert engine.alive()


def test_an_output_that_cannot_be_written_fails_its_job_and_drops_its_calls(engine_factory):
    runner = FakeRunner()
    engine, rec = engine_factory(runner)
    engine.submit("wfail", _params(), reserved=False)
    engine.submit("ok", _params(frames=48), reserved=False)
    failed = rec.wait_for("wfail")
    assert failed.kind == "failed" and failed.error_code == "internal"
    assert rec.wait_for("ok").kind == "finished"
    assert runner.calls["wfail"] == 1 and "wfail" in runner.released
    assert rec.kinds("wfail") == ["started", "progress", "failed"]


def test_device_error_stops_the_engine(engine_factory):
    engine, rec = engine_factory(FakeRunner())
    engine.submit("fatal1", _params(), reserved=False)
    assert rec.wait_for("fatal1").error_code == "internal"
    _until(lambda: not engine.alive())
    assert "device error" in engine.dead_reason and not engine.accepting()


def test_cancel_queued_and_running(engine_factory):
    runner = FakeRunner(step_delay=0.05)
    engine, rec = engine_factory(runner, max_batch_size=1)
    engine.submit("run", _params(frames=24), reserved=False)
    engine.submit("queued", _params(frames=48), reserved=False)  # another shape: never batched with "run"
    rec.wait_for("run", kinds=("progress",))
    engine.cancel("run")
    engine.cancel("queued")
    assert rec.wait_for("run").kind == "cancelled"
    assert rec.wait_for("queued").kind == "cancelled"
    assert "run" in runner.released and runner.calls["run"] < 3
    assert rec.kinds("queued") == ["cancelled"] and "queued" not in runner.calls  # never prefilled
    _until(lambda: engine.running_count == 0 and engine.queue_depth == 0)


def test_cancel_while_prefilling_and_no_admission_until_the_prefill_ends(engine_factory):
    runner = FakeRunner(hold_prefill=True)
    engine, rec = engine_factory(runner)
    engine.submit("p", _params(), reserved=False)
    rec.wait_for("p", kinds=("started",))
    engine.cancel("p")
    event = rec.wait_for("p")
    assert event.kind == "cancelled" and event.error_code == "cancelled" and "p" in runner.released
    engine.submit("next", _params(), reserved=False)  # the prefill worker is still busy: "next" waits, queued
    time.sleep(0.1)
    assert engine.queue_position("next") == 0 and rec.kinds("next") == []
    runner.hold_prefill = False
    runner.end_prefill()
    assert rec.wait_for("next").kind == "finished"
    assert rec.kinds("p") == ["started", "cancelled"] and all("p" not in batch for batch in runner.batches)


def test_time_limit_fails_the_job(engine_factory):
    engine, rec = engine_factory(FakeRunner(step_delay=0.2), job_timeout_s=0.3)
    engine.submit("slow", _params(), reserved=False)
    event = rec.wait_for("slow")
    assert event.kind == "failed" and event.error_code == "timeout" and "time limit" in event.error


# ---------------------------------------------------------------------------------------------- the tiny model


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_tiny_model_batches_two_jobs_and_matches_each_alone(tmp_path):
    from magi_server.runtime.pipeline import MagiPipeline

    pipe = MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path / "cache")
    params = [
        GenerationParams(prompts=(p,), width=64, height=64, num_frames=48, num_inference_steps=8, seed=s,
                         trim_to_frames=True)
        for p, s in (("a red fox", 11), ("a blue whale", 12))
    ]

    def run(jobs, outputs):
        runner = pipe.runner.with_outputs(outputs)
        rec = Recorder()
        engine = Engine(runner, on_event=rec, idle_wait_s=0.01)
        for job_id, p in jobs:
            engine.submit(job_id, p, reserved=False)
        engine.start()  # both submits are in the inbox before the first round: admitted together
        try:
            return {job_id: rec.wait_for(job_id, timeout=120) for job_id, _ in jobs}, runner
        finally:
            engine.stop()

    together, runner = run([("j1", params[0]), ("j2", params[1])], tmp_path / "together")
    assert all(e.kind == "finished" for e in together.values()), together
    assert runner.batch_sizes and set(runner.batch_sizes) == {2}
    alone1, runner1 = run([("j1", params[0])], tmp_path / "alone1")
    alone2, _ = run([("j2", params[1])], tmp_path / "alone2")
    assert set(runner1.batch_sizes) == {1}
    assert _sha(tmp_path / "together" / "j1.mp4") == _sha(tmp_path / "alone1" / "j1.mp4")
    assert _sha(tmp_path / "together" / "j2.mp4") == _sha(tmp_path / "alone2" / "j2.mp4")
    assert _sha(tmp_path / "together" / "j1.mp4") != _sha(tmp_path / "together" / "j2.mp4")
