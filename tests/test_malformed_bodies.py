"""Malformed JSON of every shape on every JSON body route of every API answers a 4xx in that API's own error format,
never a 5xx (issue #10, acceptance 6): nesting 100,000 deep, a 5000-digit number, NaN and Infinity, bad UTF-8, and a
wrong type at the top level and at every field the route's schema declares.

The routes come from each listener's /openapi.json, so a new route is covered without editing this file. The server
has no room in its queue (max_queue=0): a body that happens to be valid answers 429, also in the API's format.
"""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from magi_server.runtime.pipeline import MagiPipeline
from tests.server_utils import running_server, tiny_settings

LISTENERS = ("main", "fal_queue", "fal_run")
RAW_BODIES = {
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep object": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "5000-digit number": b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",
    "NaN": b'{"prompt": "x", "seed": NaN}',
    "Infinity": b'{"prompt": "x", "num_frames": Infinity}',
    "bad UTF-8": b'{"prompt": "\xff\xfe"}',
    "truncated": b'{"prompt": "x"',
    "empty": b"",
}
WRONG_VALUES = ([1, [2]], {"nested": {"deeper": [None]}}, 1e308, -1, True, "", None)


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    from magi_server.serving.app import create_app

    tmp = tmp_path_factory.mktemp("malformed")
    pipeline = MagiPipeline.from_pretrained("tiny", cache_dir=tmp / "cache")
    with running_server(tiny_settings(tmp, tmp / "cache", max_queue=0), pipeline=pipeline) as (ctx, _):
        clients = {role: TestClient(create_app(ctx, role), raise_server_exceptions=False) for role in LISTENERS}
        yield clients
        assert sum(ctx.store.count_by_status().values()) == 0  # nothing was stored


def _json_routes(client: TestClient) -> list[tuple[str, str, list[str]]]:
    """(method, path, top-level field names) of every operation that takes a JSON body."""
    spec = client.get("/openapi.json").json()
    routes = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if schema is None:
                continue
            if "$ref" in schema:
                schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
            routes.append((method.upper(), path.replace("{job_id}", "0" * 32), sorted(schema.get("properties", {}))))
    return routes


def _in_its_format(role: str, path: str, response) -> bool:
    body = response.json()
    if role.startswith("fal"):
        return "detail" in body
    if path == "/v1/videos" or path.startswith("/v1/videos/"):  # OpenAI's error object
        error = body.get("error")
        return isinstance(error, dict) and isinstance(error.get("message"), str) and set(error) == {
            "message", "type", "param", "code"}
    if path.startswith("/v1/"):  # Magic Hour
        return isinstance(body.get("message"), str)
    return set(body) >= {"code", "message", "data"} and body["code"] == response.status_code  # WaveSpeed


@pytest.mark.parametrize("role", LISTENERS)
def test_malformed_bodies_are_4xx_in_the_apis_format(clients, role):
    client = clients[role]
    routes = _json_routes(client)
    assert routes, f"{role} has no JSON body routes"
    tried = 0
    for method, path, fields in routes:
        bodies = dict(RAW_BODIES)
        bodies.update({f"top-level {value!r}": _dump(value) for value in WRONG_VALUES})
        for field in fields:
            for value in WRONG_VALUES:
                bodies[f"{field}={value!r}"] = _dump({"prompt": "x", field: value})
        for name, raw in bodies.items():
            r = client.request(method, path, content=raw, headers={"Content-Type": "application/json"})
            tried += 1
            assert 400 <= r.status_code < 500, (role, method, path, name, r.status_code, r.text[:300])
            assert _in_its_format(role, path, r), (role, method, path, name, r.text[:300])
    assert tried > 50


def _dump(value) -> bytes:
    import json

    return json.dumps(value, allow_nan=True).encode()


def test_unknown_paths_wrong_methods_and_large_bodies_answer_in_each_providers_format(tmp_path):
    """The router's 404/405 and the body limit's 413 speak the API the path belongs to: WaveSpeed's envelope under
    /api/v3/, Magic Hour's {"message"} under /v1/, fal's {"detail"} on the fal listeners (never FastAPI's bare
    {"detail": "Not Found"} on a provider path)."""
    from fastapi.testclient import TestClient

    from magi_server.serving.app import create_app
    from magi_server.serving.common import ServerContext
    from magi_server.serving.jobs import JobStore
    from magi_server.serving.cluster import SharedQueue
    from tests.server_utils import tiny_settings

    settings = tiny_settings(tmp_path, tmp_path / "cache", max_body_bytes=1024)
    store = JobStore(tmp_path / "jobs.db")
    ctx = ServerContext(settings=settings, store=store, engine=SharedQueue(store), executor=None, model_name="tiny")
    try:
        with TestClient(create_app(ctx)) as main, \
                TestClient(create_app(ctx, "fal_queue"), base_url="https://localhost:8443") as fal:
            r = main.post("/api/v3/wavespeed-ai/no-such-model", json={"prompt": "x"})
            assert r.status_code == 404 and r.json()["code"] == 404 and r.json()["data"] is None, r.text
            assert "no-such-model" in r.json()["message"]
            r = main.get("/api/v3/wavespeed-ai/magi-1-24b")
            assert r.status_code == 405 and r.json()["code"] == 405 and "POST" in r.headers["allow"], r.text
            r = main.post("/api/v3/wavespeed-ai/magi-1-24b", content=b"x" * 2048,
                          headers={"content-type": "application/json"})
            assert r.status_code == 413 and r.json()["code"] == 413 and "1024 bytes" in r.json()["message"], r.text
            r = main.get("/v1/no-such-route")
            assert r.status_code == 404 and set(r.json()) == {"message"}, r.text
            r = main.post("/v1/image-to-video", content=b"x" * 2048, headers={"content-type": "application/json"})
            assert r.status_code == 413 and set(r.json()) == {"message"}, r.text
            r = fal.post("/fal-ai/no-such-app", json={})
            assert r.status_code == 404 and isinstance(r.json()["detail"], str), r.text
            r = fal.post("/fal-ai/magi", content=b"x" * 2048, headers={"content-type": "application/json"})
            assert r.status_code == 413 and set(r.json()) == {"detail"}, r.text
            assert main.get("/api/v3/predictions/" + "0" * 32 + "/result").json()["message"].startswith("prediction")
    finally:
        store.close()
