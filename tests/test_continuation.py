"""Continuation over HTTP (issue #12, acceptance 4): ``continue_from`` (an earlier job of the same owner, continued
from the clean latents it kept) and ``video`` (a clip to continue) on WaveSpeed, fal and Magic Hour.

The served continuation is the library's ``video_latents`` path: a WaveSpeed job continuing another writes the same
MP4 bytes as ``MagiPipeline`` given the first job's last 8 latent frames and the same seed (tiny preset, one
process). The continuation's output holds only the new frames, as MAGI-1's video-to-video does (spec §5.6). The kept
latents are never an output nor served, belong to their owner only, and go with their job at retention.
"""
from __future__ import annotations

import base64
import hashlib
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from magi_server.media.images import encode_png
from magi_server.media.mp4 import Mp4Writer
from magi_server.params import KEPT_LATENT_FRAMES, kept_latents_name, output_size
from magi_server.runtime.model_runner import plan_frames_for_output
from magi_server.runtime.pipeline import MagiPipeline
from magi_server.serving.app import create_app
from magi_server.serving.janitor import Janitor
from magi_server.serving.jobs import Job
from tests.media_utils import probe_video
from tests.server_utils import running_server, tiny_settings, wait_status

MODEL = "/api/v3/wavespeed-ai/magi-1-24b"
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
FAL_QUEUE = "https://localhost:8443"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _video_uri(tmp_path, frames: int, width: int, height: int) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path / "clip.mp4"
    with Mp4Writer(path, width, height) as writer:
        writer.append(rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8))
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def _png_uri(width: int, height: int) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_png(np.zeros((height, width, 3), np.uint8))).decode()


def _refused(response, field: str, status: int = 400) -> None:
    assert response.status_code == status, response.text
    assert response.json()["message"].startswith(f"{field}:"), response.text


