"""In-process server fixtures: the real app and engine over the tiny model, with tmp paths."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from fastapi.testclient import TestClient

from magi_server.serving.settings import ServerSettings


def tiny_settings(tmp: Path, cache: Path, **overrides) -> ServerSettings:
    base = ServerSettings(
        model="tiny", db_path=str(tmp / "jobs.db"), outputs_dir=str(tmp / "outputs"), cache_dir=str(cache),
        resolution_scale=0.125, default_num_frames=24, default_steps=8, public_base_url="http://testserver",
    )
    return replace(base, **overrides)


@contextmanager
def running_server(settings: ServerSettings, pipeline=None):
    from magi_server.composition import build_context
    from magi_server.serving.app import create_app, shutdown

    ctx = build_context(settings, pipeline=pipeline)
    try:
        with TestClient(create_app(ctx)) as client:
            yield ctx, client
    finally:
        shutdown(ctx)


def wait_status(client, job_id: str, done=("completed", "failed", "cancelled"), timeout=120.0, headers=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = client.get(f"/api/v3/predictions/{job_id}/result", headers=headers).json()["data"]
        if data["status"] in done:
            return data
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {data}")


def read_sse(client, path: str, timeout_s: float = 60.0, headers: dict | None = None) -> list[dict]:
    """Every event of an SSE stream as ``{"id": int, "event": str, "data": dict}`` (the fields it had), read on a
    thread so that a stream that never ends fails the test instead of hanging it. ``client``: an httpx client (or a
    TestClient) whose base URL the ``path`` is relative to."""
    import json
    import threading

    events: list[dict] = []
    failure: list[BaseException] = []

    def read():
        try:
            with client.stream("GET", path, headers=headers) as response:
                assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
                event: dict = {}
                for line in response.iter_lines():
                    if not line:
                        if event:
                            events.append(event)
                        event = {}
                    elif line.startswith("id: "):
                        event["id"] = int(line[len("id: "):])
                    elif line.startswith("event: "):
                        event["event"] = line[len("event: "):]
                    elif line.startswith("data: "):
                        event["data"] = json.loads(line[len("data: "):])
                if event:
                    events.append(event)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            failure.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"the event stream did not end within {timeout_s} s; got {events}"
    if failure:
        raise failure[0]
    return events
