"""The official WaveSpeed SDK (``wavespeed`` 2.0.5), unchanged, against a real ``magi-server serve`` subprocess.

Only the constructor's ``base_url`` points it here (api-compat.md §2). It is a plain HTTP client, so it runs in
the test process; the server runs in its own. Every SDK call passes ``timeout`` so a server that never reaches a
terminal status fails the test instead of hanging it (the SDK's own default waits forever).
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.media_utils import probe_video
from tests.procs import ServerProcess

wavespeed = pytest.importorskip(
    "wavespeed", reason="the WaveSpeed SDK is not installed: add wavespeed==2.0.5 to the test extra")

MODEL = "wavespeed-ai/magi-1-24b"
SDK_TIMEOUT_S = 60.0
API_KEY = "test-key-0123"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdk")
    # with the SDK's key configured: outputs then answer only to it or to their signed URLs
    srv = ServerProcess(db=tmp / "jobs.db", outputs=tmp / "outputs", cache=tmp / "cache", log=tmp / "server.log",
                        extra_args=("--api-key", API_KEY))
    try:
        srv.start()
        yield srv
    finally:
        srv.close()


@pytest.fixture
def client(server):
    # one connection retry instead of five with 1..5 s backoff: a dead server fails the test in seconds
    return wavespeed.Client(api_key=API_KEY, base_url=server.url, max_connection_retries=1)


def _download_and_probe(url: str, tmp_path: Path, server: ServerProcess):
    path_part = urlsplit(url).path
    assert url.startswith(server.url + "/files/") and path_part.endswith(".mp4") and "sig=" in url, url
    r = httpx.get(url, timeout=30)  # no auth header: the SDK leaves downloading to the caller (a signed URL)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert httpx.get(server.url + path_part, timeout=30).status_code == 404  # unsigned and without the key
    path = tmp_path / Path(path_part).name
    path.write_bytes(r.content)
    return probe_video(path)


BODY = {"prompt": "a lighthouse at dusk", "seed": 42, "num_frames": 96, "resolution": "480p",
        "num_inference_steps": 8}


def test_run_returns_outputs(client, server, tmp_path):
    # poll_interval 0.2 instead of the 1 s default only keeps the suite short; the protocol is the same
    result = client.run(MODEL, dict(BODY), timeout=SDK_TIMEOUT_S, poll_interval=0.2)
    assert list(result) == ["outputs"] and len(result["outputs"]) == 1, result
    info = _download_and_probe(result["outputs"][0], tmp_path, server)
    assert (info.frames, info.width, info.height) == (96, 96, 64)  # 480p 16:9 at the tiny preset's 1/8 scale


def test_run_sync_mode(client, server, tmp_path):
    result = client.run(MODEL, dict(BODY, seed=43), timeout=SDK_TIMEOUT_S, enable_sync_mode=True)
    assert len(result["outputs"]) == 1, result
    info = _download_and_probe(result["outputs"][0], tmp_path, server)
    assert (info.frames, info.width, info.height) == (96, 96, 64)


def test_run_no_throw_reports_a_bad_request(client):
    result = client.run_no_throw(MODEL, {}, timeout=SDK_TIMEOUT_S, poll_interval=0.2)
    # the submit itself was refused, so the SDK has no task id and no outputs
    assert result["status"] == "failed" and not result["outputs"] and result["task_id"] == "unknown", result
    assert "HTTP 400" in result["error"] and "prompt: field required" in result["error"], result["error"]


def test_a_sync_job_failing_at_the_time_limit_is_a_failure_to_the_sdk(tmp_path):
    """The server's job time limit (--job-timeout) fails a job: in sync mode that is a failed task with WaveSpeed's
    "task failed" code, which the SDK reports as a failure, never as its own sync timeout (code 5004: "query the
    result later")."""
    srv = ServerProcess(db=tmp_path / "jobs.db", outputs=tmp_path / "outputs", cache=tmp_path / "cache",
                        log=tmp_path / "server.log", extra_args=("--job-timeout", "1", "--max-batch", "1"))
    try:
        srv.start()
        sdk = wavespeed.Client(api_key="unused", base_url=srv.url, max_connection_retries=1)
        long = dict(BODY, num_frames=480, num_inference_steps=32)  # minutes of work, a second allowed
        outcome = sdk.run_no_throw(MODEL, long, timeout=SDK_TIMEOUT_S, enable_sync_mode=True)
        assert outcome["status"] == "failed" and not outcome["outputs"], outcome
        assert "Sync mode timed out" not in outcome["error"] and "time limit" in outcome["error"], outcome
        with pytest.raises(Exception) as raised:
            sdk.run(MODEL, dict(long, seed=44), timeout=SDK_TIMEOUT_S, enable_sync_mode=True)
        assert "Sync mode timed out" not in str(raised.value) and "failed" in str(raised.value).lower(), raised.value
    finally:
        srv.close()
