"""``magi-server generate``: one video and a resumable JSONL batch, end to end on the tiny preset in a subprocess."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.media_utils import probe_video
from magi_server.models.config import preset
from magi_server.params import MAX_SEED, ParamError
from magi_server.tools.generate import RESOLUTIONS, parse_job, resolve_size
from tests.golden_utils import REPO_ROOT

SMALL = ["--width", "64", "--height", "64"]  # the tiny model at 64x64 runs a 48-frame video in well under a second


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One tiny-weights cache for the module, so the weights are written once."""
    return tmp_path_factory.mktemp("magi-cache")


def generate(*args, cache, timeout=120):
    env = dict(os.environ, MAGI_SERVER_CACHE=str(cache))
    return subprocess.run(
        [sys.executable, "-m", "magi_server", "generate", *map(str, args), "--device", "cpu"],
        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env,
    )


def test_generate_one_video(cache, tmp_path):
    out = tmp_path / "nested" / "fox.mp4"
    proc = generate("--prompt", "a red fox runs through snow", *SMALL, "--frames", 48, "--seed", 5, "-o", out,
                    cache=cache)
    assert proc.returncode == 0, proc.stderr
    info = probe_video(out)
    assert (info.frames, info.width, info.height, info.fps) == (48, 64, 64, 24)
    assert f"wrote {out}: 48 frames, 64x64, 24 fps, seed 5" in proc.stdout
    assert "tiny preset: random weights" in proc.stderr
    assert "sampling" in proc.stderr  # the progress bar
    assert not [p for p in out.parent.iterdir() if p.name != "fox.mp4"]  # no temporary file left behind


def test_generate_chunkwise_prompts_and_random_seed(cache, tmp_path):
    out = tmp_path / "scenes.mp4"
    proc = generate("--prompt", "a quiet lake", "--prompt", "a storm rolls in", *SMALL, "--frames", 48, "-o", out,
                    cache=cache)
    assert proc.returncode == 0, proc.stderr
    seed = int(re.search(r"seed (\d+)", proc.stdout).group(1))
    assert 0 <= seed < 2**31
    assert probe_video(out).frames == 48


