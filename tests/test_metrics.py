"""/metrics is prometheus-client's exposition of a registry owned by one server, and its label values stay
bounded: made-up methods and paths add no series (issue #9, acceptance 6)."""
from __future__ import annotations

import asyncio
import itertools

import httpx
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from magi_server.serving.metrics import HTTP_METHODS, GaugeReaders, Metrics
from tests.server_utils import tiny_settings


@pytest.fixture(scope="module")
def app_and_ctx(tmp_path_factory):
    from magi_server.composition import build_context
    from magi_server.runtime.pipeline import MagiPipeline
    from magi_server.serving.app import create_app, shutdown

    tmp = tmp_path_factory.mktemp("metrics")
    pipeline = MagiPipeline.from_pretrained("tiny", cache_dir=tmp / "cache")
    ctx = build_context(tiny_settings(tmp, tmp / "cache"), pipeline=pipeline)
    try:
        yield create_app(ctx), ctx
    finally:
        shutdown(ctx)


async def _scrape(client: httpx.AsyncClient) -> str:
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
    return r.text


async def _status_of(app, method: str, path: str) -> int:
    """One bodiless request straight into the ASGI app: 20,000 of them through httpx would take 4x as long."""
    messages = [{"type": "http.request", "body": b"", "more_body": False}]
    status: list[int] = []

    async def receive() -> dict:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    await app(scope, receive, send)
    return status[0]


def _samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def test_metrics_is_prometheus_exposition_with_every_metric(app_and_ctx):
    app, _ = app_and_ctx

    async def scrape() -> str:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as c:
            await c.get("/health/live")
            return await _scrape(c)

    names = {family.name for family in text_string_to_metric_families(asyncio.run(scrape()))}
    # counters with no sample yet are still declared; magi_gpu_memory_used_bytes is absent off-GPU
    assert {"magi_http_requests", "magi_jobs_submitted", "magi_jobs_rejected", "magi_jobs_finished",
            "magi_generation_seconds", "magi_queue_depth", "magi_jobs", "magi_engine_alive"} <= names


@pytest.mark.slow  # 20,000 requests: several seconds on two cores
def test_made_up_methods_and_paths_add_no_series(app_and_ctx):
    app, _ = app_and_ctx
    methods = ["GET", "POST", "BREW", "FOO", "get", "PROPFIND", "X-" * 10, "DELETE", "PATCH"]
    routes = ["/nope/zz{}", "/api/v3/predictions/zz{}/result", "/files/zz{}", "/api/v3/wavespeed-ai/zz{}",
              "/zz{}/metrics", "/fal-ai/zz{}", "/health/zz{}"]
    counter = itertools.count()

    async def send(n: int) -> None:
        for _ in range(n):
            i = next(counter)
            assert await _status_of(app, methods[i % len(methods)], routes[i % len(routes)].format(i)) < 500

    async def run() -> tuple[str, str, str]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as c:
            before = await _scrape(c)
            await send(1_000)
            after_1k = await _scrape(c)
            await send(19_000)
            return before, after_1k, await _scrape(c)

    before, after_1k, after_20k = asyncio.run(run())
    assert len(_samples(after_1k)) - len(_samples(before)) <= 40  # the fixed (route, method, code) combinations
    assert len(_samples(after_20k)) == len(_samples(after_1k))  # 19,000 more odd requests: not one new series
    requests = [s for s in _samples(after_20k) if s.name == "magi_http_requests_total"]
    assert sum(s.value for s in requests) >= 20_000
    templates = set(app.fastapi.openapi()["paths"]) | {getattr(r, "path", "") for r in app.fastapi.routes}
    for sample in requests:
        assert sample.labels["method"] in HTTP_METHODS | {"other"}, sample
        assert sample.labels["route"] in templates | {"unmatched"} and "zz" not in sample.labels["route"], sample


def test_registry_per_server_and_gauges_read_at_scrape_time():
    depth = [3]

    def broken() -> bool:
        raise RuntimeError("owner gone")

    first = Metrics(GaugeReaders(queue_depth=lambda: depth[0], jobs_by_status=lambda: {"queued": 3, "failed": 1},
                                 gpu_memory_bytes=lambda: None, engine_alive=broken))
    second = Metrics()  # same metric names, no clash: nothing goes to the library's global registry
    first.jobs_submitted.labels(api="fal").inc()
    assert second.registry.get_sample_value("magi_jobs_submitted_total", {"api": "fal"}) is None
    assert prometheus_client.REGISTRY.get_sample_value("magi_jobs_submitted_total", {"api": "fal"}) is None

    body, _ = first.exposition()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in _samples(body.decode())}
    assert samples[("magi_queue_depth", ())] == 3
    assert samples[("magi_jobs", (("status", "failed"),))] == 1
    assert samples[("magi_jobs_submitted_total", (("api", "fal"),))] == 1
    # no value: no sample; a failing reader leaves its gauge out instead of failing the scrape
    assert not any(name in ("magi_gpu_memory_used_bytes", "magi_engine_alive") for name, _ in samples)
    depth[0] = 0
    assert first.registry.get_sample_value("magi_queue_depth") == 0
