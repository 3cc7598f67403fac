"""Serving limits over the real app, engine and tiny model, in process: queue bound, cancel, job time limit, SSE,
/metrics and readiness (reliability goal table rows 6, 8, 9, 11, 12, and the /metrics counters).

Long jobs use num_frames 960 (40 chunks, ~10 s on two cores) so they are still running when the test acts; the
tests cancel or time them out instead of waiting for them. Every wait has a deadline.
"""
from __future__ import annotations

import base64
import time
from pathlib import Path

import numpy as np
import pytest

from magi_server.serving.jobs import JobStatus
from magi_server.runtime.pipeline import MagiPipeline
from magi_server.media.images import encode_png
from tests.media_utils import probe_video
from tests.server_utils import read_sse, running_server, tiny_settings, wait_status

MODEL = "/api/v3/wavespeed-ai/magi-1-24b"
LONG = {"prompt": "a long shot", "num_frames": 960, "num_inference_steps": 8}
SHORT = {"prompt": "a short shot", "num_frames": 24, "num_inference_steps": 8}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


def _settings(tmp_path: Path, **overrides):
    return tiny_settings(tmp_path, tmp_path / "cache", **overrides)


def _until(predicate, timeout_s: float, what: str, poll_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _status(client, job_id: str) -> dict:
    return client.get(f"/api/v3/predictions/{job_id}/result").json()["data"]


def _submit(client, body: dict) -> str:
    r = client.post(MODEL, json=body)
    assert r.status_code == 200, r.text
    return r.json()["data"]["id"]


def _metrics(client) -> dict[tuple[str, frozenset], float]:
    """The /metrics text parsed: (name, {label: value}) -> value (what a Prometheus scrape would read)."""
    series = {}
    for line in client.get("/metrics").text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, labels = head.partition("{")
        pairs = frozenset()
        if labels:
            pairs = frozenset(tuple(part.split("=", 1)) for part in labels.rstrip("}").split(","))
            pairs = frozenset((k, v.strip('"')) for k, v in pairs)
        series[(name, pairs)] = float(value)
    return series


def _m(series: dict, name: str, **labels) -> float:
    return series.get((name, frozenset(labels.items())), 0.0)


def _files_of(outputs: Path, job_id: str) -> list[str]:
    return sorted(p.name for p in outputs.iterdir() if job_id in p.name)


# --------------------------------------------------------------------------------------------------- queue bound


def test_full_queue_answers_429_with_retry_after_and_stores_nothing(tmp_path, pipeline):
    with running_server(_settings(tmp_path, max_queue=2, max_batch_size=1), pipeline=pipeline) as (ctx, client):
        png = encode_png(np.full((40, 72, 3), 120, dtype=np.uint8))
        body = dict(LONG, image="data:image/png;base64," + base64.b64encode(png).decode())
        accepted = [_submit(client, body)]
        # once it runs, exactly max_queue=2 more fit (the running job holds for ~10 s, so this is deterministic)
        _until(lambda: _status(client, accepted[0])["status"] == "processing", 30, "the first job to start")
        rejected = None
        for _ in range(4):
            before_counts = ctx.store.count_by_status()
            before_uploads = sorted(p.name for p in ctx.uploads_dir.glob("*")) if ctx.uploads_dir.exists() else []
            before_rejects = _m(_metrics(client), "magi_jobs_rejected_total", reason="queue_full")
            started = time.monotonic()
            r = client.post(MODEL, json=body)
            elapsed = time.monotonic() - started
            if r.status_code == 429:
                rejected = r
                break
            assert r.status_code == 200, r.text
            accepted.append(r.json()["data"]["id"])
        assert rejected is not None, f"no 429 after {len(accepted)} accepted submits with max_queue=2"
        assert len(accepted) == 3, accepted  # the queue bound holds: 1 running + 2 waiting
        assert int(rejected.headers["Retry-After"]) >= 1
        payload = rejected.json()
        assert payload["code"] == 429 and payload["data"] is None and "queue is full" in payload["message"]
        assert "HTTP 5" not in payload["message"]  # the SDK would replay a task whose error says so
        assert elapsed < 1.0  # rejected at once, not after waiting for room
        # nothing stored for the refused submit: no row, and its decoded input image was removed again
        assert ctx.store.count_by_status() == before_counts
        assert sorted(p.name for p in ctx.uploads_dir.glob("*")) == before_uploads
        assert _m(_metrics(client), "magi_jobs_rejected_total", reason="queue_full") == before_rejects + 1
        # and it stays full while the first job runs: the waiting jobs are not let in behind its back (each
        # would free its slot and show "processing" while it only waits for the GPU)
        time.sleep(0.5)
        counts = ctx.store.count_by_status()
        assert counts[JobStatus.RUNNING] == 1 and counts[JobStatus.QUEUED] == 2, counts
        assert ctx.engine.running_count == 1 and ctx.engine.queue_depth == 2
        assert [_status(client, j)["status"] for j in accepted] == ["processing", "created", "created"]
        assert client.post(MODEL, json=SHORT).status_code == 429
        for job_id in accepted:  # end quickly
            client.post(f"/api/v3/predictions/{job_id}/cancel")
        for job_id in accepted:
            assert wait_status(client, job_id, timeout=30)["status"] == "cancelled"
        # the rows are final at once; the engine gives the slots back at its next round (after the call in flight)
        _until(lambda: ctx.engine.queue_depth == 0 and ctx.engine.running_count == 0, 10, "the engine to let go")
        assert client.post(MODEL, json=SHORT).status_code == 200


# -------------------------------------------------------------------------------------------------------- cancel


def test_cancel_queued_and_running(tmp_path, pipeline):
    with running_server(_settings(tmp_path, max_batch_size=1), pipeline=pipeline) as (ctx, client):
        before = _metrics(client)
        running = _submit(client, LONG)
        queued = _submit(client, LONG)
        # mid-run: at least one chunk written, so the job holds state and a partial encode
        _until(lambda: _status(client, running)["progress"]["chunks_done"] >= 1, 30, "the first chunk")
        assert _status(client, queued)["status"] == "created"

        r = client.post(f"/api/v3/predictions/{queued}/cancel")
        assert r.status_code == 200 and r.json()["data"]["status"] == "cancelled"
        steps_at_cancel = ctx.engine_for(None).steps_run
        r = client.post(f"/api/v3/predictions/{running}/cancel")
        assert r.status_code == 200 and r.json()["data"]["status"] == "cancelled"
        # the engine lets go of it at the next safe point: at most the model call in flight completes
        _until(lambda: ctx.engine.running_count == 0, 10, "the running job to stop")
        assert ctx.engine_for(None).steps_run - steps_at_cancel <= 1
        time.sleep(0.3)  # and nothing runs afterwards
        assert ctx.engine_for(None).steps_run - steps_at_cancel <= 1

        for job_id in (running, queued):
            data = _status(client, job_id)
            assert data["status"] == "cancelled" and data["outputs"] == [] and data["error"] == "cancelled"
            assert not (ctx.outputs_dir / f"{job_id}.mp4").exists()
            # a chunk preview the output worker was encoding when the cancel came is removed once it is done (on a
            # busy machine that can take longer than the model call did)
            _until(lambda: not [n for n in _files_of(ctx.outputs_dir, job_id) if n.endswith(".part")], 10,
                   "the cancelled job's partial files to be removed")
        assert _status(client, running)["progress"]["chunks_done"] < 40
        never_ran = ctx.store.get(queued)
        assert never_ran.started_at is None and never_ran.attempts == 0
        # terminal jobs cannot be cancelled again; unknown ids are 404
        assert client.post(f"/api/v3/predictions/{running}/cancel").status_code == 400
        assert client.post("/api/v3/predictions/" + "0" * 32 + "/cancel").status_code == 404
        # counted once each, as cancelled; the engine goes on with the next job
        _until(lambda: _m(_metrics(client), "magi_jobs_finished_total", outcome="cancelled")
               == _m(before, "magi_jobs_finished_total", outcome="cancelled") + 2, 10, "the cancel metric")
        assert wait_status(client, _submit(client, SHORT), timeout=60)["status"] == "completed"
        assert _m(_metrics(client), "magi_jobs_finished_total", outcome="cancelled") == \
            _m(before, "magi_jobs_finished_total", outcome="cancelled") + 2


def test_cancel_that_races_the_last_call_leaves_no_output(tmp_path, pipeline):
    """The engine reports "finished" for a job whose row an API cancel already made final (the cancel arrived
    while its last model call ran): the client was told "cancelled", so the finished MP4 must not appear, and the
    ending is counted once, as cancelled. Driven through the engine-event bridge directly: the race itself is a
    few milliseconds wide."""
    from magi_server.engine.loop import EngineEvent
    from magi_server.serving.jobs import Job
    from magi_server.params import GenerationParams
    from magi_server.serving.events import on_engine_event

    with running_server(_settings(tmp_path), pipeline=pipeline) as (ctx, client):
        params = GenerationParams(prompts=("x",), width=160, height=96, num_frames=24, num_inference_steps=8, seed=1,
                                  trim_to_frames=True)
        job = ctx.store.create(Job.new("wavespeed", "wavespeed-ai/magi-1-24b", params))
        ctx.store.mark_running(job.id)
        assert client.post(f"/api/v3/predictions/{job.id}/cancel").json()["data"]["status"] == "cancelled"
        output = ctx.outputs_dir / f"{job.id}.mp4"
        output.write_bytes(b"finished just before the cancel was seen")
        before = _metrics(client)
        on_engine_event(ctx, EngineEvent("finished", job.id, chunks_done=1, chunks_total=1, output=output.name,
                                         num_frames=24, inference_ms=5))
        assert not output.exists()
        data = _status(client, job.id)
        assert data["status"] == "cancelled" and data["outputs"] == []
        after = _metrics(client)
        assert _m(after, "magi_jobs_finished_total", outcome="cancelled") == \
            _m(before, "magi_jobs_finished_total", outcome="cancelled") + 1
        assert _m(after, "magi_jobs_finished_total", outcome="completed") == \
            _m(before, "magi_jobs_finished_total", outcome="completed")


# ---------------------------------------------------------------------------------------------------- time limit


def test_job_time_limit_fails_the_job(tmp_path, pipeline):
    limit = 2.0
    with running_server(_settings(tmp_path, job_timeout_s=limit, max_batch_size=1), pipeline=pipeline) as (ctx, client):
        started = time.monotonic()
        job_id = _submit(client, LONG)
        behind = _submit(client, SHORT)  # waits for the GPU while the long one runs into its limit
        data = wait_status(client, job_id, timeout=30)
        elapsed = time.monotonic() - started
        assert data["status"] == "failed", data
        assert "exceeded its time limit" in data["error"] and data["code"] == 1405, data
        assert data["outputs"] == [] and not (ctx.outputs_dir / f"{job_id}.mp4").exists()
        assert data["progress"]["chunks_done"] < 40  # it was stopped, not allowed to finish
        assert limit <= elapsed < limit + 5.0, elapsed  # within the cap plus one model call and polling slack
        assert ctx.store.get(job_id).error_code == "timeout"
        # the limit is on running time: the job queued behind it waited about as long as the limit, then ran
        done = wait_status(client, behind, timeout=60)
        assert done["status"] == "completed", done
        assert time.monotonic() - started > limit  # submit-to-finish above the limit, and still not failed
        assert probe_video(ctx.outputs_dir / f"{behind}.mp4").frames == 24


# ----------------------------------------------------------------------------------------------------------- SSE


def _read_sse(client, path: str, timeout_s: float) -> list[tuple[str, dict]]:
    """Every (event name, data) of an SSE stream (server_utils.read_sse)."""
    return [(event.get("event"), event["data"]) for event in read_sse(client, path, timeout_s) if "data" in event]


def test_sse_streams_each_chunk_before_completed(tmp_path, pipeline):
    with running_server(_settings(tmp_path), pipeline=pipeline) as (ctx, client):
        job_id = _submit(client, {"prompt": "three chunks", "num_frames": 72, "num_inference_steps": 8})
        events = _read_sse(client, f"/api/v3/predictions/{job_id}/events", timeout_s=60)
        kinds = [kind for kind, _ in events]
        assert kinds[0] == "status" and kinds[-1] == "completed", kinds
        assert kinds.count("completed") == 1 and all(data["id"] == job_id for _, data in events)
        chunks = [data for kind, data in events if kind == "chunk"]
        assert [c["index"] for c in chunks] == [0, 1, 2], chunks
        assert [c["chunks_done"] for c in chunks] == [1, 2, 3] and {c["chunks_total"] for c in chunks} == {3}
        assert [c["frames"] for c in chunks] == [24, 48, 72]
        progress = [data["chunks_done"] for kind, data in events if kind == "progress"]
        assert progress == sorted(progress) and progress[-1] == 3
        for c in chunks:
            r = client.get(c["url"].replace("http://testserver", ""))
            assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
            path = tmp_path / f"chunk{c['index']}.mp4"
            path.write_bytes(r.content)
            info = probe_video(path)
            assert (info.frames, info.width, info.height) == (24, 160, 96), info
        final = events[-1][1]
        assert final["status"] == "completed" and [u.split("?")[0] for u in final["outputs"]] == [
            f"http://testserver/files/{job_id}.mp4"]
        assert probe_video(ctx.outputs_dir / f"{job_id}.mp4").frames == 72
        # a client that connects after the end gets the history and the final event at once
        late = _read_sse(client, f"/api/v3/predictions/{job_id}/events", timeout_s=10)
        assert [c["index"] for kind, c in late if kind == "chunk"] == [0, 1, 2] and late[-1][0] == "completed"
        assert client.get("/api/v3/predictions/" + "0" * 32 + "/events").status_code == 404


# ------------------------------------------------------------------------------------------------------- metrics


def test_metrics_count_what_happened(tmp_path, pipeline):
    with running_server(_settings(tmp_path, max_queue=2), pipeline=pipeline) as (ctx, client):
        route = MODEL
        before = _metrics(client)
        ids = [_submit(client, dict(SHORT, seed=i)) for i in range(3)]
        for job_id in ids:
            assert wait_status(client, job_id, timeout=60)["status"] == "completed"
        assert client.post(MODEL, json={"seed": 1}).status_code == 400  # no prompt
        # a full queue, deterministically: hold every slot as in-flight submits would
        for _ in range(ctx.settings.max_queue):
            ctx.engine_for(None).try_reserve()
        try:
            assert client.post(MODEL, json=SHORT).status_code == 429
        finally:
            for _ in range(ctx.settings.max_queue):
                ctx.engine_for(None).unreserve()
        _until(lambda: _m(_metrics(client), "magi_jobs_finished_total", outcome="completed")
               >= _m(before, "magi_jobs_finished_total", outcome="completed") + 3, 10, "the finish counter")
        after = _metrics(client)

        def rose(name, **labels):
            return _m(after, name, **labels) - _m(before, name, **labels)

        assert rose("magi_jobs_submitted_total", api="wavespeed") == 3
        assert rose("magi_http_requests_total", route=route, method="POST", code="200") == 3
        assert rose("magi_http_requests_total", route=route, method="POST", code="400") == 1
        assert rose("magi_http_requests_total", route=route, method="POST", code="429") == 1
        assert rose("magi_jobs_rejected_total", reason="queue_full") == 1
        assert rose("magi_jobs_finished_total", outcome="completed") == 3
        assert rose("magi_jobs_finished_total", outcome="failed") == 0
        assert rose("magi_generation_seconds_count") == 3
        assert rose("magi_http_requests_total", route="/api/v3/predictions/{job_id}/result", method="GET",
                    code="200") >= 3
        # gauges read their owners at scrape time
        assert _m(after, "magi_jobs", status="completed") == 3 and _m(after, "magi_jobs", status="queued") == 0
        assert _m(after, "magi_queue_depth") == 0 and _m(after, "magi_engine_alive") == 1


# -------------------------------------------------------------------------------------------------------- health


def test_readiness_follows_the_engine(tmp_path, pipeline):
    with running_server(_settings(tmp_path), pipeline=pipeline) as (ctx, client):
        ready = client.get("/health/ready")
        body = ready.json()
        assert ready.status_code == 200 and body["status"] == "ready" and body["engine_alive"] is True
        assert "noise-like" in body["notice"] and body["model"] == "tiny"

        ctx.engine.stop()  # the GPU loop is gone (as after a fatal device error)
        ready = client.get("/health/ready")
        body = ready.json()
        assert ready.status_code == 503 and body["status"] == "not ready" and body["engine_alive"] is False
        assert body["reason"]
        assert client.get("/health/live").status_code == 200  # the process itself answers: do not restart-loop it
        assert _m(_metrics(client), "magi_engine_alive") == 0
        # and no job is accepted into the dead loop (goal 11): 503 + Retry-After, nothing stored
        before = ctx.store.count_by_status()
        r = client.post(MODEL, json=SHORT)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
        assert r.json()["data"] is None and "HTTP 5" not in r.json()["message"]
        assert ctx.store.count_by_status() == before
        assert _m(_metrics(client), "magi_jobs_rejected_total", reason="engine_dead") == 1


def test_json_logs_carry_the_job_id_and_escape_control_characters():
    import json as _json
    import logging

    from magi_server.composition import JsonLogFormatter

    record = logging.LogRecord("magi_server.serving.app", logging.INFO, __file__, 1, "job %s finished: %s",
                               ("abc123", "line1\r\nFORGED 2026-01-01 INFO admin"), None)
    record.job_id = "abc123"
    record.event = "finished"
    line = JsonLogFormatter().format(record)
    assert "\n" not in line and "\r" not in line
    payload = _json.loads(line)
    assert payload["job_id"] == "abc123" and payload["event"] == "finished" and "FORGED" in payload["msg"]


# ------------------------------------------------------------------------------------------------ one contract


def test_the_apis_name_the_same_parameter_for_the_same_bad_value(tmp_path, pipeline):
    """A bad seed, frame count, size, step count or prompt is refused by every API, naming the same parameter:
    WaveSpeed and fal share the contract's names, Magic Hour maps them to its fields (frames are its end_seconds, the
    prompt its style.prompt) and has no seed or steps. The prompt cap is the contract's rule (params.validate,
    here with a server cap of 100 characters), the rest are each API's own bounds."""
    from fastapi.testclient import TestClient

    from magi_server.serving.app import create_app

    png = encode_png(np.full((36, 64, 3), 90, dtype=np.uint8))
    image = "data:image/png;base64," + base64.b64encode(png).decode()
    cases = [  # (WaveSpeed and fal fields, Magic Hour fields or None, the names: (WaveSpeed/fal, Magic Hour))
        ({"seed": 2**40}, None, ("seed", None)),
        ({"num_frames": 100_000}, {"end_seconds": 100_000 / 24}, ("num_frames", "end_seconds")),
        ({"resolution": "1080p"}, {"resolution": "1080p"}, ("resolution", "resolution")),
        ({"num_inference_steps": 3}, None, ("num_inference_steps", None)),
        ({"prompt": "p" * 101}, {"style": {"prompt": "p" * 101}}, ("prompt", "style.prompt")),
    ]
    with running_server(_settings(tmp_path, max_prompt_chars=100), pipeline=pipeline) as (ctx, client), \
            TestClient(create_app(ctx, "fal_queue")) as fal:
        for fields, magichour, (name, magichour_name) in cases:
            r = client.post(MODEL, json={"prompt": "x", **fields})
            assert r.status_code == 400 and r.json()["message"].startswith(f"{name}:"), (fields, r.text)
            r = fal.post("/fal-ai/magi", json={"prompt": "x", **fields})
            assert r.status_code == 422 and [d["loc"] for d in r.json()["detail"]] == [["body", name]], (fields, r.text)
            if magichour is not None:
                r = client.post("/v1/image-to-video", json={"end_seconds": 1, "assets": {"image_file_path": image},
                                                            **magichour})
                assert r.status_code == 422 and r.json()["field"] == magichour_name, (magichour, r.text)
        assert sum(ctx.store.count_by_status().values()) == 0
        assert not ctx.uploads_dir.exists() or not list(ctx.uploads_dir.iterdir())


@pytest.mark.parametrize("fields, name", [
    ({"seed": 2**40}, "seed"),
    ({"num_frames": 100_000}, "num_frames"),
    ({"num_inference_steps": 3}, "num_inference_steps"),
    ({"resolution": "1080p"}, "resolution"),
    ({"width": 100, "height": 64}, "width"),
    ({"prompt": "p" * 5000}, "prompt"),
])
def test_the_offline_doors_name_the_same_parameter(tmp_path, pipeline, capsys, fields, name):
    """The same bad values through the offline doors: a JSONL line, the generate command's flags and
    MagiPipeline.__call__ all refuse with the contract's name, the one the HTTP APIs above use (the pipeline has
    width and height instead of resolution tiers)."""
    from magi_server.models.config import preset
    from magi_server.params import ParamError
    from magi_server.tools import cli
    from magi_server.tools.generate import parse_job

    with pytest.raises(ParamError) as info:
        parse_job({"prompt": "x", **fields}, preset("tiny"))
    assert info.value.param == name

    flags = []
    for key, value in {"prompt": "x", **fields}.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    code = cli.main(["generate", *flags, "--cache-dir", str(tmp_path / "cache"), "-o", str(tmp_path / "x.mp4")])
    assert code == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {name}: ")

    if "resolution" not in fields:
        with pytest.raises(ParamError) as info:
            pipeline(**{"prompt": "x", **fields}, output_path=tmp_path / "y.mp4")
        assert info.value.param == name
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "y.mp4").exists()


