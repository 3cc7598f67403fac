"""Unit tests of magi_server/models/vae.py on tiny random VAEs: layout, frame arithmetic of (tiled) encode/decode,
the blend geometry, the C-fastest unpatchify order and the uint8 conversion (spec §5.3-5.6)."""
from __future__ import annotations

import math

import pytest
import torch

from magi_server.models.config import VAEConfig
from magi_server.models import vae as vae_module
from magi_server.models.vae import (
    TileConfig,
    ViTVAE,
    decode_to_frames,
    encode_video_uint8,
    frames_to_uint8,
    tiled_decode,
    tiled_encode,
    unpatchify,
)

# Native grid 2x4x4 (video 32 px, 8 frames); one block keeps the tests fast.
TINY = VAEConfig(video_size=32, video_length=8, embed_dim=256, depth=1, num_heads=4, mlp_ratio=1.0)
# 32 px tiles = 4 latent px: decode stride 3 latent px, blend 8 px; encode stride 24 px, blend 1 latent px.
SMALL_TILES = TileConfig(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_min_length=12)


def _random_vae(config: VAEConfig = TINY, seed: int = 0) -> ViTVAE:
    torch.manual_seed(seed)
    vae = ViTVAE(config).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            # LayerNorm gains near 1 so activations stay O(1); everything else small and random
            p.normal_(1.0 if name.endswith("norm.weight") or name.endswith("norm2.weight") else 0.0, 0.02)
    return vae


@pytest.fixture(scope="module")
def tiny_vae() -> ViTVAE:
    return _random_vae()


def _count_calls(monkeypatch, vae: ViTVAE, method: str) -> list[tuple[int, ...]]:
    """Record the input shape of every vae.<method> call (tiled_* call the instance attribute)."""
    shapes: list[tuple[int, ...]] = []
    original = getattr(vae, method)

    def spy(x):
        shapes.append(tuple(x.shape))
        return original(x)

    monkeypatch.setattr(vae, method, spy)
    return shapes


def test_real_config_on_meta_has_reference_layout():
    with torch.device("meta"):
        vae = ViTVAE(VAEConfig())
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert shapes["encoder.patch_embed.proj.weight"] == (1024, 3, 4, 8, 8)
    assert shapes["encoder.pos_embed"] == (1, 4097, 1024)
    assert shapes["encoder.cls_token"] == (1, 1, 1024)
    assert shapes["encoder.blocks.23.attn.qkv.weight"] == (3072, 1024)
    assert shapes["encoder.blocks.23.mlp.fc1.weight"] == (4096, 1024)
    assert shapes["encoder.last_layer.weight"] == (32, 1024)
    assert shapes["decoder.proj_in.weight"] == (1024, 16)
    assert shapes["decoder.last_layer.weight"] == (3, 4, 3, 3, 3)
    assert not any("norm1" in k or "blocks.24" in k for k in shapes)
    # per side: 24 blocks x 10, cls + pos + norm w/b, last_layer w/b, patch_embed (or proj_in) w/b
    assert len(shapes) == 2 * (24 * 10 + 4 + 2 + 2)
    params = sum(math.prod(s) for s in shapes.values())
    assert abs(params / 1e6 - 613.8) < 0.5


def test_single_frame_encode_and_one_latent_decode(tiny_vae):
    torch.manual_seed(1)
    with torch.no_grad():
        image = torch.rand(1, 3, 1, 32, 40) * 2 - 1
        z = tiny_vae.encode(image)
        assert z.shape == (1, 16, 1, 4, 5)
        repeated = tiny_vae.encode(image.repeat(1, 1, 4, 1, 1))
        torch.testing.assert_close(z, repeated[:, :, :1])
        assert tiny_vae.encode(torch.zeros(1, 3, 8, 32, 40)).shape == (1, 16, 2, 4, 5)
        # one latent frame -> ONE pixel frame (the first of the four the decoder makes)
        one = tiny_vae.decode(z)
        assert one.shape == (1, 3, 1, 32, 40)
        two = tiny_vae.decode(z.repeat(1, 1, 2, 1, 1))
        assert two.shape == (1, 3, 8, 32, 40)


def test_chunk_of_six_latents_decodes_to_24_frames(tiny_vae, monkeypatch):
    calls = _count_calls(monkeypatch, tiny_vae, "decode")
    frames = decode_to_frames(tiny_vae, torch.randn(1, 16, 6, 4, 4), TileConfig(), uint8_output=True)
    assert calls == [(1, 16, 3, 4, 4), (1, 16, 3, 4, 4)]  # two temporal tiles of 3 latent frames
    assert frames.shape == (24, 3, 32, 32) and frames.dtype == torch.uint8


def test_v2v_style_latent_tail_decodes_to_one_frame(tiny_vae, monkeypatch):
    # latent frames 8..11 of a v2v chunk: tiles of 3 + 1 latent -> 12 + 1 pixel frames (spec §5.6)
    calls = _count_calls(monkeypatch, tiny_vae, "decode")
    video = tiled_decode(tiny_vae, torch.randn(1, 16, 4, 4, 4), TileConfig())
    assert [c[2] for c in calls] == [3, 1]
    assert video.shape == (1, 3, 13, 32, 32)


