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
