"""Job events: the hub's numbered, bounded per-job histories and asyncio hand-offs, the waits built on them (sync
mode) and the WaveSpeed event stream (only WaveSpeed status words; ``Last-Event-ID`` resumes after that event)."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import pytest

from magi_server.engine.loop import EngineEvent
from magi_server.params import GenerationParams
from magi_server.runtime.pipeline import MagiPipeline
from magi_server.serving.adapters.wavespeed import STATUS
from magi_server.serving.events import EventHub, on_engine_event, wait_for_terminal
from magi_server.serving.jobs import TERMINAL, Job, JobStatus
from tests.server_utils import read_sse, running_server, tiny_settings, wait_status

MODEL = "/api/v3/wavespeed-ai/magi-1-24b"
THREE_CHUNKS = {"prompt": "three chunks", "num_frames": 72, "num_inference_steps": 8}


# ---------------------------------------------------------------------------------------------------- the hub


def test_ids_count_up_per_job_and_nothing_follows_the_end():
    hub = EventHub()
    assert [hub.publish("a", "status", status=JobStatus.QUEUED).id, hub.publish("b", "progress").id,
            hub.publish("a", "status", status=JobStatus.RUNNING).id] == [1, 1, 2]
    assert hub.publish("a", "status", status=JobStatus.COMPLETED).ends_job
    assert hub.publish("a", "progress", chunks_done=1, chunks_total=1) is None
    assert [e.id for e in hub.since("a")] == [1, 2, 3] and [e.id for e in hub.since("a", 2)] == [3]
    assert hub.since("unknown") == []


def test_the_hub_stays_bounded():
    now = [0.0]
    hub = EventHub(max_events_per_job=3, max_jobs=3, keep_ended_s=60, clock=lambda: now[0])
    for n in range(5):
        hub.publish("long", "progress", chunks_done=n)
    assert [e.id for e in hub.since("long")] == [3, 4, 5]  # the oldest events went, the ids did not restart
    hub.publish("ended", "status", status=JobStatus.FAILED)
    hub.publish("live", "status", status=JobStatus.QUEUED)
    hub.publish("new", "status", status=JobStatus.QUEUED)  # at the cap: the ended job goes first, not the oldest
    assert hub.since("ended") == [] and hub.since("long") and hub.since("live")
    hub.publish("newer", "status", status=JobStatus.QUEUED)  # nothing has ended: the oldest goes
    assert hub.since("long") == [] and hub.since("live") and hub.since("new")
    hub.publish("new", "status", status=JobStatus.COMPLETED)
    now[0] = 61.0
    hub.publish("newest", "status", status=JobStatus.QUEUED)  # an ended history goes after keep_ended_s anyway
    assert hub.since("new") == [] and hub.since("live") and hub.since("newer") and hub.since("newest")


def test_a_waiter_is_handed_the_event_from_another_thread():
    hub = EventHub()
    hub.publish("j", "status", status=JobStatus.QUEUED)

    async def scenario():
        assert [e.id for e in await hub.wait("j", 0, 5)] == [1]  # already there: no wait
        started = time.monotonic()
        assert await hub.wait("j", 1, 0.05) == [] and time.monotonic() - started >= 0.05  # nothing: times out
        published = []
        timer = threading.Timer(0.2, lambda: published.append(
            (time.monotonic(), hub.publish("j", "status", status=JobStatus.RUNNING))))
        timer.start()
        events = await hub.wait("j", 1, 10)
        woke = time.monotonic()
        timer.join()
        assert [e.id for e in events] == [2] and woke - published[0][0] < 0.05
        assert not hub._jobs["j"].waiters  # a woken or timed-out waiter leaves nothing behind

    asyncio.run(scenario())


class _CountingStore:
    """A job store double: the job ends when the test says so; counts reads."""

    def __init__(self, job: Job) -> None:
        self.job, self.reads = job, 0

    def get(self, job_id: str) -> Job:
        self.reads += 1
        return self.job


def _job() -> Job:
    params = GenerationParams(prompts=("x",), width=160, height=96, num_frames=24, num_inference_steps=8, seed=1,
                              trim_to_frames=True)
    return Job.new("wavespeed", "wavespeed-ai/magi-1-24b", params)


def test_wait_for_terminal_is_woken_by_the_end_and_reads_the_store_twice():
    job = _job()
    ctx = SimpleNamespace(store=_CountingStore(job), hub=EventHub())

    def finish():
        time.sleep(0.3)
        ctx.hub.publish(job.id, "progress", chunks_done=1, chunks_total=1)  # wakes the waiter, no store read
        ctx.store.job = SimpleNamespace(id=job.id, is_terminal=True, status=JobStatus.COMPLETED)
        ended.append(time.monotonic())
        ctx.hub.publish(job.id, "status", status=JobStatus.COMPLETED)

    async def scenario():
        thread = threading.Thread(target=finish)
        thread.start()
        done = await wait_for_terminal(ctx, job.id, timeout_s=30)
        returned = time.monotonic()
        thread.join()
        return done, returned

    ended: list[float] = []
    done, returned = asyncio.run(scenario())
    assert done.status is JobStatus.COMPLETED and returned - ended[0] < 0.05
    assert ctx.store.reads == 2  # once before waiting, once at the end: no polling

    ctx = SimpleNamespace(store=_CountingStore(_job()), hub=EventHub())  # never ends: the timeout answers
    started = time.monotonic()
    still = asyncio.run(wait_for_terminal(ctx, ctx.store.job.id, timeout_s=0.2))
    assert still.status is JobStatus.QUEUED and 0.2 <= time.monotonic() - started < 1 and ctx.store.reads == 1


# ------------------------------------------------------------------------------------------ over the real server
# (marked slow one by one: the hub tests above are part of the inner loop)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture
def server(tmp_path, pipeline):
    with running_server(tiny_settings(tmp_path, tmp_path / "cache"), pipeline=pipeline) as pair:
        yield pair


def _read_sse(client, path: str, headers: dict | None = None, timeout_s: float = 60) -> list[dict]:
    return read_sse(client, path, timeout_s, headers=headers)


def _status_words(events: list[dict]) -> list[str]:
    return [e["data"]["status"] for e in events if "status" in e["data"]]


def _assert_wavespeed_words(events: list[dict]) -> None:
    words = _status_words(events)
    assert set(words) <= set(STATUS.values()), words
    assert all(a != b for a, b in zip(words, words[1:])), f"a status repeats the one before it: {words}"
    assert events[-1]["event"] == words[-1] and events[-1]["event"] in ("completed", "failed", "cancelled")


@pytest.mark.slow
def test_stream_speaks_only_wavespeed_status_words(server):
    ctx, client = server
    job_id = client.post(MODEL, json=THREE_CHUNKS).json()["data"]["id"]
    events = _read_sse(client, f"/api/v3/predictions/{job_id}/events")
    _assert_wavespeed_words(events)
    assert _status_words(events) == ["created", "processing", "completed"]
    assert [e["event"] for e in events if e["event"] == "chunk"] == ["chunk"] * 3
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids)), ids  # every event has an id, counting up


@pytest.mark.slow
def test_stream_across_a_requeue_says_created_not_queued(server):
    """A running job put back in the queue (as a graceful drain does) and started again. Driven through the
    engine-event bridge and the hub: a drain requeues only when the server stops."""
    ctx, client = server
    job = ctx.store.create(_job())
    ctx.hub.publish(job.id, "status", status=JobStatus.QUEUED)
    on_engine_event(ctx, EngineEvent("started", job.id))
    on_engine_event(ctx, EngineEvent("progress", job.id, chunks_total=1))
    early = _read_sse_in_background(client, job.id)  # follows the rest live, through the hand-off
    time.sleep(0.3)
    ctx.store.requeue(job.id)
    ctx.hub.publish(job.id, "status", status=JobStatus.QUEUED)
    on_engine_event(ctx, EngineEvent("started", job.id))
    ctx.hub.publish(job.id, "status", status=JobStatus.RUNNING)  # the same status again is not repeated
    on_engine_event(ctx, EngineEvent("chunk", job.id, chunks_done=1, chunks_total=1, chunk_index=0, num_frames=24))
    (ctx.outputs_dir / f"{job.id}.mp4").write_bytes(b"")
    on_engine_event(ctx, EngineEvent("finished", job.id, chunks_done=1, chunks_total=1, output=f"{job.id}.mp4",
                                     num_frames=24, inference_ms=5))
    late = _read_sse(client, f"/api/v3/predictions/{job.id}/events")
    for events in (early(), late):
        _assert_wavespeed_words(events)
        assert _status_words(events) == ["created", "processing", "created", "processing", "completed"]
        assert "queued" not in json.dumps(events)
    assert early() == late  # live and replayed streams are the same events


def _read_sse_in_background(client, job_id: str):
    result: list = []
    thread = threading.Thread(target=lambda: result.append(_read_sse(client, f"/api/v3/predictions/{job_id}/events")),
                              daemon=True)
    thread.start()

    def events() -> list[dict]:
        thread.join(60)
        assert result, "the live stream did not end"
        return result[0]

    return events


@pytest.mark.slow
def test_reconnect_with_last_event_id_gets_only_the_events_after_it(server):
    ctx, client = server
    job_id = client.post(MODEL, json=THREE_CHUNKS).json()["data"]["id"]
    deadline = time.monotonic() + 60
    while not any(e.kind == "status" and e.data["status"] is JobStatus.RUNNING for e in ctx.hub.since(job_id)):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.01)
    running = next(e.id for e in ctx.hub.since(job_id) if e.kind == "status" and e.data["status"] is JobStatus.RUNNING)
    path = f"/api/v3/predictions/{job_id}/events"
    resumed_live = _read_sse(client, path, headers={"Last-Event-ID": str(running)})  # while the job runs
    full = _read_sse(client, path)
    assert full[-1]["event"] == "completed" and len(full) > 5
    assert resumed_live == [e for e in full if e["id"] > running]
    for i, event in enumerate(full):  # after every event of a finished job: exactly the rest
        assert _read_sse(client, path, headers={"Last-Event-ID": str(event["id"])}) == full[i + 1:], event
    # an id that is not a number, or one this server never gave (from before a restart), starts over
    assert _read_sse(client, path, headers={"Last-Event-ID": "abc"}) == full
    assert _read_sse(client, path, headers={"Last-Event-ID": str(10**9)}) == full


@pytest.mark.slow
def test_stream_of_a_job_the_hub_never_saw_starts_from_its_state(server):
    """After a restart the hub is empty: the job's stored state stands in for its history."""
    ctx, client = server
    job = ctx.store.create(_job())
    ctx.store.mark_running(job.id)
    events = _read_sse_in_background(client, job.id)
    time.sleep(0.3)
    on_engine_event(ctx, EngineEvent("failed", job.id, error="boom", error_code="internal"))
    got = events()
    assert [(e["id"], e["event"]) for e in got] == [(0, "status"), (1, "failed")]
    assert _status_words(got) == ["processing", "failed"] and got[-1]["data"]["code"] == 1403