def test_continue_from_and_video_over_http(tmp_path, pipeline):
    settings = tiny_settings(tmp_path, tmp_path / "cache", api_keys=("key-a", "key-b"), fal_queue_port=8443)
    width, height = output_size("480p", "16:9", settings.resolution_scale)
    source = {"prompt": "a red fox runs through snow", "seed": 11, "num_frames": 48, "resolution": "480p",
              "aspect_ratio": "16:9", "num_inference_steps": 8}
    with running_server(settings, pipeline=pipeline) as (ctx, client):
        # ------------------------------------------------------------------ job 1, and the latents it keeps
        r = client.post(MODEL, json=source, headers=A)
        assert r.status_code == 200, r.text
        first = wait_status(client, r.json()["data"]["id"], headers=A)
        assert first["status"] == "completed", first
        kept = ctx.outputs_dir / kept_latents_name(first["id"])
        assert kept.is_file()
        assert ctx.store.get(first["id"]).outputs == [f"{first['id']}.mp4"]  # never listed as an output
        for headers in (A, {}):  # neither its owner's key nor a bare client reads it
            assert client.get(f"/files/{kept.name}", headers=headers).status_code == 404

        offline_source = pipeline(source["prompt"], num_frames=48, width=width, height=height,
                                  num_inference_steps=8, seed=11, output_type="latent")
        tail = offline_source.latents[:, :, -KEPT_LATENT_FRAMES:]
        assert torch.equal(load_file(kept)["latents"], tail)  # the last 8 clean latent frames, exactly

        # ------------------------------------------------------------------ job 2 continues job 1 (same owner)
        # no resolution or aspect ratio: a continuation takes its source's (the server default is 720p)
        follow = {"prompt": "the fox keeps running", "seed": 12, "num_frames": 37, "num_inference_steps": 8,
                  "continue_from": first["id"]}
        r = client.post(MODEL, json=follow, headers=A)
        assert r.status_code == 200, r.text
        second = wait_status(client, r.json()["data"]["id"], headers=A)
        assert second["status"] == "completed", second
        job = ctx.store.get(second["id"])
        assert job.params.task == "v2v" and (job.params.width, job.params.height) == (width, height)
        assert job.params.prefix_latents_path and job.params.video_path is None
        served = client.get(second["outputs"][0]).content

        # the library's video_latents path, same seed: the same new frames, byte for byte; only the new frames
        frames = plan_frames_for_output(37, "v2v", KEPT_LATENT_FRAMES)
        offline = pipeline(follow["prompt"], video_latents=tail, num_frames=frames, width=width, height=height,
                           num_inference_steps=8, seed=12, output_type="mp4", output_path=tmp_path / "offline.mp4")
        assert probe_video(offline.path).frames == 37
        assert _sha(served) == _sha(open(offline.path, "rb").read())
        second_kept = load_file(ctx.outputs_dir / kept_latents_name(second["id"]))["latents"]
        assert torch.equal(second_kept, offline.latents[:, :, -KEPT_LATENT_FRAMES:])

        # ------------------------------------------------------------------ refusals, each naming the field
        _refused(client.post(MODEL, json=follow, headers=B), "continue_from")  # another tenant's job: not found
        other = client.post(MODEL, json=follow, headers=B).json()["message"]
        unknown = client.post(MODEL, json={**follow, "continue_from": "0" * 32}, headers=A).json()["message"]
        assert other.replace(first["id"], "X") == unknown.replace("0" * 32, "X")  # no existence oracle
        _refused(client.post(MODEL, json={**follow, "continue_from": "nope"}, headers=A), "continue_from")
        _refused(client.post(MODEL, json={**follow, "resolution": "720p"}, headers=A), "continue_from")
        _refused(client.post(MODEL, json={**follow, "aspect_ratio": "9:16"}, headers=A), "continue_from")
        queued = ctx.store.create(Job.new("wavespeed", "m", job.params, owner=ctx.owner_of("key-a")))
        _refused(client.post(MODEL, json={**follow, "continue_from": queued.id}, headers=A), "continue_from")
        clip = _video_uri(tmp_path, 32, width, height)
        _refused(client.post(MODEL, json={**follow, "video": clip}, headers=A), "continue_from")  # both
        png = _png_uri(width, height)
        _refused(client.post(MODEL, json={**follow, "image": png}, headers=A), "continue_from")
        _refused(client.post(MODEL, json={"prompt": "x", "video": png}, headers=A), "video")
        _refused(client.post(MODEL, json={"prompt": "x", "video": "data:video/mp4;base64,AAAA"}, headers=A), "video")
        _refused(client.post(MODEL, json={"prompt": "x", "video": "http://127.0.0.1:9/a.mp4"}, headers=A), "video")

        # ------------------------------------------------------------------ video as a data URI: a v2v job
        window_sizes = []
        prefill = ctx.executor.prefill

        def spy(params, **kw):
            state = prefill(params, **kw)
            window_sizes.append(state.settings.window_size)
            return state

        ctx.executor.prefill = spy
        try:
            # 32 frames: 8 prefix latent frames, whose chunk emits 13 frames; 40 asks for one chunk more than 37
            r = client.post(MODEL, json={"prompt": "the clip goes on", "video": clip, "num_frames": 40, "seed": 5,
                                         "num_inference_steps": 8, "resolution": "480p", "aspect_ratio": "16:9",
                                         "window_size": 1}, headers=A)
            assert r.status_code == 200, r.text
            v2v = wait_status(client, r.json()["data"]["id"], headers=A)
        finally:
            ctx.executor.prefill = prefill
        assert v2v["status"] == "completed", v2v
        job = ctx.store.get(v2v["id"])
        assert job.params.task == "v2v" and job.params.video_path.startswith(str(ctx.uploads_dir))
        assert window_sizes == [1]  # window_size 1 reached the sampler
        assert probe_video(ctx.outputs_dir / f"{v2v['id']}.mp4").frames == 40  # exactly num_frames

        # ------------------------------------------------------------------ fal and Magic Hour take the fields
        with TestClient(create_app(ctx, "fal_queue"), base_url=FAL_QUEUE) as fal:
            r = fal.post("/fal-ai/magi", json={"prompt": "more fox", "continue_from": first["id"],
                                               "num_inference_steps": 8}, headers={"Authorization": "Key key-a"})
            assert r.status_code == 200, r.text
            fal_job = ctx.store.get(r.json()["request_id"])
            assert fal_job.params.prefix_latents_path
            assert (fal_job.params.width, fal_job.params.height) == (width, height)  # the source's size, not 720p
            r = fal.post("/fal-ai/magi", json={"prompt": "more fox", "continue_from": first["id"]},
                         headers={"Authorization": "Key key-b"})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "continue_from"], r.text
            r = fal.post("/fal-ai/magi", json={"prompt": "more fox", "video_url": clip, "resolution": "480p",
                                               "num_inference_steps": 8}, headers={"Authorization": "Key key-a"})
            assert r.status_code == 200, r.text
            assert ctx.store.get(r.json()["request_id"]).params.task == "v2v"
        r = client.post("/v1/image-to-video", json={"end_seconds": 1, "continue_from": first["id"]}, headers=A)
        assert r.status_code == 200, r.text
        mh_job = ctx.store.get(r.json()["id"])
        assert mh_job.params.prefix_latents_path and (mh_job.params.width, mh_job.params.height) == (width, height)
        r = client.post("/v1/image-to-video", json={"end_seconds": 1, "assets": {"video_file_path": clip},
                                                     "resolution": "480p"}, headers=A)
        assert r.status_code == 200, r.text
        assert ctx.store.get(r.json()["id"]).params.video_path
        r = client.post("/v1/image-to-video", json={"end_seconds": 1, "assets": {}}, headers=A)
        assert r.status_code == 422 and r.json()["field"] == "assets.image_file_path", r.text
        r = client.post("/v1/image-to-video", json={"end_seconds": 1, "continue_from": first["id"]}, headers=B)
        assert r.status_code == 422 and r.json()["field"] == "continue_from", r.text
        for job_id in (fal_job.id, mh_job.id):
            assert wait_completed(ctx, job_id)

        # ------------------------------------------------------------------ a trimmed output keeps what it shows
        # 30 frames: two whole chunks are made (12 latent frames), 30 frames shown: the latents of frames 0..31 kept
        r = client.post(MODEL, json={**source, "num_frames": 30, "seed": 13}, headers=A)
        trimmed = wait_status(client, r.json()["data"]["id"], headers=A)
        assert trimmed["status"] == "completed", trimmed
        whole = pipeline(source["prompt"], num_frames=plan_frames_for_output(30, "t2v"), width=width, height=height,
                         num_inference_steps=8, seed=13, output_type="latent").latents
        assert whole.shape[2] == 12
        assert torch.equal(load_file(ctx.outputs_dir / kept_latents_name(trimmed["id"]))["latents"], whole[:, :, :8])

        # ------------------------------------------------------------------ retention takes the latents with the job
        copy = ctx.store.get(second["id"]).params.prefix_latents_path
        Janitor(ctx.store, ctx.outputs_dir, ttl_s=-1).sweep()
        assert not kept.exists() and not (ctx.outputs_dir / kept_latents_name(second["id"])).exists()
        assert not (ctx.uploads_dir / copy.rsplit("/", 1)[1]).exists()  # the continuation's own copy too
        _refused(client.post(MODEL, json=follow, headers=A), "continue_from")


