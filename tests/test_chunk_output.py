"""Chunk output off the critical path (tiny preset, real model runner and engine): with the MP4 encoder slowed, the next
model call starts before the previous chunk's encode ends; the MP4 bytes equal the synchronous library path's;
events stay in order; a cancel drops pending output; a failing encode fails only its job."""
from __future__ import annotations

import hashlib
import threading
import time

import pytest

from magi_server.media import mp4
from magi_server.params import GenerationParams
from magi_server.runtime.pipeline import MagiPipeline
from tests.media_utils import probe_video
from tests.test_async_prefill import _Run

SLOW_S = 0.5


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> MagiPipeline:
    return MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


def _params(prompt: str = "a red fox", frames: int = 96, seed: int = 7, **kw) -> GenerationParams:
    return GenerationParams(prompts=(prompt,), width=64, height=64, num_frames=frames, num_inference_steps=8, seed=seed, **kw)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def slow_writer(monkeypatch):
    """Every append to an output MP4 (not a preview) takes SLOW_S longer; records (path, start, end) of each."""
    append = mp4.Mp4Writer.append
    spans: list[tuple[str, float, float]] = []

    def slowed(self, frames):
        start = time.monotonic()
        append(self, frames)
        if ".chunk" not in self.path.name:
            writing.set()
            time.sleep(SLOW_S)
            spans.append((self.path.name, start, time.monotonic()))

    writing = threading.Event()  # set when the first output append has begun
    slowed.writing = writing

    monkeypatch.setattr(mp4.Mp4Writer, "append", slowed)
    return spans


def test_next_call_starts_before_the_previous_chunk_is_encoded(pipe, slow_writer, tmp_path):
    with _Run(pipe, tmp_path / "async") as run:
        run.engine.submit("job", _params(), reserved=False)
        finished = run.rec.wait_for("job", timeout=120)
    assert finished.kind == "finished" and finished.num_frames == 96
    assert len(slow_writer) == 4 and len(run.chunk_calls) == 4  # one append per chunk
    for (call, _), (_, _, encoded) in zip(run.chunk_calls[:-1], slow_writer):
        # the call after the one that made this chunk final began before the chunk's encode ended (the synchronous
        # path decoded and encoded in between, so it began SLOW_S after)
        assert run.calls[call + 1][0] < encoded, (run.calls, slow_writer)
    # events in order: one per chunk with growing frame counts, previews named per chunk, then finished
    chunks = [e for e in run.rec.events if e.kind == "chunk"]
    assert [e.chunk_index for e in chunks] == [0, 1, 2, 3]
    assert [e.num_frames for e in chunks] == [24, 48, 72, 96]
    assert [e.preview for e in chunks] == [f"job.chunk{i}.mp4" for i in range(4)]
    assert run.rec.kinds("job") == ["started", "progress", "chunk", "chunk", "chunk", "chunk", "finished"]
    for e in chunks:
        assert probe_video(tmp_path / "async" / e.preview).frames == 24

    # the same bytes as the synchronous library path (decode and append between calls, as before)
    sync = pipe("a red fox", num_frames=96, seed=7, height=64, width=64, num_inference_steps=8,
                output_path=tmp_path / "sync.mp4")
    assert _sha(tmp_path / "async" / "job.mp4") == _sha(sync.path)


def test_trimmed_output_and_batched_jobs_match_the_library(pipe, tmp_path):
    """Two batched jobs, trimmed to 30 frames (hosted-API semantics): each MP4 is the library's for those frames."""
    with _Run(pipe, tmp_path / "async") as run:
        for job_id, seed in (("a", 1), ("b", 2)):
            run.engine.submit(job_id, _params(frames=30, seed=seed, trim_to_frames=True), reserved=False)
        for job_id in "ab":
            assert run.rec.wait_for(job_id, timeout=120).kind == "finished"
    assert set(run.runner.batch_sizes) == {2}
    for job_id, seed in (("a", 1), ("b", 2)):
        lib = pipe("a red fox", num_frames=32, seed=seed, height=64, width=64, num_inference_steps=8,
                   output_type="np")
        path = tmp_path / "async" / f"{job_id}.mp4"
        assert probe_video(path).frames == 30
        with mp4.Mp4Writer(tmp_path / f"{job_id}.lib.mp4", 64, 64, fps=24) as writer:
            writer.append(lib.frames[:24])
            writer.append(lib.frames[24:30])
        assert _sha(path) == _sha(tmp_path / f"{job_id}.lib.mp4")


