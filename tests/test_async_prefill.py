"""Prefill off the engine thread (tiny preset, real model runner and engine): a slow prompt encode of a new job does not
stall the running job's calls, runs on another thread, can be cancelled while in flight, and bad input still fails
only that job naming the parameter. Plus the T5 contract that makes the encode short: encoding only the valid
tokens gives the padded encoding's values on them (tiny preset's T5)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from magi_server.engine.loop import Engine
from magi_server.params import GenerationParams
from magi_server.runtime.pipeline import MagiPipeline
from tests.test_engine import Recorder

SLOW_S = 2.0


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> MagiPipeline:
    return MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


def _params(prompt: str, frames: int = 96, seed: int = 1, **kw) -> GenerationParams:
    return GenerationParams(prompts=(prompt,), width=64, height=64, num_frames=frames, num_inference_steps=8, seed=seed, **kw)


class _Run:
    """An engine over the real model runner, with every model call's job ids and start time recorded."""

    def __init__(self, pipe, outputs):
        self.runner = pipe.runner.with_outputs(outputs)
        self.calls: list[tuple[float, tuple[str, ...]]] = []
        self.chunk_calls: list[tuple[int, str]] = []  # (index in calls, job id) of each call that made a chunk final
        step = self.runner.step

        def timed_step(job_ids):
            self.calls.append((time.monotonic(), tuple(job_ids)))
            made_final = step(job_ids)
            self.chunk_calls += [(len(self.calls) - 1, job_id) for job_id in made_final]
            return made_final

        self.runner.step = timed_step
        self.rec = Recorder()
        self.engine = Engine(self.runner, on_event=self.rec, idle_wait_s=0.01)

    def __enter__(self):
        self.engine.start()
        return self

    def __exit__(self, *exc):
        self.engine.stop()

    def starts(self, job_id: str) -> list[float]:
        return [t for t, ids in self.calls if job_id in ids]


@pytest.fixture
def slow_encode(pipe, monkeypatch):
    """Prompts starting with "slow" take SLOW_S longer to encode (or wait for ``gate`` when it is set up); records
    the thread and the time span of each slowed encode."""
    encode = pipe.text_encoder.encode
    seen: list[dict] = []
    gate: dict[str, threading.Event] = {}

    def slowed(prompts, *args, **kwargs):
        if any(p.startswith("slow") for p in prompts):
            record = {"thread": threading.current_thread().name, "start": time.monotonic()}
            seen.append(record)
            if "open" in gate:
                gate["open"].wait(30)
            else:
                time.sleep(SLOW_S)
            record["end"] = time.monotonic()
        return encode(prompts, *args, **kwargs)

    monkeypatch.setattr(pipe.text_encoder, "encode", slowed)
    return seen, gate


def test_slow_prompt_encoding_does_not_stall_the_running_job(pipe, slow_encode, tmp_path):
    seen, _ = slow_encode
    with _Run(pipe, tmp_path) as run:
        run.engine.submit("running", _params("a red fox", frames=480), reserved=False)
        run.rec.wait_for("running", kinds=("chunk",), timeout=60)  # prefilled and stepping
        run.engine.submit("new", _params("slow: a blue whale", seed=2), reserved=False)
        assert run.rec.wait_for("new", timeout=120).kind == "finished"
        assert run.rec.wait_for("running", timeout=120).kind == "finished"
    (encode,) = seen
    assert encode["thread"] != run.engine._thread.name  # never on the engine thread
    starts = run.starts("running")
    during = [t for t in starts if encode["start"] <= t <= encode["end"]]
    # the running job kept taking calls all through the slow encode, at its usual pace
    assert len(during) >= 3, (encode, starts)
    window = [t for t in starts if encode["start"] - 1 <= t <= encode["end"] + 1]
    gaps = [b - a for a, b in zip(window, window[1:])]
    assert max(gaps) < SLOW_S / 3, gaps
    # the encode overlapped the running job's calls, so the new job started on its own, not batched with it
    assert run.starts("new") and all(ids == ("new",) or "running" not in ids for _, ids in run.calls
                                     if "new" in ids)


def test_cancel_while_the_prompt_is_encoding(pipe, slow_encode, tmp_path):
    seen, gate = slow_encode
    gate["open"] = threading.Event()
    with _Run(pipe, tmp_path) as run:
        run.engine.submit("slow", _params("slow prompt"), reserved=False)
        run.rec.wait_for("slow", kinds=("started",))
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        run.engine.cancel("slow")
        # the cancel is answered while the encode is still held, not when it ends
        assert run.rec.wait_for("slow", timeout=10).kind == "cancelled"
        assert "end" not in seen[0]
        # submits that arrive while the prefill is in flight wait for it, queued
        run.engine.submit("next", _params("a cat", seed=3), reserved=False)
        time.sleep(0.2)
        assert run.engine.queue_position("next") == 0 and "started" not in run.rec.kinds("next")
        gate["open"].set()
        assert run.rec.wait_for("next", timeout=60).kind == "finished"
        time.sleep(0.2)
    assert run.rec.kinds("slow") == ["started", "cancelled"]
    assert not run.starts("slow")
    assert not (tmp_path / "slow.mp4").exists() and not list(tmp_path.glob(".slow.mp4.*.part"))
    assert (tmp_path / "next.mp4").exists()


def test_bad_input_in_prefill_names_the_parameter(pipe, tmp_path):
    not_an_image = tmp_path / "x.png"
    not_an_image.write_bytes(b"not an image")
    with _Run(pipe, tmp_path / "out") as run:
        run.engine.submit("bad", _params("a cat", image_path=str(not_an_image)), reserved=False)
        run.engine.submit("good", _params("a dog"), reserved=False)
        failed = run.rec.wait_for("bad", timeout=60)
        assert failed.kind == "failed" and failed.error_code == "invalid_input" and failed.error.startswith("image")
        assert run.rec.wait_for("good", timeout=60).kind == "finished"


def test_tiny_t5_valid_tokens_equal_the_padded_encoding(pipe):
    """The tiny preset's T5: only each prompt's valid tokens go through the model; on every valid token the result
    equals the full 800-token encoding (to float32 summation order), elsewhere it is zero."""
    from magi_server.models.caption_cleaning import preprocess_prompt

    encoder = pipe.text_encoder
    prompts = ["A cat walks on the beach at sunset, cinematic.", "a dog", "zyxwv quokka café 日本, " * 6, ""]
    embeds, mask = encoder.encode(prompts)
    ids, attention = encoder.tokenize([preprocess_prompt(p) for p in prompts])
    with torch.no_grad():
        padded = encoder.model(input_ids=ids, attention_mask=attention).last_hidden_state
    assert embeds.shape == padded.shape == (4, 800, 32) and torch.equal(mask, attention)
    valid = attention.bool()
    assert 1 <= attention.sum(1).min() and attention.sum(1).max() < 800
    torch.testing.assert_close(embeds[valid], padded[valid], rtol=1e-5, atol=1e-5)
    assert embeds[~valid].eq(0).all()
