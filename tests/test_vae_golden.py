"""Golden parity of the ViTVAE (models/vae.py): vae_fp32 (plain calls) and vae_bf16_tiled (pipeline helpers).

The VAE is loaded through the project's loader from golden/vae (the official diffusers-style layout). On the CPU
that made the fixtures every tensor here is bit-exact, but another CPU type picks other MKL/oneDNN kernels and the
reference itself drifts there (golden README § Tolerances), so only the README's cross-CPU bounds are asserted.
"""
from __future__ import annotations

import json

import pytest
import torch

from magi_server.runtime.loading import load_vae
from magi_server.models.vae import TileConfig, ViTVAE, decode_to_frames, encode_video_uint8, frames_to_uint8
from tests.golden_utils import VAE_FP32_REL, assert_close_bf16, assert_close_fp32, load_golden

SCALE_FACTOR = 0.18215


def _load_golden_vae(golden, dtype: torch.dtype) -> ViTVAE:
    return load_vae(golden / "vae", dtype=dtype)


@pytest.fixture(scope="module")
def vae_fp32(golden) -> ViTVAE:
    return _load_golden_vae(golden, torch.float32)


@pytest.fixture(scope="module")
def vae_bf16(golden) -> ViTVAE:
    return _load_golden_vae(golden, torch.bfloat16)


def test_golden_vae_state_dict_matches_file(golden, vae_fp32):
    from safetensors.torch import load_file

    state = load_file(str(golden / "vae" / "diffusion_pytorch_model.safetensors"))
    ours = vae_fp32.state_dict()
    assert set(ours) == set(state)
    for name, tensor in state.items():
        assert tuple(ours[name].shape) == tuple(tensor.shape), name
        assert ours[name].dtype == torch.float32, name


@torch.no_grad()
def test_vae_fp32(golden, vae_fp32):
    g = load_golden("vae_fp32.safetensors")
    rel = VAE_FP32_REL
    assert_close_fp32(vae_fp32.encoder(g["enc.video"]), g["enc.moments"], "enc.moments", rel=rel)
    assert_close_fp32(vae_fp32.encode(g["enc.video"]), g["enc.z"], "enc.z", rel=rel)
    assert_close_fp32(vae_fp32.encode(g["enc_image.image"]), g["enc_image.z"], "enc_image.z", rel=rel)
    assert_close_fp32(vae_fp32.encode(g["enc_native.video"]), g["enc_native.z"], "enc_native.z", rel=rel)
    assert_close_fp32(vae_fp32.decode(g["dec.z"]), g["dec.video"], "dec.video", rel=rel)
    assert_close_fp32(vae_fp32.decode(g["dec_T1.z"]), g["dec_T1.video"], "dec_T1.video", rel=rel)


def _golden_tiles(golden) -> TileConfig:
    tiles = json.loads((golden / "manifest.json").read_text())["files"]["vae_bf16_tiled.safetensors"]["tiles"]
    assert tiles.pop("allow_spatial_tiling") is True
    return TileConfig(**tiles)


def test_vae_bf16_tiled(golden, vae_bf16):
    g = load_golden("vae_bf16_tiled.safetensors")
    tiles = _golden_tiles(golden)

    latent = encode_video_uint8(vae_bf16, g["encode.video_uint8"], tiles)
    assert latent.dtype == torch.bfloat16
    assert_close_bf16(latent, g["encode.latent"], "encode.latent")

    frames = decode_to_frames(vae_bf16, g["decode.latent_scaled"] / SCALE_FACTOR, tiles, uint8_output=False)
    assert frames.dtype == torch.bfloat16
    assert_close_bf16(frames, g["decode.frames"], "decode.frames")

    # README bound for uint8 frames: mean |d| <= 1 level, max |d| <= 8
    levels = (frames_to_uint8(frames).int() - frames_to_uint8(g["decode.frames"]).int()).abs()
    assert levels.float().mean().item() <= 1.0 and levels.max().item() <= 8
