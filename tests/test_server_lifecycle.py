"""The server process's life seen from outside (issue #10, acceptance 10 and 11): it answers liveness while the
model still loads, drains on SIGTERM (readiness 503 at once, submits 503 + Retry-After, the running job finishes,
exit 0), and under ``--log-format json`` every line it writes is JSON, with no upload token or query string in it.

Real ``magi-server serve`` subprocesses (tests/procs.py): signals, start-up time and the process's own output are
what is tested.
"""
from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from magi_server.media.images import encode_png
from tests.procs import ServerProcess

MODEL = "/api/v3/wavespeed-ai/magi-1-24b"


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")


def _server(tmp_path: Path, cache: Path, *args: str) -> ServerProcess:
    return ServerProcess(db=tmp_path / "jobs.db", outputs=tmp_path / "outputs", cache=cache,
                         log=tmp_path / "server.log", extra_args=("--max-batch", "1", *args))


def _submit(url: str, num_frames: int, seed: int, **extra) -> httpx.Response:
    return httpx.post(url + MODEL, json={"prompt": f"job {seed}", "seed": seed, "num_frames": num_frames,
                                         "num_inference_steps": 8, **extra}, timeout=30)


def _wait(url: str, job_id: str, statuses: tuple[str, ...], timeout_s: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        data = httpx.get(f"{url}/api/v3/predictions/{job_id}/result", timeout=10).json()["data"]
        if data["status"] in statuses:
            return data
        assert time.monotonic() < deadline, data
        time.sleep(0.05)


def test_liveness_answers_within_a_second_while_the_model_loads(tmp_path, tiny_cache):
    srv = _server(tmp_path, tiny_cache).spawn()
    try:
        first_live = None
        while time.monotonic() - srv.spawned_at < 10.0:
            try:
                live = httpx.get(f"{srv.url}/health/live", timeout=0.5)
            except httpx.HTTPError:
                time.sleep(0.01)
                continue
            first_live = time.monotonic() - srv.spawned_at
            assert live.status_code == 200 and live.json() == {"status": "alive"}
            break
        assert first_live is not None and first_live < 1.0, (first_live, srv.log_tail())
        # the model is still loading (torch import + building the tiny model take seconds): readiness says so,
        # and a submit is refused with a Retry-After rather than hanging or failing
        ready = httpx.get(f"{srv.url}/health/ready", timeout=2)
        assert ready.status_code == 503 and ready.json()["status"] == "loading", ready.text
        early = _submit(srv.url, 24, 1)
        assert early.status_code == 503 and int(early.headers["retry-after"]) >= 1, early.text
        assert srv._wait_ready(60.0), srv.log_tail()
        assert httpx.get(f"{srv.url}/health/ready", timeout=5).json()["status"] == "ready"
    finally:
        srv.close()


def test_sigterm_drains_readiness_first_then_finishes_the_running_job(tmp_path, tiny_cache):
    srv = _server(tmp_path, tiny_cache, "--drain-timeout", "120").start()
    try:
        running = _submit(srv.url, 96, 7).json()["data"]["id"]
        queued = _submit(srv.url, 24, 8).json()["data"]["id"]
        _wait(srv.url, running, ("processing",))
        with httpx.Client(base_url=srv.url, timeout=5) as client:
            assert client.get("/health/ready").status_code == 200
            signalled = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            while client.get("/health/ready").status_code != 503:
                assert time.monotonic() - signalled < 1.0, "readiness never turned 503"
            turned = time.monotonic() - signalled
            assert turned < 0.1, turned
            assert client.get("/health/ready").json()["status"] == "draining"
            refused = client.post(MODEL, json={"prompt": "during the drain", "num_frames": 24})
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            assert "shutting down" in refused.json()["message"]
            # polls are still answered while the running job finishes
            assert client.get(f"/api/v3/predictions/{queued}/result").json()["data"]["status"] == "created"
        assert srv.proc.wait(120) == 0, srv.log_tail()
        import sqlite3

        with sqlite3.connect(srv.db) as con:
            rows = dict(con.execute("SELECT id, status FROM jobs"))
        assert rows == {running: "completed", queued: "queued"}  # finished in the drain; the other waits for us
        assert (srv.outputs / f"{running}.mp4").stat().st_size > 0
    finally:
        srv.close()


SECRET_QUERY = "sig=q9ZxSECRETQUERYVALUE"


def test_json_logs_every_line_is_json_and_no_token_or_query_string(tmp_path, tiny_cache):
    srv = _server(tmp_path, tiny_cache, "--log-format", "json", "--drain-timeout", "0").start()
    tokens: list[str] = []
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            # upload through the presigned flow: the token is in the PUT's path and in the download URL
            ticket = client.post("/api/v3/media/uploads", json={"filename": "in.png", "content_type": "image/png",
                                                                "size": 1000}).json()["data"]
            put_url = ticket["upload"]["url"]
            tokens.append(put_url.rsplit("/", 1)[1])
            png = encode_png(np.full((96, 160, 3), 90, dtype=np.uint8))
            assert client.put(put_url, content=png, headers={"content-type": "image/png"}).status_code == 200
            download = ticket["download_url"]
            tokens += [part for part in re.split(r"[/?=&]", download) if len(part) >= 16]
            assert client.get(download).status_code == 200
            # generate from it, and a job that fails (a bad field) and routes nobody has, with query strings
            job = client.post(MODEL, json={"prompt": "from an upload", "image": download, "num_frames": 24,
                                           "num_inference_steps": 8}).json()["data"]["id"]
            assert _wait(srv.url, job, ("completed", "failed"))["status"] == "completed"
            assert client.post(MODEL, json={"prompt": "bad", "num_frames": -3}).status_code == 400
            assert client.get(f"/api/v3/predictions/{job}/result?{SECRET_QUERY}").status_code == 200
            assert client.get(f"/files/uploads/{tokens[0]}xyz?{SECRET_QUERY}").status_code in (403, 404)
            # a job still running when the drain (0 s) ends goes back to the queue
            _wait(srv.url, _submit(srv.url, 480, 9).json()["data"]["id"], ("processing",))
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0
        log = srv.log_path.read_text()
    finally:
        srv.close()
    lines = [line for line in log.splitlines() if line and not line.startswith("===== start ")]
    not_json = []
    for line in lines:
        try:
            assert isinstance(json.loads(line), dict)
        except (ValueError, AssertionError):
            not_json.append(line)
    assert not not_json, not_json[:10]
    records = [json.loads(line) for line in lines]
    assert any(r.get("http", {}).get("path") == "/api/v3/media/upload/{token}" for r in records)
    assert any("drain" in r["msg"] for r in records) and any(r["logger"] == "magi_server.access" for r in records)
    for secret in (*tokens, SECRET_QUERY, "SECRETQUERYVALUE"):
        assert secret not in log, secret
    assert "?" not in "".join(r["http"]["path"] for r in records if "http" in r)
