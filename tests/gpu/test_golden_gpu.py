"""Golden fixtures on the GPU: the DiT in bf16 with each usable attention backend, and the VAE."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from magi_server.models.config import MagiConfig
from magi_server.runtime.loading import load_dit, load_vae
from magi_server.models.attention import available_backends
from magi_server.models.vae import TileConfig, decode_to_frames, encode_video_uint8
from tests.golden_utils import assert_close_bf16, load_golden

BACKENDS = ["sdpa", "flash_attn", "xformers"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["A", "B"])
def test_dit_forward_plain_bf16(golden, variant, backend):
    if backend not in available_backends("cuda", torch.bfloat16):
        pytest.skip(f"{backend} is not usable here")
    config = MagiConfig.from_json(golden / f"config_{variant}.json")
    dit_config = dataclasses.replace(config.dit, params_dtype="bfloat16")
    model = load_dit(config.load, dit_config, device="cuda", attention_backend=backend)
    data = load_golden(f"dit_{variant}_forward_plain.safetensors")
    manifest = json.loads((golden / "manifest.json").read_text())
    kwargs = manifest["files"][f"dit_{variant}_forward_plain.safetensors"]["kwargs"]
    from magi_server.runtime.timesteps import distill_dt

    dt = distill_dt(kwargs["num_steps"], kwargs["distill_interval"]) if dit_config.distill else None
    out = model(
        data["x"].cuda(), data["t"].cuda(), data["y"].squeeze(1).cuda(), data["xattn_mask"].squeeze(1).cuda(),
        data["kv_range"], data["caption_dropout_mask"], slice_point=0, chunk_width=6, dt=dt,
    )
    assert_close_bf16(out.cpu(), data["out"], f"dit_{variant} out ({backend}, bf16)")


def test_vae_on_gpu(golden):
    fp32 = load_vae(golden / "vae", device="cuda", dtype=torch.float32)
    g = load_golden("vae_fp32.safetensors")
    out = fp32.encode(g["enc.video"].cuda()).cpu()
    # golden README: another attention kernel may need 2e-3 relative for vae_fp32
    bound = 2e-3 * max(1.0, g["enc.z"].abs().max().item())
    assert (out - g["enc.z"]).abs().max().item() <= bound

    bf16 = load_vae(golden / "vae", device="cuda", dtype=torch.bfloat16)
    t = load_golden("vae_bf16_tiled.safetensors")
    tiles = TileConfig(64, 64, 12, 0.25, 0.0)
    latent = encode_video_uint8(bf16, t["encode.video_uint8"].cuda(), tiles)
    assert_close_bf16(latent.cpu(), t["encode.latent"], "encode.latent")
    frames = decode_to_frames(bf16, t["decode.latent_scaled"].cuda() / 0.18215, tiles, uint8_output=False)
    assert_close_bf16(frames.cpu(), t["decode.frames"], "decode.frames")
