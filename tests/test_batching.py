"""Requests in lock-step share batched DiT calls and get exactly the latents each gets alone."""
from __future__ import annotations

import pytest
import torch

from magi_server.models.config import MagiConfig
from magi_server.runtime.loading import load_dit
from magi_server.runtime.sampler import SamplerSettings, plan_request, sampler_step_batch, start_sampler


def _request(plan, settings, model, seed, *, prefix_frames=0):
    gen = torch.Generator().manual_seed(seed)
    layout = plan.layout
    width = model.config.caption_channels
    captions = torch.randn(2, layout.num_chunks, 800, width, generator=gen)
    masks = torch.zeros(2, layout.num_chunks, 800)
    masks[0, :, : 10 + seed % 7] = 1
    masks[1, :, :50] = 1
    noise = torch.randn(1, 16, layout.latent_frames, 6, 8, generator=gen)
    prefix = torch.randn(1, 16, prefix_frames, 6, 8, generator=gen).to(torch.bfloat16) if prefix_frames else None
    return start_sampler(
        plan, settings, noise=noise, captions=captions, caption_masks=masks, prefix=prefix,
        num_layers=model.config.num_layers, cache_dtype=torch.float32, cache_device="cpu",
    )


@pytest.mark.parametrize("config_name, prefix_frames", [("config_A.json", 0), ("config_A.json", 8), ("config_B_w4.json", 0)])
def test_batched_calls_equal_single_runs(golden, config_name, prefix_frames):
    config = MagiConfig.from_json(golden / config_name)
    model = load_dit(config.load, config.dit)
    settings = SamplerSettings.from_config(config)
    plan = plan_request(settings, num_frames=72, prefix_frames=prefix_frames, latent_height=6, latent_width=8)

    alone = []
    for seed in (1, 2, 3):
        state = _request(plan, settings, model, seed, prefix_frames=prefix_frames)
        chunks = []
        while not state.done:
            (chunk,) = sampler_step_batch(model, [state])
            if chunk is not None:
                chunks.append(chunk.latents)
        alone.append(torch.cat(chunks, dim=2))

    states = [_request(plan, settings, model, seed, prefix_frames=prefix_frames) for seed in (1, 2, 3)]
    together = [[] for _ in states]
    calls = 0
    while not states[0].done:
        for b, chunk in enumerate(sampler_step_batch(model, states)):
            if chunk is not None:
                together[b].append(chunk.latents)
        calls += 1
    assert calls == plan.num_calls
    for b in range(3):
        assert torch.equal(torch.cat(together[b], dim=2), alone[b]), f"request {b} differs when batched"


def test_mismatched_calls_are_refused(golden):
    config = MagiConfig.from_json(golden / "config_B.json")
    model = load_dit(config.load, config.dit)
    settings = SamplerSettings.from_config(config)
    plan = plan_request(settings, num_frames=72, prefix_frames=0, latent_height=6, latent_width=8)
    a, b = _request(plan, settings, model, 1), _request(plan, settings, model, 2)
    sampler_step_batch(model, [a])
    with pytest.raises(ValueError, match="same call"):
        sampler_step_batch(model, [a, b])
