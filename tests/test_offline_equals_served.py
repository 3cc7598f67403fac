"""The library and the server make the same video: ``MagiPipeline`` and a WaveSpeed request with the same params
and seed write byte-identical MP4s (tiny preset).

Both drive the same ModelRunner steps (prefill, one model call at a time, chunk decode, the same MP4 writer); this
pins it end to end. The hosted APIs return exactly ``num_frames`` frames (MAGI-1 itself whole 24-frame chunks), so
the library is asked for the frame count the server plans for them (``plan_frames_for_output``): for t2v 48 frames
that is 48 itself; for i2v the image takes a latent frame, so 44. The server center-crops an input image to the
output's aspect ratio, so the image here already has that shape.
"""
from __future__ import annotations

import base64
import hashlib

import numpy as np
import pytest

from magi_server.media.images import encode_png
from tests.media_utils import probe_video
from magi_server.params import output_size
from magi_server.runtime.model_runner import plan_frames_for_output
from magi_server.runtime.pipeline import MagiPipeline
from tests.server_utils import running_server, tiny_settings, wait_status

MODEL = "/api/v3/wavespeed-ai/magi-1-24b"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_pipeline_and_server_write_identical_mp4s(tmp_path, pipeline, task):
    settings = tiny_settings(tmp_path, tmp_path / "cache")
    width, height = output_size("480p", "16:9", settings.resolution_scale)
    request = {"prompt": "a red fox runs through snow", "seed": 1234, "num_frames": 48, "resolution": "480p",
               "aspect_ratio": "16:9", "num_inference_steps": 8}
    image = None
    if task == "i2v":
        image = encode_png((np.arange(height * width * 3).reshape(height, width, 3) % 251).astype(np.uint8))
        request["image"] = "data:image/png;base64," + base64.b64encode(image).decode()

    with running_server(settings, pipeline=pipeline) as (ctx, client):
        r = client.post(MODEL, json=request)
        assert r.status_code == 200, r.text
        done = wait_status(client, r.json()["data"]["id"])
        assert done["status"] == "completed", done
        served = client.get(done["outputs"][0])
        assert served.status_code == 200

    offline = pipeline(
        request["prompt"], image=image, num_frames=plan_frames_for_output(request["num_frames"], task), width=width,
        height=height, num_inference_steps=request["num_inference_steps"], seed=request["seed"], output_type="mp4",
        output_path=tmp_path / "offline.mp4",
    )
    info = probe_video(offline.path)
    assert (info.frames, info.width, info.height) == (48, width, height)  # nothing for the server to trim
    assert _sha(served.content) == _sha(open(offline.path, "rb").read())
