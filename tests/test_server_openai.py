"""OpenAI videos API over the real app and engine (tiny model), in process: the wire format the official ``openai``
SDK reads (the Video object, the list page, the deletion answer, the binary downloads), the MAGI-1 mapping (seconds
-> frames, size -> exact sizes, input_reference -> the first frame, the extension fields), model routing, and every
refusal as an OpenAI error object naming its parameter (nothing stored)."""
from __future__ import annotations

import base64
import re
import time

import imageio_ffmpeg
import numpy as np
import pytest

from magi_server.media.images import encode_png, load_image
from magi_server.params import FPS, GenerationParams, ParamError, nearest_aspect, output_size
from magi_server.runtime.pipeline import MagiPipeline
from magi_server.serving.adapters.openai_videos import choose_model, reported_model
from magi_server.serving.jobs import Job
from magi_server.serving.routing import Router, Variant
from tests.media_utils import probe_video
from tests.server_utils import running_server, tiny_settings

SCALE = 0.125  # tiny_settings' resolution_scale
VIDEO_KEYS = {"id", "object", "model", "status", "progress", "created_at", "completed_at", "expires_at", "prompt",
              "seconds", "size", "error", "remixed_from_video_id", "seed"}
ERROR_KEYS = {"message", "type", "param", "code"}


# ------------------------------------------------------------------------------------------------- helpers


