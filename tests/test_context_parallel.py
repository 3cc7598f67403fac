"""Context parallelism (Ulysses over torch.distributed, gloo on the CPU) gives the single-process results (#11, 6).

* A tiny DiT (8 heads, 4 KV groups) run by 2 and 4 spawned gloo ranks equals the single-process forward within the
  golden README's float32 bound ``max|a-b| <= 3e-4 * max(1, max|ref|)``: a plain call whose 81 tokens do not divide
  by the rank count (so padding is exercised), then a batched pair of KV-cache calls (write, then read the cache).
* The tiny pipeline (``TINY_CP_DIT``: 4 heads, 4 KV groups) with ``cp=2`` writes the MP4 frames ``cp=1`` writes,
  within the uint8 bound (mean |d| <= 1 level, max |d| <= 8).
* The real Engine driving a :class:`LeaderRunner` (two batched jobs and one cancelled after its prefill, so install,
  batched advance and release all travel to the follower) writes the MP4s a plain runner writes, and the follower
  process ends cleanly with the engine.
* The server's composition (``build_context`` with a ``cp=2`` pipeline) serves a WaveSpeed job and stops the
  follower when it shuts down.
* Failures end the group instead of hanging it: a follower that cannot load fails the launch with its reason, and
  a follower whose leader is killed exits.

Every rank is a real process on loopback; a process that runs rank 0 is spawned too, so this test process never
joins a process group.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from magi_server.engine.loop import Engine, EventKind
from magi_server.models.config import DiTConfig
from magi_server.models.dit import KVCache, VideoDiT
from magi_server.params import GenerationParams
from magi_server.runtime.context_parallel import (
    ContextParallelError, ContextParallelLaunch, init_context_parallel, loopback_init_method,
)
from magi_server.runtime.pipeline import MagiPipeline
from magi_server.runtime.tiny import TINY_CP_DIT, tiny_dit_state, write_tiny_weights
from tests.media_utils import probe_video

RANK_TIMEOUT_S = 150

# ------------------------------------------------------------------------------------------- (a) DiT forward
DIT = DiTConfig(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=8, num_query_groups=4,
                kv_channels=16, caption_channels=32, params_dtype="float32", distill=False)
WIDTH = 3  # latent frames per chunk; 6x6 latents -> 9 tokens a frame, 27 a chunk: odd totals need padding
TPC = 27


def _dit() -> VideoDiT:
    model = VideoDiT(DIT, max_piece_tokens=16)  # several token pieces per chunk, cut again by the shards
    model.load_state_dict(tiny_dit_state(DIT, seed=3))
    return model


def _captions(generator, chunks: int, valid: list[int]):
    captions = torch.randn(chunks, 20, DIT.caption_channels, generator=generator)
    mask = torch.zeros(chunks, 20)
    for row, count in enumerate(valid):
        mask[row, :count] = 1
    return captions, mask


def _dit_calls(model: VideoDiT) -> dict[str, torch.Tensor]:
    """The same seeded calls, whatever the model's context parallelism."""
    g = torch.Generator().manual_seed(5)
    out = {}
    # 1. one element, 3 chunks = 81 tokens, block-causal ranges (chunk 2 cannot see chunk 0)
    x = torch.randn(1, 16, 3 * WIDTH, 6, 6, generator=g)
    captions, mask = _captions(g, 3, [7, 20, 3])
    out["plain"] = model(x, torch.tensor([[0.9, 0.5, 0.2]]), captions, mask, [[0, 27], [0, 54], [27, 81]], [False],
                         chunk_width=WIDTH)
    # 2. two batched elements: write chunks 0-1 into their caches, then chunks 2-3 read them (slice_point 2)
    caches = [KVCache(DIT.num_layers, dtype=torch.float32) for _ in range(2)]
    x = torch.randn(2, 16, 2 * WIDTH, 6, 6, generator=g)
    captions, mask = _captions(g, 4, [5, 9, 20, 1])
    full = 2 * TPC
    ranges = [[b * full, b * full + TPC * (c + 1)] for b in range(2) for c in range(2)]
    out["cache_write"] = model(x, torch.full((2, 2), 0.9999), captions, mask, ranges, [False, True],
                               chunk_width=WIDTH, kv_cache=caches, write_cache=True)
    x = torch.randn(2, 16, 2 * WIDTH, 6, 6, generator=g)
    captions, mask = _captions(g, 4, [11, 2, 20, 6])
    full = 4 * TPC  # per element: 2 cached chunks, then the 2 of this call
    ranges = [[b * full, b * full + 3 * TPC] for b in range(2)]
    ranges = [ranges[0], [TPC, full], ranges[1], [full + TPC, 2 * full]]
    out["cache_read"] = model(x, torch.tensor([[0.6, 0.3], [0.7, 0.1]]), captions, mask, ranges, [True, False],
                              chunk_width=WIDTH, slice_point=2, kv_cache=caches)
    return out


