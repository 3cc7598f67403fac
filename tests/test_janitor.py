"""Retention: finished jobs older than the time to live go, with their videos, chunk previews and stored inputs;
nothing younger, nothing still running and no file the job does not own."""
from __future__ import annotations

import pytest

from magi_server.params import GenerationParams
from magi_server.serving.janitor import Janitor
from magi_server.serving.jobs import Job, JobStore
from magi_server.tools import cli

HOUR = 3600.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _job(store: JobStore, outputs, image: str | None = None) -> Job:
    params = GenerationParams(prompts=("x",), width=64, height=64, num_frames=24, num_inference_steps=8, seed=1,
                              image_path=image)
    job = store.create(Job.new("wavespeed", "m", params))
    store.mark_running(job.id)
    (outputs / f"{job.id}.chunk0.mp4").write_bytes(b"preview")
    return job


def test_sweep_deletes_old_finished_jobs_and_only_their_files(tmp_path):
    clock = FakeClock()
    outputs = tmp_path / "outputs"
    (outputs / "uploads").mkdir(parents=True)
    store = JobStore(tmp_path / "jobs.db", clock=clock)
    old_input = outputs / "uploads" / "input-old.png"
    old_input.write_bytes(b"png")
    foreign = tmp_path / "mine.png"  # an offline caller's own file: never the server's to delete
    foreign.write_bytes(b"png")
    old = _job(store, outputs, image=str(old_input))
    (outputs / f"{old.id}.mp4").write_bytes(b"video")
    store.complete(old.id, [f"{old.id}.mp4"], 10)
    old_failed = _job(store, outputs, image=str(foreign))
    store.fail(old_failed.id, "boom", "internal")
    still_running = _job(store, outputs)
    clock.now += 2 * HOUR
    recent = _job(store, outputs)
    store.complete(recent.id, [], 10)
    clock.now += 0.5 * HOUR

    janitor = Janitor(store, outputs, ttl_s=1 * HOUR)
    assert {job.id for job in janitor.sweep()} == {old.id, old_failed.id}
    assert store.get(old.id) is None and store.get(old_failed.id) is None
    assert not (outputs / f"{old.id}.mp4").exists() and not old_input.exists()
    assert not (outputs / f"{old.id}.chunk0.mp4").exists() and not (outputs / f"{old_failed.id}.chunk0.mp4").exists()
    assert foreign.exists()
    for kept in (still_running, recent):
        assert store.get(kept.id) is not None and (outputs / f"{kept.id}.chunk0.mp4").exists()
    assert janitor.sweep() == []
    store.close()


def test_sweep_deletes_a_pruned_jobs_objects_from_the_output_store(tmp_path):
    """Outputs in an object store (--outputs s3://...): the pruned job's video and previews go from the store too;
    a folder-backed OutputStore stands in for the bucket (tests/test_outputs.py runs both through one suite)."""
    from magi_server.serving.outputs import LocalOutputStore

    clock = FakeClock()
    scratch, bucket = tmp_path / "scratch", tmp_path / "bucket"
    scratch.mkdir()
    objects = LocalOutputStore(bucket)
    store = JobStore(tmp_path / "jobs.db", clock=clock)
    old, kept = _job(store, scratch), _job(store, scratch)
    for job in (old, kept):
        for name in (f"{job.id}.mp4", f"{job.id}.chunk0.mp4", f"{job.id}.chunk1.mp4"):
            (tmp_path / name).write_bytes(b"video")
            objects.publish(tmp_path / name, name)
        store.complete(job.id, [f"{job.id}.mp4"], 10)
    clock.now += 2 * HOUR
    # back to running (not ended: kept whatever its age)
    store._conn.execute("UPDATE jobs SET status = 'running', finished_at = NULL WHERE id = ?", (kept.id,))
    janitor = Janitor(store, scratch, ttl_s=HOUR, output_store=objects)
    assert [job.id for job in janitor.sweep()] == [old.id]
    assert objects.names() == sorted(f"{kept.id}{tail}" for tail in (".mp4", ".chunk0.mp4", ".chunk1.mp4"))
    store.close()


def test_the_serve_flag_sets_the_time_to_live(monkeypatch):
    seen = {}
    monkeypatch.setattr("magi_server.composition.serve", lambda settings, **kw: seen.setdefault("settings", settings))
    assert cli.main(["serve", "--model", "tiny", "--device", "cpu", "--keep-jobs-hours", "48"]) == 0
    assert seen["settings"].keep_jobs_s == pytest.approx(48 * HOUR)
    seen.clear()
    assert cli.main(["serve", "--model", "tiny", "--device", "cpu", "--keep-jobs-hours", "0"]) == 0
    assert seen["settings"].keep_jobs_s is None


def test_a_server_runs_its_janitor_and_stops_it(tmp_path):
    from magi_server.runtime.pipeline import MagiPipeline
    from tests.server_utils import running_server, tiny_settings

    pipeline = MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path / "cache")
    with running_server(tiny_settings(tmp_path, tmp_path / "cache", keep_jobs_s=HOUR), pipeline) as (ctx, _):
        assert ctx.janitor is not None and ctx.janitor.ttl_s == HOUR and ctx.janitor._thread.is_alive()
    assert not ctx.janitor._thread.is_alive()
    with running_server(tiny_settings(tmp_path / "b", tmp_path / "cache", keep_jobs_s=None), pipeline) as (ctx, _):
        assert ctx.janitor is None


def test_stale_uploads_go_and_the_disk_gauge_falls(tmp_path):
    import os

    from magi_server.serving.janitor import disk_bytes
    from magi_server.serving.metrics import GaugeReaders, Metrics

    clock = FakeClock()
    outputs = tmp_path / "outputs"
    uploads = outputs / "uploads"
    uploads.mkdir(parents=True)
    store = JobStore(tmp_path / "jobs.db", clock=clock)
    old_unused, old_in_use, fresh = uploads / "old.png", uploads / "input-queued.png", uploads / "new.png"
    for path in (old_unused, old_in_use, fresh):
        path.write_bytes(b"x" * 1000)
    for path in (old_unused, old_in_use):
        os.utime(path, (clock.now - 3 * HOUR, clock.now - 3 * HOUR))
    params = GenerationParams(prompts=("x",), width=64, height=64, num_frames=24, num_inference_steps=8, seed=1,
                              image_path=str(old_in_use))
    store.create(Job.new("wavespeed", "m", params))  # still queued: its input must stay
    metrics = Metrics(GaugeReaders(queue_depth=lambda: 0, jobs_by_status=dict, gpu_memory_bytes=lambda: None,
                                   engine_alive=lambda: True, outputs_bytes=lambda: disk_bytes(outputs)))

    def gauge() -> float:
        text = metrics.exposition()[0].decode()
        return float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith("magi_outputs_disk_bytes ")))

    assert gauge() == 3000
    Janitor(store, outputs, ttl_s=1 * HOUR, clock=clock).sweep()
    assert not old_unused.exists() and old_in_use.exists() and fresh.exists()
    assert gauge() == 2000
    store.close()
