"""Golden parity of special-token padding and the per-chunk caption tensors (special_tokens_padding.safetensors,
made with the real special_tokens.npz, PAD_HQ=1 and PAD_DURATION=1), plus the chunk-wise prompt and option rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from magi_server.models.text_encoder import (
    CaptionTokenOptions,
    SpecialTokens,
    build_chunk_captions,
    build_null_captions,
    pad_special_tokens,
)


@pytest.fixture(scope="module")
def padding(golden):
    from safetensors.torch import load_file

    return load_file(str(golden / "special_tokens_padding.safetensors"))


@pytest.fixture(scope="module")
def tokens(golden):
    return SpecialTokens.load(golden / "special_tokens.npz")


def test_load_rounds_to_float16(golden, tokens):
    with np.load(golden / "special_tokens.npz") as raw:
        assert tokens.other.dtype == torch.float16 and tokens.other.shape == (100, 4096)
        assert np.array_equal(tokens.hq.numpy(), raw["other_tokens"][1:2].astype(np.float16))
        assert np.array_equal(tokens.duration[0].numpy(), raw["other_tokens"][7:8].astype(np.float16))
        assert np.array_equal(tokens.duration[7].numpy(), raw["other_tokens"][14:15].astype(np.float16))
        assert np.array_equal(tokens.two_d_anime.numpy(), raw["other_tokens"][16:17].astype(np.float16))
        assert np.array_equal(tokens.caption.numpy(), raw["caption_token"].astype(np.float16))
    tiny = SpecialTokens.load(golden / "sampler_tiny_special_tokens.safetensors")
    assert tiny.width == 32 and tiny.other.dtype == torch.float16


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="special_tokens.npz"):
        SpecialTokens.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, caption_token=np.zeros((1, 4)))
    with pytest.raises(ValueError, match="other_tokens"):
        SpecialTokens.load(bad)


def test_pad3(padding, tokens):
    embs = padding["caption_embs"].repeat(1, 3, 1, 1)
    masks = padding["emb_masks"].unsqueeze(1).repeat(1, 3, 1)
    out, out_mask = pad_special_tokens(embs, masks, tokens, CaptionTokenOptions())
    assert torch.equal(out, padding["pad3.caption_embs"])
    assert out_mask.dtype == padding["pad3.emb_masks"].dtype
    assert torch.equal(out_mask, padding["pad3.emb_masks"])


def test_txt_and_null(padding, tokens):
    null_emb = padding["null_emb"]
    y, masks = build_chunk_captions(
        padding["caption_embs"], padding["emb_masks"], null_emb, num_chunks=3, num_clean_chunks=1, tokens=tokens
    )
    assert y.shape == (2, 3, 8, 4096) and masks.shape == (2, 3, 8)
    assert torch.equal(y[:1], padding["txt.caption_embs"])
    assert torch.equal(masks[:1], padding["txt.emb_masks"])
    assert torch.equal(masks[1:], padding["null.emb_masks"])
    assert torch.equal(y[1:], null_emb.repeat(1, 3, 1, 1))

    null, null_mask = build_null_captions(null_emb, 3, torch.zeros(1, 3, 8))
    assert torch.equal(null_mask, padding["null.emb_masks"])


def test_int_mask_becomes_float(padding, tokens):
    int_mask = padding["emb_masks"].to(torch.int64).unsqueeze(1)
    _, out_mask = pad_special_tokens(padding["caption_embs"], int_mask, tokens)
    assert out_mask.dtype == torch.float32
    no_tokens = CaptionTokenOptions(hq=False, duration=False)
    _, kept = pad_special_tokens(padding["caption_embs"], int_mask, tokens, no_tokens)
    assert kept.dtype == torch.int64


def test_token_order_and_truncation(tokens):
    d = tokens.width
    embs = torch.arange(800, dtype=torch.float32).reshape(1, 1, 800, 1).expand(1, 2, 800, d).clone()
    masks = torch.ones(1, 2, 800, dtype=torch.int64)
    options = CaptionTokenOptions(static=True, dynamic=True, borderness=True, hq=True, three_d_model=True,
                                  two_d_anime=True, duration=True)
    out, out_mask = pad_special_tokens(embs, masks, tokens, options)
    assert out.shape == (1, 2, 800, d) and out_mask.shape == (1, 2, 800)
    expected_front = [tokens.two_d_anime, tokens.three_d_model, tokens.hq, tokens.borderness,
                      tokens.dynamic_first_frames, tokens.static_first_frames]
    for chunk, duration in ((0, tokens.duration[1]), (1, tokens.duration[0])):
        assert torch.equal(out[0, chunk, 0], duration[0].float())
        for k, token in enumerate(expected_front, start=1):
            assert torch.equal(out[0, chunk, k], token[0].float())
        assert torch.equal(out[0, chunk, 7:], embs[0, chunk, :793])


def test_duration_saturates_at_eight(tokens):
    embs = torch.zeros(1, 10, 4, tokens.width)
    out, _ = pad_special_tokens(embs, torch.ones(1, 10, 4), tokens, CaptionTokenOptions(hq=False))
    expected = [7, 7, 7, 6, 5, 4, 3, 2, 1, 0]  # chunk i has 9 - i chunks after it, saturating at DURATION_8
    for i, k in enumerate(expected):
        assert torch.equal(out[0, i, 0], tokens.duration[k][0].float()), i


def test_negative_special_tokens(tokens):
    null = torch.randn(800, tokens.width)
    options = CaptionTokenOptions(negative_special_tokens=True)
    out, mask = build_null_captions(null, 2, torch.zeros(1, 2, 800), tokens, options)
    for k, token in enumerate([tokens.borderness, tokens.trans, tokens.logo, tokens.caption]):
        assert torch.equal(out[0, 1, k], token[0].float())
    assert torch.equal(out[0, 0, 4:], null[:796])
    assert mask.sum().item() == 100


def test_empty_prompt_gives_null_rows(padding, tokens):
    null_emb = padding["null_emb"]
    empty = torch.zeros_like(padding["emb_masks"])
    y, masks = build_chunk_captions(padding["caption_embs"], empty, null_emb, 3, 1, tokens)
    assert torch.equal(y[0], y[1]) and torch.equal(masks[0], masks[1])
    assert masks[0].sum(-1).tolist() == [8.0, 8.0, 8.0]  # L' = 8 <= 50: every position valid


def test_chunk_wise_prompts(padding, tokens):
    null_emb = padding["null_emb"]
    a, b = padding["caption_embs"], padding["caption_embs"] + 1
    mask = padding["emb_masks"]
    y, masks = build_chunk_captions([a, b, a], [mask, mask, mask], null_emb, 4, 1, tokens)
    single, single_masks = build_chunk_captions(a, mask, null_emb, 4, 1, tokens)
    assert torch.equal(masks, single_masks)
    assert torch.equal(y[:, [0, 1, 3]], single[:, [0, 1, 3]])
    assert torch.equal(y[0, 2, 2:], b[0, 0]) and torch.equal(y[0, 2, :2], single[0, 2, :2])

    # an empty prompt for one chunk gives that chunk the null caption only
    y2, masks2 = build_chunk_captions([a, b, a], [mask, torch.zeros_like(mask), mask], null_emb, 4, 1, tokens)
    assert torch.equal(y2[0, 2], y2[1, 2]) and torch.equal(masks2[0, 2], masks2[1, 2])
    assert torch.equal(y2[0, 3], y[0, 3]) and masks2[0, 0].sum() == 0

    with pytest.raises(ValueError, match="one embedding"):
        build_chunk_captions([a, b], [mask, mask], null_emb, 4, 1, tokens)


def test_length_mismatch_is_explained(padding, tokens):
    with pytest.raises(ValueError, match="null caption"):
        build_chunk_captions(padding["caption_embs"], padding["emb_masks"], torch.zeros(800, 4096), 3, 0, tokens)
