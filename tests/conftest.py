"""Shared test fixtures (the golden reference folder beside the checkout) and the markers every test gets.

``pytest -m "not slow"`` is the sub-minute inner loop; ``make test`` runs everything. Markers are given by file so
a new test in a slow file is slow without anyone remembering to say so.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.golden_utils import GOLDEN_DIR


@pytest.fixture(scope="session")
def golden() -> Path:
    """Path to ../shared/golden; skips (with the reason) when the folder is absent."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden fixtures not found at {GOLDEN_DIR} (CI keeps ../shared beside the checkout)")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the whole session (tests/postgres_utils.py); skips, with the reason, where
    the server binaries or psycopg are missing. Stopped when the session ends."""
    from tests.postgres_utils import PostgresServer, why_unavailable

    reason = why_unavailable()
    if reason is not None:
        pytest.skip(reason)
    server = PostgresServer()
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture
def postgres_dsn(postgres_server) -> str:
    """The URL of a fresh, empty job-store location on the session's PostgreSQL server (a schema of its own, named
    by the URL's search_path), dropped after the test. `postgres_server.database()` makes a whole database."""
    name, dsn = postgres_server.schema_dsn()
    yield dsn
    postgres_server.drop_schema(name)


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server process for the whole session (tests/s3_utils.py: moto stands in for a real S3 server,
    which does not install here), as a `MotoS3` (endpoint URL, fake credentials passed explicitly, never through
    os.environ); skips, with the reason, where boto3 or moto is missing. Stopped when the session ends."""
    from tests.s3_utils import MotoServer, why_unavailable

    reason = why_unavailable()
    if reason is not None:
        pytest.skip(reason)
    server = MotoServer()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the session's S3 server: an `S3Bucket` (``endpoint_url``, ``bucket``, ``url()``,
    ``store_kwargs()`` for an in-process store, ``env()`` for a subprocess)."""
    from tests.s3_utils import S3Bucket

    return S3Bucket(s3_server, s3_server.make_bucket())


# whole files that build tiny models, run servers or subprocesses, compile, or account real-shape plans
SLOW_FILES = {
    "test_planner.py", "test_sampler_golden.py", "test_server_durability.py", "test_readme_quickstart.py",
    "test_cli_generate.py", "test_server_magichour.py", "test_server_limits.py", "test_vae_golden.py",
    "test_vae_unit.py", "test_compile.py", "test_server_wavespeed.py", "test_gpu_bench.py", "test_chunk_output.py",
    "test_dit_golden.py", "test_pipeline_tiny.py", "test_bench.py", "test_tiny.py", "test_text_encoder.py",
    "test_async_prefill.py", "test_offline_equals_served.py", "test_openapi_conformance.py",
    "test_server_fal.py", "test_file_access.py", "test_batching.py", "test_video.py", "test_malformed_bodies.py",
    "test_image_admission.py", "test_poll_latency.py", "test_connection_limits.py", "test_server_lifecycle.py",
    "test_outputs.py", "test_scale_out.py", "test_scene_prompts.py", "test_context_parallel.py", "test_readme_scale_out.py",
    "test_safety_checker.py", "test_continuation.py", "test_webhooks.py", "test_prediction_history.py",
    "test_server_openai.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.fspath))
        if path.name.startswith("test_sdk_"):  # the official SDKs against a real server process
            item.add_marker(pytest.mark.sdk)
            item.add_marker(pytest.mark.slow)
        elif path.name == "test_playground.py":  # headless Chromium
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.slow)
        elif path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
        if "gpu" in path.parts:
            item.add_marker(pytest.mark.gpu)

