"""Tolerance checks of the golden README, shared by the parity tests."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from magi_server.runtime.guidance import GuidanceScales, guided_velocity_batch

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO_ROOT.parent / "shared" / "golden"


def load_golden(name: str) -> dict:
    """All tensors of one golden safetensors file (name without the folder)."""
    from safetensors.torch import load_file

    return load_file(str(GOLDEN_DIR / name))


# The golden README's bounds that hold on any x86-64 CPU (§ Tolerances): the reference itself, re-run on another CPU
# type, drifts from its own stored files by up to 4.2e-5 (DiT), 6.9e-5 (sampler) and 4.5e-4 (vae_fp32). Nothing
# tighter may be asserted against these files; bit-exactness is a same-machine property (same seed -> same bytes).
FP32_REL = 3e-4  # DiT forward, KV cache, dispatcher and sampler fixtures
VAE_FP32_REL = 2e-3  # vae_fp32: its bf16-rounded attention turns last-bit differences into 2-4e-4


def assert_close_fp32(actual, expected, name: str = "tensor", rel: float = FP32_REL) -> None:
    """The golden README's float32 bound: max|a-b| <= rel * max(1, max|ref|)."""
    import torch

    actual = actual.detach().to(torch.float32).cpu()
    expected = expected.detach().to(torch.float32).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bound = rel * max(1.0, expected.abs().max().item())
    diff = (actual - expected).abs().max().item()
    assert diff <= bound, f"{name}: max|diff| {diff:.3e} > {bound:.3e}"


def assert_close_bf16(actual, expected, name: str = "tensor") -> None:
    """The golden README's bf16 bound: rms(d)/rms(ref) <= 2e-2 and max|d| <= 5e-2 * max|ref|."""
    import torch

    actual = actual.detach().to(torch.float32).cpu()
    expected = expected.detach().to(torch.float32).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    d = actual - expected
    rms_ratio = d.pow(2).mean().sqrt().item() / max(expected.pow(2).mean().sqrt().item(), 1e-12)
    max_ratio = d.abs().max().item() / max(expected.abs().max().item(), 1e-12)
    assert rms_ratio <= 2e-2, f"{name}: rms ratio {rms_ratio:.3e} > 2e-2"
    assert max_ratio <= 5e-2, f"{name}: max ratio {max_ratio:.3e} > 5e-2"


def guided_velocity(
    model,
    x: torch.Tensor,
    t: torch.Tensor,
    captions: torch.Tensor,
    caption_mask: torch.Tensor,
    kv_range,
    *,
    cfg_number: int,
    slice_point: int,
    chunk_width: int,
    extra_clean_chunk: bool,
    nearly_clean: bool,
    dt: float | None = None,
    kv_cache=None,
    cfg_t_range: Sequence[float] | None = None,
    prev_chunk_scales: Sequence[float] | None = None,
    text_scales: Sequence[float] | None = None,
    prev_chunks_scale: float = 0.7,
    max_cache_write_chunks: int | None = None,
) -> torch.Tensor:
    """Guided velocity of one request's call in the reference dispatcher's layout (what the golden fixtures hold),
    computed by the product's :func:`guided_velocity_batch`.

    x: (2, C, T, H, W) (both rows the same canvas slice; row 0 is used); t: (2, chunks); captions: (2·chunks, L,
    C_txt) rows [conditional chunks..., null chunks...] (a singleton dim 1 is accepted); caption_mask likewise
    (2·chunks, L); kv_range: (chunks, 2) absolute token ranges. Returns (2, C, T, H, W) with both rows equal.
    """
    defaults = GuidanceScales.defaults()
    scales = GuidanceScales(
        defaults.cfg_t_range if cfg_t_range is None else tuple(cfg_t_range),
        defaults.prev_chunk_scales if prev_chunk_scales is None else tuple(prev_chunk_scales),
        defaults.text_scales if text_scales is None else tuple(text_scales),
        float(prev_chunks_scale),
    )
    t = torch.as_tensor(t, dtype=torch.float32)
    chunks = t.shape[1]
    captions = torch.as_tensor(captions)
    if captions.dim() == 4:
        captions = captions.squeeze(1)
    caption_mask = torch.as_tensor(caption_mask).reshape(captions.shape[0], -1)
    if captions.shape[0] != 2 * chunks or caption_mask.shape[0] != 2 * chunks:
        raise ValueError(f"captions and caption_mask must have 2·chunks = {2 * chunks} rows [cond..., null...]")
    out = guided_velocity_batch(
        model, x[0:1], t[0:1], captions[:chunks], caption_mask[:chunks], captions[chunks:], caption_mask[chunks:],
        kv_range, cfg_number=cfg_number, slice_point=slice_point, chunk_width=chunk_width,
        extra_clean_chunk=extra_clean_chunk, nearly_clean=nearly_clean, dt=dt,
        kv_caches=None if kv_cache is None else [kv_cache], scales=scales,
        max_cache_write_chunks=max_cache_write_chunks,
    )
    return torch.cat([out, out], dim=0)