def _dit_rank(rank: int, size: int, init_method: str, folder: str) -> None:
    torch.set_num_threads(1)
    group = init_context_parallel(rank, size, "cpu", init_method)
    try:
        model = _dit()
        model.set_context_parallel(group)
        torch.save(_dit_calls(model), Path(folder) / f"rank{rank}.pt")
    finally:
        group.close()


def _run_ranks(target, nprocs: int, *args) -> None:
    """Run ``target(i, *args)`` in ``nprocs`` spawned processes; fail the test if one fails or they hang."""
    context = mp.start_processes(target, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + RANK_TIMEOUT_S
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {RANK_TIMEOUT_S} s")


def _assert_float32_bound(actual: torch.Tensor, reference: torch.Tensor) -> None:
    bound = 3e-4 * max(1.0, reference.abs().max().item())
    error = (actual - reference).abs().max().item()
    assert error <= bound, f"max|cp - single| = {error:.3g} > {bound:.3g}"


@pytest.fixture(scope="module")
def single_process_dit() -> dict[str, torch.Tensor]:
    return _dit_calls(_dit())


@pytest.mark.parametrize("size", [2, 4])
def test_dit_forward_matches_single_process(tmp_path, single_process_dit, size):
    _run_ranks(_dit_rank, size, size, loopback_init_method(), str(tmp_path))
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(size)]
    for name, reference in single_process_dit.items():
        for rank, result in enumerate(results):
            # every rank gathers the whole output, the same bytes on each
            assert torch.equal(result[name], results[0][name]), (name, rank)
        assert results[0][name].shape == reference.shape
        assert torch.isfinite(results[0][name]).all()
        _assert_float32_bound(results[0][name], reference)


class _Group:
    def __init__(self, size: int) -> None:
        self.size, self.rank = size, 0


def test_ranks_must_divide_heads_and_kv_groups():
    model = VideoDiT(DIT)  # 8 heads, 4 KV groups
    with pytest.raises(ValueError, match="divisible by 8"):
        model.set_context_parallel(_Group(8))
    with pytest.raises(ValueError, match="divisible by 3"):
        model.set_context_parallel(_Group(3))
    model.set_context_parallel(_Group(4))
    assert model.context_parallel is not None
    model.set_context_parallel(_Group(1))  # one rank: the single-process path
    assert model.context_parallel is None


# ----------------------------------------------------------------------------------- (b) pipeline end to end
REQUEST = dict(prompt="a red fox runs through snow", num_frames=48, seed=7, height=64, width=64)


@pytest.fixture(scope="module")
def cp_model(tmp_path_factory) -> Path:
    """The tiny model with 4 heads and 4 KV groups (the preset's single KV group cannot be split)."""
    return write_tiny_weights(tmp_path_factory.mktemp("tiny-cp"), dit=TINY_CP_DIT)


@pytest.fixture(scope="module")
def cp1_pipeline(cp_model) -> MagiPipeline:
    return MagiPipeline.from_pretrained(cp_model)


