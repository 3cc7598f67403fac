"""End to end on the tiny preset: every task writes a playable MP4 of the documented length, deterministically."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from magi_server.runtime.chunking import chunk_layout, plan_sampler_calls, tokens_per_chunk
from magi_server.runtime.pipeline import MagiPipeline
from magi_server.runtime.sampler import SamplerSettings, plan_request, sampler_step_batch, start_sampler
from magi_server.media.mp4 import Mp4Writer
from tests.media_utils import probe_video

SIZE = dict(height=64, width=64)  # the tiny model at 64x64: 4x4 patches per latent frame


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> MagiPipeline:
    return MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _frames(path) -> np.ndarray:
    return np.stack(list(_iter_frames(path)))


def _iter_frames(path):
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    for raw in reader:
        yield np.frombuffer(raw, np.uint8).reshape(h, w, 3)


def test_t2v_mp4_frames_size_fps_and_determinism(pipe, tmp_path):
    a = pipe("a red fox runs through snow", num_frames=96, seed=7, output_path=tmp_path / "a.mp4", **SIZE)
    info = probe_video(a.path)
    assert (info.frames, info.width, info.height, info.fps) == (96, 64, 64, 24)
    assert a.num_frames == 96 and a.seed == 7
    b = pipe("a red fox runs through snow", num_frames=96, seed=7, output_path=tmp_path / "b.mp4", **SIZE)
    assert _sha(a.path) == _sha(b.path)
    c = pipe("a red fox runs through snow", num_frames=96, seed=8, output_path=tmp_path / "c.mp4", **SIZE)
    assert not np.array_equal(_frames(a.path), _frames(c.path))


def test_t2v_frame_count_rounds_up_to_whole_chunks(pipe):
    out = pipe("waves", num_frames=100, seed=1, output_type="np", **SIZE)  # 100 // 4 = 25 latents -> 5 chunks
    assert out.frames.shape == (120, 64, 64, 3) and out.frames.dtype == np.uint8


def test_random_seed_is_reported(pipe):
    out = pipe("waves", num_frames=24, seed=-1, output_type="latent", **SIZE)
    assert isinstance(out.seed, int) and 0 <= out.seed < 2**31
    again = pipe("waves", num_frames=24, seed=out.seed, output_type="latent", **SIZE)
    assert torch.equal(out.latents, again.latents)


def test_i2v_mp4(pipe, tmp_path):
    image = (np.arange(48 * 80 * 3, dtype=np.uint32).reshape(48, 80, 3) % 251).astype(np.uint8)  # resized to 64x64
    out = pipe("a cat", image=image, num_frames=96, seed=3, output_path=tmp_path / "i2v.mp4", **SIZE)
    info = probe_video(out.path)
    # i2v: the image is one latent frame, 96 frames -> ceil((24 + 1) / 6) = 5 chunks, all emitted: 120 frames
    assert (info.frames, info.width, info.height, info.fps) == (120, 64, 64, 24)


def test_v2v_mp4(pipe, tmp_path):
    source = tmp_path / "source.mp4"
    with Mp4Writer(source, 64, 64, fps=24) as writer:
        rng = np.random.default_rng(0)
        writer.append(rng.integers(0, 255, size=(40, 64, 64, 3), dtype=np.uint8))
    out = pipe("a cat", video=source, num_frames=96, seed=3, output_path=tmp_path / "v2v.mp4", **SIZE)
    info = probe_video(out.path)
    # v2v: the first 32 frames -> 8 prefix latents; ceil((24 + 8) / 6) = 6 chunks; chunk 1 emits latents 8..11
    # (decoded as 3 + 1 latents -> 13 frames), chunks 2..5 24 frames each: 109 frames (spec §5.6)
    assert (info.frames, info.width, info.height, info.fps) == (109, 64, 64, 24)


def test_chunkwise_prompts(pipe, tmp_path):
    prompts = ["a quiet lake at dawn", "a storm rolls in", "lightning over the lake"]
    out = pipe(prompts, num_frames=96, seed=5, output_path=tmp_path / "scenes.mp4", **SIZE)
    info = probe_video(out.path)
    assert (info.frames, info.width, info.height, info.fps) == (96, 64, 64, 24)
    single = pipe(prompts[0], num_frames=96, seed=5, output_type="latent", **SIZE)
    scenes = pipe(prompts, num_frames=96, seed=5, output_type="latent", **SIZE)
    # same noise; captions differ from chunk 1 on. Chunk 0 is finished before it could see them (block-causal
    # attention, no later chunk in its context) so it is identical; every later chunk differs
    assert torch.equal(single.latents[:, :, :6], scenes.latents[:, :, :6])
    assert not torch.equal(single.latents[:, :, 6:], scenes.latents[:, :, 6:])


def test_callback_order_follows_the_window_schedule(pipe):
    """Each chunk reaches the callback right after the call that finishes it, before any later chunk is final."""
    events = []
    out = pipe(
        "birds", num_frames=96, seed=2, output_type="np", **SIZE,
        callback_on_step=lambda done, total: events.append(("call", done)),
        callback_on_chunk=lambda e: events.append(("chunk", e.index, e.frames.shape[0], e.first_frame)),
    )
    settings = SamplerSettings.from_config(pipe.config)
    plan = plan_sampler_calls(
        chunk_layout(96), num_steps=settings.num_steps, window_size=settings.window_size,
        tokens_per_chunk=tokens_per_chunk(8, 8),
    )
    expected = []
    for call in plan.calls:
        expected.append(("call", call.index + 1))
        if call.emitted is not None:
            expected.append(("chunk", call.emitted.index, 24, 24 * call.emitted.index))
    assert events == expected
    assert out.frames.shape[0] == 96


def test_long_video_cache_is_bounded_by_the_window(pipe):
    """240 frames = 10 chunks: the KV cache never holds more than the clean chunks the window reads."""
    settings = SamplerSettings.from_config(pipe.config)
    plan = plan_request(settings, num_frames=240, prefix_frames=0, latent_height=8, latent_width=8)
    assert plan.layout.num_chunks == 10
    y, masks = torch.zeros(2, 10, 800, 32), torch.zeros(2, 10, 800)
    masks[:, :, :4] = 1
    state = start_sampler(
        plan, settings, noise=torch.randn(1, 16, 60, 8, 8), captions=y, caption_masks=masks, prefix=None,
        num_layers=pipe.dit.config.num_layers, cache_dtype=torch.float32, cache_device="cpu",
    )
    tpc = plan.tokens_per_chunk
    row_bytes = tpc * pipe.dit.config.num_query_groups * 2 * pipe.dit.config.kv_channels * 4
    retained, emitted = [], 0
    while not state.done:
        (chunk,) = sampler_step_batch(pipe.dit, [state])
        emitted += chunk is not None
        retained.append(state.cache.chunks())
        assert state.cache.nbytes() <= 1 * row_bytes * pipe.dit.config.num_layers
    assert emitted == 10
    # a clean chunk is kept exactly while the next window reads it: at most one at a time with the shipped ranges
    assert max(len(r) for r in retained) == 1
    assert retained[-1] == []


def test_lossless_continuation_from_latents(pipe):
    """A later call continues from the latents of an earlier one (no VAE round trip)."""
    first = pipe("a fox", num_frames=48, seed=4, output_type="latent", **SIZE)
    assert first.latents.shape == (1, 16, 12, 8, 8)
    more = pipe("the fox keeps running", video_latents=first.latents[:, :, -8:], num_frames=48, seed=5,
                output_type="np", **SIZE)
    # P = 8 prefix latents, 48 // 4 = 12 new ones: ceil(20 / 6) = 4 chunks; chunk 0 is the prefix, chunk 1 emits
    # canvas frames 8..11 (decoded as 3 + 1 latents -> 13 frames), chunks 2 and 3 24 frames each
    assert more.frames.shape == (13 + 24 + 24, 64, 64, 3)