def png(width: int, height: int) -> bytes:
    image = np.full((height, width, 3), 90, dtype=np.uint8)
    image[:, : width // 2, 1] = 240  # not flat
    return encode_png(image)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def sdk_video(payload: dict) -> None:
    """The answer validates against the official SDK's Video model, field by field. ``size`` is checked apart: the
    model's Literal lists Sora's four sizes only (the SDK parses answers without validating them, which
    test_sdk_openai.py shows), and MAGI-1's sizes are others."""
    from openai.types import Video

    assert re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", payload["size"]), payload["size"]
    video = Video.model_validate({**payload, "size": "1280x720"})
    assert video.id == payload["id"] and video.status == payload["status"]


def create(client, headers=None, **fields) -> dict:
    r = client.post("/v1/videos", json=fields, headers=headers)
    assert r.status_code == 200, r.text
    video = r.json()
    assert set(video) == VIDEO_KEYS and video["object"] == "video" and video["id"].startswith("video_"), video
    sdk_video(video)
    return video


def wait_video(client, video_id: str, timeout: float = 60.0, headers=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/v1/videos/{video_id}", headers=headers)
        assert r.status_code == 200, r.text
        video = r.json()
        assert set(video) == VIDEO_KEYS and video["status"] in ("queued", "in_progress", "completed", "failed")
        if video["status"] in ("completed", "failed"):
            sdk_video(video)
            return video
        time.sleep(0.05)
    raise AssertionError(f"video {video_id} did not finish: {video}")


def job_of(ctx, video: dict) -> Job:
    return ctx.store.get(video["id"].removeprefix("video_"))


def openai_error(response, status: int, param: str | None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["param"] == param, body
    return body["error"]


def stored(ctx) -> tuple:
    uploads = sorted(p.name for p in ctx.uploads_dir.glob("*")) if ctx.uploads_dir.exists() else []
    return sum(ctx.store.count_by_status().values()), uploads


def frames_of(path) -> list[np.ndarray]:
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    return [np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, pipeline):
    tmp = tmp_path_factory.mktemp("openai")
    with running_server(tiny_settings(tmp, tmp / "cache"), pipeline=pipeline) as pair:
        yield pair


@pytest.fixture(scope="module")
def validation_server(tmp_path_factory, pipeline):
    """For the refusals: no job is ever created here, so "nothing stored" is exact."""
    tmp = tmp_path_factory.mktemp("openai-validation")
    with running_server(tiny_settings(tmp, tmp / "cache"), pipeline=pipeline) as pair:
        yield pair


# --------------------------------------------------------------------------------------------------- tests


def test_create_poll_download_thumbnail_spritesheet(server):
    ctx, client = server
    created = create(client, prompt="a lighthouse at dusk", seconds="2", size="832x480")
    assert created["status"] == "queued" and created["progress"] == 0 and created["completed_at"] is None
    assert created["model"] == "tiny"  # the stand-in variant runs it, and says so (serving/routing.py)
    done = wait_video(client, created["id"])
    width, height = output_size("480p", "16:9", SCALE)
    assert done | {"created_at": 0, "completed_at": 0, "expires_at": 0} == {
        "id": created["id"], "object": "video", "model": "tiny", "status": "completed", "progress": 100,
        "created_at": 0, "completed_at": 0, "expires_at": 0, "prompt": "a lighthouse at dusk", "seconds": "2",
        "size": f"{width}x{height}", "error": None, "remixed_from_video_id": None, "seed": created["seed"]}
    job = job_of(ctx, done)
    assert done["completed_at"] == int(job.finished_at) >= done["created_at"] == int(job.created_at)
    assert done["expires_at"] == int(job.finished_at + ctx.settings.keep_jobs_s)  # when the janitor removes it
    assert job.api == "openai" and job.params.num_frames == 2 * FPS and job.params.prompts == ("a lighthouse at dusk",)

    r = client.get(f"/v1/videos/{done['id']}/content")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4", r.text[:200]
    output = ctx.outputs_dir / job.outputs[0]
    assert r.content == output.read_bytes()
    info = probe_video(output)
    assert (info.frames, info.width, info.height) == (2 * FPS, width, height)
    ranged = client.get(f"/v1/videos/{done['id']}/content", headers={"Range": "bytes=0-99"})
    assert ranged.status_code == 206 and ranged.content == output.read_bytes()[:100]

    r = client.get(f"/v1/videos/{done['id']}/content", params={"variant": "thumbnail"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
    assert r.content[:4] == b"RIFF" and r.content[8:12] == b"WEBP"
    thumbnail = load_image(r.content).astype(np.int16)
    frames = frames_of(output)
    assert thumbnail.shape == (height, width, 3)
    # the middle frame, lossily: closer to it than to the first and the last frame
    errors = [np.abs(thumbnail - frame.astype(np.int16)).mean() for frame in frames]
    assert int(np.argmin(errors)) in range(FPS - 2, FPS + 3), errors

    r = client.get(f"/v1/videos/{done['id']}/content", params={"variant": "spritesheet"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:3] == b"\xff\xd8\xff"
    sheet = load_image(r.content)
    assert sheet.shape == (height, 2 * width, 3)  # one frame per second, side by side

    openai_error(client.get(f"/v1/videos/{done['id']}/content", params={"variant": "poster"}), 400, "variant")


def test_image_reference_multipart_and_json(server):
    ctx, client = server
    image = png(64, 112)  # portrait: the nearest aspect ratio is 9:16
    r = client.post("/v1/videos", data={"prompt": "a tower", "seconds": "1"},
                    files={"input_reference": ("frame.png", image, "image/png")})
    assert r.status_code == 200, r.text
    multipart = r.json()
    sdk_video(multipart)
    width, height = output_size(ctx.settings.default_resolution, nearest_aspect(64, 112), SCALE)
    assert multipart["size"] == f"{width}x{height}"
    job = job_of(ctx, multipart)
    assert job.params.task == "i2v" and job.params.image_path is not None
    # a size given with an image: the image is cropped and scaled to it
    by_url = create(client, prompt="a tower", seconds=1, size="624x624", input_reference={"image_url": data_url(image)})
    assert by_url["size"] == "x".join(map(str, output_size("480p", "1:1", SCALE)))
    assert job_of(ctx, by_url).params.task == "i2v"
    for video in (multipart, by_url):
        assert wait_video(client, video["id"])["status"] == "completed"


def test_extension_fields_json_and_multipart(server):
    ctx, client = server
    video = create(client, prompt="scene", prompts=["a harbour", "a storm"], seconds="2", seed=1234,
                   num_inference_steps=4, window_size=1)
    params = job_of(ctx, video).params
    assert (params.prompts, params.seed, params.num_inference_steps, params.window_size) == (
        ("a harbour", "a storm"), 1234, 4, 1)
    assert video["seed"] == 1234
    # the SDK's extra_body in multipart: prompts[] repeated, numbers as text
    r = client.post("/v1/videos", data={"prompt": "scene", "prompts[]": ["one", "two"], "seconds": "2",
                                        "seed": "7", "num_inference_steps": "8", "window_size": "2"})
    assert r.status_code == 200, r.text
    params = job_of(ctx, r.json()).params
    assert (params.prompts, params.seed, params.num_inference_steps, params.window_size) == (("one", "two"), 7, 8, 2)
    for done in (video, r.json()):
        assert wait_video(client, done["id"])["status"] == "completed"


def test_list_pagination_and_order(server):
    ctx, client = server
    made = [create(client, prompt=f"clip {i}", seconds="1")["id"] for i in range(3)]
    first = client.get("/v1/videos", params={"limit": 1})
    assert first.status_code == 200
    page = first.json()
    assert set(page) == {"object", "data", "first_id", "last_id", "has_more"} and page["object"] == "list"
    assert [v["id"] for v in page["data"]] == [made[-1]] and page["has_more"] is True
    assert page["first_id"] == page["last_id"] == made[-1]
    seen, after = [], None
    while True:  # what the SDK's cursor page does: after=last_id until has_more is false
        page = client.get("/v1/videos", params={"limit": 1, **({"after": after} if after else {})}).json()
        seen += [v["id"] for v in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen[:3] == made[::-1] and len(seen) == len(set(seen))
    assert all(job_of(ctx, {"id": v}).api == "openai" for v in seen)
    ascending = client.get("/v1/videos", params={"order": "asc", "limit": 100}).json()["data"]
    assert [v["id"] for v in ascending] == seen[::-1]
    openai_error(client.get("/v1/videos", params={"after": "video_" + "0" * 32}), 400, "after")
    openai_error(client.get("/v1/videos", params={"limit": 0}), 400, "limit")
    openai_error(client.get("/v1/videos", params={"order": "sideways"}), 400, "order")
    for video_id in made:
        wait_video(client, video_id)


def test_delete_then_404_everywhere(server):
    ctx, client = server
    video = wait_video(client, create(client, prompt="short-lived", seconds="1")["id"])
    output = ctx.outputs_dir / job_of(ctx, video).outputs[0]
    assert output.is_file()
    r = client.delete(f"/v1/videos/{video['id']}")
    assert r.status_code == 200 and r.json() == {"id": video["id"], "object": "video.deleted", "deleted": True}
    assert not output.exists()
    for response in (client.get(f"/v1/videos/{video['id']}"), client.get(f"/v1/videos/{video['id']}/content"),
                     client.delete(f"/v1/videos/{video['id']}")):
        assert openai_error(response, 404, None)["code"] == "not_found"
    assert video["id"] not in [v["id"] for v in client.get("/v1/videos", params={"limit": 100}).json()["data"]]


def test_unfinished_video_content_and_delete_cancels(server):
    ctx, client = server
    params = GenerationParams(prompts=("queued",), width=64, height=32, num_frames=24, num_inference_steps=4, seed=1)
    job = ctx.store.create(Job.new("openai", "magi-1", params))  # stored, never handed to the engine: stays queued
    video_id = f"video_{job.id}"
    assert client.get(f"/v1/videos/{video_id}").json()["status"] == "queued"
    assert "queued" in openai_error(client.get(f"/v1/videos/{video_id}/content"), 400, None)["message"]
    assert client.delete(f"/v1/videos/{video_id}").json()["deleted"] is True
    assert ctx.store.get(job.id).status.value == "cancelled"
    openai_error(client.get(f"/v1/videos/{video_id}"), 404, None)


def test_failed_video_reports_its_error(server):
    ctx, client = server
    params = GenerationParams(prompts=("doomed",), width=64, height=32, num_frames=24, num_inference_steps=4, seed=1)
    job = ctx.store.create(Job.new("openai", "magi-1", params))
    ctx.store.mark_running(job.id)
    ctx.store.fail(job.id, "out of GPU memory", "oom")
    video = client.get(f"/v1/videos/video_{job.id}").json()
    sdk_video(video)
    assert video["status"] == "failed" and video["error"] == {"code": "oom", "message": "out of GPU memory",
                                                              "param": None}
    assert video["completed_at"] is not None
    # a failure that names a parameter names it in this API's words
    job = ctx.store.create(Job.new("openai", "magi-1", params))
    ctx.store.mark_running(job.id)
    ctx.store.fail(job.id, "num_frames: too long for this model", "invalid_input", "num_frames")
    assert client.get(f"/v1/videos/video_{job.id}").json()["error"]["param"] == "seconds"


BAD_REQUESTS = [
    ({"seconds": "4"}, "prompt", "missing_required_parameter"),
    ({"prompt": "  "}, "prompt", "invalid_value"),
    ({"prompt": "x", "size": "1024x1792"}, "size", "invalid_value"),
    ({"prompt": "x", "size": "1280x721"}, "size", "invalid_value"),
    ({"prompt": "x", "seconds": "0"}, "seconds", "invalid_value"),
    ({"prompt": "x", "seconds": "61"}, "seconds", "invalid_value"),
    ({"prompt": "x", "seconds": "2.5"}, "seconds", "invalid_value"),
    ({"prompt": "x", "seconds": 3.5}, "seconds", "invalid_value"),
    ({"prompt": "x", "model": "sora-2"}, "model", "invalid_value"),
    ({"prompt": "x", "style": "noir"}, "style", "unknown_parameter"),
    ({"prompt": "x", "seed": "7"}, "seed", "invalid_value"),
    ({"prompt": "x", "seed": -2}, "seed", "invalid_value"),
    ({"prompt": "x", "num_inference_steps": 6}, "num_inference_steps", "invalid_value"),
    ({"prompt": "x", "window_size": 0}, "window_size", "invalid_value"),
    ({"prompt": "x", "prompts": []}, "prompts", "invalid_value"),
    ({"prompt": "x", "input_reference": {"file_id": "file_123"}}, "input_reference.file_id", "invalid_value"),
    ({"prompt": "x", "input_reference": {}}, "input_reference.image_url", "invalid_value"),
    ({"prompt": "x", "input_reference": "https://example.com/a.png"}, "input_reference", "invalid_value"),
    ({"prompt": "x", "input_reference": {"image_url": "data:image/png;base64,AAAA"}}, "input_reference.image_url",
     "invalid_value"),
]


@pytest.mark.parametrize(("payload", "param", "code"), BAD_REQUESTS, ids=[p for _, p, _ in BAD_REQUESTS])
def test_bad_json_fields_are_400_error_objects(validation_server, payload, param, code):
    ctx, client = validation_server
    before = stored(ctx)
    error = openai_error(client.post("/v1/videos", json=payload), 400, param)
    assert error["type"] == "invalid_request_error" and error["code"] == code and param in error["message"]
    assert stored(ctx) == before == (0, [])


def test_bad_bodies_and_multipart(validation_server):
    ctx, client = validation_server
    json_headers = {"content-type": "application/json"}
    assert openai_error(client.post("/v1/videos", content=b'{"prompt": ', headers=json_headers), 400,
                        None)["code"] == "invalid_json"
    openai_error(client.post("/v1/videos", content=b"[1, 2]", headers=json_headers), 400, None)
    openai_error(client.post("/v1/videos", content=b"prompt=x", headers={"content-type": "text/plain"}), 415, None)
    not_image = client.post("/v1/videos", data={"prompt": "x"},
                            files={"input_reference": ("a.png", b"<html>hello</html>", "image/png")})
    openai_error(not_image, 400, "input_reference")
    both = client.post("/v1/videos", data={"prompt": "x", "input_reference[image_url]": data_url(png(32, 32))},
                       files={"input_reference": ("a.png", png(32, 32), "image/png")})
    openai_error(both, 400, "input_reference")
    other_file = client.post("/v1/videos", data={"prompt": "x"}, files={"video": ("a.png", png(32, 32), "image/png")})
    openai_error(other_file, 400, "video")
    openai_error(client.post("/v1/videos", data={"prompt": "x", "seed": "seven"}), 400, "seed")
    assert stored(ctx) == (0, [])


def test_unknown_paths_methods_and_ids_are_error_objects(validation_server):
    ctx, client = validation_server
    openai_error(client.get("/v1/videos/video_" + "0" * 32), 404, None)
    openai_error(client.get("/v1/videos/not-an-id"), 404, None)
    openai_error(client.post("/v1/videos/video_" + "0" * 32 + "/remix", json={"prompt": "x"}), 404, None)
    r = client.put("/v1/videos", json={})
    openai_error(r, 405, None)
    assert "POST" in r.headers["allow"]
    # Magic Hour's /v1/ paths keep Magic Hour's shape
    r = client.get("/v1/no-such-route")
    assert r.status_code == 404 and set(r.json()) == {"message"}


def test_body_limit_is_an_error_object(tmp_path, pipeline):
    settings = tiny_settings(tmp_path, tmp_path / "cache", max_body_bytes=1024)
    with running_server(settings, pipeline=pipeline) as (ctx, client):
        r = client.post("/v1/videos", content=b"x" * 2048, headers={"content-type": "application/json"})
        assert "1024 bytes" in openai_error(r, 413, None)["message"]


def test_auth_and_tenants(tmp_path, pipeline):
    settings = tiny_settings(tmp_path, tmp_path / "cache", api_keys=("key-a", "key-b"))
    with running_server(settings, pipeline=pipeline) as (ctx, client):
        a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
        error = openai_error(client.post("/v1/videos", json={"prompt": "x"}), 401, None)
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        openai_error(client.get("/v1/videos", headers={"Authorization": "Bearer nope"}), 401, None)
        video = create(client, headers=a, prompt="mine", seconds="1")
        openai_error(client.get(f"/v1/videos/{video['id']}", headers=b), 404, None)
        openai_error(client.delete(f"/v1/videos/{video['id']}", headers=b), 404, None)
        assert client.get("/v1/videos", headers=b).json()["data"] == []
        assert [v["id"] for v in client.get("/v1/videos", headers=a).json()["data"]] == [video["id"]]
        assert wait_video(client, video["id"], headers=a)["status"] == "completed"
        assert client.get(f"/v1/videos/{video['id']}/content", headers=a).status_code == 200
        openai_error(client.get(f"/v1/videos/{video['id']}/content", headers=b), 404, None)


def test_served_variant_by_name(server):
    ctx, client = server
    video = create(client, prompt="named", model="tiny", seconds="1")
    job = job_of(ctx, video)
    assert video["model"] == job.model == "tiny" and job.variant == "tiny"
    wait_video(client, video["id"])


def test_model_names_map_to_served_variants_truthfully():
    router = Router([Variant("24B-distill", "24B", True), Variant("4.5B", "4.5B", False)])
    # a name whose promise a served variant keeps runs that variant under the requested name
    for name, variant in (("magi-1-24b", "24B-distill"), ("magi-1-24b-distill", "24B-distill"),
                          ("magi-1-4.5b", "4.5B"), ("magi-1", "24B-distill"), (None, "24B-distill")):
        choice = choose_model(router, name)
        resolved = router.resolve(choice.route)
        assert resolved.variant.name == variant, name
        assert reported_model(choice, resolved.model) == (name or "magi-1")
    # a variant's own name pins it
    assert choose_model(router, "4.5B").variant == "4.5B"
    # nothing served keeps the promise: a 400 naming the model and what is served, never another model
    for name in ("magi-1-4.5b-distill", "sora-2", "sora-2-pro", "MAGI-1"):
        with pytest.raises(ParamError) as refused:
            choose_model(router, name)
        assert refused.value.param == "model" and repr(name) in refused.value.message
        assert "24B-distill" in refused.value.message and "4.5B" in refused.value.message
    # a stand-in (the tiny preset) runs any MAGI-1 name, reported under its own name
    tiny = Router([Variant("tiny", None, False)])
    choice = choose_model(tiny, "magi-1-24b")
    assert reported_model(choice, tiny.resolve(choice.route).model) == "tiny"


def test_idempotency_key(server):
    ctx, client = server
    key = {"Idempotency-Key": "openai-once"}
    first = create(client, headers=key, prompt="only once", seconds="1")
    again = create(client, headers=key, prompt="only once", seconds="1")
    assert again["id"] == first["id"]
    error = openai_error(client.post("/v1/videos", json={"prompt": "another", "seconds": "1"}, headers=key), 409, None)
    assert "Idempotency-Key" in error["message"]
    wait_video(client, first["id"])


def test_continuation_extension_fields(tmp_path, pipeline):
    """continue_from (this API's video id or the bare job id) continues a finished video of the same key from its
    kept latents; another key's video reads as unknown; video takes a data: URL of an MP4. Outputs hold the new
    frames only, at the source's size."""
    settings = tiny_settings(tmp_path, tmp_path / "cache", api_keys=("key-a", "key-b"))
    with running_server(settings, pipeline=pipeline) as (ctx, client):
        a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
        source = create(client, headers=a, prompt="a river", seconds="1", size="832x480", seed=3)
        assert wait_video(client, source["id"], headers=a)["status"] == "completed"
        error = openai_error(client.post("/v1/videos", json={"prompt": "more", "continue_from": source["id"]},
                                         headers=b), 400, "continue_from")
        assert "no job" in error["message"]
        openai_error(client.post("/v1/videos", json={"prompt": "more", "continue_from": source["id"],
                                                     "video": "data:video/mp4;base64,AAAA"}, headers=a),
                     400, "continue_from")
        for reference in (source["id"], source["id"].removeprefix("video_")):
            more = create(client, headers=a, prompt="more river", seconds="1", continue_from=reference, seed=3)
            assert wait_video(client, more["id"], headers=a)["status"] == "completed"
            params = job_of(ctx, more).params
            assert params.task == "v2v" and params.prefix_latents_path is not None
            assert more["size"] == source["size"]  # the source's size when none is given
        mp4 = client.get(f"/v1/videos/{source['id']}/content", headers=a).content
        from_video = create(client, headers=a, prompt="more", seconds="1", size="832x480",
                            video="data:video/mp4;base64," + base64.b64encode(mp4).decode())
        assert job_of(ctx, from_video).params.task == "v2v"
        assert wait_video(client, from_video["id"], headers=a)["status"] == "completed"
        path = ctx.outputs_dir / job_of(ctx, from_video).outputs[0]
        assert probe_video(path).frames == FPS
