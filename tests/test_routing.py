"""Model routing that tells the truth (issue #11, acceptance 5): each hosted route runs a served variant that keeps
its promise (a 24B route a 24B model, fal's base app a base model, ...), a route nobody can keep is a 4xx naming
what is served, the tiny preset stands in under its own name, and an operator's --route-map is honoured and said."""
from __future__ import annotations

import dataclasses
import time

import pytest
from fastapi.testclient import TestClient

from magi_server.composition import build_context, model_specs, variant_for
from magi_server.models.config import TINY_DIT, preset
from magi_server.params import ModelLimits
from magi_server.serving.app import create_app, shutdown
from magi_server.serving.cluster import SharedQueue
from magi_server.serving.common import ServerContext
from magi_server.serving.jobs import JobStore
from magi_server.serving.routing import Router, RouteMapError, UnservedRoute, Variant, parse_route_map
from magi_server.tools import cli
from tests.server_utils import tiny_settings

QUEUE = "https://localhost:8443"


def v(name: str, size: str | None, distill: bool) -> Variant:
    return Variant(name, size, distill, ModelLimits())


def test_each_route_runs_a_variant_that_keeps_its_promise():
    router = Router([v("4.5B-distill", "4.5B", True), v("24B-base", "24B", False), v("24B-distill-quant", "24B", True)])
    picks = {route: (c.variant.name, c.model) for route in (
        "wavespeed-ai/magi-1-24b", "wavespeed-ai/magi-1-24b-distill", "wavespeed-ai/magi-1-4.5b-distill",
        "fal-ai/magi", "fal-ai/magi-distilled/image-to-video", "magichour") for c in [router.resolve(route)]}
    assert picks == {
        "wavespeed-ai/magi-1-24b": ("24B-base", "wavespeed-ai/magi-1-24b"),
        "wavespeed-ai/magi-1-24b-distill": ("24B-distill-quant", "wavespeed-ai/magi-1-24b-distill"),
        "wavespeed-ai/magi-1-4.5b-distill": ("4.5B-distill", "wavespeed-ai/magi-1-4.5b-distill"),
        "fal-ai/magi": ("24B-base", "fal-ai/magi"),
        "fal-ai/magi-distilled/image-to-video": ("4.5B-distill", "fal-ai/magi-distilled/image-to-video"),
        "magichour": ("4.5B-distill", "magichour"),
    }
    with pytest.raises(UnservedRoute, match="runs a 4.5B MAGI-1 model.*it serves 24B-base, 24B-distill-quant"):
        Router([v("24B-base", "24B", False), v("24B-distill-quant", "24B", True)]).resolve("wavespeed-ai/magi-1-4.5b")


def test_a_stand_in_runs_under_its_own_name_and_a_route_map_is_said():
    tiny = Router([v("tiny", None, True)])
    for route in ("wavespeed-ai/magi-1-24b", "fal-ai/magi", "fal-ai/magi-distilled", "magichour"):
        assert (tiny.resolve(route).variant.name, tiny.resolve(route).model) == ("tiny", "tiny")
    both = Router([v("tiny-distilled", None, True), v("tiny-base", None, False)])
    assert both.resolve("fal-ai/magi").variant.name == "tiny-base"
    assert both.resolve("fal-ai/magi-distilled").variant.name == "tiny-distilled"
    assert both.resolve("wavespeed-ai/magi-1-24b").variant.name == "tiny-distilled"  # the first stand-in
    # a real variant is preferred to a stand-in where it keeps the promise; elsewhere the stand-in runs
    mixed = Router([v("tiny", None, True), v("4.5B-distill", "4.5B", True)])
    assert mixed.resolve("wavespeed-ai/magi-1-4.5b-distill").model == "wavespeed-ai/magi-1-4.5b-distill"
    assert mixed.resolve("wavespeed-ai/magi-1-24b").model == "tiny"
    mapped = Router([v("4.5B-distill", "4.5B", True)], parse_route_map(["wavespeed-ai/magi-1-24b=4.5B-distill"]))
    assert (mapped.resolve("wavespeed-ai/magi-1-24b").variant.name, mapped.resolve("wavespeed-ai/magi-1-24b").model) \
        == ("4.5B-distill", "4.5B-distill")  # the route promised 24B: responses name what ran
    with pytest.raises(RouteMapError, match="not served"):
        Router([v("4.5B-distill", "4.5B", True)], {"fal-ai/magi": "24B-base"})
    with pytest.raises(RouteMapError, match="unknown route"):
        Router([v("4.5B-distill", "4.5B", True)], {"fal-ai/nope": "4.5B-distill"})
    with pytest.raises(RouteMapError, match="ROUTE=VARIANT"):
        parse_route_map(["fal-ai/magi"])


