"""fal's queue and sync API over the real app and engine (tiny model), in process.

The queue and sync apps are the two TLS listeners of `magi-server serve`; here TestClient drives them with an
https base URL, so the URLs the server hands out must come back on that same scheme and host:port.
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
from contextlib import contextmanager

import numpy as np
import pytest
from fastapi.testclient import TestClient

from magi_server.params import output_size
from magi_server.serving.jobs import Job, JobStatus
from magi_server.params import GenerationParams
from magi_server.runtime.pipeline import MagiPipeline
from magi_server.media.images import encode_png
from tests.media_utils import probe_video
from tests.server_utils import running_server, tiny_settings

QUEUE = "https://localhost:8443"
RUN = "https://localhost:8444"
I2V = "fal-ai/magi/image-to-video"
DISTILLED = "fal-ai/magi-distilled"
FAST = {"resolution": "480p", "num_inference_steps": 8}  # 96 frames (the default) at 1/8 scale: under a second


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


@contextmanager
def fal_server(tmp_path, pipeline, **overrides):
    from magi_server.serving.app import create_app

    settings = tiny_settings(tmp_path, tmp_path / "cache", **overrides)
    with running_server(settings, pipeline=pipeline) as (ctx, _):
        with TestClient(create_app(ctx, "fal_queue"), base_url=QUEUE) as queue, \
                TestClient(create_app(ctx, "fal_run"), base_url=RUN) as run:
            yield ctx, queue, run


@pytest.fixture
def fal(tmp_path, pipeline):
    with fal_server(tmp_path, pipeline, fal_queue_port=8443) as triple:
        yield triple


def png_uri(height: int, width: int) -> str:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 2, 1] = 180
    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode()


def path_of(url: str) -> str:
    for base in (QUEUE, RUN):
        if url.startswith(base + "/"):
            return url[len(base):]
    raise AssertionError(f"{url} is not on one of our listeners")


def wait_completed(client, status_url: str, timeout: float = 60.0, logs: str = "true") -> tuple[dict, list[str]]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(path_of(status_url), params={"logs": logs})
        assert r.headers["x-fal-request-id"]
        body = r.json()
        if not seen or seen[-1] != body["status"]:
            seen.append(body["status"])
        if body["status"] == "COMPLETED":
            assert r.status_code == 200
            return body, seen
        assert r.status_code == 202, body
        time.sleep(0.02)
    raise AssertionError(f"not completed: {seen}")


def counts(ctx) -> tuple:
    uploads = sorted(p.name for p in ctx.uploads_dir.glob("*")) if ctx.uploads_dir.exists() else []
    return ctx.store.count_by_status(), uploads


# ------------------------------------------------------------------------------------------------ queue flow


def test_submit_status_result_i2v(fal):
    ctx, queue, _ = fal
    r = queue.post(f"/{I2V}", json={"prompt": "a green wall", "image_url": png_uri(90, 160), "seed": 11, **FAST})
    assert r.status_code == 200, r.text
    sub = r.json()
    rid = sub["request_id"]
    assert r.headers["x-fal-request-id"] == rid and len(rid) == 32
    assert sub["status"] == "IN_QUEUE" and isinstance(sub["queue_position"], int)
    root = f"{QUEUE}/fal-ai/magi/requests/{rid}"  # owner/alias, as fal-client builds them itself
    assert (sub["response_url"], sub["status_url"], sub["cancel_url"]) == (root, f"{root}/status", f"{root}/cancel")

    done, seen = wait_completed(queue, sub["status_url"])
    assert seen[-1] == "COMPLETED" and set(seen) <= {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    order = ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert [order.index(s) for s in seen] == sorted(order.index(s) for s in seen)  # never backwards
    assert done["request_id"] == rid and done["response_url"] == root
    assert done["metrics"]["inference_time"] > 0 and "error" not in done
    messages = [line["message"] for line in done["logs"]]
    assert messages[0].startswith("started: 96 frames") and messages[-1].startswith("completed in")
    chunks = [m for m in messages if m.startswith("chunk ")]
    assert chunks and chunks[-1] == f"chunk {len(chunks)}/{len(chunks)} done"
    assert all(line["level"] == "INFO" and line["source"] == "user" and line["timestamp"].endswith("Z")
               for line in done["logs"])

    result = queue.get(path_of(sub["response_url"]))
    assert result.status_code == 200 and result.headers["x-fal-request-id"] == rid
    out = result.json()
    assert out["seed"] == 11
    video = out["video"]
    assert video["url"].split("?")[0] == f"{QUEUE}/files/{rid}.mp4" and video["content_type"] == "video/mp4"
    assert video["file_name"] == f"{rid}.mp4"
    download = queue.get(path_of(video["url"]))
    assert download.status_code == 200 and len(download.content) == video["file_size"]
    info = probe_video(ctx.outputs_dir / video["file_name"])
    assert (info.frames, info.width, info.height) == (96, *output_size("480p", "16:9", 0.125))

    # logs off, the 1/0 spelling, the full-path variant; another app's path does not know the request
    assert queue.get(f"/fal-ai/magi/requests/{rid}/status", params={"logs": "0"}).json()["logs"] is None
    assert queue.get(f"/fal-ai/magi/requests/{rid}/status", params={"logs": "1"}).json()["logs"]
    assert queue.get(f"/{I2V}/requests/{rid}/status").json()["status"] == "COMPLETED"
    assert queue.get(f"/{I2V}/requests/{rid}").json() == out
    bad = queue.get(f"/fal-ai/magi/requests/{rid}/status", params={"logs": "maybe"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "logs"]
    for path in (f"/{DISTILLED}/requests/{rid}/status", f"/fal-ai/magi-distilled/image-to-video/requests/{rid}"):
        assert queue.get(path).status_code == 404


def test_distilled_exact_frames_size_and_seed(fal):
    ctx, queue, _ = fal
    cases = [
        ({"num_frames": 100, "seed": 4294967295}, 100, ("720p", "16:9")),  # defaults: 720p, auto -> 16:9 (no image)
        ({"num_frames": "120", "resolution": "480p", "aspect_ratio": "9:16", "num_inference_steps": "4"}, 120,
         ("480p", "9:16")),
        ({"resolution": "480p", "aspect_ratio": "1:1", "num_inference_steps": 16.0, "enable_safety_checker": False},
         96, ("480p", "1:1")),
    ]
    rids = []
    for fields, _, _ in cases:
        r = queue.post(f"/{DISTILLED}", json={"prompt": "rain on a window", "unknown_field": [1, 2], **fields})
        assert r.status_code == 200, r.text
        rids.append(r.json())
    for sub, (fields, frames, size) in zip(rids, cases):
        done, _ = wait_completed(queue, sub["status_url"], logs="false")
        assert done["logs"] is None and "error" not in done, done
        out = queue.get(path_of(sub["response_url"])).json()
        if "seed" in fields:
            assert out["seed"] == fields["seed"]
        assert isinstance(out["seed"], int) and 0 <= out["seed"] <= 2**32 - 1
        info = probe_video(ctx.outputs_dir / out["video"]["file_name"])
        assert (info.frames, info.width, info.height) == (frames, *output_size(*size, 0.125)), fields
        job = ctx.store.get(sub["request_id"])
        assert job.api == "fal" and job.meta == {"app": DISTILLED} and job.params.trim_to_frames


def test_auto_aspect_follows_the_image(fal):
    ctx, queue, _ = fal
    sub = queue.post(f"/{I2V}", json={"prompt": "a tower", "image_url": png_uri(160, 90), **FAST}).json()
    wait_completed(queue, sub["status_url"], logs="false")
    out = queue.get(path_of(sub["response_url"])).json()
    info = probe_video(ctx.outputs_dir / out["video"]["file_name"])
    assert (info.frames, info.width, info.height) == (96, *output_size("480p", "9:16", 0.125))


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "app, body, field",
    [
        (I2V, {"image_url": "IMG"}, "prompt"),
        (I2V, {"prompt": "", "image_url": "IMG"}, "prompt"),
        (I2V, {"prompt": 5, "image_url": "IMG"}, "prompt"),
        (I2V, {"prompt": "\ud83d", "image_url": "IMG"}, "prompt"),
        (I2V, {"prompt": "x"}, "image_url"),
        (I2V, {"prompt": "x", "image_url": None}, "image_url"),
        (I2V, {"prompt": "x", "image_url": 7}, "image_url"),
        (I2V, {"prompt": "x", "image_url": "ftp://example.com/a.png"}, "image_url"),
        (I2V, {"prompt": "x", "image_url": "data:image/png;base64,AAAA"}, "image_url"),
        (I2V, {"prompt": "x", "image_url": "data:text/plain;base64,aGVsbG8="}, "image_url"),
        (I2V, {"prompt": "x", "image_url": "http://127.0.0.1:9/cat.png"}, "image_url"),  # private host: refused
        (I2V, {"prompt": "x", "image_url": "https://does-not-exist.invalid/cat.png"}, "image_url"),
        (I2V, {"prompt": "x", "image_url": "IMG", "num_frames": 95}, "num_frames"),
        (DISTILLED, {"prompt": "x", "num_frames": 1441}, "num_frames"),  # beyond the server's --max-frames
        (DISTILLED, {"prompt": "x", "num_frames": 96.5}, "num_frames"),
        (DISTILLED, {"prompt": "x", "num_frames": True}, "num_frames"),
        (DISTILLED, {"prompt": "x", "num_frames": "ninety-six"}, "num_frames"),
        (DISTILLED, {"prompt": "x", "num_frames": "1" * 5000}, "num_frames"),
        (DISTILLED, {"prompt": "x", "num_inference_steps": 64}, "num_inference_steps"),
        (I2V, {"prompt": "x", "image_url": "IMG", "num_inference_steps": 12}, "num_inference_steps"),
        (I2V, {"prompt": "x", "image_url": "IMG", "num_inference_steps": "\u00b2"}, "num_inference_steps"),
        (DISTILLED, {"prompt": "x", "resolution": "1080p"}, "resolution"),
        (DISTILLED, {"prompt": "x", "resolution": ["720p"]}, "resolution"),
        (DISTILLED, {"prompt": "x", "aspect_ratio": "4:3"}, "aspect_ratio"),
        (DISTILLED, {"prompt": "x", "seed": -1}, "seed"),
        (DISTILLED, {"prompt": "x", "seed": 2**32}, "seed"),
        (DISTILLED, {"prompt": "x", "seed": False}, "seed"),
        (DISTILLED, {"prompt": "x", "enable_safety_checker": "yes"}, "enable_safety_checker"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(fal, app, body, field):
    ctx, queue, run = fal
    body = {k: png_uri(32, 32) if v == "IMG" else v for k, v in body.items()}
    before = counts(ctx)
    # json.dumps escapes lone surrogates as \\ud83d, as a real client's JSON would carry them
    for client in (queue, run):
        r = client.post(f"/{app}", content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.headers["x-fal-request-id"]
        detail = r.json()["detail"]
        assert isinstance(detail, list) and ["body", field] in [d["loc"] for d in detail], detail
        assert all(isinstance(d["msg"], str) and isinstance(d["type"], str) for d in detail)
    assert counts(ctx) == before  # no job, no stored image


def test_every_invalid_field_is_reported(fal):
    _, queue, _ = fal
    raw = b'{"num_frames": 95, "seed": NaN, "resolution": "1080p", "aspect_ratio": "4:3", "num_inference_steps": 3}'
    r = queue.post(f"/{I2V}", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    fields = [d["loc"][1] for d in r.json()["detail"]]
    assert fields == ["prompt", "image_url", "num_frames", "seed", "resolution", "aspect_ratio",
                      "num_inference_steps"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"x"', b"\xff\xfe{", b"[" * 100_000, b"1" * 5000])
def test_bodies_that_are_not_objects(fal, raw):
    ctx, queue, _ = fal
    before = counts(ctx)
    r = queue.post(f"/{DISTILLED}", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body"] and r.headers["x-fal-request-id"]
    assert counts(ctx) == before


def test_a_webhook_to_a_private_address_is_refused_not_dropped(fal):
    """Without --allow-private-urls a loopback receiver is refused at submit (SSRF rules), naming the parameter;
    nothing is stored. Delivery itself: tests/test_webhooks.py."""
    ctx, queue, _ = fal
    before = counts(ctx)
    for url in ("http://127.0.0.1:9/hook", "file:///etc/passwd", "https://10.0.0.1/hook"):
        r = queue.post(f"/{DISTILLED}", params={"fal_webhook": url}, json={"prompt": "x"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "fal_webhook"], (url, r.text)
    assert counts(ctx) == before


# ----------------------------------------------------------------------------------------------- sync listener


def test_sync_run_answers_the_output(fal):
    ctx, queue, run = fal
    r = run.post(f"/{DISTILLED}", json={"prompt": "fog", "seed": 3, **FAST})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"video", "seed", "variant"} and out["seed"] == 3 and out["variant"] == "tiny"
    assert out["video"]["url"].startswith(f"{RUN}/files/")  # downloadable from the host the client used
    assert r.headers["x-fal-request-id"] == out["video"]["file_name"][:32]
    assert run.get(path_of(out["video"]["url"])).status_code == 200
    info = probe_video(ctx.outputs_dir / out["video"]["file_name"])
    assert (info.frames, info.width, info.height) == (96, *output_size("480p", "16:9", 0.125))
    # the sync listener has no queue routes; the queue listener knows the request
    rid = r.headers["x-fal-request-id"]
    assert run.get(f"/{DISTILLED}/requests/{rid}/status").status_code == 404
    again = queue.get(f"/{DISTILLED}/requests/{rid}").json()
    assert again["video"].pop("url").split("?")[0] == f"{QUEUE}/files/{out['video']['file_name']}"
    assert again == {**out, "video": {k: v for k, v in out["video"].items() if k != "url"}}


def test_sync_cap_answers_504_and_the_job_goes_on(tmp_path, pipeline):
    with fal_server(tmp_path, pipeline, sync_timeout_s=0.05, fal_queue_port=8443) as (ctx, queue, run):
        r = run.post("/fal-ai/magi", json={"prompt": "longer than the cap", "num_inference_steps": 32})
        assert r.status_code == 504, r.text
        body = r.json()
        rid = body["request_id"]
        assert r.headers["x-fal-request-id"] == rid  # so fal-client raises instead of replaying it
        assert body["error_type"] == "request_timeout"
        assert f"{QUEUE}/fal-ai/magi/requests/{rid}/status" in body["detail"]
        done, _ = wait_completed(queue, f"{QUEUE}/fal-ai/magi/requests/{rid}/status")
        assert "error" not in done


def test_sync_client_disconnect_cancels_the_job(fal):
    ctx, _, _ = fal
    from magi_server.serving.app import create_app

    app = create_app(ctx, "fal_run")
    body = json.dumps({"prompt": "nobody waits", "num_frames": 192, "num_inference_steps": 64}).encode()
    sent: list[dict] = []

    async def drive():
        delivered = False
        t0 = time.monotonic()

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            # like a server's receive(): blocks until the client hangs up, a moment after sending
            await asyncio.sleep(max(0.0, t0 + 0.3 - time.monotonic()))
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "https", "path": "/fal-ai/magi", "raw_path": b"/fal-ai/magi", "query_string": b"",
                 "root_path": "", "headers": [(b"host", b"localhost:8444"), (b"content-type", b"application/json")],
                 "server": ("localhost", 8444), "client": ("127.0.0.1", 50000)}
        await asyncio.wait_for(app(scope, receive, send), timeout=30)

    asyncio.run(drive())
    jobs = ctx.store.list(limit=1)
    assert jobs and jobs[0].params.prompts == ("nobody waits",)
    assert jobs[0].status is JobStatus.CANCELLED
    assert sent and sent[0]["status"] == 499


# ------------------------------------------------------------------------------------------ cancel, 429, auth


def _estimate(pipeline, tmp_path, params: GenerationParams) -> int:
    return pipeline.runner.request_memory_bytes(params)


def test_cancel_queued_and_running(tmp_path, pipeline):
    long = {"prompt": "long", "num_frames": 192, "num_inference_steps": 64}
    width, height = output_size("720p", "16:9", 0.125)
    shape = GenerationParams(prompts=("x",), width=width, height=height, num_frames=192, num_inference_steps=64, seed=0,
                             trim_to_frames=True)
    # a memory budget that fits one such job: the second waits in the queue while the first runs
    budget = _estimate(pipeline, tmp_path / "estimate", shape)
    with fal_server(tmp_path, pipeline, memory_budget_bytes=budget) as (ctx, queue, _):
        first = queue.post("/fal-ai/magi", json=long).json()
        second = queue.post("/fal-ai/magi", json=long).json()
        status = queue.get(path_of(second["status_url"]))
        assert status.status_code == 202 and status.json()["status"] == "IN_QUEUE"
        assert status.json()["queue_position"] in (0, 1)  # 1 until the engine admitted the first one

        r = queue.put(path_of(second["cancel_url"]))
        assert (r.status_code, r.json()["status"]) == (202, "CANCELLATION_REQUESTED")
        assert r.headers["x-fal-request-id"] == second["request_id"]
        done = queue.get(path_of(second["status_url"]), params={"logs": "true"}).json()
        assert done["status"] == "COMPLETED" and done["error"] and done["error_type"] == "request_cancelled"
        assert done["logs"][-1]["message"] == "cancelled"
        result = queue.get(path_of(second["response_url"]))
        assert result.status_code == 400 and result.json()["error_type"] == "request_cancelled"
        again = queue.put(path_of(second["cancel_url"]))
        assert (again.status_code, again.json()["status"]) == (400, "ALREADY_COMPLETED")

        # the first one is running (or about to): cancel stops it at the next safe point
        assert queue.get(path_of(first["response_url"])).status_code in (400,)  # "still in progress"
        r = queue.put(path_of(first["cancel_url"]))
        assert (r.status_code, r.json()["status"]) == (202, "CANCELLATION_REQUESTED")
        done, _ = wait_completed(queue, first["status_url"])
        assert done["error_type"] == "request_cancelled"
        deadline = time.monotonic() + 30
        while ctx.engine.running_count and time.monotonic() < deadline:  # the engine really let go of it
            time.sleep(0.05)
        assert ctx.engine.running_count == 0

        missing = queue.put(f"/fal-ai/magi/requests/{'0' * 32}/cancel")
        assert (missing.status_code, missing.json()["status"]) == (404, "NOT_FOUND")
        assert missing.headers["x-fal-request-id"]
        assert queue.get(f"/fal-ai/magi/requests/{'0' * 32}").status_code == 404
        odd = queue.get("/fal-ai/magi/requests/%0d%0aSet-Cookie:%20x=1%C3%A9/status")  # not echoed into headers
        assert odd.status_code == 404 and "set-cookie" not in odd.headers and odd.headers["x-fal-request-id"]
        assert queue.get(f"/fal-ai/magi/requests/{'0' * 32}/status").status_code == 404


def test_queue_full_is_429_and_stores_nothing(tmp_path, pipeline):
    with fal_server(tmp_path, pipeline, max_queue=0) as (ctx, queue, run):
        before = counts(ctx)
        for client in (queue, run):
            r = client.post(f"/{DISTILLED}", json={"prompt": "x"})
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.headers["x-fal-request-id"] and isinstance(r.json()["detail"], str)
        r = queue.post(f"/{I2V}", json={"prompt": "x", "image_url": png_uri(32, 32)})
        assert r.status_code == 429
        assert counts(ctx) == before  # the center-cropped input image was removed again


def test_auth_and_tenants(tmp_path, pipeline):
    with fal_server(tmp_path, pipeline, api_keys=("k1", "k2")) as (_, queue, run):
        for headers in ({}, {"Authorization": "Key"}, {"Authorization": "Bearer k1"}, {"Authorization": "Key k3"}):
            for client in (queue, run):
                r = client.post(f"/{DISTILLED}", json={"prompt": "x"}, headers=headers)
                assert r.status_code == 401 and isinstance(r.json()["detail"], str)
                assert r.headers["x-fal-request-id"]
        sub = queue.post(f"/{DISTILLED}", json={"prompt": "x", **FAST}, headers={"Authorization": "Key k1"})
        assert sub.status_code == 200
        rid = sub.json()["request_id"]
        assert queue.get(f"/{DISTILLED}/requests/{rid}/status").status_code == 401
        # another tenant cannot see or cancel it: 404, as for an unknown id
        other = {"Authorization": "Key k2"}
        assert queue.get(f"/{DISTILLED}/requests/{rid}/status", headers=other).status_code == 404
        assert queue.put(f"/{DISTILLED}/requests/{rid}/cancel", headers=other).status_code == 404
        mine = queue.get(f"/{DISTILLED}/requests/{rid}/status", headers={"Authorization": "Key k1"})
        assert mine.status_code in (200, 202)


def _failed_job(ctx, error: str, code: str, param: str = "") -> str:
    """A fal job stored and failed through the engine's failure event (never handed to the engine itself)."""
    from magi_server.engine.loop import EngineEvent, EventKind
    from magi_server.serving.events import on_engine_event

    params = GenerationParams(prompts=("x",), width=96, height=64, num_frames=96, num_inference_steps=8, seed=1,
                              trim_to_frames=True)
    job = ctx.store.create(Job.new("fal", DISTILLED, params, meta={"app": DISTILLED}))
    on_engine_event(ctx, EngineEvent(EventKind.FAILED, job.id, error=error, error_code=code, error_param=param))
    assert ctx.store.get(job.id).status is JobStatus.FAILED
    return job.id


