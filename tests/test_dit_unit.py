"""Unit tests of the DiT, its KV cache and the guidance helpers on tiny random configurations (CPU, fast)."""
from __future__ import annotations

import pytest
import torch

from magi_server.models.config import DiTConfig
from magi_server.models.dit import KVCache, VideoDiT
from magi_server.runtime.timesteps import distill_dt
from tests.golden_utils import guided_velocity
from tests.golden_utils import assert_close_fp32

CW = 2  # latent frames per chunk in these tests
H, W = 4, 4  # latent size -> 2x2 patches, 4 tokens per frame
TPC = CW * (H // 2) * (W // 2)
L_CAP, C_CAP = 20, 8


def tiny_config(**changes) -> DiTConfig:
    base = dict(
        num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        caption_channels=C_CAP, caption_max_length=L_CAP, params_dtype="float32",
    )
    base.update(changes)
    return DiTConfig(**base)


def tiny_model(seed: int = 0, **changes) -> VideoDiT:
    torch.manual_seed(seed)
    model = VideoDiT(tiny_config(**changes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            # perturb every tensor (zero-centred norms included) so a missing +1 or a wrong layout shows
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(chunks: int, seed: int = 1, batch: int = 1, channels: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, chunks * CW, H, W, generator=g)
    t = torch.rand(batch, chunks, generator=g)
    caps = torch.randn(batch * chunks, L_CAP, C_CAP, generator=g)
    mask = torch.zeros(batch * chunks, L_CAP)
    for i in range(batch * chunks):
        mask[i, : 3 + (5 * i) % (L_CAP - 3)] = 1
    return x, t, caps, mask


# ---------------------------------------------------------------------------------------------------------------
# structure and precision policy
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config, expected",
    [
        (
            DiTConfig(
                num_layers=34, hidden_size=3072, ffn_hidden_size=12288, num_attention_heads=24, num_query_groups=8,
                kv_channels=128,
            ),
            4_459_898_128,
        ),
        (
            DiTConfig(
                num_layers=48, hidden_size=6144, ffn_hidden_size=16384, num_attention_heads=48, num_query_groups=8,
                kv_channels=128, in_channels=32, out_channels=32, x_rescale_factor=0.1, half_channel_vae=True,
                gated_linear_unit=True,
            ),
            23_899_281_936,
        ),
    ],
)
def test_real_sizes_build_on_meta_with_reference_parameter_count(config: DiTConfig, expected: int) -> None:
    with torch.device("meta"):
        model = VideoDiT(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(v.numel() for v in model.state_dict().values()) == expected
    h = config.hidden_size
    assert shapes["videodit_blocks.layers.0.self_attention.linear_kv_xattn.weight"] == (2048, h)
    assert shapes["videodit_blocks.layers.0.self_attention.linear_proj.weight"] == (h, 2 * h)
    assert shapes["y_embedder.null_caption_embedding"] == (800, 4096)
    assert shapes["rope.bands"] == (16,)
    assert shapes["final_linear.linear.weight"] == (4 * config.out_channels, h)


def test_is_fp32_param_names() -> None:
    fp32 = [
        "x_embedder.weight", "t_embedder.mlp.2.bias", "y_embedder.null_caption_embedding", "rope.bands",
        "final_linear.linear.weight", "videodit_blocks.final_layernorm.weight",
        "videodit_blocks.layers.3.self_attention.q_layernorm.bias",
        "videodit_blocks.layers.3.self_attention.k_layernorm.weight",
        "videodit_blocks.layers.3.self_attn_post_norm.weight", "videodit_blocks.layers.3.mlp_post_norm.bias",
    ]
    other = [
        "videodit_blocks.layers.3.self_attention.q_layernorm_xattn.weight",
        "videodit_blocks.layers.3.self_attention.k_layernorm_xattn.bias",
        "videodit_blocks.layers.3.self_attention.linear_qkv.layer_norm.weight",
        "videodit_blocks.layers.3.self_attention.linear_proj.weight",
        "videodit_blocks.layers.3.mlp.layer_norm.weight", "videodit_blocks.layers.3.ada_modulate_layer.proj.0.bias",
    ]
    assert all(VideoDiT.is_fp32_param(n) for n in fp32)
    assert not any(VideoDiT.is_fp32_param(n) for n in other)


def test_parameters_are_created_in_their_policy_dtype() -> None:
    model = VideoDiT(tiny_config(params_dtype="bfloat16"))
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if VideoDiT.is_fp32_param(name) else torch.bfloat16), name


# ---------------------------------------------------------------------------------------------------------------
# KV cache object
# ---------------------------------------------------------------------------------------------------------------
def test_kvcache_write_read_evict() -> None:
    cache = KVCache(2, torch.float32, "cpu", tokens_per_chunk=3)
    rows = torch.arange(3 * 3 * 2 * 4, dtype=torch.float32).reshape(9, 2, 4)
    cache.write(0, 5, rows)
    cache.write(1, 5, rows[:3] * 2)
    assert cache.chunks() == [5, 6, 7]
    assert torch.equal(cache.read(0, 6, 8), rows[3:])
    assert torch.equal(cache.rows(0, 5), rows)
    assert cache.read(0, 6, 6).shape == (0, 2, 4)
    with pytest.raises(KeyError, match="chunk 6"):
        cache.read(1, 5, 7)
    with pytest.raises(ValueError):
        cache.write(0, 0, rows[:4])  # not whole chunks
    rows[:] = 0  # the cache holds copies
    assert cache.read(0, 5, 6).abs().sum() > 0
    assert cache.nbytes() == 4 * 3 * 2 * 4 * 4
    cache.evict([6, 7])
    assert cache.chunks() == [6, 7]
    cache.drop_before(7)
    assert cache.chunks() == [7] and cache.nbytes() == 3 * 2 * 4 * 4
    with pytest.raises(ValueError):
        cache.bind_tokens_per_chunk(4)


# ---------------------------------------------------------------------------------------------------------------
# forward semantics
# ---------------------------------------------------------------------------------------------------------------
def test_cached_window_equals_full_causal_call_and_reads_only_needed_chunks() -> None:
    model = tiny_model()
    x, t, caps, mask = inputs(4)
    drop = [False]
    full_ranges = [[0, TPC], [0, 2 * TPC], [TPC, 3 * TPC], [TPC, 4 * TPC]]
    full = model(x, t, caps, mask, full_ranges, drop, chunk_width=CW)

    cache = KVCache(model.config.num_layers, torch.float32, "cpu")
    out1 = model(x[:, :, : 2 * CW], t[:, :2], caps[:2], mask[:2], full_ranges[:2], drop, chunk_width=CW,
                 kv_cache=cache, write_cache=True)
    assert_close_fp32(out1, full[:, :, : 2 * CW], "first two chunks")
    assert cache.chunks() == [0, 1]
    # chunk 0 is outside every range of the next call: without it the call must still work and match
    cache.drop_before(1)
    out2 = model(x[:, :, 2 * CW :], t[:, 2:], caps[2:], mask[2:], full_ranges[2:], drop, slice_point=2,
                 chunk_width=CW, kv_cache=cache)
    assert_close_fp32(out2, full[:, :, 2 * CW :], "cached chunks 2-3")
    assert cache.chunks() == [1]  # a read-only call writes nothing
    with pytest.raises(KeyError, match="chunk 0"):
        model(x[:, :, 2 * CW :], t[:, 2:], caps[2:], mask[2:], [[0, 3 * TPC], [TPC, 4 * TPC]], drop,
              slice_point=2, chunk_width=CW, kv_cache=cache)


def test_cache_write_skips_last_chunks() -> None:
    model = tiny_model()
    x, t, caps, mask = inputs(3)
    cache = KVCache(model.config.num_layers, torch.float32, "cpu")
    ranges = [[4 * TPC, 5 * TPC], [4 * TPC, 6 * TPC], [6 * TPC, 7 * TPC]]
    with pytest.raises(KeyError, match="chunk 3"):  # the cache lacks chunk 3, and nothing gets written
        model(x, t, caps, mask, [[3 * TPC, 5 * TPC]] + ranges[1:], [True], slice_point=4, chunk_width=CW,
              kv_cache=cache, write_cache=True)
    assert cache.chunks() == []
    model(x, t, caps, mask, ranges, [True], slice_point=4, chunk_width=CW, kv_cache=cache, write_cache=True,
          skip_cache_write_chunks=1)
    assert cache.chunks() == [4, 5]


def test_batched_elements_use_batch_flattened_ranges() -> None:
    model = tiny_model()
    x, t, caps, mask = inputs(1, batch=3)
    batched = model(x, t, caps, mask, [[b * TPC, (b + 1) * TPC] for b in range(3)], [True] * 3, chunk_width=CW)
    for b in range(3):
        single = model(x[b : b + 1], t[b : b + 1], caps[b : b + 1], mask[b : b + 1], [[0, TPC]], [True],
                       chunk_width=CW)
        assert_close_fp32(batched[b : b + 1], single, f"batch element {b}")


def test_forward_rejects_bad_calls() -> None:
    model = tiny_model()
    x, t, caps, mask = inputs(1, batch=2)
    with pytest.raises(ValueError, match="one KV cache per batch element"):
        model(x, t, caps, mask, [[0, TPC], [TPC, 2 * TPC]], [False, False], chunk_width=CW,
              kv_cache=KVCache(2, torch.float32))
    with pytest.raises(ValueError, match="outside"):
        model(x[:1], t[:1], caps[:1], mask[:1], [[0, 2 * TPC]], [False], chunk_width=CW)
    with pytest.raises(ValueError, match="dt"):
        model(x[:1], t[:1], caps[:1], mask[:1], [[0, TPC]], [False], chunk_width=CW, dt=4.0)


def test_bf16_forward_runs_and_tracks_fp32() -> None:
    ref = tiny_model(gated_linear_unit=True, half_channel_vae=True, in_channels=32, out_channels=32,
                     x_rescale_factor=0.1, distill=True)
    model = VideoDiT(tiny_config(params_dtype="bfloat16", gated_linear_unit=True, half_channel_vae=True,
                                 in_channels=32, out_channels=32, x_rescale_factor=0.1, distill=True)).eval()
    model.load_state_dict({k: v.to(torch.float32 if VideoDiT.is_fp32_param(k) else torch.bfloat16)
                           for k, v in ref.state_dict().items()})
    x, t, caps, mask = inputs(2)
    ranges = [[0, TPC], [0, 2 * TPC]]
    cache = KVCache(2, torch.bfloat16, "cpu")
    out = model(x, t, caps, mask, ranges, [False], chunk_width=CW, dt=8.0, kv_cache=cache, write_cache=True)
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.isfinite(out).all()
    assert cache.rows(0).dtype == torch.bfloat16 and cache.chunks() == [0, 1]
    expected = ref(x, t, caps, mask, ranges, [False], chunk_width=CW, dt=8.0)
    err = (out - expected).abs().max() / expected.abs().max()
    assert err < 5e-2, err


# ---------------------------------------------------------------------------------------------------------------
# guidance helpers
# ---------------------------------------------------------------------------------------------------------------
def test_distill_dt() -> None:
    assert distill_dt(16, 1) == 8 and distill_dt(64, 1) == 32 and distill_dt(8, 1.0) == 4
    assert distill_dt(12, 2) == 4 and distill_dt(12, 1) == 8


def _dispatch_inputs(chunks: int):
    x, t, caps, mask = inputs(chunks, seed=3)
    _, _, null_caps, null_mask = inputs(chunks, seed=4)
    return (torch.cat([x, x]), torch.cat([t, t]), torch.cat([caps, null_caps]), torch.cat([mask, null_mask]))


def test_cfg3_extra_clean_chunk_slot_keeps_input_and_only_pass2_writes() -> None:
    model = tiny_model()
    x, t, caps, mask = _dispatch_inputs(3)
    t[:, 0] = 0.9999
    cache = KVCache(2, torch.float32, "cpu")
    kv = [[5 * TPC, 6 * TPC], [5 * TPC, 7 * TPC], [5 * TPC, 8 * TPC]]
    cache.bind_tokens_per_chunk(TPC)
    out = guided_velocity(model, x, t, caps, mask, kv, cfg_number=3, slice_point=5, chunk_width=CW,
                          extra_clean_chunk=True, nearly_clean=True, kv_cache=cache)
    assert torch.equal(out[0], out[1])
    assert torch.equal(out[:, :, :CW], x[:, :, :CW])
    assert cache.chunks() == [5, 6]  # nearly-clean trims the newest chunk from pass 2's write
    # pass 2 (null captions, dropout True) produced the cached K|V
    ref_cache = KVCache(2, torch.float32, "cpu")
    model(x[:1], t[:1], caps[3:], mask[3:], kv, [True], slice_point=5, chunk_width=CW, kv_cache=ref_cache,
          write_cache=True, skip_cache_write_chunks=1)
    assert torch.equal(cache.rows(1, 5), ref_cache.rows(1, 5))


def test_cfg1_nearly_clean_copies_first_denoising_chunk() -> None:
    model = tiny_model(distill=True)
    x, t, caps, mask = _dispatch_inputs(3)
    t[:, 0] = 0.9999
    kv = [[0, TPC], [0, 2 * TPC], [0, 3 * TPC]]
    cache = KVCache(2, torch.float32, "cpu")
    out = guided_velocity(model, x, t, caps, mask, kv, cfg_number=1, slice_point=0, chunk_width=CW,
                          extra_clean_chunk=True, nearly_clean=True, dt=8.0, kv_cache=cache, prev_chunks_scale=0.7)
    assert cache.chunks() == [0, 1, 2]  # the copy's rows are not written
    plain = model(x[:1], t[:1], caps[:3], mask[:3], kv, [False], chunk_width=CW, dt=8.0)
    copy = model(x[:1, :, CW : 2 * CW], t[:1, 1:2], caps[1:2], mask[1:2], [[0, TPC]], [False], chunk_width=CW, dt=8.0)
    assert_close_fp32(out[:1, :, :CW], plain[:, :, :CW], "clean slot holds the model output")
    assert_close_fp32(out[:1, :, 2 * CW :], plain[:, :, 2 * CW :], "other slots untouched")
    assert_close_fp32(out[:1, :, CW : 2 * CW], 0.7 * plain[:, :, CW : 2 * CW] + 0.3 * copy, "mixed slot")

    # without the flag the clean chunk's slot gets its input back
    out = guided_velocity(model, x, t, caps, mask, kv, cfg_number=1, slice_point=0, chunk_width=CW,
                          extra_clean_chunk=True, nearly_clean=False, dt=8.0, kv_cache=KVCache(2, torch.float32))
    assert torch.equal(out[:, :, :CW], x[:, :, :CW])
    assert_close_fp32(out[:1, :, CW:], plain[:, :, CW:], "plain cfg1")
