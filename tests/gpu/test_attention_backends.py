"""Each attention backend against an fp32 reference on the GPU, in bf16; SDPA's kernel choice for the DiT's shapes."""
from __future__ import annotations

import pytest
import torch

from magi_server.models.attention import available_backends, range_attention, sdpa_choice, select_backend

RANGES_Q = [(0, 96), (96, 192), (192, 288)]
RANGES_K = [(0, 96), (0, 192), (96, 288)]  # block-causal, chunk 2 cannot see chunk 0


@pytest.mark.parametrize("backend", ["sdpa", "flash_attn", "xformers"])
def test_backend_matches_fp32_reference(backend):
    device = torch.device("cuda")
    if backend not in available_backends(device, torch.bfloat16):
        pytest.skip(f"{backend} is not installed")
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(288, 8, 128, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(288, 2, 128, device=device, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(288, 2, 128, device=device, dtype=torch.bfloat16, generator=gen)
    ref = range_attention(q.float(), k.float(), v.float(), RANGES_Q, RANGES_K, backend="sdpa")
    out = range_attention(q, k, v, RANGES_Q, RANGES_K, backend=backend)
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 1e-2, f"{backend}: relative L2 {rel:.2e}"


def test_auto_prefers_a_fast_kernel_on_gpu():
    choice = select_backend("cuda", torch.bfloat16)
    assert choice in available_backends("cuda", torch.bfloat16)
    if torch.cuda.get_device_capability() >= (9, 0):
        assert choice == "sdpa"  # cuDNN attention through SDPA on Hopper and later


@pytest.mark.parametrize("heads", [(48, 8), (24, 8), (16, 16)])
def test_sdpa_never_takes_the_math_kernel(heads):
    """The DiT's self-attention (GQA) and the VAE's (MHA) shapes run a fused kernel, cuDNN first where it accepts."""
    hq, hk = heads
    q = torch.randn(1024, hq, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2048, hk, 128, device="cuda", dtype=torch.bfloat16)
    choice = sdpa_choice(q, k, k)
    assert choice in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"), choice
