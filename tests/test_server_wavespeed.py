"""WaveSpeed v3 over the real app and engine (tiny model), in process."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from magi_server.runtime.pipeline import MagiPipeline
from magi_server.media.images import encode_png
from tests.media_utils import probe_video
from tests.server_utils import running_server, tiny_settings, wait_status

MODEL = "/api/v3/wavespeed-ai/magi-1-24b"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture
def server(tmp_path, pipeline):
    with running_server(tiny_settings(tmp_path, tmp_path / "cache"), pipeline=pipeline) as pair:
        yield pair


def test_submit_poll_download(server):
    ctx, client = server
    r = client.post(MODEL, json={"prompt": "a red fox in snow", "seed": 42, "num_frames": 24})
    assert r.status_code == 200
    body = r.json()
    assert body["code"] == 200 and body["message"] == "success"
    data = body["data"]
    assert data["status"] == "created" and data["outputs"] == [] and len(data["id"]) == 32
    assert data["urls"]["get"] == f"http://testserver/api/v3/predictions/{data['id']}/result"
    done = wait_status(client, data["id"])
    assert done["status"] == "completed", done
    assert done["timings"]["inference"] > 0 and done["has_nsfw_contents"] == [False]
    # a signed URL (serving.files): the SDK downloads it without the key
    assert [url.split("?")[0] for url in done["outputs"]] == [f"http://testserver/files/{data['id']}.mp4"]
    assert "&sig=" in done["outputs"][0]
    video = client.get(f"/files/{data['id']}.mp4")
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    path = ctx.outputs_dir / f"{data['id']}.mp4"
    info = probe_video(path)
    assert (info.frames, info.width, info.height) == (24, 160, 96)  # 720p 16:9 at the tiny preset's 1/8 scale
    assert client.get(f"/api/v3/predictions/{data['id']}").json()["data"]["status"] == "completed"


def test_sync_mode_returns_outputs(server):
    _, client = server
    r = client.post(MODEL, json={"prompt": "waves", "num_frames": 24, "enable_sync_mode": True,
                                 "resolution": "480p", "aspect_ratio": "9:16"})
    data = r.json()["data"]
    assert data["status"] == "completed" and len(data["outputs"]) == 1


def test_base64_output_is_encoded_once_off_the_event_loop(server, monkeypatch):
    """Every poll of a finished enable_base64_output job answers the MP4's bytes; they are read and encoded once,
    on a worker thread, never on the event loop that answers everyone else."""
    import threading

    from magi_server.serving.adapters import wavespeed

    ctx, client = server
    calls = []
    real = wavespeed.base64.b64encode

    def counting(data):
        calls.append(threading.current_thread() is threading.main_thread() or _on_event_loop())
        return real(data)

    monkeypatch.setattr(wavespeed.base64, "b64encode", counting)
    job_id = client.post(MODEL, json={"prompt": "waves", "num_frames": 24, "enable_base64_output": True}).json()["data"]["id"]
    done = wait_status(client, job_id)
    assert done["status"] == "completed"
    mp4 = (ctx.outputs_dir / f"{job_id}.mp4").read_bytes()
    for _ in range(5):
        data = client.get(f"/api/v3/predictions/{job_id}/result").json()["data"]
        assert base64.b64decode(data["outputs"][0]) == mp4
    assert calls == [False]  # one encode, and not on the event loop


def _on_event_loop() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_image_data_uri_and_auto_aspect(server):
    ctx, client = server
    image = np.zeros((90, 50, 3), dtype=np.uint8)  # portrait -> 9:16
    image[:, :, 0] = 200
    uri = "data:image/png;base64," + base64.b64encode(encode_png(image)).decode()
    data = client.post(MODEL, json={"prompt": "a red wall", "image": uri, "num_frames": 24}).json()["data"]
    done = wait_status(client, data["id"])
    assert done["status"] == "completed"
    info = probe_video(ctx.outputs_dir / f"{data['id']}.mp4")
    assert (info.frames, info.width, info.height) == (24, 96, 160)


def test_uploads_both_flows(server):
    _, client = server
    png = encode_png(np.full((32, 32, 3), 90, dtype=np.uint8))
    ticket = client.post("/api/v3/media/uploads", json={"filename": "in.png", "size": len(png),
                                                        "content_type": "image/png"}).json()["data"]
    assert ticket["upload"]["method"] == "PUT"
    put = client.put(ticket["upload"]["url"].replace("http://testserver", ""), content=png,
                     headers=ticket["upload"]["headers"])
    assert put.status_code == 200
    assert client.get(ticket["download_url"].replace("http://testserver", "")).content == png
    legacy = client.post("/api/v3/media/upload/binary", files={"file": ("x.png", png, "image/png")}).json()["data"]
    assert legacy["size"] == len(png) and legacy["type"] == "image"
    data = client.post(MODEL, json={"prompt": "grey", "image": ticket["download_url"], "num_frames": 24}).json()["data"]
    assert wait_status(client, data["id"])["status"] == "completed"


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "\ud83d"}, "prompt"),
        ({"prompt": "x", "seed": 2147483648}, "seed"),
        ({"prompt": "x", "seed": -2}, "seed"),
        ({"prompt": "x", "seed": True}, "seed"),
        ({"prompt": "x", "seed": 1.5}, "seed"),
        ({"prompt": "x", "num_frames": 0}, "num_frames"),
        ({"prompt": "x", "num_frames": "96"}, "num_frames"),
        ({"prompt": "x", "resolution": "1080p"}, "resolution"),
        ({"prompt": "x", "aspect_ratio": "4:3"}, "aspect_ratio"),
        ({"prompt": "x", "frames_per_second": 30}, "frames_per_second"),
        ({"prompt": "x", "num_inference_steps": 10}, "num_inference_steps"),
        ({"prompt": "x", "image": "data:image/png;base64,AAAA"}, "image"),
        ({"prompt": "x", "image": "file:///etc/passwd"}, "image"),
        ({"prompt": "x", "image": "http://127.0.0.1:9/cat.png"}, "image"),
        ({"prompt": "x", "enable_sync_mode": "yes"}, "enable_sync_mode"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(server, body, field):
    ctx, client = server
    before = ctx.store.count_by_status()
    # json.dumps escapes lone surrogates as \\ud83d, as a real client's JSON would carry them
    r = client.post(MODEL, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    payload = r.json()
    assert payload["code"] == 400 and payload["data"] is None
    assert payload["message"].startswith(f"{field}:"), payload["message"]
    assert ctx.store.count_by_status() == before  # nothing stored


def test_nan_and_non_object_bodies(server):
    _, client = server
    r = client.post(MODEL, content=b'{"prompt": "x", "seed": NaN}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["message"].startswith("seed:")
    r = client.post(MODEL, content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["message"].startswith("body:")
    r = client.post(MODEL, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_unknown_prediction_and_model(server):
    _, client = server
    assert client.get("/api/v3/predictions/" + "0" * 32 + "/result").status_code == 404
    assert client.post("/api/v3/wavespeed-ai/not-a-model", json={"prompt": "x"}).status_code == 404


def test_health_and_metrics(server):
    _, client = server
    assert client.get("/health/live").json() == {"status": "alive"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and "noise-like" in ready.json()["notice"]
    before = _counter(client, 'magi_jobs_submitted_total{api="wavespeed"}')
    for _ in range(3):
        client.post(MODEL, json={"prompt": "x", "num_frames": 24})
    assert _counter(client, 'magi_jobs_submitted_total{api="wavespeed"}') == before + 3


def _counter(client, series: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_auth(tmp_path, pipeline):
    with running_server(tiny_settings(tmp_path, tmp_path / "cache", api_keys=("k1", "k2")), pipeline=pipeline) as (_, client):
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic k1"}, {"Authorization": "Bearer k3"}):
            r = client.post(MODEL, json={"prompt": "x"}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        a = client.post(MODEL, json={"prompt": "x", "num_frames": 24}, headers={"Authorization": "Bearer k1"})
        job = a.json()["data"]["id"]
        # another tenant cannot see it: 404, not 403
        other = client.get(f"/api/v3/predictions/{job}/result", headers={"Authorization": "Bearer k2"})
        assert other.status_code == 404
        mine = client.get(f"/api/v3/predictions/{job}/result", headers={"Authorization": "Bearer k1"})
        assert mine.status_code == 200


def test_body_limit(tmp_path, pipeline):
    with running_server(tiny_settings(tmp_path, tmp_path / "cache", max_body_bytes=1000), pipeline=pipeline) as (_, client):
        r = client.post(MODEL, content=json.dumps({"prompt": "x" * 5000}), headers={"content-type": "application/json"})
        assert r.status_code == 413

        def chunked():  # no Content-Length: the limit must count the bytes as they arrive
            for _ in range(10):
                yield b" " * 500

        r = client.post(MODEL, content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert client.get("/health/live").status_code == 200


def test_upload_names_are_not_patterns(server):
    _, client = server
    png = encode_png(np.full((8, 8, 3), 1, dtype=np.uint8))
    client.post("/api/v3/media/upload/binary", files={"file": ("x.png", png, "image/png")})
    for name in ("*.png", "*", "..%2f..%2fetc", "[a-z]*.png"):
        assert client.get(f"/files/uploads/{name}").status_code == 404, name
    r = client.post(MODEL, json={"prompt": "x", "image": "http://testserver/files/uploads/*.png", "num_frames": 24})
    assert r.status_code == 400 and r.json()["message"].startswith("image:")


def test_idempotency_key_replays_the_same_job(server):
    ctx, client = server
    png = encode_png(np.full((40, 72, 3), 100, dtype=np.uint8))
    body = {"prompt": "a fox", "num_frames": 24, "seed": 5,
            "image": "data:image/png;base64," + base64.b64encode(png).decode()}
    key = {"Idempotency-Key": "order-42"}
    first = client.post(MODEL, json=body, headers=key)
    assert first.status_code == 200, first.text
    stored = sorted(p.name for p in ctx.uploads_dir.glob("*"))
    # the same body (in another key order) with the same key: the same job, and nothing new stored or started
    again = client.post(MODEL, json=dict(reversed(list(body.items()))), headers=key)
    assert again.status_code == 200 and again.json()["data"]["id"] == first.json()["data"]["id"]
    assert sum(ctx.store.count_by_status().values()) == 1
    assert sorted(p.name for p in ctx.uploads_dir.glob("*")) == stored
    # the key with another body, or on another model: a 409 in the envelope, nothing stored
    for path, other in ((MODEL, dict(body, seed=6)), ("/api/v3/wavespeed-ai/magi-1-4.5b", body)):
        conflict = client.post(path, json=other, headers=key)
        assert conflict.status_code == 409 and conflict.json()["data"] is None, conflict.text
        assert conflict.json()["message"].startswith("Idempotency-Key:")
    assert sum(ctx.store.count_by_status().values()) == 1
    assert client.post(MODEL, json=body).json()["data"]["id"] != first.json()["data"]["id"]  # no key: a new job
    too_long = client.post(MODEL, json=body, headers={"Idempotency-Key": "k" * 256})
    assert too_long.status_code == 400 and too_long.json()["message"].startswith("Idempotency-Key:")
