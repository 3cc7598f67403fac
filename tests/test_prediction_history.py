"""WaveSpeed's prediction history, ``POST /api/v3/predictions`` (issue #12, the playground's history): a page of the
caller's own predictions, newest first, with seed, status, timings and output URLs; never another key's jobs nor
jobs of another API; filters and bad pages answered as WaveSpeed does."""
from __future__ import annotations

import time

import pytest

from magi_server.runtime.pipeline import MagiPipeline
from magi_server.serving.jobs import Job
from tests.server_utils import running_server, tiny_settings, wait_status

MODEL = "/api/v3/wavespeed-ai/magi-1-24b"
KEY_A, KEY_B = "history-key-a", "history-key-b"
AS_A = {"Authorization": f"Bearer {KEY_A}"}
AS_B = {"Authorization": f"Bearer {KEY_B}"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


def test_history_lists_only_the_callers_wavespeed_jobs_newest_first(tmp_path, pipeline):
    settings = tiny_settings(tmp_path, tmp_path / "cache", api_keys=(KEY_A, KEY_B))
    with running_server(settings, pipeline=pipeline) as (ctx, client):
        first = client.post(MODEL, json={"prompt": "a fox", "seed": 5}, headers=AS_A).json()["data"]["id"]
        second = client.post(MODEL, json={"prompt": "a hare", "seed": 6, "num_frames": 48},
                             headers=AS_A).json()["data"]["id"]
        other = client.post(MODEL, json={"prompt": "an owl", "seed": 7}, headers=AS_B).json()["data"]["id"]
        for job_id, headers in ((first, AS_A), (second, AS_A), (other, AS_B)):
            assert wait_status(client, job_id, headers=headers)["status"] == "completed"
        # a job of key A submitted through another API is not a WaveSpeed prediction: not listed
        mine = ctx.store.get(first)
        ctx.store.create(Job.new("fal", "fal-ai/magi", mine.params, owner=mine.owner))

        r = client.post("/api/v3/predictions", json={"page": 1, "page_size": 20}, headers=AS_A)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert (data["page"], data["total"]) == (1, 2)
        assert [item["id"] for item in data["items"]] == [second, first]
        assert [item["seed"] for item in data["items"]] == [6, 5]
        for item in data["items"]:
            assert item["status"] == "completed" and item["timings"]["inference"] > 0
            assert item["created_at"].endswith("Z") and item["urls"]["get"].endswith(f"/{item['id']}/result")
            video = client.get(item["outputs"][0])
            assert video.status_code == 200 and video.content[4:8] == b"ftyp"  # signed: no key needed

        # pages of one
        pages = [client.post("/api/v3/predictions", json={"page": n, "page_size": 1}, headers=AS_A).json()["data"]
                 for n in (1, 2, 3)]
        assert [[item["id"] for item in p["items"]] for p in pages] == [[second], [first], []]
        assert {p["total"] for p in pages} == {2}

        # key B sees its own job only
        theirs = client.post("/api/v3/predictions", json={"page": 1, "page_size": 100}, headers=AS_B).json()["data"]
        assert [item["id"] for item in theirs["items"]] == [other] and theirs["total"] == 1

        # filters: status, model, creation time
        def ids(**filters) -> list[str]:
            body = client.post("/api/v3/predictions", json={"page": 1, "page_size": 10, **filters}, headers=AS_A)
            assert body.status_code == 200, body.text
            return [item["id"] for item in body.json()["data"]["items"]]

        assert ids(status="failed") == [] and ids(status="completed") == [second, first]
        assert ids(model=mine.model) == [second, first] and ids(model="wavespeed-ai/other") == []
        split = ctx.store.get(second).created_at
        moment = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(split - 1e-3)) + f".{int(((split - 1e-3) % 1) * 1e6):06d}Z"
        assert ids(created_after=moment) == [second] and ids(created_before=moment) == [first]
        assert ids(created_after="2999-01-01T00:00:00") == []

        # bad requests: the envelope, naming the field
        for body, field in (({"page": 0, "page_size": 10}, "page"), ({"page": 1, "page_size": 101}, "page_size"),
                            ({"page_size": 10}, "page"), ({"page": 1, "page_size": 10, "status": "done"}, "status"),
                            ({"page": 1, "page_size": 10, "created_after": "yesterday"}, "created_after")):
            r = client.post("/api/v3/predictions", json=body, headers=AS_A)
            assert r.status_code == 400 and r.json()["data"] is None, r.text
            assert r.json()["message"].startswith(field), r.json()
        r = client.post("/api/v3/predictions", json={"page": 1, "page_size": 10})
        assert r.status_code == 401 and r.json()["data"] is None