def test_tiled_decode_multi_tile_shape_and_count(tiny_vae, monkeypatch):
    calls = _count_calls(monkeypatch, tiny_vae, "decode")
    # latent 7 x 8 with 4-px tiles at stride 3: rows [0:4] [3:7] [6:7], cols [0:4] [3:7] [6:8]; 2 temporal tiles
    video = tiled_decode(tiny_vae, torch.randn(2, 16, 6, 7, 8), SMALL_TILES)
    assert len(calls) == 2 * 3 * 3
    assert sorted({c[3] for c in calls}) == [1, 4] and sorted({c[4] for c in calls}) == [2, 4]
    # crops: 24 + 24 + 8 rows, 24 + 24 + 16 cols = 8 px per latent px; 12 frames per temporal tile
    assert video.shape == (2, 3, 24, 56, 64)
    frames = decode_to_frames(tiny_vae, torch.randn(2, 16, 6, 7, 8), SMALL_TILES, uint8_output=False)
    assert frames.shape == (48, 3, 56, 64)


def test_tiled_encode_shapes(tiny_vae, monkeypatch):
    calls = _count_calls(monkeypatch, tiny_vae, "encode")
    video = torch.randint(0, 256, (1, 3, 24, 56, 64), dtype=torch.uint8)
    latent = encode_video_uint8(tiny_vae, video, SMALL_TILES)
    assert len(calls) == 2 * 3 * 3
    assert latent.shape == (1, 16, 6, 7, 8) and latent.dtype == torch.float32
    # 13 frames: tiles of 12 + 1 frames -> 3 + 1 latent frames; 32 frames (v2v prefix): 12 + 12 + 8 -> 8
    assert tiled_encode(tiny_vae, torch.zeros(1, 3, 13, 32, 32), TileConfig()).shape[2] == 4
    assert tiled_encode(tiny_vae, torch.zeros(1, 3, 32, 32, 32), TileConfig()).shape[2] == 8


def test_single_tile_equals_plain_calls(tiny_vae):
    torch.manual_seed(2)
    z = torch.randn(1, 16, 3, 4, 5)
    video = torch.rand(1, 3, 12, 32, 40) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(tiled_decode(tiny_vae, z, TileConfig()), tiny_vae.decode(z), rtol=0, atol=0)
        torch.testing.assert_close(tiled_encode(tiny_vae, video, TileConfig()), tiny_vae.encode(video), rtol=0, atol=0)


def _reference_style_blend(a, b, extent, dim, round_each):
    """Literal per-slice loop of spec §5.5: b[y] = a[size_a - E' + y](1 - y/E') + b[y](y/E')."""
    b = b.clone()
    extent = min(extent, a.shape[dim], b.shape[dim])
    for y in range(extent):
        a_y = a.select(dim, a.shape[dim] - extent + y)
        b_y = b.select(dim, y)
        if round_each:
            value = a_y * (1 - y / extent) + b_y * (y / extent)  # eager in the tensor dtype
        else:
            value = (a_y.float() * (1 - y / extent) + b_y.float() * (y / extent)).to(b.dtype)
        b_y.copy_(value)
    return b


@pytest.mark.parametrize("single_rounding", [True, False])
@pytest.mark.parametrize("b_size", [2, 5, 9])  # 2 and 5: an edge tile smaller than the nominal extent 6
def test_blend_matches_literal_loop(single_rounding, b_size):
    torch.manual_seed(3)
    a = torch.randn(1, 3, 2, 9, 7).bfloat16()
    b = torch.randn(1, 3, 2, b_size, 7).bfloat16()
    expected = _reference_style_blend(a, b, 6, 3, round_each=not single_rounding)
    got = vae_module._blend(a, b.clone(), 6, 3, single_rounding=single_rounding)
    assert torch.equal(got, expected)


def test_unpatchify_is_c_fastest_with_two_channels():
    torch.manual_seed(4)
    grid, pt, p, c = (2, 3, 2), 4, 8, 2  # embed 512 = 4 * 8 * 8 * 2
    tokens = torch.randn(2, math.prod(grid), pt * p * p * c)
    got = unpatchify(tokens, grid, pt, p, c)
    expected = torch.empty(2, c, grid[0] * pt, grid[1] * p, grid[2] * p)
    t_, h_, w_ = grid
    for b in range(2):
        for t in range(t_):
            for h in range(h_):
                for w in range(w_):
                    token = tokens[b, (t * h_ + h) * w_ + w]
                    for dt in range(pt):
                        for dh in range(p):
                            for dw in range(p):
                                base = ((dt * p + dh) * p + dw) * c
                                expected[b, :, t * pt + dt, h * p + dh, w * p + dw] = token[base : base + c]
    assert torch.equal(got, expected)


def test_decoder_with_two_unpatch_channels():
    vae = _random_vae(VAEConfig(video_size=32, video_length=8, embed_dim=512, depth=1, num_heads=4, mlp_ratio=1.0))
    assert vae.decoder.last_layer.weight.shape == (3, 2, 3, 3, 3)
    with torch.no_grad():
        assert vae.decode(torch.randn(1, 16, 2, 3, 4)).shape == (1, 3, 8, 24, 32)


def test_frames_to_uint8_truncates():
    x = torch.tensor([-2.0, -1.0, -0.9999, 0.0, 0.5, 0.999, 1.0, 3.0])
    # x*127.5 + 127.5 = (-127.5), 0, 0.01275, 127.5, 191.25, 254.87, 255, (510) -> clamp, then truncate
    assert frames_to_uint8(x).tolist() == [0, 0, 0, 127, 191, 254, 255, 255]
    assert frames_to_uint8(x).dtype == torch.uint8
