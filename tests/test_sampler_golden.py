"""The sampler fixtures through the library API (MagiPipeline), and the window bookkeeping of every call."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from magi_server.runtime.pipeline import MagiPipeline
from tests.golden_utils import assert_close_fp32, load_golden

LATENT_CASES = [
    "sampler_A_t2v",
    "sampler_A_v2v",
    "sampler_A_v2v_short_prefix",
    "sampler_B_t2v_distill",
    "sampler_B_t2v_distill_w4",
    "sampler_B_i2v_distill",
]


@pytest.fixture(scope="module")
def manifest(golden) -> dict:
    return json.loads((golden / "manifest.json").read_text())


def _pipeline(golden, config_name: str, *, vae) -> MagiPipeline:
    config = golden / config_name
    load = json.loads(config.read_text())["runtime_config"]["load"]
    return MagiPipeline.from_pretrained(
        golden / load, config=config, text_encoder=None, vae=vae,
        special_tokens=golden / "sampler_tiny_special_tokens.safetensors",
    )


@pytest.mark.parametrize("name", LATENT_CASES)
def test_sampler_fixture_latents(golden, manifest, name):
    entry = manifest["files"][f"{name}.safetensors"]
    data = load_golden(f"{name}.safetensors")
    pipe = _pipeline(golden, entry["config"], vae=None)
    runtime = json.loads((golden / entry["config"]).read_text())["runtime_config"]
    num_frames = entry.get("runtime_override", {}).get("num_frames", runtime["num_frames"])
    out = pipe(
        prompt_embeds=data["caption_embs"], prompt_attention_mask=data["emb_masks"], latents=data["initial_noise"],
        video_latents=data.get("prefix_video"), num_frames=num_frames, output_type="latent", seed=1234,
    )
    assert_close_fp32(out.latents, data["clean_latents"], f"{name}.clean_latents")


def test_sampler_i2v_end_to_end_uint8(golden, manifest):
    """sampler_B_i2v_distill from the uint8 image to the decoded uint8 frames (VAE in bf16, 256 px tiles)."""
    data = load_golden("sampler_B_i2v_distill.safetensors")
    image = load_golden("sampler_B_i2v_image.safetensors")
    (key,) = [k for k in image if image[k].dtype == torch.uint8]
    pipe = _pipeline(golden, "config_B.json", vae="load")
    captured = {}
    original = pipe.runner.encode_prefix

    def spy(*args, **kwargs):
        captured["prefix"] = original(*args, **kwargs)
        return captured["prefix"]

    pipe.runner.encode_prefix = spy
    out = pipe(
        image=image[key].numpy()[0], prompt_embeds=data["caption_embs"], prompt_attention_mask=data["emb_masks"],
        latents=data["initial_noise"], output_type="np", seed=1234,
    )
    # the image encode (bf16) gives the fixture's prefix latent
    prefix = captured["prefix"]
    assert prefix.dtype == torch.bfloat16
    d = (prefix.float() - data["prefix_video"].float()).abs()
    assert d.max().item() <= 5e-2 * data["prefix_video"].float().abs().max().item()
    ref = data["decoded_frames_uint8"].permute(0, 2, 3, 1).numpy()  # (96, 48, 64, 3)
    assert out.frames.shape == ref.shape == (96, 48, 64, 3)
    levels = np.abs(out.frames.astype(np.int32) - ref.astype(np.int32))
    assert levels.mean() <= 1.0, f"mean level difference {levels.mean():.3f}"
    assert levels.max() <= 8, f"max level difference {levels.max()}"