@pytest.mark.parametrize(
    "args, param",
    [
        (["--width", 100, "--height", 64], "width"),
        (["--width", 64], "height"),
        (["--steps", 7], "num_inference_steps"),  # the short flags are spellings of the contract's names
        (["--frames", 0], "num_frames"),
        (["--image", "missing.png"], "image"),
        (["--resolution", "1080p"], "resolution"),
        (["--resolution", "480p", "--aspect-ratio", "4:3"], "aspect_ratio"),
        (["--model", "no-such-folder"], "model"),
        (["--prompt", "b", "--prompt", "c", "--frames", 24], "prompt"),  # 2 prompts, 1 chunk
    ],
)
def test_bad_input_exits_2_before_model_work(tmp_path, args, param):
    cache = tmp_path / "cache"
    proc = generate("--prompt", "a cat", *args, "-o", tmp_path / "x.mp4", cache=cache, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {param}: ")
    # nothing was loaded or generated: the tiny weights were never written, no video appeared
    assert not cache.exists() and not (tmp_path / "x.mp4").exists()


def test_batch_is_resumable_and_reports_bad_lines(cache, tmp_path):
    batch = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "a red fox", "frames": 48, "seed": 3, "output": "fox.mp4"},
        {"prompt": "a cat", "frames": 0},
        {"prompt": ["waves", "a lighthouse"], "num_frames": 48},  # no seed: a random one, reported
        {"prompt": "a dog", "image": "missing.png"},
        "this line is not JSON",
        "",  # blank lines are ignored
    ]
    batch.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    out_dir = tmp_path / "videos"

    first = generate("--batch", batch, "--out-dir", out_dir, *SMALL, cache=cache)
    assert first.returncode == 1, first.stderr
    assert "batch: 2 done, 0 skipped, 3 failed" in first.stdout
    assert "line 2: frames: " in first.stderr and "line 4: image: " in first.stderr and "line 5: " in first.stderr
    assert sorted(p.name for p in out_dir.glob("*.mp4")) == ["0003.mp4", "fox.mp4"]
    for name in ("fox.mp4", "0003.mp4"):
        info = probe_video(out_dir / name)
        assert (info.frames, info.width, info.height) == (48, 64, 64)

    report = json.loads((out_dir / "batch_report.json").read_text())
    assert (report["done"], report["skipped"], report["failed"]) == (2, 0, 3)
    by_line = {entry["line"]: entry for entry in report["lines"]}
    assert sorted(by_line) == [1, 2, 3, 4, 5]
    assert by_line[1]["status"] == "done" and by_line[1]["seed"] == 3 and by_line[1]["frames"] == 48
    assert by_line[3]["status"] == "done" and isinstance(by_line[3]["seed"], int)
    assert by_line[2]["status"] == "failed" and by_line[2]["param"] == "frames"
    assert by_line[2]["error"].startswith("frames: ")
    assert by_line[4]["param"] == "image" and "missing.png" in by_line[4]["error"]
    assert by_line[5]["status"] == "failed" and "JSON" in by_line[5]["error"]

    mtimes = {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.mp4")}
    second = generate("--batch", batch, "--out-dir", out_dir, *SMALL, cache=cache)
    assert second.returncode == 1, second.stderr
    assert "batch: 0 done, 2 skipped, 3 failed" in second.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.mp4")} == mtimes
    again = {e["line"]: e for e in json.loads((out_dir / "batch_report.json").read_text())["lines"]}
    assert again[1]["status"] == again[3]["status"] == "skipped"
    assert again[3]["seed"] == by_line[3]["seed"]  # the seed of the earlier run is kept in the report
    assert again[2]["status"] == "failed" and again[2]["param"] == "frames"
    assert "tiny preset" not in second.stderr  # nothing left to generate: the model was never loaded


def test_batch_without_failures_exits_0(cache, tmp_path):
    batch = tmp_path / "one.jsonl"
    batch.write_text(json.dumps({"prompt": "a kite", "width": 32, "height": 48, "frames": 24}) + "\n")
    proc = generate("--batch", batch, "--out-dir", tmp_path / "out", "--no-progress", cache=cache)
    assert proc.returncode == 0, proc.stderr
    info = probe_video(tmp_path / "out" / "0001.mp4")
    assert (info.frames, info.width, info.height) == (24, 32, 48)  # the line's size wins over the default


def test_batch_bad_options_exit_2(cache, tmp_path):
    proc = generate("--batch", tmp_path / "missing.jsonl", "--out-dir", tmp_path / "out", cache=cache)
    assert proc.returncode == 2 and "error: batch: file not found" in proc.stderr
    (tmp_path / "ok.jsonl").write_text('{"prompt": "x"}\n')
    proc = generate("--batch", tmp_path / "ok.jsonl", cache=cache)
    assert proc.returncode == 2 and "error: out_dir: required" in proc.stderr
    proc = generate("--batch", tmp_path / "ok.jsonl", "--out-dir", tmp_path / "out", "--steps", 6, cache=cache)
    assert proc.returncode == 2 and "error: num_inference_steps: " in proc.stderr


# ------------------------------------------------------------------------------------- size table (in-process)


@pytest.mark.parametrize("resolution", ["480p", "720p"])
def test_resolution_table(resolution):
    table = RESOLUTIONS[resolution]
    for aspect, size in table.items():
        assert resolve_size({"resolution": resolution, "aspect_ratio": aspect}, (128, 128)) == size
        assert size[0] % 16 == 0 and size[1] % 16 == 0
    assert resolve_size({"resolution": resolution}, (128, 128)) == table["16:9"]  # auto without an image
    # auto with an image: its nearest aspect
    assert resolve_size({"resolution": resolution}, (128, 128), lambda: (1080, 1920)) == table["9:16"]
    assert resolve_size({"resolution": resolution}, (128, 128), lambda: (1000, 900)) == table["1:1"]
    assert resolve_size({"resolution": resolution}, (128, 128), lambda: (1600, 1000)) == table["16:9"]


def test_size_defaults_and_conflicts():
    assert RESOLUTIONS["480p"]["16:9"] == (832, 480) and RESOLUTIONS["720p"]["9:16"] == (720, 1280)
    assert resolve_size({}, (128, 96)) == (128, 96)
    assert resolve_size({"width": 64, "height": 32}, (128, 96)) == (64, 32)
    with pytest.raises(ParamError, match="^resolution: "):
        resolve_size({"resolution": "480p", "width": 64, "height": 64}, (128, 128))
    with pytest.raises(ParamError, match="^aspect_ratio: "):
        resolve_size({"aspect_ratio": "1:1"}, (128, 128))


# ------------------------------------------------------------------ the request contract's names (in-process)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"seed": MAX_SEED + 1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"num_frames": 0}, "num_frames"),
        ({"frames": 0}, "frames"),  # the JSONL's short name is reported as the line wrote it
        ({"width": 100, "height": 64}, "width"),
        ({"width": 64, "height": 8192}, "height"),
        ({"num_inference_steps": 6}, "num_inference_steps"),
        ({"steps": 6}, "steps"),
        ({"prompt": ["a", 3]}, "prompt"),
    ],
)
def test_bad_fields_name_the_contract_parameter(fields, param):
    with pytest.raises(ParamError) as info:
        parse_job({"prompt": "a cat", **fields}, preset("tiny"))
    assert info.value.param == param and str(info.value).startswith(f"{param}: ")


def test_a_good_line_is_the_contract_record():
    params = parse_job({"prompt": ["a", "b"], "frames": 48.0, "steps": 8, "seed": MAX_SEED, "width": 64,
                        "height": 32}, preset("tiny"))
    assert (params.prompts, params.num_frames, params.num_inference_steps, params.seed) == (("a", "b"), 48, 8, MAX_SEED)
    assert (params.width, params.height, params.task) == (64, 32, "t2v") and type(params.num_frames) is int
    assert 0 <= parse_job({"prompt": "x", "seed": -1}, preset("tiny")).seed <= MAX_SEED
