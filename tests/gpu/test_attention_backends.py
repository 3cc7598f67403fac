"""Each fast attention backend against the SDPA default, on the GPU, in bf16."""
from __future__ import annotations

import pytest
import torch

from magi_server.models.attention import available_backends, range_attention, select_backend

RANGES_Q = [(0, 96), (96, 192), (192, 288)]
RANGES_K = [(0, 96), (0, 192), (96, 288)]  # block-causal, chunk 2 cannot see chunk 0


@pytest.mark.parametrize("backend", ["flash_attn", "xformers", "flex"])
def test_backend_matches_sdpa(backend):
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
