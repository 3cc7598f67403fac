"""Every listener's /openapi.json describes what it does (issue #9, acceptance 3).

(a) Every POST route of the three listeners (main: WaveSpeed and Magic Hour; fal's queue and sync listeners)
declares its request body. (b) schemathesis, in process over each listener's own schema, finds no server error and
no answer that contradicts the schema: every error a provider answers is declared with that provider's envelope.

The server runs the tiny model with no room in its queue (max_queue=0), so a valid submit goes the whole way through
the request model, the contract's validate and the image intake, then answers 429: nothing is generated, and fal's
sync listener answers at once instead of waiting on a generation. Image URLs resolve to nothing (a patched DNS), so
the test never reaches the network.
"""
from __future__ import annotations

import socket

import pytest
from fastapi.testclient import TestClient

from magi_server.runtime.pipeline import MagiPipeline
from tests.server_utils import running_server, tiny_settings

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extra")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (installed with schemathesis)
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

LISTENERS = ("main", "fal_queue", "fal_run")
EXAMPLES = 15  # per operation and generation mode (valid requests, then invalid ones): about a minute on 2 cores


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    from magi_server.serving.app import create_app

    tmp = tmp_path_factory.mktemp("conformance")
    pipeline = MagiPipeline.from_pretrained("tiny", cache_dir=tmp / "cache")

    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "name resolution is off in this test")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", offline)
        with running_server(tiny_settings(tmp, tmp / "cache", max_queue=0), pipeline=pipeline) as (ctx, _):
            yield {role: create_app(ctx, role) for role in LISTENERS}


@pytest.mark.parametrize("role", LISTENERS)
def test_every_post_route_declares_its_body(apps, role):
    with TestClient(apps[role]) as client:
        paths = client.get("/openapi.json").json()["paths"]
    posts = {path: op for path, ops in paths.items() for method, op in ops.items() if method == "post"}
    assert posts, f"{role} has no POST routes"
    for path, op in posts.items():
        content = op.get("requestBody", {}).get("content", {})
        assert content and all("schema" in media for media in content.values()), (role, path, op)


@pytest.mark.slow
@pytest.mark.parametrize("role", LISTENERS)
def test_listener_conforms_to_its_schema(apps, role):
    schema = schemathesis.openapi.from_asgi("/openapi.json", apps[role])
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def check(case):
                case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])

            try:
                check()
            except Unsatisfiable:  # nothing about this operation can be sent wrong (no parameters, no body)
                assert mode is GenerationMode.NEGATIVE, operation.label
            except Exception as exc:  # noqa: BLE001 - every operation is tried; the failures are listed together
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)