def test_failed_job_result_is_its_error_status(fal):
    ctx, queue, _ = fal
    rid = _failed_job(ctx, "image: not a PNG, JPEG or WebP image", "invalid_input", param="image")
    r = queue.get(f"/{DISTILLED}/requests/{rid}")
    assert r.status_code == 422 and r.headers["x-fal-request-id"] == rid
    assert r.json()["detail"] == [{"loc": ["body", "image_url"], "msg": "not a PNG, JPEG or WebP image",
                                   "type": "validation_error"}]

    rid = _failed_job(ctx, "internal error (RuntimeError); see the server log", "internal")
    r = queue.get(f"/{DISTILLED}/requests/{rid}")
    assert r.status_code == 500 and r.headers["x-fal-request-id"] == rid  # x-fal-request-id: never replayed
    assert r.json()["error_type"] == "internal_error" and r.headers["x-fal-error-type"] == "internal_error"
    status = queue.get(f"/{DISTILLED}/requests/{rid}/status", params={"logs": "true"})
    assert status.status_code == 200
    body = status.json()
    assert body["status"] == "COMPLETED" and body["error"].startswith("internal error (RuntimeError)")
    assert body["error_type"] == "internal_error" and body["logs"][-1]["level"] == "ERROR"

    rid = _failed_job(ctx, "job timeout: exceeded its time limit", "timeout")
    r = queue.get(f"/{DISTILLED}/requests/{rid}")
    assert r.status_code == 504 and r.headers["x-fal-request-id"] == rid


def test_idempotency_key_replays_the_same_request(fal):
    ctx, queue, run = fal
    key = {"Idempotency-Key": "fal-1"}
    first = queue.post(f"/{DISTILLED}", json={"prompt": "rain", **FAST}, headers=key)
    assert first.status_code == 200, first.text
    before = counts(ctx)
    again = queue.post(f"/{DISTILLED}", json={**FAST, "prompt": "rain"}, headers=key)
    assert again.status_code == 200 and again.json()["request_id"] == first.json()["request_id"]
    assert counts(ctx) == before
    for path, other in ((DISTILLED, {"prompt": "snow", **FAST}), ("fal-ai/magi", {"prompt": "rain", **FAST})):
        conflict = queue.post(f"/{path}", json=other, headers=key)
        assert conflict.status_code == 409 and isinstance(conflict.json()["detail"], str), conflict.text
        assert conflict.headers["x-fal-request-id"]
    assert counts(ctx) == before
    # the sync listener's run with the key answers the same request's output once it is done
    out = run.post(f"/{DISTILLED}", json={"prompt": "rain", **FAST}, headers=key)
    assert out.status_code == 200 and out.json()["video"]["file_name"] == f"{first.json()['request_id']}.mp4"
