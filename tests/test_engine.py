"""The engine loop: schedule -> execute -> update, with a fake executor and with the tiny model."""
from __future__ import annotations

import hashlib
import threading
import time

import pytest

from magi_server.engine.loop import Engine, EngineEvent, QueueFullError
from magi_server.runtime.model_runner import ChunkDone, Finished, JobFailed, PipelineExecutor, PrefillInfo, Prefilled
from magi_server.params import GenerationParams
from magi_server.media.video import InputError


class FakeExecutor:
    """Three calls per job, one chunk at the last; failure modes chosen by the prompt. Background work finishes at
    once: its records are ready for the next poll."""

    def __init__(self, step_delay: float = 0.0):
        self.calls: dict[str, int] = {}
        self.batches: list[list[str]] = []
        self.released: list[str] = []
        self.step_delay = step_delay
        self.gate = threading.Event()
        self.gate.set()
        self.prefilling = False
        self._records: list = []
        self._wakeup = lambda: None

    def set_wakeup(self, wakeup):
        self._wakeup = wakeup

    def request_memory_bytes(self, params):
        from magi_server.models.config import preset
        from magi_server.runtime.memory_model import request_memory_estimate

        return request_memory_estimate(dit=preset("tiny").dit, width=64, height=64, num_frames=96, num_steps=8,
                                       window_size=4, cfg_number=1).total_bytes

    def start_prefill(self, jobs):
        for job_id, params in jobs:
            if params.prompts[0] == "bad":
                self._records.append(JobFailed(job_id, "prefill", InputError("image", "not a PNG, JPEG or WebP image")))
                continue
            self.calls[job_id] = 0
            self._records.append(Prefilled(job_id, PrefillInfo(params.shape_key(), 3, 1)))
        self._wakeup()

    def poll(self):
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
            if self.calls[job_id] == 3:
                out.append(job_id)
                self._records.append(ChunkDone(job_id, 0, 1, 24, None))
        return out

    def finish(self, job_id):
        self._records.append(Finished(job_id, f"{job_id}.mp4", 24, 5, 1))

    def release(self, job_id):
        self.released.append(job_id)

    def empty_device_cache(self):
        pass

    def shutdown(self):
        pass


def _params(prompt="a cat", frames=24, **kw):
    return GenerationParams(prompts=(prompt,), width=64, height=64, num_frames=frames, num_inference_steps=8, seed=1, **kw)


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


@pytest.fixture
def engine_factory():
    engines = []

    def make(executor, **kw):
        rec = Recorder()
        engine = Engine(executor, on_event=rec, idle_wait_s=0.01, **kw)
        engine.start()
        engines.append(engine)
        return engine, rec

    yield make
    for engine in engines:
        engine.stop()


def test_two_jobs_of_one_shape_share_every_call(engine_factory):
    ex = FakeExecutor()
    ex.gate.clear()  # hold the loop so both jobs are admitted in the same round
    engine, rec = engine_factory(ex)
    engine.submit("a", _params(), reserved=False)
    engine.submit("b", _params(), reserved=False)
    time.sleep(0.1)
    ex.gate.set()
    for job in "ab":
        assert rec.wait_for(job).kind == "finished"
        assert rec.kinds(job) == ["started", "progress", "chunk", "finished"]
    assert ex.batches == [["a", "b"]] * 3


def test_queue_bound_by_reservation(engine_factory):
    engine, _ = engine_factory(FakeExecutor(), max_queue=2)
    engine.try_reserve()
    engine.try_reserve()
    with pytest.raises(QueueFullError) as info:
        engine.try_reserve()
    assert info.value.retry_after_s > 0
    engine.unreserve()
    engine.try_reserve()


def test_bad_input_fails_only_that_job(engine_factory):
    engine, rec = engine_factory(FakeExecutor())
    engine.submit("x", _params("bad"), reserved=False)
    engine.submit("y", _params(), reserved=False)
    failed = rec.wait_for("x")
    assert failed.kind == "failed" and failed.error_code == "invalid_input" and failed.error.startswith("image:")
    assert rec.wait_for("y").kind == "finished"


def test_oom_fails_the_step_and_the_engine_goes_on(engine_factory):
    engine, rec = engine_factory(FakeExecutor())
    engine.submit("oom1", _params(frames=48), reserved=False)
    assert rec.wait_for("oom1").error_code == "oom"
    engine.submit("ok", _params(), reserved=False)
    assert rec.wait_for("ok").kind == "finished"
    assert engine.alive()


def test_device_error_stops_the_engine(engine_factory):
    engine, rec = engine_factory(FakeExecutor())
    engine.submit("fatal1", _params(), reserved=False)
    assert rec.wait_for("fatal1").error_code == "internal"
    deadline = time.monotonic() + 5
    while engine.alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.alive() and "device error" in engine.dead_reason


def test_cancel_queued_and_running(engine_factory):
    ex = FakeExecutor(step_delay=0.05)
    engine, rec = engine_factory(ex, max_batch_size=1)
    engine.submit("run", _params(frames=24), reserved=False)
    engine.submit("queued", _params(frames=48), reserved=False)  # another shape: never batched with "run"
    rec.wait_for("run", kinds=("progress",))
    engine.cancel("run")
    engine.cancel("queued")
    assert rec.wait_for("run").kind == "cancelled"
    assert rec.wait_for("queued").kind == "cancelled"
    assert "run" in ex.released


def test_time_limit_fails_the_job(engine_factory):
    engine, rec = engine_factory(FakeExecutor(step_delay=0.2), job_timeout_s=0.3)
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
        GenerationParams(prompts=(p,), width=64, height=64, num_frames=48, num_inference_steps=8, seed=s, trim_to_frames=True)
        for p, s in (("a red fox", 11), ("a blue whale", 12))
    ]

    def run(jobs, outputs):
        executor = PipelineExecutor(pipe, outputs)
        rec = Recorder()
        engine = Engine(executor, on_event=rec, idle_wait_s=0.01)
        for job_id, p in jobs:
            engine.submit(job_id, p, reserved=False)
        engine.start()  # both submits are in the inbox before the first round: admitted together
        try:
            return {job_id: rec.wait_for(job_id, timeout=120) for job_id, _ in jobs}, executor
        finally:
            engine.stop()

    together, executor = run([("j1", params[0]), ("j2", params[1])], tmp_path / "together")
    assert all(e.kind == "finished" for e in together.values()), together
    assert executor.batch_sizes and set(executor.batch_sizes) == {2}
    alone1, ex1 = run([("j1", params[0])], tmp_path / "alone1")
    alone2, _ = run([("j2", params[1])], tmp_path / "alone2")
    assert set(ex1.batch_sizes) == {1}
    assert _sha(tmp_path / "together" / "j1.mp4") == _sha(tmp_path / "alone1" / "j1.mp4")
    assert _sha(tmp_path / "together" / "j2.mp4") == _sha(tmp_path / "alone2" / "j2.mp4")
    assert _sha(tmp_path / "together" / "j1.mp4") != _sha(tmp_path / "together" / "j2.mp4")