def _assert_uint8_bound(actual: np.ndarray, reference: np.ndarray) -> None:
    assert actual.shape == reference.shape and actual.dtype == reference.dtype == np.uint8
    diff = np.abs(actual.astype(np.int16) - reference.astype(np.int16))
    assert diff.mean() <= 1.0 and diff.max() <= 8, (diff.mean(), diff.max())


class _RecordingWriter:
    """An Mp4Writer that also keeps the frames appended to it: what the x264 encoder is given. The MP4 itself is
    a lossy encode of a noise-like tiny video, where one level of difference in the input can move the encoder's
    choices for a whole block by tens of levels, so the uint8 bound is checked on the encoder's input."""

    def __init__(self, writer, frames: list) -> None:
        self._writer, self._frames = writer, frames

    def append(self, frames) -> None:
        self._frames.append(np.array(frames, dtype=np.uint8))
        self._writer.append(frames)

    def __getattr__(self, name):
        return getattr(self._writer, name)


def _record_mp4_frames(runner) -> dict[str, list]:
    """Make ``runner`` (a ModelRunner) keep every MP4's frames, by file stem."""
    frames: dict[str, list] = {}
    open_video = runner.open_video

    def recording_open_video(path, width, height):
        return _RecordingWriter(open_video(path, width, height), frames.setdefault(Path(path).stem, []))

    runner.open_video = recording_open_video
    return frames


def _pipeline_leader(_, model: str, folder: str) -> None:
    pipe = MagiPipeline.from_pretrained(model, cp=2)
    frames = []
    try:
        result = pipe(**REQUEST, output_path=Path(folder) / "cp2.mp4",
                      callback_on_chunk=lambda event: frames.append(event.frames))
    finally:
        pipe.close()
    np.save(Path(folder) / "cp2.npy", np.concatenate(frames))
    report = {"frames": result.num_frames, "followers": [p.exitcode for p in pipe.runner.follower_processes]}
    (Path(folder) / "report.json").write_text(json.dumps(report))


