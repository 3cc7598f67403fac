"""Job-store faults (issue #10, acceptance 5): a store that refuses writes (disk full), a corrupt store file, a
damaged row.

The full disk is a fault injected at the store's commits (a tmpfs needs root): every COMMIT fails with SQLite's own
"database or disk is full" until the test frees it, which is where a real full disk surfaces in WAL mode. One test
shows that a real SQLITE_FULL (``PRAGMA max_page_count``) is the same JobStoreError.
"""
from __future__ import annotations

import base64
import errno
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from magi_server.engine.loop import EngineEvent
from magi_server.media.images import encode_png
from magi_server.params import GenerationParams
from magi_server.serving.events import EventHub, StoreBacklog, on_engine_event
from magi_server.serving.jobs import (CorruptJobStore, DamagedJob, Job, JobStatus, JobStore, JobStoreError,
                                      JobStoreUnusable)
from tests.server_utils import running_server, tiny_settings, wait_status

WAVESPEED = "/api/v3/wavespeed-ai/magi-1-24b"
FAL_APP = "fal-ai/magi-distilled"
FULL = "database or disk is full"
THREE_CHUNKS = {"prompt": "three chunks", "num_frames": 72, "num_inference_steps": 8}


class FullDisk:
    """Stands in for the store's sqlite3 connection: while ``full``, every COMMIT fails as on a full disk (SQLite
    leaves the transaction open, and the store rolls it back); everything else goes to the real connection."""

    def __init__(self, store: JobStore) -> None:
        self._conn = store._conn
        self.full = False
        self.refused = 0
        store._conn = self

    def execute(self, sql: str, *args):
        if self.full and sql.strip().upper().startswith("COMMIT"):
            self.refused += 1
            raise sqlite3.OperationalError(FULL)
        return self._conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def _params(prompt: str = "a lighthouse") -> GenerationParams:
    return GenerationParams(prompts=(prompt,), width=64, height=64, num_frames=24, num_inference_steps=8, seed=1)


def _png_uri() -> str:
    image = np.full((36, 64, 3), 120, dtype=np.uint8)
    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode()


# ------------------------------------------------------------------------------------ the store's own errors