def test_a_server_of_only_4_5b_distill_refuses_the_24b_and_base_routes_naming_what_it_serves(tmp_path):
    """The variant is described from the 4.5B-distill preset's config (no weights are needed to route); the
    engine stand-in is an API replica's shared queue, so accepted submits are stored for a worker."""
    settings = tiny_settings(tmp_path, tmp_path / "cache", model="4.5B-distill")
    store = JobStore(tmp_path / "jobs.db")
    router = Router([variant_for("4.5B-distill", preset("4.5B-distill"))])
    ctx = ServerContext(settings=settings, store=store, engine=SharedQueue(store), executor=None,
                        model_name="4.5B-distill", router=router, runs_jobs=False)
    body = {"prompt": "a fox", "seed": 1, "num_frames": 24, "num_inference_steps": 8}
    try:
        with TestClient(create_app(ctx)) as client:
            r = client.post("/api/v3/wavespeed-ai/magi-1-24b", json=body)
            assert r.status_code == 404, r.text
            message = r.json()["message"]
            assert "a 24B MAGI-1 model" in message and "serves 4.5B-distill" in message, message
            ok = client.post("/api/v3/wavespeed-ai/magi-1-4.5b-distill", json=body)
            assert ok.status_code == 200, ok.text
            data = ok.json()["data"]
            assert data["model"] == "wavespeed-ai/magi-1-4.5b-distill" and data["variant"] == "4.5B-distill"
            assert store.get(data["id"]).variant == "4.5B-distill"
        with TestClient(create_app(ctx, "fal_queue"), base_url=QUEUE) as fal:
            r = fal.post("/fal-ai/magi", json={"prompt": "a fox", "num_frames": 96})
            assert r.status_code == 404, r.text
            assert "a base (not distilled) MAGI-1 model" in r.json()["detail"]
            assert "serves 4.5B-distill" in r.json()["detail"]
            assert fal.post("/fal-ai/magi-distilled", json={"prompt": "a fox", "num_frames": 96}).status_code == 200
        assert len(store.list()) == 2  # the refused submits stored nothing
    finally:
        store.close()


def test_two_tiny_variants_in_one_process_run_their_own_routes(tmp_path):
    """Two tiny models in one server (different seeds, one distilled, one not): the two fal apps return different
    videos for the same request, each naming the variant that ran; a WaveSpeed route with no kept promise runs the
    first stand-in and says so."""
    from magi_server.runtime.tiny import write_tiny_weights

    distilled = write_tiny_weights(tmp_path / "w-distilled", seed=0)
    base = write_tiny_weights(tmp_path / "w-base", seed=1, dit=dataclasses.replace(TINY_DIT, distill=False))
    settings = tiny_settings(tmp_path, tmp_path / "cache", model=f"tiny-distilled={distilled}",
                             more_models=(f"tiny-base={base}",))
    assert [name for name, _ in model_specs(settings)] == ["tiny-distilled", "tiny-base"]
    ctx = build_context(settings)
    try:
        assert ctx.router.served == ["tiny-distilled", "tiny-base"]
        with TestClient(create_app(ctx, "fal_queue"), base_url=QUEUE) as fal:
            body = {"prompt": "the same request", "seed": 5, "num_frames": 96, "resolution": "480p",
                    "num_inference_steps": 8}
            videos = {}
            for app, variant in (("fal-ai/magi", "tiny-base"), ("fal-ai/magi-distilled", "tiny-distilled")):
                r = fal.post(f"/{app}", json=body)
                assert r.status_code == 200, r.text
                request_id = r.json()["request_id"]
                deadline = time.monotonic() + 120
                while fal.get(f"/{app}/requests/{request_id}/status").json()["status"] != "COMPLETED":
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                result = fal.get(f"/{app}/requests/{request_id}").json()
                assert result["variant"] == variant, result
                assert ctx.store.get(request_id).variant == variant
                videos[app] = (ctx.outputs_dir / result["video"]["file_name"]).read_bytes()
            assert videos["fal-ai/magi"] != videos["fal-ai/magi-distilled"]
        with TestClient(create_app(ctx)) as client:
            r = client.post("/api/v3/wavespeed-ai/magi-1-24b", json={"prompt": "x", "seed": 1, "num_frames": 24,
                                                                     "num_inference_steps": 8})
            assert r.status_code == 200 and r.json()["data"]["model"] == "tiny-distilled", r.text
            assert r.json()["data"]["variant"] == "tiny-distilled"
    finally:
        shutdown(ctx)


@pytest.mark.parametrize("args, said", [
    (["--route-map", "fal-ai/nope=tiny"], "unknown route"),
    (["--route-map", "fal-ai/magi=24B-base"], "not served"),
    (["--route-map", "fal-ai/magi"], "ROUTE=VARIANT"),
    (["--model", "tiny", "--model", "tiny"], "same variant name"),
])
def test_serve_refuses_a_bad_route_map_or_model_list_in_one_line(args, said, tmp_path, capsys):
    assert cli.main(["serve", "--device", "cpu", "--db", str(tmp_path / "jobs.db"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1, err