@pytest.mark.slow
def test_an_api_cancel_ends_the_stream_at_once(server):
    """The cancel makes the row final and tells the hub: the stream ends now, not at the engine's next safe point
    (here the engine never hears of the job at all)."""
    ctx, client = server
    job = ctx.store.create(_job())
    ctx.hub.publish(job.id, "status", status=JobStatus.QUEUED)
    events = _read_sse_in_background(client, job.id)
    time.sleep(0.3)
    started = time.monotonic()
    assert client.post(f"/api/v3/predictions/{job.id}/cancel").json()["data"]["status"] == "cancelled"
    got = events()
    assert time.monotonic() - started < 2 and [e["event"] for e in got] == ["status", "cancelled"]
    assert _status_words(got) == ["created", "cancelled"]


@pytest.mark.slow
def test_sync_mode_is_handed_the_end_without_polling(server, monkeypatch):
    ctx, client = server
    reads, ended = [], []
    get, publish = ctx.store.get, ctx.hub.publish
    monkeypatch.setattr(ctx.store, "get", lambda *a, **k: reads.append(1) or get(*a, **k))

    def timed_publish(job_id, kind, **data):
        if kind == "status" and data["status"] in TERMINAL:
            ended.append(time.monotonic())  # before the hand-off, which may answer the client at once
        return publish(job_id, kind, **data)

    monkeypatch.setattr(ctx.hub, "publish", timed_publish)
    started = time.monotonic()
    r = client.post(MODEL, json={**THREE_CHUNKS, "enable_sync_mode": True})
    answered = time.monotonic()
    data = r.json()["data"]
    assert r.status_code == 200 and data["status"] == "completed" and len(data["outputs"]) == 1
    assert answered - ended[0] < 0.5, answered - ended[0]  # the end is handed over, not found by a later poll
    # once before waiting, once at the end; a 50 ms poll would have read the store about once per 50 ms
    assert len(reads) <= 3 and answered - started > 0.2, (len(reads), answered - started)
    assert wait_status(client, data["id"])["status"] == "completed"