def wait_completed(ctx, job_id: str, timeout: float = 120.0) -> bool:
    """The job (of any API) ended completed; polled from the store."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = ctx.store.get(job_id)
        if job.is_terminal:
            assert job.status.value == "completed", (job.status, job.error)
            return True
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def test_kept_latents_and_inputs_travel_through_the_object_store(tmp_path):
    """Outputs in an object store (workers on other machines): the worker publishes a finished job's kept latents
    beside its video, an API replica finds them there to check and copy a continuation's input, and a worker
    without the continuation's input (or a prefix video) fetches it from the store."""
    from types import SimpleNamespace

    from magi_server.engine.loop import EngineEvent, EventKind
    from magi_server.params import GenerationParams
    from magi_server.serving.common import _has_kept_latents, _read_kept_latents
    from magi_server.serving.outputs import LocalOutputStore
    from magi_server.serving.worker import OutputPublisher, WorkerLink

    bucket = LocalOutputStore(tmp_path / "bucket")
    worker_dir = tmp_path / "worker"
    worker_dir.mkdir()
    job_id = "a" * 32
    (worker_dir / f"{job_id}.mp4").write_bytes(b"video")
    (worker_dir / kept_latents_name(job_id)).write_bytes(b"latents")
    event = OutputPublisher(bucket, worker_dir)(EngineEvent(EventKind.FINISHED, job_id, output=f"{job_id}.mp4"))
    assert event.kind is EventKind.FINISHED
    assert bucket.read(kept_latents_name(job_id)) == b"latents" and bucket.read(f"{job_id}.mp4") == b"video"
    assert not (worker_dir / kept_latents_name(job_id)).exists()  # moved, as the video is

    replica = SimpleNamespace(outputs_dir=tmp_path / "replica", output_store=bucket)
    assert _has_kept_latents(replica, job_id) and _read_kept_latents(replica, job_id) == b"latents"
    assert not _has_kept_latents(replica, "b" * 32)

    bucket.publish(_write(tmp_path / "l", b"copy"), "uploads/input-1.safetensors")
    bucket.publish(_write(tmp_path / "v", b"clip"), "uploads/input-2.mp4")
    params = GenerationParams(prompts=("x",), width=64, height=64, num_frames=24, num_inference_steps=8, seed=1,
                              prefix_latents_path="/elsewhere/uploads/input-1.safetensors")
    link = WorkerLink(SimpleNamespace(), SimpleNamespace(), worker_id="w", capacity=1, lease_s=3,
                      outputs_dir=worker_dir, output_store=bucket)
    local = link._local_inputs(params)
    assert local.prefix_latents_path == str(worker_dir / "uploads" / "input-1.safetensors")
    assert open(local.prefix_latents_path, "rb").read() == b"copy"
    video = link._local_inputs(GenerationParams(prompts=("x",), width=64, height=64, num_frames=24,
                                                num_inference_steps=8, seed=1, video_path="/x/uploads/input-2.mp4"))
    assert open(video.video_path, "rb").read() == b"clip"


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_a_job_is_continued_only_by_the_variant_that_made_it(tmp_path):
    from types import SimpleNamespace

    from magi_server.params import GenerationParams, ParamError
    from magi_server.serving.common import _continued_job
    from magi_server.serving.jobs import JobStatus

    params = GenerationParams(prompts=("x",), width=96, height=64, num_frames=24, num_inference_steps=8, seed=1)
    job = Job.new("wavespeed", "m", params, variant="magi-1-4.5b-distill")
    job.status = JobStatus.COMPLETED
    ctx = SimpleNamespace(store=SimpleNamespace(get=lambda job_id, owner=None: job),
                          settings=SimpleNamespace(api_keys=(), resolution_scale=0.125))
    assert _continued_job(ctx, "", job.id, "magi-1-4.5b-distill", "continue_from").source is job
    with pytest.raises(ParamError) as refused:
        _continued_job(ctx, "", job.id, "magi-1-24b", "continue_from")
    assert refused.value.param == "continue_from" and "magi-1-4.5b-distill" in refused.value.message


def test_admission_charges_a_continuation_its_prefix(pipeline):
    """A v2v job (a video or continue_from) holds its prefix's latent frames in the KV cache beside the new ones:
    admission charges it more than the same text-to-video job, and the charge is the planner's formula with an
    8-frame prefix."""
    from magi_server.params import GenerationParams
    from magi_server.runtime.memory_model import request_memory_estimate

    runner = pipeline.runner
    base = dict(prompts=("x",), width=832, height=480, num_frames=96, num_inference_steps=8, seed=1,
                trim_to_frames=True)
    t2v = GenerationParams(**base)
    v2v = GenerationParams(**base, prefix_latents_path="/kept.safetensors")
    facts = runner.memory_facts(v2v)
    assert facts["prefix_frames"] == 8 and runner.memory_facts(t2v)["prefix_frames"] == 0
    assert runner.request_memory_bytes(v2v) > runner.request_memory_bytes(t2v)
    assert runner.request_memory_bytes(v2v) == request_memory_estimate(**facts).total_bytes