def test_cancel_drops_pending_output(pipe, slow_writer, tmp_path):
    with _Run(pipe, tmp_path) as run:
        step = run.runner.step

        def slow_step(job_ids):  # calls of 50 ms: the cancel lands while calls are left
            time.sleep(0.05)
            return step(job_ids)

        run.runner.step = slow_step
        run.engine.submit("job", _params(frames=240), reserved=False)
        assert mp4.Mp4Writer.append.writing.wait(60)  # the first chunk is being written
        run.engine.cancel("job")
        assert run.rec.wait_for("job", timeout=30).kind == "cancelled"
        # dropped before the report, while the worker may still be inside the write
        assert not list(tmp_path.glob(".job.*.part"))
        calls = len(run.calls)
        time.sleep(3 * SLOW_S)  # the write in progress ends; nothing of the job may be reported after the cancel
    assert run.rec.kinds("job")[-1] == "cancelled" and "finished" not in run.rec.kinds("job")
    assert calls < 26 and len(run.calls) == calls  # no call after the cancel (240 frames take 26)
    assert len(slow_writer) <= 2  # the chunks queued behind the cancel were never written
    assert not (tmp_path / "job.mp4").exists() and not list(tmp_path.glob(".job.mp4.*.part"))


def test_a_failing_encode_fails_only_its_job(pipe, monkeypatch, tmp_path):
    append = mp4.Mp4Writer.append

    def broken(self, frames):
        if self.path.name == "bad.mp4":
            raise mp4.VideoWriteError("ffmpeg stopped accepting frames (disk full)")
        append(self, frames)

    monkeypatch.setattr(mp4.Mp4Writer, "append", broken)
    with _Run(pipe, tmp_path) as run:
        # the failing job is long (26 calls): its failure (at its first chunk's write, on a worker thread) must
        # arrive before it could have run them all, however the engine and the writer share the cores
        run.engine.submit("bad", _params(frames=240, seed=1), reserved=False)
        run.engine.submit("good", _params(frames=96, seed=2), reserved=False)
        failed = run.rec.wait_for("bad", timeout=60)
        assert failed.kind == "failed" and failed.error_code == "internal"
        assert run.rec.wait_for("good", timeout=60).kind == "finished"
        time.sleep(0.2)
        assert run.engine.alive()
    assert run.rec.kinds("bad") == ["started", "progress", "failed"]
    # its remaining calls were dropped at the next safe point (240 frames take 26 calls)
    assert len(run.starts("bad")) < 26
    assert not (tmp_path / "bad.mp4").exists() and not list(tmp_path.glob(".bad.mp4.*.part"))


def test_abort_from_another_thread_stops_a_write_in_progress(tmp_path):
    """How the engine drops a cancelled job's output without waiting for the output worker: abort() from another
    thread kills the encoder, the producer's append fails at once, and no file is left."""
    import numpy as np

    writer = mp4.Mp4Writer(tmp_path / "x.mp4", 320, 240, fps=24)
    frames = np.random.default_rng(0).integers(0, 255, (24, 240, 320, 3), dtype=np.uint8)
    outcome = {}

    def produce():  # an endless stream: the producer is (nearly always) blocked inside append when abort comes
        try:
            while True:
                writer.append(frames)
        except mp4.VideoWriteError as exc:
            outcome["result"] = exc

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(0.3)
    writer.abort()
    producer.join(10)
    assert not producer.is_alive() and isinstance(outcome["result"], mp4.VideoWriteError)
    assert list(tmp_path.iterdir()) == []
