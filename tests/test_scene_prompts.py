"""MAGI-1 over HTTP (issue #12, acceptance 4 in part): WaveSpeed's extension fields `prompts` (one per chunk: scene
changes) and `window_size` reach the runner, and a 240-frame request runs."""
from __future__ import annotations

import pytest

from magi_server.runtime.pipeline import MagiPipeline
from tests.media_utils import probe_video
from tests.server_utils import running_server, tiny_settings, wait_status

MODEL = "/api/v3/wavespeed-ai/magi-1-24b"


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
