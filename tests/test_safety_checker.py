"""The safety checker (issue #12, acceptance 2): with a tiny image classifier written here (a one-layer ViT with
random weights, labels ``normal``/``nsfw``, its classifier bias forced to one label), WaveSpeed's
``has_nsfw_contents`` says what the classifier said, ``enable_safety_checker: false`` skips it, a flagged fal or
Magic Hour job fails with the documented error, and a server without a checker says so (``/health/ready``,
``safety_checked``) instead of claiming clean outputs. All over the real app and engine (tiny model), in process."""
from __future__ import annotations

import base64
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from magi_server.media.images import encode_png
from magi_server.runtime.pipeline import MagiPipeline
from magi_server.runtime.safety_checker import SafetyChecker, parse_labels, sample_frames
from magi_server.tools import cli
from tests.server_utils import running_server, tiny_settings, wait_status

WAVESPEED = "/api/v3/wavespeed-ai/magi-1-24b"
FAL_QUEUE = "https://localhost:8443"
FAL_RUN = "https://localhost:8444"
README = Path(__file__).resolve().parents[1] / "README.md"


def write_classifier(folder: Path, labels: dict[int, str], forced: str | None) -> Path:
    """A ViT image classifier (one layer, random weights) saved with its image processor; ``forced``: the label
    every image gets (the classifier's weights zeroed, its bias pushed to that label)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, id2label=labels, label2id={v: k for k, v in labels.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ViTForImageClassification(config)
    if forced is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor([8.0 if name == forced else 0.0 for name in labels.values()]))
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict[str, Path]:
    labels = {0: "normal", 1: "nsfw"}
    return {forced: write_classifier(tmp_path_factory.mktemp(f"classifier-{forced}"), labels, forced)
            for forced in ("nsfw", "normal")}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


def serve(tmp_path, pipeline, **overrides):
    return running_server(tiny_settings(tmp_path, tmp_path / "cache", **overrides), pipeline=pipeline)


def spy_on_classifier(ctx) -> list[int]:
    """Record how many frames each classifier call gets (the checker the composition root handed the runner)."""
    checker = ctx.executor.safety_checker
    assert isinstance(checker, SafetyChecker)
    calls: list[int] = []
    scores = checker.nsfw_scores

    def counted(frames):
        calls.append(len(frames))
        return scores(frames)

    checker.nsfw_scores = counted
    return calls


def wait_project(client, project_id: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        project = client.get(f"/v1/video-projects/{project_id}").json()
        if project["status"] in ("complete", "error", "canceled"):
            return project
        time.sleep(0.05)
    raise AssertionError(f"project {project_id} did not end: {project}")


def png_uri() -> str:
    image = np.full((36, 64, 3), 120, dtype=np.uint8)
    image[:, :32, 0] = 250
    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode()


# ------------------------------------------------------------------------------------------ the classifier itself


def test_the_checker_flags_by_the_summed_nsfw_labels_on_sampled_frames(classifiers, tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (24, 40, 56, 3), dtype=np.uint8)
    assert SafetyChecker.from_pretrained(classifiers["nsfw"]).check(frames) is True
    assert SafetyChecker.from_pretrained(classifiers["normal"]).check(frames) is False
    assert SafetyChecker.from_pretrained(classifiers["nsfw"]).check(frames[:0]) is False
    # the first, middle and last frame of a chunk; a short chunk whole
    assert [int(f[0, 0, 0]) for f in sample_frames(np.arange(24).reshape(24, 1, 1, 1))] == [0, 12, 23]
    assert len(sample_frames(frames[:2])) == 2
    assert parse_labels(" NSFW, porn,,nsfw ") == ("nsfw", "porn")
    # several unsafe labels count together: 40% porn + 40% hentai flags although "neutral" (20%) is on top of each
    split = write_classifier(tmp_path / "split", {0: "neutral", 1: "porn", 2: "hentai"}, None)
    checker = SafetyChecker.from_pretrained(split)
    with torch.no_grad():
        checker.model.classifier.weight.zero_()
        checker.model.classifier.bias.copy_(torch.log(torch.tensor([0.2, 0.4, 0.4])))
    assert checker.nsfw_labels == ("porn", "hentai")
    assert checker.nsfw_scores(frames[:1]) == pytest.approx([0.8], abs=1e-4) and checker.check(frames)


def test_a_classifier_without_an_nsfw_label_is_refused_at_startup_with_one_line(tmp_path, capsys):
    pets = write_classifier(tmp_path / "pets", {0: "cat", 1: "dog"}, None)
    with pytest.raises(ValueError, match="has none of the labels"):
        SafetyChecker.from_pretrained(pets)
    assert SafetyChecker.from_pretrained(pets, ["Dog"]).nsfw_labels == ("dog",)  # label names are configurable
    with pytest.raises(ValueError, match="every label"):
        SafetyChecker.from_pretrained(pets, ["cat", "dog"])
    db = str(tmp_path / "jobs.db")
    capsys.readouterr()  # what saving and loading the classifiers printed
    for extra, words in ((["--safety-checker", str(pets)], "has none of the labels nsfw, porn, hentai, sexy"),
                         (["--safety-checker", str(tmp_path / "nowhere")], "is not a folder"),
                         (["--safety-labels", "nsfw"], "give --safety-checker DIR")):
        assert cli.main(["serve", "--device", "cpu", "--db", db, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert cli._check_safety_checker(str(pets), "dog,Bird") == ("dog", "bird")


# --------------------------------------------------------------------------------------------------- over HTTP


def test_wavespeed_reports_what_the_checker_says_and_can_skip_it(tmp_path, pipeline, classifiers):
    with serve(tmp_path, pipeline, safety_checker=str(classifiers["nsfw"])) as (ctx, client):
        assert client.get("/health/ready").json()["safety_checker"] == "configured"
        calls = spy_on_classifier(ctx)
        r = client.post(WAVESPEED, json={"prompt": "a red fox in snow", "seed": 1, "num_frames": 48})
        assert r.status_code == 200, r.text
        done = wait_status(client, r.json()["data"]["id"])
        assert done["status"] == "completed", done
        assert done["has_nsfw_contents"] == [True] and done["safety_checked"] is True
        assert calls == [3, 3]  # each of the two chunks, on three sampled frames
        job = ctx.store.get(done["id"])
        assert job.meta["nsfw"] == [True] and job.meta["safety_checked"] is True
        assert job.meta["resolution"] == "720p"  # merged into the meta the submit stored, not replacing it

        skipped = client.post(WAVESPEED, json={"prompt": "a red fox in snow", "seed": 1, "num_frames": 24,
                                               "enable_safety_checker": False})
        done = wait_status(client, skipped.json()["data"]["id"])
        assert done["status"] == "completed" and done["has_nsfw_contents"] == [False]
        assert done["safety_checked"] is False and calls == [3, 3]  # the classifier never ran
        skipped_job = ctx.store.get(done["id"])
        assert skipped_job.params.safety_check is False and "safety_checked" not in skipped_job.meta

    with serve(tmp_path / "clean", pipeline, safety_checker=str(classifiers["normal"])) as (ctx, client):
        r = client.post(WAVESPEED, json={"prompt": "a red fox in snow", "seed": 1, "num_frames": 24,
                                         "enable_safety_checker": True})
        done = wait_status(client, r.json()["data"]["id"])
        assert done["status"] == "completed"
        assert done["has_nsfw_contents"] == [False] and done["safety_checked"] is True


def test_a_flagged_fal_job_fails_with_a_content_policy_violation(tmp_path, pipeline, classifiers):
    from magi_server.serving.app import create_app

    with serve(tmp_path, pipeline, safety_checker=str(classifiers["nsfw"]), fal_queue_port=8443) as (ctx, _):
        with TestClient(create_app(ctx, "fal_queue"), base_url=FAL_QUEUE) as queue, \
                TestClient(create_app(ctx, "fal_run"), base_url=FAL_RUN) as run:
            fast = {"prompt": "a red fox in snow", "resolution": "480p", "num_inference_steps": 8, "seed": 3}
            r = run.post("/fal-ai/magi-distilled", json=fast)
            assert r.status_code == 422, r.text
            rid = r.headers["x-fal-request-id"]
            assert r.headers["x-fal-error-type"] == "content_policy_violation"
            assert r.json() == {"detail": [{"loc": ["body"], "type": "content_policy_violation",
                                            "msg": "content flagged: the server's safety checker flagged the "
                                                   "generated video"}],
                                "error_type": "content_policy_violation"}
            status = queue.get(f"/fal-ai/magi-distilled/requests/{rid}/status").json()
            assert status["status"] == "COMPLETED" and status["error_type"] == "content_policy_violation"
            assert queue.get(f"/fal-ai/magi-distilled/requests/{rid}").status_code == 422
            job = ctx.store.get(rid)
            assert job.status.value == "failed" and job.error_code == "content_flagged" and job.outputs == []
            assert not (ctx.outputs_dir / f"{rid}.mp4").exists()  # nobody can fetch what was flagged

            unchecked = run.post("/fal-ai/magi-distilled", json={**fast, "enable_safety_checker": False})
            assert unchecked.status_code == 200, unchecked.text
            assert unchecked.json()["video"]["url"]


def test_a_flagged_magic_hour_project_ends_in_error(tmp_path, pipeline, classifiers):
    with serve(tmp_path, pipeline, safety_checker=str(classifiers["nsfw"])) as (ctx, client):
        r = client.post("/v1/image-to-video", json={"end_seconds": 1.0, "resolution": "480p",
                                                     "assets": {"image_file_path": png_uri()},
                                                     "style": {"prompt": "a lighthouse at dusk"}})
        assert r.status_code == 200, r.text
        project_id = r.json()["id"]
        project = wait_project(client, project_id)
        assert project["status"] == "error", project
        assert project["error"] == {"code": "content_flagged",
                                    "message": "content flagged: the server's safety checker flagged the "
                                               "generated video"}
        assert project["download"] is None and project["downloads"] == []

    with serve(tmp_path / "clean", pipeline, safety_checker=str(classifiers["normal"])) as (ctx, client):
        r = client.post("/v1/image-to-video", json={"end_seconds": 1.0, "resolution": "480p",
                                                     "assets": {"image_file_path": png_uri()}})
        project_id = r.json()["id"]
        project = wait_project(client, project_id)
        assert project["status"] == "complete", project
        assert ctx.store.get(project_id).meta["safety_checked"] is True


def test_without_a_checker_the_server_says_outputs_are_not_checked(tmp_path, pipeline):
    with serve(tmp_path, pipeline) as (ctx, client):
        assert ctx.executor.safety_checker is None
        assert client.get("/health/ready").json()["safety_checker"] == "none"
        r = client.post(WAVESPEED, json={"prompt": "a red fox in snow", "seed": 1, "num_frames": 24})
        done = wait_status(client, r.json()["data"]["id"])
        assert done["status"] == "completed"
        assert done["has_nsfw_contents"] == [False] and done["safety_checked"] is False
        assert "safety_checked" not in ctx.store.get(done["id"]).meta and "nsfw" not in ctx.store.get(done["id"]).meta
    readme = README.read_text()
    assert "--safety-checker" in readme and "safety_checked" in readme and "has_nsfw_contents" in readme


# ------------------------------------------------------------------------------------------ the verdict's record


def _verdict_round_trip(store) -> None:
    from magi_server.params import GenerationParams
    from magi_server.serving.jobs import Job, JobStatus, new_job_id

    params = GenerationParams(prompts=("a cat",), width=64, height=32, num_frames=24, num_inference_steps=8, seed=1)
    job = store.create(Job(id=new_job_id(), api="wavespeed", model="m", status=JobStatus.QUEUED, params=params,
                           created_at=100.0, meta={"resolution": "720p", "original_prompt": "ein Kätzchen"}))
    store.mark_running(job.id)
    done = store.complete(job.id, [f"{job.id}.mp4"], 5, meta_updates={"nsfw": [True], "safety_checked": True})
    assert done.status is JobStatus.COMPLETED and done.outputs == [f"{job.id}.mp4"]
    assert done.meta == {"resolution": "720p", "original_prompt": "ein Kätzchen", "nsfw": [True],
                         "safety_checked": True}
    assert store.get(job.id).meta == done.meta
    plain = store.create(Job(id=new_job_id(), api="fal", model="m", status=JobStatus.QUEUED, params=params,
                             created_at=101.0, meta={"app": "fal-ai/magi"}))
    store.mark_running(plain.id)
    assert store.complete(plain.id, ["x.mp4"], 5).meta == {"app": "fal-ai/magi"}  # no updates: meta untouched
    assert store.complete(plain.id, ["x.mp4"], 5, meta_updates={"nsfw": [False]}) is None  # already completed


def test_the_verdict_is_merged_into_the_meta_in_the_completing_write_sqlite(tmp_path):
    from magi_server.serving.jobs import JobStore

    with JobStore(tmp_path / "jobs.db") as store:
        _verdict_round_trip(store)


def test_the_verdict_is_merged_into_the_meta_in_the_completing_write_postgres(postgres_dsn):
    from magi_server.serving.jobs_postgres import PostgresJobStore

    with PostgresJobStore(postgres_dsn) as store:
        _verdict_round_trip(store)
        fenced_id = store.create(_fal_job()).id
        claimed = store.claim("w1", None, lease_s=30.0)
        assert claimed is not None and claimed.id == fenced_id
        from magi_server.serving.worker import FencedStore

        assert FencedStore(store, "w2").complete(fenced_id, ["y.mp4"], 5, meta_updates={"nsfw": [True]}) is None
        assert FencedStore(store, "w1").complete(fenced_id, ["y.mp4"], 5,
                                                 meta_updates={"nsfw": [True]}).meta["nsfw"] == [True]


def _fal_job():
    from magi_server.params import GenerationParams
    from magi_server.serving.jobs import Job, JobStatus, new_job_id

    params = GenerationParams(prompts=("a dog",), width=64, height=32, num_frames=24, num_inference_steps=8, seed=2)
    return Job(id=new_job_id(), api="fal", model="m", status=JobStatus.QUEUED, params=params, created_at=102.0,
               meta={"app": "fal-ai/magi"})


def test_the_request_knob_travels_with_the_params_without_splitting_batches():
    import json
    from dataclasses import replace

    from magi_server.params import GenerationParams

    checked = GenerationParams(prompts=("a cat",), width=64, height=32, num_frames=24, num_inference_steps=8, seed=1)
    unchecked = replace(checked, safety_check=False)
    assert checked.safety_check is True and checked.shape_key() == unchecked.shape_key()  # batched together
    assert GenerationParams.from_json(unchecked.to_json()).safety_check is False
    stored_before = {k: v for k, v in json.loads(checked.to_json()).items() if k != "safety_check"}
    assert GenerationParams.from_json(json.dumps(stored_before)).safety_check is True  # jobs stored before the field