def test_pipeline_cp2_writes_the_frames_of_cp1(tmp_path, cp_model, cp1_pipeline):
    frames = []
    single = cp1_pipeline(**REQUEST, output_path=tmp_path / "cp1.mp4",
                          callback_on_chunk=lambda event: frames.append(event.frames))
    _run_ranks(_pipeline_leader, 1, str(cp_model), str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == {"frames": 48, "followers": [0]}  # the follower left its loop and exited cleanly
    assert probe_video(tmp_path / "cp2.mp4") == probe_video(single.path)  # 48 frames, 64x64, 24 fps
    _assert_uint8_bound(np.load(tmp_path / "cp2.npy"), np.concatenate(frames))


# ------------------------------------------------------------------------ (c) the engine leads the followers
def _params(seed: int, num_frames: int) -> GenerationParams:
    return GenerationParams(prompts=("waves at dusk",), width=64, height=64, num_frames=num_frames,
                            num_inference_steps=8, seed=seed)


# a and b have the same plan (batched model calls); c is cancelled once prefilled (released on every rank)
JOBS = {"a": _params(1, 48), "b": _params(2, 48), "c": _params(3, 96)}
CANCELLED = "c"
EXPECTED_ENDS = {"a": "finished", "b": "finished", "c": "cancelled"}


def _run_engine(runner) -> dict[str, str]:
    """Drive ``runner`` with the real engine until every job ended; the terminal event of each."""
    events: queue.Queue = queue.Queue()
    holder = {}

    def on_event(event) -> None:
        events.put(event)
        if event.kind == EventKind.PROGRESS and event.job_id == CANCELLED:
            holder["engine"].cancel(event.job_id)

    engine = holder["engine"] = Engine(runner, on_event=on_event, max_batch_size=4, idle_wait_s=0.05)
    for job_id, params in JOBS.items():
        engine.submit(job_id, params, reserved=False)  # before the loop starts: admitted in one prefill group
    engine.start()
    ended: dict[str, str] = {}
    deadline = time.monotonic() + RANK_TIMEOUT_S
    try:
        while len(ended) < len(JOBS):
            event = events.get(timeout=max(0.1, deadline - time.monotonic()))
            if event.kind in (EventKind.FINISHED, EventKind.FAILED, EventKind.CANCELLED):
                failed = event.kind == EventKind.FAILED
                ended[event.job_id] = f"failed: {event.error}" if failed else event.kind.value
    finally:
        engine.stop()
    return ended


def _engine_leader(_, model: str, folder: str) -> None:
    pipe = MagiPipeline.from_pretrained(model, cp=2)
    runner = pipe.runner.with_outputs(Path(folder) / "cp2", chunk_previews=False)
    frames = _record_mp4_frames(runner.runner)
    try:
        ended = _run_engine(runner)  # engine.stop() shuts the runner down: the follower is told to stop
    finally:
        pipe.close()
    for job_id in ("a", "b"):
        np.save(Path(folder) / f"cp2-{job_id}.npy", np.concatenate(frames[job_id]))
    report = {"ended": ended, "followers": [p.exitcode for p in runner.follower_processes],
              "commands": dict(runner.commands_sent)}
    (Path(folder) / "report.json").write_text(json.dumps(report))


def test_engine_with_leader_runner_writes_the_mp4s_of_one_process(tmp_path, cp_model, cp1_pipeline):
    single = cp1_pipeline.runner.with_outputs(tmp_path / "cp1", chunk_previews=False)
    frames = _record_mp4_frames(single)
    assert _run_engine(single) == EXPECTED_ENDS

    _run_ranks(_engine_leader, 1, str(cp_model), str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    commands = report.pop("commands")
    assert report == {"ended": EXPECTED_ENDS, "followers": [0]}  # and the follower exited cleanly
    # each job's state went over once, c's release and the shutdown once; a and b shared their model calls
    assert {kind: commands[kind] for kind in ("install", "release", "shutdown")} == {
        "install": 3, "release": 1, "shutdown": 1}
    calls_per_job = len(cp1_pipeline.runner.prefill(JOBS["a"]).plan.calls)
    assert calls_per_job <= commands["advance"] < 2 * calls_per_job
    assert not (tmp_path / "cp2" / "c.mp4").exists()
    served = {}
    for job_id in ("a", "b"):
        assert probe_video(tmp_path / "cp2" / f"{job_id}.mp4").frames == 48
        served[job_id] = np.load(tmp_path / f"cp2-{job_id}.npy")
        _assert_uint8_bound(served[job_id], np.concatenate(frames[job_id]))
    # the two seeds differ: each comparison is between the same job's videos, not two similar noises
    assert np.abs(served["a"].astype(np.int16) - served["b"].astype(np.int16)).mean() > 8


def _server_leader(_, model: str, folder: str) -> None:
    from tests.server_utils import running_server, tiny_settings, wait_status

    root = Path(folder)
    pipe = MagiPipeline.from_pretrained(model, cp=2)
    settings = tiny_settings(root, root / "cache", model=model)
    with running_server(settings, pipeline=pipe) as (ctx, client):  # the composition's build_context and shutdown
        response = client.post("/api/v3/wavespeed-ai/magi-1-24b", json={
            "prompt": "a red fox runs through snow", "seed": 3, "num_frames": 48, "resolution": "480p",
            "aspect_ratio": "16:9", "num_inference_steps": 8})
        done = wait_status(client, response.json()["data"]["id"])
        if done["status"] == "completed":
            (root / "served.mp4").write_bytes(client.get(done["outputs"][0]).content)
        runner = ctx.executor
    report = {"status": done["status"], "advance": runner.commands_sent["advance"],
              "followers": [p.exitcode for p in runner.follower_processes]}
    pipe.close()
    (root / "report.json").write_text(json.dumps(report))


def test_server_with_a_cp2_pipeline_serves_a_wavespeed_job(tmp_path, cp_model):
    """The server's composition over a ``cp=2`` pipeline: a WaveSpeed job completes with its model calls made by
    both ranks, and the server's shutdown stops the follower."""
    _run_ranks(_server_leader, 1, str(cp_model), str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "completed" and report["advance"] > 0 and report["followers"] == [0]
    assert probe_video(tmp_path / "served.mp4").frames == 48


# ------------------------------------------------------------------------------------ (d) failures end the group
def _dit_only(device) -> SimpleNamespace:
    return SimpleNamespace(dit=VideoDiT(DIT), advance=lambda states: None)


def _unloadable(device):
    raise FileNotFoundError("no weights here")


def _leader_with_unloadable_follower(_, folder: str) -> None:
    launch = ContextParallelLaunch.spawn(2, _unloadable, device="cpu")
    try:
        launch.lead(_dit_only("cpu"))
    except ContextParallelError as exc:
        message = str(exc)
    else:
        message = "lead() returned"
    report = {"error": message, "followers": [p.exitcode for p in launch.processes]}
    (Path(folder) / "report.json").write_text(json.dumps(report))


def test_a_follower_that_cannot_load_fails_the_launch(tmp_path):
    _run_ranks(_leader_with_unloadable_follower, 1, str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    assert "rank 1 could not load the model" in report["error"] and "no weights here" in report["error"]
    assert report["followers"] not in ([None], [0])  # it ended, with a failure status


def _leader_that_dies(_, folder: str) -> None:
    launch = ContextParallelLaunch.spawn(2, _dit_only, device="cpu")
    launch.lead(_dit_only("cpu"))
    (Path(folder) / "follower.pid").write_text(str(launch.processes[0].pid))
    os.kill(os.getpid(), signal.SIGKILL)  # no shutdown command, no atexit: the follower is orphaned


def test_a_follower_ends_when_its_leader_dies(tmp_path):
    context = mp.start_processes(_leader_that_dies, args=(str(tmp_path),), nprocs=1, join=False,
                                 start_method="spawn")
    context.processes[0].join(RANK_TIMEOUT_S)
    pid = int((tmp_path / "follower.pid").read_text())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return  # the closed connection ended its wait for commands
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the follower still waits for a leader that is gone")


def test_serve_cp2_process_serves_a_wavespeed_job_and_stops_its_follower(tmp_path, cp_model):
    """`magi-server serve --cp 2` as a real process: a WaveSpeed job completes with the requested frames; SIGTERM
    ends the server with exit code 0 and its follower rank with it."""
    import httpx

    from tests.procs import ServerProcess

    srv = ServerProcess(db=tmp_path / "jobs.db", outputs=tmp_path / "outputs", cache=tmp_path / "cache",
                        log=tmp_path / "server.log", model=str(cp_model),
                        extra_args=("--cp", "2", "--resolution-scale", "0.125"),
                        env={"OMP_NUM_THREADS": "1"})
    try:
        srv.start(timeout_s=120)
        r = httpx.post(srv.url + "/api/v3/wavespeed-ai/magi-1-24b", timeout=30,
                       json={"prompt": "two ranks", "seed": 3, "num_frames": 48, "num_inference_steps": 8})
        assert r.status_code == 200, r.text
        job_id = r.json()["data"]["id"]
        deadline = time.monotonic() + 120
        while (data := httpx.get(f"{srv.url}/api/v3/predictions/{job_id}/result", timeout=10).json()["data"])[
                "status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.1)
        assert data["status"] == "completed", data
        assert probe_video(tmp_path / "outputs" / f"{job_id}.mp4").frames == 48
        children = _children(srv.pid)
        assert children, "no follower process"
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=60) == 0, srv.log_tail()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)], srv.log_tail()
    finally:
        srv.close()


def _children(pid: int) -> list[int]:
    """The python processes the server started (its follower ranks; the encoders are ffmpeg)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"python" in cmdline:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