def test_a_real_sqlite_full_is_a_job_store_error_and_passes(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    kept = store.create(Job.new("wavespeed", "m", _params()))
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk": no page more
    big = _params("x" * 20_000)
    for write in (lambda: store.create(Job.new("wavespeed", "m", big)),
                  lambda: store.create_idempotent(Job.new("fal", "m", big), "key", "fp", quota=5)):
        with pytest.raises(JobStoreError, match=FULL):
            write()
    assert store.get(kept.id) == kept and len(store.list()) == 1  # reads go on; nothing half-written
    store._conn.execute("PRAGMA max_page_count = 1073741823")  # space returns
    assert store.create(Job.new("wavespeed", "m", big)).status is JobStatus.QUEUED
    store.close()


def test_every_write_path_raises_job_store_error_on_a_full_disk(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    running = store.create(Job.new("wavespeed", "m", _params()))
    store.mark_running(running.id)
    disk = FullDisk(store)
    disk.full = True
    writes = {
        "create": lambda: store.create(Job.new("wavespeed", "m", _params())),
        "create with quota": lambda: store.create(Job.new("wavespeed", "m", _params()), quota=3),
        "create_idempotent": lambda: store.create_idempotent(Job.new("fal", "m", _params()), "k", "fp", quota=3),
        "complete": lambda: store.complete(running.id, ["x.mp4"], 5),
        "fail": lambda: store.fail(running.id, "boom", "internal"),
        "cancel": lambda: store.cancel(running.id),
        "requeue": lambda: store.requeue(running.id),
        "progress": lambda: store.update_progress(running.id, 1, 2),
        "prune": lambda: store.prune_jobs(0),
    }
    for name, write in writes.items():
        with pytest.raises(JobStoreError, match=FULL):
            write()
    assert disk.refused == len(writes)
    assert store.get(running.id).status is JobStatus.RUNNING  # nothing changed
    disk.full = False
    assert store.complete(running.id, ["x.mp4"], 5).status is JobStatus.COMPLETED
    store.close()


# ------------------------------------------------------------------- the engine's events while the disk is full


def _bridge(tmp_path: Path):
    """What on_engine_event needs, over a real store whose commits can be refused."""
    store = JobStore(tmp_path / "jobs.db")
    (tmp_path / "outputs").mkdir()
    outputs = tmp_path / "outputs"
    ctx = SimpleNamespace(store=store, hub=EventHub(), metrics=None, outputs_dir=outputs,
                          remove_output=lambda name: (outputs / name).unlink(missing_ok=True),
                          backlog=StoreBacklog(retry_s=3600))  # no retry thread in the way: the test flushes
    return ctx, FullDisk(store)


def _event(kind: str, job_id: str, **fields) -> EngineEvent:
    return EngineEvent(kind=kind, job_id=job_id, **fields)


def test_an_end_the_store_refused_is_written_as_failed_with_the_reason_when_space_returns(tmp_path):
    ctx, disk = _bridge(tmp_path)
    job = ctx.store.create(Job.new("wavespeed", "m", _params()))
    on_engine_event(ctx, _event("started", job.id))
    output = ctx.outputs_dir / f"{job.id}.mp4"
    output.write_bytes(b"video")
    disk.full = True
    on_engine_event(ctx, _event("progress", job.id, chunks_done=1, chunks_total=1))  # a lost tick is not kept
    on_engine_event(ctx, _event("finished", job.id, output=output.name, inference_ms=5))  # returns: no raise
    assert ctx.backlog.unwritten() == {job.id: ("finished",)}
    assert ctx.store.get(job.id).status is JobStatus.RUNNING
    assert not any(e.ends_job for e in ctx.hub.since(job.id))  # nobody is told of an end the store lacks
    assert not ctx.backlog.flush(ctx)  # still full: kept
    disk.full = False
    assert ctx.backlog.flush(ctx) and ctx.backlog.unwritten() == {}
    ended = ctx.store.get(job.id)
    assert ended.status is JobStatus.FAILED and ended.error_code == "internal"
    assert ended.error.startswith(f"job store write failed: {FULL}")
    assert not output.exists()  # no record will point at it
    assert ctx.hub.since(job.id)[-1].data["status"] is JobStatus.FAILED  # the waiters hear of the end now
    ctx.store.close()


def test_a_lost_start_and_a_lost_failure_end_as_the_engine_said_not_stuck_queued(tmp_path):
    ctx, disk = _bridge(tmp_path)
    job = ctx.store.create(Job.new("wavespeed", "m", _params()))
    other = ctx.store.create(Job.new("wavespeed", "m", _params()))
    disk.full = True
    on_engine_event(ctx, _event("started", job.id))
    on_engine_event(ctx, _event("failed", job.id, error="out of memory", error_code="oom"))
    assert ctx.backlog.unwritten() == {job.id: ("started", "failed")}
    disk.full = False
    on_engine_event(ctx, _event("started", other.id))  # the next event writes the backlog first, in order
    assert ctx.backlog.unwritten() == {}
    ended = ctx.store.get(job.id)
    assert (ended.status, ended.error, ended.error_code, ended.attempts) == (JobStatus.FAILED, "out of memory",
                                                                              "oom", 1)
    assert ctx.store.get(other.id).status is JobStatus.RUNNING
    ctx.store.close()


def test_a_start_that_comes_through_later_lets_the_job_complete(tmp_path):
    ctx, disk = _bridge(tmp_path)
    job = ctx.store.create(Job.new("wavespeed", "m", _params()))
    disk.full = True
    on_engine_event(ctx, _event("started", job.id))
    disk.full = False
    assert ctx.backlog.flush(ctx) and ctx.store.get(job.id).status is JobStatus.RUNNING
    on_engine_event(ctx, _event("finished", job.id, output="x.mp4", inference_ms=5))
    assert ctx.store.get(job.id).status is JobStatus.COMPLETED  # the end itself was written: nothing lost
    ctx.store.close()


def test_the_retry_thread_writes_the_backlog_without_another_event(tmp_path):
    ctx, disk = _bridge(tmp_path)
    ctx.backlog.retry_s = 0.02
    job = ctx.store.create(Job.new("wavespeed", "m", _params()))
    on_engine_event(ctx, _event("started", job.id))
    disk.full = True
    on_engine_event(ctx, _event("cancelled", job.id))
    time.sleep(0.2)
    assert ctx.backlog.unwritten() == {job.id: ("cancelled",)}  # retried, still refused
    disk.full = False
    deadline = time.monotonic() + 5
    while ctx.backlog.unwritten() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ctx.store.get(job.id).status is JobStatus.CANCELLED
    ctx.store.close()


# --------------------------------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from magi_server.runtime.pipeline import MagiPipeline

    return MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture
def server(tmp_path, pipeline):
    from magi_server.serving.app import create_app

    with running_server(tiny_settings(tmp_path, tmp_path / "cache"), pipeline=pipeline) as (ctx, client):
        with TestClient(create_app(ctx, "fal_queue"), base_url="https://testserver:8443") as fal:
            yield SimpleNamespace(ctx=ctx, client=client, fal=fal, disk=FullDisk(ctx.store))


def _submits(server) -> dict:
    """One submit per API (and each again with an Idempotency-Key): name -> the response."""
    answers = {}
    for key in (None, "idem"):
        def headers(api: str) -> dict:  # one key per API: a key names one request of its owner, whatever the API
            return {"Idempotency-Key": f"{key}-{api}"} if key else {}

        answers[f"wavespeed {key}"] = server.client.post(WAVESPEED, json={"prompt": "rain"},
                                                         headers=headers("wavespeed"))
        answers[f"fal {key}"] = server.fal.post(f"/{FAL_APP}", json={"prompt": "rain", "num_inference_steps": 8},
                                                headers=headers("fal"))
        answers[f"magichour {key}"] = server.client.post("/v1/image-to-video", headers=headers("magichour"), json={
            "end_seconds": 1.0, "resolution": "480p", "assets": {"image_file_path": _png_uri()},
            "style": {"prompt": "rain"}})
    return answers


def _in_its_format(name: str, response) -> bool:
    body = response.json()
    if name.startswith("fal"):
        return isinstance(body.get("detail"), str)
    if name.startswith("magichour"):
        return isinstance(body.get("message"), str)
    return body["code"] == response.status_code and body["data"] is None and isinstance(body["message"], str)


@pytest.mark.slow
def test_submits_on_every_api_answer_503_with_retry_after_while_the_disk_is_full(server):
    ctx = server.ctx
    old = ctx.store.create(Job.new("wavespeed", "wavespeed-ai/magi-1-24b", _params()))  # polls keep working
    uploads_before = sorted(ctx.uploads_dir.glob("*")) if ctx.uploads_dir.exists() else []
    server.disk.full = True
    for name, response in _submits(server).items():
        assert response.status_code == 503, (name, response.status_code, response.text)
        assert int(response.headers["Retry-After"]) >= 1, name
        assert _in_its_format(name, response), (name, response.text)
    assert server.client.get(f"/api/v3/predictions/{old.id}/result").status_code == 200
    assert [j.id for j in ctx.store.list()] == [old.id]  # nothing stored
    assert sorted(ctx.uploads_dir.glob("*")) == uploads_before  # no stored input image left behind
    assert ctx.engine.queue_depth == 0  # every refused submit gave its queue slot back
    server.disk.full = False
    answers = _submits(server)
    assert all(r.status_code == 200 for r in answers.values()), {n: r.text for n, r in answers.items()}


@pytest.mark.slow
def test_the_running_job_ends_failed_with_a_reason_and_a_new_job_completes_once_space_returns(server, monkeypatch):
    ctx, client, disk = server.ctx, server.client, server.disk
    ctx.backlog.retry_s = 0.05
    job_id = client.post(WAVESPEED, json=THREE_CHUNKS).json()["data"]["id"]
    publish = ctx.hub.publish

    def fill_the_disk_mid_job(target, kind, **data):  # deterministic: after its start is written, before its end
        if target == job_id and kind == "progress":
            disk.full = True
        return publish(target, kind, **data)

    monkeypatch.setattr(ctx.hub, "publish", fill_the_disk_mid_job)
    deadline = time.monotonic() + 120
    while ctx.backlog.unwritten().get(job_id) != ("finished",):
        assert time.monotonic() < deadline, "the engine never reported the job's end"
        time.sleep(0.05)
    poll = client.get(f"/api/v3/predictions/{job_id}/result")
    assert poll.status_code == 200 and poll.json()["data"]["status"] == "processing"  # the store's last word
    refused = client.post(WAVESPEED, json={"prompt": "while full"})
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert ctx.engine.alive()

    disk.full = False  # space returns: the retry thread writes the end, no further event needed
    ended = wait_status(client, job_id, timeout=10)
    assert ended["status"] == "failed" and ended["error"].startswith(f"job store write failed: {FULL}")
    assert not (ctx.outputs_dir / f"{job_id}.mp4").exists()
    monkeypatch.setattr(ctx.hub, "publish", publish)
    fresh = client.post(WAVESPEED, json={"prompt": "after the fault"})
    assert fresh.status_code == 200
    done = wait_status(client, fresh.json()["data"]["id"])
    assert done["status"] == "completed" and len(done["outputs"]) == 1


@pytest.mark.slow
def test_no_space_for_a_stored_input_image_is_a_503_too(server, monkeypatch):
    from magi_server.serving import common

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(common, "_write_atomically", full)
    answers = {name: r for name, r in _submits(server).items() if name.startswith("magichour")}  # the image ones
    for name, response in answers.items():
        assert response.status_code == 503 and response.headers["Retry-After"], (name, response.text)
        assert _in_its_format(name, response) and "disk space" in response.json()["message"]
    assert not [job for job in server.ctx.store.list() if job.api == "magichour"]  # the text-only submits went in


# --------------------------------------------------------------------------------------------- damaged rows


def _damage(db: Path, sql: str, *args) -> None:
    """Write the store behind the server's back, as a broken tool or a bit flip would."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA ignore_check_constraints = ON")
    conn.execute(sql, args)
    conn.commit()
    conn.close()


def _damage_page_of(db: Path, job_id: str) -> None:
    """Overwrite the header of the table page that holds the job's row (rows of ~3 KB: one per page)."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the main file
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    raw = db.read_bytes()
    pages = [n for n in range(1, len(raw) // page_size)
             if raw[n * page_size] == 0x0D and job_id.encode() in raw[n * page_size:(n + 1) * page_size]]
    assert len(pages) == 1, pages
    with open(db, "r+b") as f:
        f.seek(pages[0] * page_size)
        f.write(b"\xff" * 16)


@pytest.mark.slow
def test_a_damaged_row_answers_a_clear_error_and_the_others_are_unaffected(server):
    ctx, client, fal = server.ctx, server.client, server.fal
    db = Path(ctx.settings.db_path)
    big = "a long prompt " * 220  # ~3 KB: each row on a table page of its own

    def stored(api: str, model_id: str, **meta) -> Job:
        return ctx.store.create(Job.new(api, model_id, _params(big), meta=meta))

    polls = {  # api -> (poll of a job id, a fresh job of that api)
        "wavespeed": (lambda i: client.get(f"/api/v3/predictions/{i}/result"),
                      lambda: stored("wavespeed", "wavespeed-ai/magi-1-24b")),
        "fal": (lambda i: fal.get(f"/{FAL_APP}/requests/{i}/status"), lambda: stored("fal", FAL_APP, app=FAL_APP)),
        "magichour": (lambda i: client.get(f"/v1/video-projects/{i}"),
                      lambda: stored("magichour", "magi-1", model="magi-1")),
    }
    for api, (poll, make) in polls.items():
        bad_params, bad_status, bad_page, healthy = make(), make(), make(), make()
        _damage(db, "UPDATE jobs SET params = '{not json' WHERE id = ?", bad_params.id)
        _damage(db, "UPDATE jobs SET status = 'exploded' WHERE id = ?", bad_status.id)
        _damage_page_of(db, bad_page.id)
        _damage(db, "UPDATE jobs SET progress_done = 0 WHERE id = ?", healthy.id)  # readers drop their cached pages
        for damaged in (bad_params, bad_status, bad_page):
            r = poll(damaged.id)
            assert r.status_code == 410, (api, r.status_code, r.text)
            assert _in_its_format(api, r), r.text
            assert f"job {damaged.id} is damaged" in r.text
            with pytest.raises(DamagedJob):
                ctx.store.get(damaged.id)
        assert poll(healthy.id).status_code in (200, 202), api  # fal answers 202 while a request is pending
        listed = {job.id for job in ctx.store.list(limit=1000)}
        assert healthy.id in listed and not listed & {bad_params.id, bad_status.id, bad_page.id}
    assert client.get("/metrics").status_code == 200  # the status gauge counts around the damage


# ------------------------------------------------------------------------------------------- a corrupt store


def _serve(db: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "magi_server.tools.cli", "serve", "--model", "tiny", "--db", str(db),
                           "--outputs", str(tmp_path / "outputs"), "--port", "0"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)


@pytest.mark.slow
def test_a_store_file_of_garbage_stops_serve_with_one_line_and_exit_code_2(tmp_path):
    db = tmp_path / "jobs.db"
    db.write_bytes(np.random.default_rng(0).integers(0, 256, 64 * 1024, dtype=np.uint8).tobytes())
    done = _serve(db, tmp_path)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stdout == "", done.stderr
    assert f"the job store {db} is corrupt: file is not a database; move it aside" in done.stderr


@pytest.mark.slow
def test_a_store_failing_its_integrity_check_stops_serve_with_one_line_and_exit_code_2(tmp_path):
    db = tmp_path / "jobs.db"
    with JobStore(db) as store:
        victim = store.create(Job.new("wavespeed", "m", _params("a long prompt " * 220)))
        store.create(Job.new("wavespeed", "m", _params("a long prompt " * 220)))
    _damage_page_of(db, victim.id)
    with pytest.raises(CorruptJobStore) as refused:
        JobStore(db)
    assert isinstance(refused.value, JobStoreUnusable) and "\n" not in str(refused.value)
    done = _serve(db, tmp_path)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1 and f"the job store {db} is corrupt" in done.stderr, done.stderr


def test_a_row_that_only_breaks_a_check_rule_does_not_stop_the_store(tmp_path):
    db = tmp_path / "jobs.db"
    with JobStore(db) as store:
        bad, good = (store.create(Job.new("wavespeed", "m", _params())) for _ in range(2))
    _damage(db, "UPDATE jobs SET status = 'exploded' WHERE id = ?", bad.id)
    with JobStore(db) as store:  # opens: one row is damaged, not the file
        assert store.get(good.id) == good
        with pytest.raises(DamagedJob, match=f"job {bad.id} is damaged"):
            store.get(bad.id)
        assert [j.id for j in store.list()] == [good.id] and store.count_by_status()[JobStatus.QUEUED] == 1
        assert store.prune_jobs(-10) == []  # nothing terminal; the damaged row neither fails nor goes


def test_a_store_path_that_cannot_be_opened_is_one_line_too(tmp_path):
    with pytest.raises(JobStoreUnusable, match=f"the job store {tmp_path} cannot be opened: Is a directory"):
        JobStore(tmp_path)
