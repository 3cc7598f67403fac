"""MAGI-1 over HTTP (issue #12, acceptance 4 in part): the extension fields `prompts` (one per chunk: scene changes)
and `window_size` reach the runner on WaveSpeed, fal and Magic Hour, a 240-frame request runs, and the longest video
is the server's --max-frames on every API."""
from __future__ import annotations

import time

import pytest

from magi_server.runtime.pipeline import MagiPipeline
from tests.media_utils import probe_video
from tests.server_utils import running_server, tiny_settings, wait_status

MODEL = "/api/v3/wavespeed-ai/magi-1-24b"


def _png_uri() -> str:
    import base64

    import numpy as np

    from magi_server.media.images import encode_png

    image = np.full((64, 64, 3), 120, dtype=np.uint8)
    image[:, :32, 0] = 230
    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode()


PNG = _png_uri()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


def test_one_prompt_per_chunk_reaches_the_text_encoder_and_window_size_the_sampler(tmp_path, pipeline):
    scenes = ["a fox wakes in its den", "the fox runs across snow", "the fox jumps a river", "the fox sleeps"]
    with running_server(tiny_settings(tmp_path, tmp_path / "cache"), pipeline=pipeline) as (ctx, client):
        encoder = ctx.executor.text_encoder
        seen = []
        original = encoder.encode
        encoder.encode = lambda prompts, *a, **k: (seen.append(list(prompts)), original(prompts, *a, **k))[1]
        try:
            r = client.post(MODEL, json={"prompt": "a fox", "prompts": scenes, "num_frames": 96, "seed": 3,
                                         "num_inference_steps": 8, "window_size": 1})
            assert r.status_code == 200, r.text
            job_id = r.json()["data"]["id"]
            done = wait_status(client, job_id, timeout=120)
        finally:
            encoder.encode = original
        assert done["status"] == "completed" and done["progress"]["chunks_total"] == 4, done
        assert seen == [scenes]  # the four scenes, in order, for the four chunks
        job = ctx.store.get(job_id)
        assert job.params.prompts == tuple(scenes) and job.params.window_size == 1
        assert probe_video(ctx.outputs_dir / f"{job_id}.mp4").frames == 96

        long = client.post(MODEL, json={"prompt": "a long walk", "num_frames": 240, "seed": 4,
                                        "num_inference_steps": 8})
        assert long.status_code == 200, long.text
        done = wait_status(client, long.json()["data"]["id"], timeout=180)
        assert done["status"] == "completed" and done["progress"]["chunks_total"] == 10, done

        for bad, field in (({"prompts": []}, "prompts"), ({"prompts": ["ok", ""]}, "prompts"),
                           ({"window_size": 0}, "window_size"), ({"window_size": 3}, "num_inference_steps")):
            r = client.post(MODEL, json={"prompt": "x", "num_inference_steps": 8, **bad})
            assert r.status_code == 400 and r.json()["message"].startswith(field), (bad, r.text)


def test_fal_and_magic_hour_take_the_same_extension_fields_and_the_frame_cap_is_the_servers(tmp_path, pipeline):
    """prompts, window_size and videos longer than the providers' own bounds (fal 192 frames, Magic Hour 60 s) up to
    the server's --max-frames; beyond it every API answers its 4xx naming its own field."""
    from fastapi.testclient import TestClient

    from magi_server.serving.app import create_app

    scenes = ["a lighthouse at dawn", "waves break on rocks"]
    settings = tiny_settings(tmp_path, tmp_path / "cache", max_num_frames=240, fal_queue_port=8443)
    with running_server(settings, pipeline=pipeline) as (ctx, client), \
            TestClient(create_app(ctx, "fal_queue"), base_url="https://localhost:8443") as queue:
        r = queue.post("/fal-ai/magi-distilled", json={"prompt": "sea", "prompts": scenes, "num_frames": 240,
                                                       "window_size": 2, "num_inference_steps": 8,
                                                       "resolution": "480p"})
        assert r.status_code == 200, r.text
        fal_job = r.json()["request_id"]
        r = client.post("/v1/image-to-video", json={"end_seconds": 3, "prompts": scenes, "window_size": 1,
                                                    "assets": {"image_file_path": PNG}, "style": {"prompt": "sea"}})
        assert r.status_code == 200, r.text
        mh_job = r.json()["id"]
        for job_id, frames, window in ((fal_job, 240, 2), (mh_job, 72, 1)):
            started = time.monotonic()
            while not ctx.store.get(job_id).is_terminal and time.monotonic() - started < 240:
                time.sleep(0.1)
            job = ctx.store.get(job_id)
            assert job.status.value == "completed", job
            assert job.params.prompts == tuple(scenes) and job.params.window_size == window
            assert probe_video(ctx.outputs_dir / job.outputs[0]).frames == frames

        too_long = queue.post("/fal-ai/magi-distilled", json={"prompt": "x", "num_frames": 264})
        assert too_long.status_code == 422 and too_long.json()["detail"][0]["loc"] == ["body", "num_frames"]
        too_long = client.post("/v1/image-to-video", json={"end_seconds": 11, "assets": {"image_file_path": PNG}})
        assert too_long.status_code == 422 and too_long.json()["field"] == "end_seconds", too_long.text
        too_long = client.post(MODEL, json={"prompt": "x", "num_frames": 264})
        assert too_long.status_code == 400 and too_long.json()["message"].startswith("num_frames"), too_long.text
        bad = queue.post("/fal-ai/magi-distilled", json={"prompt": "x", "prompts": [""]})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][:2] == ["body", "prompts"], bad.text
