"""magi-server bench: hosted list prices by the published rules, and a full report against a local tiny server."""
from __future__ import annotations

import json

import pytest

from magi_server.tools.bench import Workload, hosted_price, markdown, run
from magi_server.runtime.pipeline import MagiPipeline
from tests.golden_utils import REPO_ROOT
from tests.server_utils import running_server, tiny_settings


def test_hosted_prices_by_hand():
    # fal base: $0.20 per 24 frames x (720p = 1) x max(1, 16/16) x 4 units
    assert hosted_price("fal-ai/magi/image-to-video", num_frames=96, resolution="720p", steps=16) == pytest.approx(0.80)
    # fal distilled: $0.08 x 8 units x (480p = 0.5) x (32/16 = 2)
    assert hosted_price("fal-ai/magi-distilled", num_frames=192, resolution="480p", steps=32) == pytest.approx(0.64)
    # WaveSpeed: $0.08 per 24 frames, 120 frames = 5 units
    assert hosted_price("wavespeed-ai/magi-1-24b", num_frames=120) == pytest.approx(0.40)
    # steps below 16 cost the same as 16; frames round up to whole seconds
    assert hosted_price("fal-ai/magi-distilled", num_frames=100, resolution="720p", steps=4) == pytest.approx(0.40)
    assert hosted_price("magic-hour", num_frames=96) is None


def test_workload_file_errors(tmp_path):
    bad = tmp_path / "w.json"
    bad.write_text(json.dumps({"requests": []}))
    with pytest.raises(ValueError, match="non-empty 'requests'"):
        Workload.load(bad)
    bad.write_text(json.dumps({"requests": [{"no": "prompt"}]}))
    with pytest.raises(ValueError, match=r"requests\[0\]"):
        Workload.load(bad)


def test_bench_against_local_tiny_server(tmp_path):
    workload = Workload.load(REPO_ROOT / "benchmarks" / "workloads" / "smoke.json")
    pipe = MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path / "cache")
    with running_server(tiny_settings(tmp_path, tmp_path / "cache"), pipeline=pipe) as (_, client):
        report = run(client, workload, gpu_dollars_per_hour=2.5, poll_s=0.05, timeout_s=300)
    assert report["completed"] == 3 and report["failed"] == 0
    lat = report["latency_seconds"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["max"]
    assert report["time_to_first_chunk_seconds"]["p50"] is not None  # this server streams chunks
    assert report["videos_per_hour"] > 0 and report["self_hosted_cost_per_video"] > 0
    by_frames = {r["num_frames"]: r for r in report["requests"]}
    assert by_frames[96]["hosted_cost"]["fal-ai/magi/image-to-video"] == pytest.approx(0.80)
    assert by_frames[192]["hosted_cost"]["fal-ai/magi-distilled"] == pytest.approx(0.64)
    assert by_frames[120]["hosted_cost"]["wavespeed-ai/magi-1-24b"] == pytest.approx(0.40)
    for r in report["requests"]:
        assert r["status"] == "completed" and r["output"].split("?")[0].endswith(".mp4") and r["first_chunk_s"] is not None
        assert all(v is not None for v in r["hosted_cost"].values())
    table = markdown(report)
    assert "| latency p50 / p90 / max |" in table and "n/a" not in table
