"""Magic Hour v1 over the real app and engine (tiny model), in process: create/poll/download, the status machine,
uploads, delete, validation (422 naming the field, nothing stored), auth, 429 and exact frames and sizes."""
from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time

import numpy as np
import pytest

from magi_server.params import nearest_aspect, output_size
from magi_server.runtime.pipeline import MagiPipeline
from magi_server.media.images import encode_png
from tests.media_utils import probe_video
from tests.server_utils import running_server, tiny_settings

CREATE = "/v1/image-to-video"
PROJECT_KEYS = {"id", "name", "type", "status", "created_at", "enabled", "start_seconds", "end_seconds", "fps",
                "width", "height", "credits_charged", "total_frame_cost", "error", "download", "downloads"}
TERMINAL = ("complete", "error", "canceled")
ORDER = {"queued": 0, "rendering": 1, "complete": 2, "error": 2, "canceled": 2}
SCALE = 0.125  # tiny_settings' resolution_scale


# ------------------------------------------------------------------------------------------------- helpers


def png(width: int, height: int, value: int = 120) -> bytes:
    image = np.full((height, width, 3), value, dtype=np.uint8)
    image[:, : width // 2, 0] = 250  # not flat, so a wrong crop would show
    return encode_png(image)


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def expected_size(resolution: str, width: int, height: int) -> tuple[int, int]:
    return output_size(resolution, nearest_aspect(width, height), SCALE)


def body(**overrides) -> dict:
    base = {"end_seconds": 1.0, "assets": {"image_file_path": data_uri(png(64, 36))}, "resolution": "480p",
            "style": {"prompt": "a lighthouse at dusk"}}
    base.update(overrides)
    return base


def as_json(response) -> dict:
    # the SDK picks its parser from the header: a JSON answer without it crashes the client
    assert response.headers["content-type"].startswith("application/json"), response.headers
    return response.json()


def sdk_validate(model_name: str, payload: dict) -> None:
    """Check an answer against the official SDK's pydantic model when the SDK is installed."""
    try:
        from magic_hour.types import models
    except ImportError:
        return
    getattr(models, model_name).model_validate(payload)


def get_project(client, job_id: str, headers=None) -> dict:
    r = client.get(f"/v1/video-projects/{job_id}", headers=headers)
    assert r.status_code == 200, r.text
    data = as_json(r)
    assert set(data) == PROJECT_KEYS, set(data) ^ PROJECT_KEYS
    sdk_validate("V1VideoProjectsGetResponse", data)
    return data


def wait_project(client, job_id: str, until=TERMINAL, timeout=60.0, trace: list | None = None, headers=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = get_project(client, job_id, headers)
        if trace is not None:
            trace.append(data["status"])
        if data["status"] in until:
            return data
        time.sleep(0.02)
    raise AssertionError(f"project {job_id} never reached {until}: {data}")


def create(client, payload: dict, headers=None) -> str:
    r = client.post(CREATE, json=payload, headers=headers)
    assert r.status_code == 200, r.text
    data = as_json(r)
    assert set(data) == {"id", "credits_charged", "estimated_frame_cost"}
    sdk_validate("V1ImageToVideoCreateResponse", data)
    return data["id"]


def stored_state(ctx) -> tuple:
    files = sorted(p.name for p in ctx.uploads_dir.glob("*")) if ctx.uploads_dir.exists() else []
    return ctx.store.count_by_status(), files


def wait_engine_idle(ctx, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while (ctx.engine.running_count or ctx.engine.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.02)


class GatedPipeline:
    """The tiny pipeline, except that a served job's prefill waits for ``gate``: the engine thread holds the first
    job in "rendering" and every later one in "queued" until the test opens it."""

    def __init__(self, pipe, gate: threading.Event) -> None:
        self._pipe = pipe
        self._gate = gate
        self.runner = self  # build_context asks the pipeline's runner for the served one (with_outputs)

    def with_outputs(self, outputs_dir, **options):
        served = self._pipe.runner.with_outputs(outputs_dir, **options)
        prefill = served.prefill

        def gated(*args, **kwargs):
            self._gate.wait(30)
            return prefill(*args, **kwargs)

        served.prefill = gated
        return served

    def __getattr__(self, name):
        return getattr(self._pipe.runner, name)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture
def server(tmp_path, pipeline):
    with running_server(tiny_settings(tmp_path, tmp_path / "cache"), pipeline=pipeline) as pair:
        yield pair


@pytest.fixture(scope="module")
def validation_server(tmp_path_factory, pipeline):
    """One server for the validation tables: they never create a job, so "nothing stored" stays comparable."""
    tmp = tmp_path_factory.mktemp("validation")
    with running_server(tiny_settings(tmp, tmp / "cache"), pipeline=pipeline) as pair:
        yield pair


@pytest.fixture
def gated(tmp_path, pipeline):
    gate = threading.Event()
    settings = tiny_settings(tmp_path, tmp_path / "cache", max_queue=2)
    with running_server(settings, pipeline=GatedPipeline(pipeline, gate)) as (ctx, client):
        try:
            yield ctx, client, gate
        finally:
            gate.set()  # before shutdown, which would otherwise wait for the engine thread held at the gate


# --------------------------------------------------------------------------------------------------- tests


def test_create_poll_download(server):
    ctx, client = server
    job_id = create(client, body(name="my clip"))
    r = client.post(CREATE, json=body())
    assert as_json(r)["credits_charged"] == 24 and r.json()["estimated_frame_cost"] == 24
    done = wait_project(client, job_id)
    assert done["status"] == "complete", done
    width, height = expected_size("480p", 64, 36)
    assert (width, height) == output_size("480p", "16:9", SCALE)
    url = f"http://testserver/files/{job_id}.mp4"
    assert done["downloads"] == [done["download"]] and done["download"]["url"].split("?")[0] == url
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", done["download"]["expires_at"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", done["created_at"])
    assert done | {"download": None, "downloads": None, "created_at": None} == {
        "id": job_id, "name": "my clip", "type": "IMAGE_TO_VIDEO", "status": "complete", "created_at": None,
        "enabled": True, "start_seconds": 0.0, "end_seconds": 1.0, "fps": 24.0, "width": width, "height": height,
        "credits_charged": 24, "total_frame_cost": 24, "error": None, "download": None, "downloads": None,
    }
    video = client.get(f"/files/{job_id}.mp4")
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    info = probe_video(ctx.outputs_dir / f"{job_id}.mp4")
    assert (info.frames, info.width, info.height) == (24, width, height)
    assert ctx.store.get(job_id).params.prompts == ("a lighthouse at dusk",)


def test_default_name_and_empty_prompt(server):
    ctx, client = server
    job_id = create(client, {"end_seconds": 1.0, "assets": {"image_file_path": data_uri(png(64, 36))}})
    project = get_project(client, job_id)
    assert re.fullmatch(r"Image To Video - \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", project["name"])
    # no resolution: Magic Hour's 720p default; no style: the empty caption
    assert (project["width"], project["height"]) == output_size("720p", "16:9", SCALE)
    assert ctx.store.get(job_id).params.prompts == ("",)
    assert wait_project(client, job_id)["status"] == "complete"


def test_statuses_queued_rendering_complete(gated):
    ctx, client, gate = gated
    first = create(client, body())
    trace: list[str] = []
    rendering = wait_project(client, first, until=("rendering",), trace=trace)
    # held in prefill by the gate: rendering, and nothing to download yet
    assert rendering["download"] is None and rendering["downloads"] == [] and rendering["error"] is None
    second = create(client, body(end_seconds=2.0))
    queued = get_project(client, second)
    assert queued["status"] == "queued" and queued["downloads"] == [] and queued["download"] is None
    assert queued["credits_charged"] == 48 and queued["end_seconds"] == 2.0
    gate.set()
    second_trace = ["queued"]
    for job_id, seen in ((first, trace), (second, second_trace)):
        done = wait_project(client, job_id, trace=seen)
        assert done["status"] == "complete" and len(done["downloads"]) == 1, done
        ranks = [ORDER[s] for s in seen]
        assert ranks == sorted(ranks), seen  # never backwards
    assert trace[0] in ("queued", "rendering") and trace[-2:] == ["rendering", "complete"]


def test_failed_job_reports_error_with_code_and_message(tmp_path, pipeline):
    # a job that fails after it was accepted: here, a time limit no job can meet
    settings = tiny_settings(tmp_path, tmp_path / "cache", job_timeout_s=1e-6)
    with running_server(settings, pipeline=pipeline) as (_, client):
        job_id = create(client, body())
        failed = wait_project(client, job_id)
        assert failed["status"] == "error"
        assert isinstance(failed["error"]["code"], str) and failed["error"]["code"] == "timeout"
        assert isinstance(failed["error"]["message"], str) and failed["error"]["message"]
        assert failed["downloads"] == [] and failed["download"] is None
        assert failed["credits_charged"] == 0  # refunded, as Magic Hour refunds failed jobs


def test_unreachable_image_url_is_a_422_at_create(tmp_path, pipeline):
    # the image is fetched in the create handler, before any job exists: a 422, not a project in "error"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: connection refused
    settings = tiny_settings(tmp_path, tmp_path / "cache", allow_private_image_hosts=True)
    with running_server(settings, pipeline=pipeline) as (ctx, client):
        before = stored_state(ctx)
        r = client.post(CREATE, json=body(assets={"image_file_path": f"http://127.0.0.1:{port}/in.png"}))
        assert r.status_code == 422, r.text
        assert as_json(r)["field"] == "assets.image_file_path"
        assert stored_state(ctx) == before


def test_upload_flow(tmp_path, pipeline):
    # with keys configured, so the PUT without Authorization proves the upload URL is its own credential
    settings = tiny_settings(tmp_path, tmp_path / "cache", api_keys=("k1",))
    auth = {"Authorization": "Bearer k1"}
    with running_server(settings, pipeline=pipeline) as (ctx, client):
        r = client.post("/v1/files/upload-urls", headers=auth,
                        json={"items": [{"extension": "png", "type": "image"}, {"extension": "JPG", "type": "image"}]})
        assert r.status_code == 200, r.text
        items = as_json(r)["items"]
        sdk_validate("V1FilesUploadUrlsCreateResponse", r.json())
        assert len(items) == 2
        assert re.fullmatch(r"api-assets/[A-Za-z0-9_-]{16,64}\.png", items[0]["file_path"])  # ASSET_PATH
        assert items[1]["file_path"].endswith(".jpg")
        assert items[0]["upload_url"].startswith("http://testserver/")
        put_path = items[0]["upload_url"].replace("http://testserver", "")
        image = png(36, 64)
        assert client.put(put_path, content=image).status_code == 200
        assert client.put(put_path, content=image).status_code == 404  # one PUT per URL
        assert client.put("/v1/files/upload/" + "A" * 32, content=image).status_code == 404
        job_id = create(client, body(assets={"image_file_path": items[0]["file_path"]}, resolution="480p"), auth)
        done = wait_project(client, job_id, headers=auth)
        assert done["status"] == "complete"
        assert (done["width"], done["height"]) == output_size("480p", "9:16", SCALE)
        # a ticket whose PUT never came: the placeholder is empty, so using it is a 422
        r = client.post(CREATE, headers=auth, json=body(assets={"image_file_path": items[1]["file_path"]}))
        assert r.status_code == 422 and r.json()["field"] == "assets.image_file_path"


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"items": []}, "items"),
        ({}, "items"),
        ({"items": "png"}, "items"),
        ({"items": [{"type": "image"}]}, "items[0].extension"),
        ({"items": [{"extension": "exe", "type": "image"}]}, "items[0].extension"),
        ({"items": [{"extension": "png", "type": "image"}, {"extension": "png", "type": "doc"}]}, "items[1].type"),
        ({"items": [{"extension": "png"}]}, "items[0].type"),
        ({"items": [5]}, "items[0]"),
    ],
)
def test_bad_upload_requests(validation_server, payload, field):
    ctx, client = validation_server
    before = stored_state(ctx)
    r = client.post("/v1/files/upload-urls", json=payload)
    assert r.status_code == 422, r.text
    assert as_json(r)["field"] == field and r.json()["message"].startswith(f"{field}:")
    assert stored_state(ctx) == before


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"end_seconds": 0}, "end_seconds"),
        ({"end_seconds": 0.99}, "end_seconds"),
        ({"end_seconds": 61}, "end_seconds"),
        ({"end_seconds": -1}, "end_seconds"),
        ({"end_seconds": "5"}, "end_seconds"),
        ({"end_seconds": True}, "end_seconds"),
        ({"end_seconds": None}, "end_seconds"),
        ({"resolution": "1080p"}, "resolution"),
        ({"resolution": "4k"}, "resolution"),
        ({"resolution": "8k"}, "resolution"),
        ({"audio": True}, "audio"),
        ({"audio": "no"}, "audio"),
        ({"model": "kling-3.0"}, "model"),
        ({"model": "sora-2"}, "model"),
        ({"model": "magi-2"}, "model"),
        ({"model": 1}, "model"),
        ({"name": 5}, "name"),
        ({"width": "wide"}, "width"),
        ({"assets": None}, "assets"),
        ({"assets": "in.png"}, "assets"),
        ({"assets": {}}, "assets.image_file_path"),
        ({"assets": {"image_file_path": ""}}, "assets.image_file_path"),
        ({"assets": {"image_file_path": 7}}, "assets.image_file_path"),
        ({"assets": {"image_file_path": "PNG", "end_image_file_path": "api-assets/x.png"}},
         "assets.end_image_file_path"),
        ({"assets": {"image_file_path": "data:image/png;base64,AAAA"}}, "assets.image_file_path"),
        ({"assets": {"image_file_path": "not an image"}}, "assets.image_file_path"),
        ({"assets": {"image_file_path": "file:///etc/passwd"}}, "assets.image_file_path"),
        ({"assets": {"image_file_path": "/etc/passwd"}}, "assets.image_file_path"),
        ({"assets": {"image_file_path": "http://127.0.0.1:9/in.png"}}, "assets.image_file_path"),  # private host
        ({"assets": {"image_file_path": "api-assets/" + "A" * 32 + ".png"}}, "assets.image_file_path"),
        ({"assets": {"image_file_path": "api-assets/*"}}, "assets.image_file_path"),
        ({"assets": {"image_file_path": "api-assets/../jobs.db"}}, "assets.image_file_path"),
        ({"assets": {"image_file_path": "http://testserver/files/uploads/*.png"}}, "assets.image_file_path"),
        ({"style": "cinematic"}, "style"),
        ({"style": {"prompt": 5}}, "style.prompt"),
        ({"style": {"prompt": "\ud83d"}}, "style.prompt"),
        ({"style": {"quality_mode": "studio"}, "resolution": None}, "style.quality_mode"),
        ({"style": {"high_quality": True}, "resolution": None}, "style.high_quality"),
        ({"style": {"high_quality": "yes"}}, "style.high_quality"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(validation_server, overrides, field):
    ctx, client = validation_server
    # an upload that exists, so the wildcard cases would have something to match if they were looked up
    ticket = client.post("/v1/files/upload-urls", json={"items": [{"extension": "png", "type": "image"}]}).json()
    client.put(ticket["items"][0]["upload_url"].replace("http://testserver", ""), content=png(32, 32))
    before = stored_state(ctx)
    payload = {k: v for k, v in body(**overrides).items() if v is not None or k == "end_seconds"}
    # json.dumps escapes a lone surrogate as \\ud83d, as a real client's JSON would carry it
    r = client.post(CREATE, content=json.dumps(payload), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    data = as_json(r)
    assert data["field"] == field and data["message"].startswith(f"{field}:"), data
    assert stored_state(ctx) == before  # no job, no stored image


@pytest.mark.parametrize("raw, field", [
    (b'{"end_seconds": NaN, "assets": {"image_file_path": "x"}}', "end_seconds"),
    (b'{"end_seconds": Infinity, "assets": {"image_file_path": "x"}}', "end_seconds"),
    (b"[1, 2]", "body"),
    (b"{not json", "body"),
    (b"", "body"),
])
def test_malformed_bodies(validation_server, raw, field):
    ctx, client = validation_server
    before = stored_state(ctx)
    r = client.post(CREATE, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and as_json(r)["field"] == field, r.text
    assert stored_state(ctx) == before


def test_model_policy_and_resolution_aliases(server):
    ctx, client = server
    for model in ("default", "magi-1", "magi-1-24b"):
        job_id = create(client, body(model=model))
        assert ctx.store.get(job_id).model == model
    assert ctx.store.get(create(client, body())).model == "default"
    # 360p renders at 480p; the deprecated style aliases speak only without resolution
    job_id = create(client, body(resolution="360p", assets={"image_file_path": data_uri(png(50, 48))}))
    assert (get_project(client, job_id)["width"], get_project(client, job_id)["height"]) == \
        output_size("480p", "1:1", SCALE)
    job_id = create(client, {"end_seconds": 1.0, "assets": {"image_file_path": data_uri(png(64, 36))},
                             "style": {"quality_mode": "quick"}})
    assert get_project(client, job_id)["width"] == output_size("720p", "16:9", SCALE)[0]
    job_id = create(client, body(style={"high_quality": True}))  # resolution given: it wins
    assert get_project(client, job_id)["width"] == output_size("480p", "16:9", SCALE)[0]
    create(client, body(audio=False, width=1280, height=720))  # deprecated width/height: accepted, ignored


def test_exact_frames_and_sizes(server):
    ctx, client = server
    cases = [  # (end_seconds, image w x h, resolution) -> frames, size from the nearest aspect
        (1.0, (64, 36), "480p", 24),
        (1.5, (36, 64), "720p", 36),  # 2 chunks generated, trimmed to 36
        (1.02, (50, 48), "360p", 24),  # round(24.48) = 24; 360p renders at 480p
    ]
    ids = [create(client, body(end_seconds=s, assets={"image_file_path": data_uri(png(w, h))}, resolution=res))
           for s, (w, h), res, _ in cases]
    for job_id, (seconds, (w, h), res, frames) in zip(ids, cases):
        done = wait_project(client, job_id)
        assert done["status"] == "complete", done
        width, height = expected_size("480p" if res == "360p" else res, w, h)
        assert (done["width"], done["height"], done["end_seconds"], done["credits_charged"]) == \
            (width, height, seconds, frames)
        info = probe_video(ctx.outputs_dir / f"{job_id}.mp4")
        assert (info.frames, info.width, info.height) == (frames, width, height)


def test_delete(gated):
    ctx, client, gate = gated
    running = create(client, body())
    wait_project(client, running, until=("rendering",))
    r = client.delete(f"/v1/video-projects/{running}")
    assert r.status_code == 204 and r.content == b""
    gone = get_project(client, running)
    assert gone["status"] == "canceled" and gone["enabled"] is False and gone["error"] is None
    assert gone["downloads"] == [] and gone["download"] is None and gone["credits_charged"] == 0
    gate.set()
    wait_engine_idle(ctx)
    assert get_project(client, running)["status"] == "canceled"
    assert not (ctx.outputs_dir / f"{running}.mp4").exists()
    assert client.delete(f"/v1/video-projects/{running}").status_code == 204  # idempotent

    finished = create(client, body())
    assert wait_project(client, finished)["status"] == "complete"
    assert client.get(f"/files/{finished}.mp4").status_code == 200
    assert client.delete(f"/v1/video-projects/{finished}").status_code == 204
    after = get_project(client, finished)
    assert after["status"] == "complete" and after["enabled"] is False and after["downloads"] == []
    assert client.get(f"/files/{finished}.mp4").status_code == 404

    missing = client.delete("/v1/video-projects/" + "0" * 32)
    assert missing.status_code == 404 and "message" in as_json(missing)
    assert as_json(client.get("/v1/video-projects/nope")) and client.get("/v1/video-projects/nope").status_code == 404


def test_queue_full_is_a_429_with_retry_after(gated):
    ctx, client, gate = gated  # max_queue=2; the gate holds the first job in prefill
    first = create(client, body())
    wait_project(client, first, until=("rendering",))
    create(client, body())
    create(client, body())
    before = stored_state(ctx)
    r = client.post(CREATE, json=body())
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "message" in as_json(r)
    assert stored_state(ctx) == before  # the stored input image was removed again


def test_auth_and_tenants(tmp_path, pipeline):
    with running_server(tiny_settings(tmp_path, tmp_path / "cache", api_keys=("k1", "k2")), pipeline=pipeline) as (
            ctx, client):
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic k1"}, {"Authorization": "Bearer k3"}):
            for method, path, kwargs in (("post", CREATE, {"json": body()}),
                                         ("post", "/v1/files/upload-urls", {"json": {"items": []}}),
                                         ("get", "/v1/video-projects/x", {}), ("delete", "/v1/video-projects/x", {})):
                r = getattr(client, method)(path, headers=headers, **kwargs)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path)
                assert "message" in as_json(r)
        job_id = create(client, body(), {"Authorization": "Bearer k1"})
        # another tenant cannot see or delete it: 404, not 403
        assert client.get(f"/v1/video-projects/{job_id}", headers={"Authorization": "Bearer k2"}).status_code == 404
        assert client.delete(f"/v1/video-projects/{job_id}", headers={"Authorization": "Bearer k2"}).status_code == 404
        assert get_project(client, job_id, {"Authorization": "Bearer k1"})["id"] == job_id
        # a WaveSpeed job is not a Magic Hour project
        ws = client.post("/api/v3/wavespeed-ai/magi-1-24b", json={"prompt": "x", "num_frames": 24},
                         headers={"Authorization": "Bearer k1"}).json()["data"]["id"]
        assert client.get(f"/v1/video-projects/{ws}", headers={"Authorization": "Bearer k1"}).status_code == 404


def test_dead_engine_is_a_503_with_retry_after(tmp_path, pipeline):
    with running_server(tiny_settings(tmp_path, tmp_path / "cache"), pipeline=pipeline) as (ctx, client):
        ctx.engine.stop()  # the GPU loop is gone, as after a fatal device error
        before = stored_state(ctx)
        r = client.post(CREATE, json=body())
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "message" in as_json(r)
        assert stored_state(ctx) == before  # no job, no stored image


def test_idempotency_key_replays_the_same_project(server):
    ctx, client = server
    key = {"Idempotency-Key": "mh-1"}
    first = client.post(CREATE, json=body(), headers=key)
    assert first.status_code == 200, first.text
    before = stored_state(ctx)
    again = client.post(CREATE, json=body(), headers=key)
    assert again.status_code == 200 and as_json(again)["id"] == first.json()["id"]
    assert stored_state(ctx)[1] == before[1] and sum(stored_state(ctx)[0].values()) == 1  # one job, one image
    conflict = client.post(CREATE, json=body(end_seconds=2.0), headers=key)
    assert conflict.status_code == 409 and as_json(conflict)["message"].startswith("Idempotency-Key:")
    assert stored_state(ctx)[1] == before[1] and sum(stored_state(ctx)[0].values()) == 1