def test_one_key_cannot_fill_the_queue(tmp_path, pipeline):
    """Per-key quota: key A at its quota of waiting or running jobs gets a 429 naming the quota while key B is
    still accepted; a replay of one of A's submits (same Idempotency-Key) answers its job, not a 429."""
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    with running_server(_settings(tmp_path, api_keys=("key-a", "key-b"), max_queue=8, max_queue_per_key=2),
                        pipeline=pipeline) as (ctx, client):
        assert ctx.key_quota == 2
        first = client.post(MODEL, json=LONG, headers={**a, "Idempotency-Key": "a-1"})
        second = client.post(MODEL, json=LONG, headers=a)
        assert first.status_code == second.status_code == 200
        refused = client.post(MODEL, json=LONG, headers=a)
        assert refused.status_code == 429 and "quota" in refused.json()["message"]
        assert int(refused.headers["Retry-After"]) >= 1
        replay = client.post(MODEL, json=LONG, headers={**a, "Idempotency-Key": "a-1"})
        assert replay.status_code == 200 and replay.json()["data"]["id"] == first.json()["data"]["id"]
        other = client.post(MODEL, json=LONG, headers=b)
        assert other.status_code == 200
        ids = [r.json()["data"]["id"] for r in (first, second, other)]
        assert sum(ctx.store.count_by_status().values()) == 3
        for job_id, key in zip(ids, (a, a, b)):
            client.post(f"/api/v3/predictions/{job_id}/cancel", headers=key)
        assert client.post(MODEL, json=SHORT, headers=a).status_code == 200  # ended jobs free the quota


def test_quota_defaults():
    from magi_server.serving.common import ServerContext
    from magi_server.serving.settings import ServerSettings

    def quota(**settings):
        return ServerContext(ServerSettings(**settings), store=None, engine=None, executor=None,
                             model_name="x").key_quota
    assert quota() is None and quota(api_keys=("one",)) is None  # no tenants to protect from each other
    assert quota(api_keys=("a", "b"), max_queue=64) == 32 and quota(api_keys=("a", "b"), max_queue=1) == 1
    assert quota(api_keys=("a",), max_queue_per_key=3) == 3

