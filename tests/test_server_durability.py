"""kill -9 of a real server process: no accepted job is lost, interrupted jobs run again a bounded number of times.

Reliability goal table rows 1-3: every id a POST returned reaches a terminal state after a restart (none unknown,
none stuck), a job that was running is re-run, and one that keeps dying with the process ends ``failed`` with
"interrupted" after max_attempts (2) while the jobs queued behind it are unaffected. The server is a subprocess
(`python -m magi_server serve --model tiny`) so SIGKILL is the real thing: no shutdown hook runs.
"""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from tests.media_utils import probe_video
from tests.procs import ServerProcess

MODEL = "/api/v3/wavespeed-ai/magi-1-24b"
TERMINAL = ("completed", "failed", "cancelled")
POLL_DEADLINE_S = 90.0


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")  # built by the first server start, reused by the rest


@pytest.fixture
def server(tmp_path, tiny_cache):
    srv = ServerProcess(db=tmp_path / "jobs.db", outputs=tmp_path / "outputs", cache=tiny_cache,
                        log=tmp_path / "server.log", extra_args=("--max-batch", "1"))
    try:
        yield srv
    finally:
        srv.close()


def _submit(srv: ServerProcess, num_frames: int, seed: int) -> str:
    r = httpx.post(srv.url + MODEL, json={"prompt": f"job {seed}", "seed": seed, "num_frames": num_frames,
                                          "num_inference_steps": 8}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["data"]["id"]


def _status(srv: ServerProcess, job_id: str) -> httpx.Response:
    return httpx.get(f"{srv.url}/api/v3/predictions/{job_id}/result", timeout=10)


def _wait_processing(srv: ServerProcess, job_id: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = _status(srv, job_id).json()["data"]["status"]
        if status == "processing":
            return
        assert status == "created", f"{job_id} went {status} before it could be killed mid-run"
        time.sleep(0.05)
    raise AssertionError(f"{job_id} never started; log:\n{srv.log_tail()}")


def _rows(db: Path) -> dict[str, tuple[str, int]]:
    """id -> (status, attempts) straight from SQLite: what the dead process left on disk."""
    conn = sqlite3.connect(str(db), timeout=10)
    try:
        return {row[0]: (row[1], row[2]) for row in conn.execute("SELECT id, status, attempts FROM jobs")}
    finally:
        conn.close()


def _wait_all_terminal(srv: ServerProcess, ids: list[str]) -> dict[str, dict]:
    deadline = time.monotonic() + POLL_DEADLINE_S
    done: dict[str, dict] = {}
    while len(done) < len(ids):
        assert time.monotonic() < deadline, (f"not terminal after {POLL_DEADLINE_S:.0f} s: "
                                             f"{sorted(set(ids) - set(done))}; log:\n{srv.log_tail()}")
        for job_id in ids:
            if job_id in done:
                continue
            r = _status(srv, job_id)
            assert r.status_code == 200, f"{job_id} unknown after restart: {r.status_code} {r.text}"
            data = r.json()["data"]
            if data["status"] in TERMINAL:
                done[job_id] = data
        time.sleep(0.1)
    return done


def _leftover_parts(outputs: Path) -> list[str]:
    return sorted(p.name for p in outputs.glob(".*.part"))


def test_kill9_with_running_and_queued_jobs_loses_nothing(server, tmp_path):
    outputs = tmp_path / "outputs"
    server.start()
    # the first job is long enough to be mid-run when the process dies; the other 11 wait behind it (max-batch 1)
    frames = {}
    ids = []
    for i in range(12):
        n = 240 if i == 0 else 24
        job_id = _submit(server, n, seed=100 + i)
        ids.append(job_id)
        frames[job_id] = n
    assert len(set(ids)) == 12
    _wait_processing(server, ids[0])
    before = {job_id: _status(server, job_id).json()["data"]["status"] for job_id in ids}
    server.kill9()

    # What the killed process left: every returned id is on disk (write-ahead), one running, the rest queued.
    left = _rows(tmp_path / "jobs.db")
    assert set(left) == set(ids)
    assert left[ids[0]] == ("running", 1), (left[ids[0]], before)
    assert all(left[j] == ("queued", 0) for j in ids[1:]), left

    server.start()
    done = _wait_all_terminal(server, ids)
    assert {d["status"] for d in done.values()} == {"completed"}, {j: (d["status"], d["error"]) for j, d in done.items()}
    for job_id in ids:
        data = done[job_id]
        assert [url.split("?")[0] for url in data["outputs"]] == [f"{server.url}/files/{job_id}.mp4"]
        video = httpx.get(data["outputs"][0], timeout=30)
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        path = outputs / f"{job_id}.mp4"
        assert video.content == path.read_bytes()
        info = probe_video(path)
        assert (info.frames, info.width, info.height) == (frames[job_id], 160, 96), (job_id, info)

    # at-least-once, and only as often as needed: the interrupted job ran twice, every other job exactly once
    after = _rows(tmp_path / "jobs.db")
    assert after[ids[0]] == ("completed", 2)
    assert all(after[j] == ("completed", 1) for j in ids[1:]), after
    # the encoder's temp file of the killed run does not stay behind forever
    assert _leftover_parts(outputs) == []


def test_job_killed_twice_while_running_fails_as_interrupted(server, tmp_path):
    outputs = tmp_path / "outputs"
    server.start()
    doomed = _submit(server, 960, seed=7)  # ~10 s on 2 cores: running whenever we kill
    follower = _submit(server, 120, seed=8)  # queued behind it both times (max-batch 1)
    for attempt in (1, 2):
        _wait_processing(server, doomed)
        assert _status(server, follower).json()["data"]["status"] == "created"
        server.kill9()
        assert _rows(tmp_path / "jobs.db")[doomed] == ("running", attempt)
        assert _rows(tmp_path / "jobs.db")[follower] == ("queued", 0)
        server.start()

    done = _wait_all_terminal(server, [doomed, follower])
    failed = done[doomed]
    assert failed["status"] == "failed", failed
    assert "interrupted" in failed["error"] and "2 of 2 attempts" in failed["error"], failed["error"]
    assert failed["code"] == 1405 and failed["outputs"] == []
    assert not (outputs / f"{doomed}.mp4").exists()
    # the job behind it was never charged an attempt and runs normally
    ok = done[follower]
    assert ok["status"] == "completed", ok
    info = probe_video(outputs / f"{follower}.mp4")
    assert (info.frames, info.width, info.height) == (120, 160, 96)
    assert _rows(tmp_path / "jobs.db") == {doomed: ("failed", 2), follower: ("completed", 1)}
    assert _leftover_parts(outputs) == []


def test_sigterm_drains_without_losing_or_charging_anything(server):
    """SIGTERM mid-job with no time to drain: exit code 0, the running job back in the queue with its attempt
    refunded, queued jobs untouched; after a restart every job completes. (A drain with time enough lets the job
    finish: test_server_lifecycle.py.)"""
    import signal

    server.extra_args += ("--drain-timeout", "0")
    server.start()
    ids = [_submit(server, 480, 100)] + [_submit(server, 24, 101 + i) for i in range(3)]
    _wait_processing(server, ids[0])
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0, server.log_tail()
    with sqlite3.connect(server.db) as con:
        rows = dict(((row[0], row[1:]) for row in con.execute("SELECT id, status, attempts FROM jobs")))
    assert rows == {job_id: ("queued", 0) for job_id in ids}
    assert "draining" in server.log_tail()

    server.start()
    deadline = time.monotonic() + POLL_DEADLINE_S
    for job_id in ids:
        while True:
            data = _status(server, job_id).json()["data"]
            if data["status"] in TERMINAL:
                break
            assert time.monotonic() < deadline, data
            time.sleep(0.1)
        assert data["status"] == "completed", data
