"""The Hopper/Ada fp8 GEMM path (torch._scaled_mm) against the CPU dequantizing path."""
from __future__ import annotations

import pytest
import torch

from magi_server.models.fp8 import FP8_DTYPE, Fp8PerTensorLinear


def test_scaled_mm_matches_cpu_path():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 GEMM needs SM 8.9+")
    torch.manual_seed(0)
    layer = Fp8PerTensorLinear(256, 512)
    layer.weight = (torch.randn(1, 512, 256) * 16).to(FP8_DTYPE)
    layer.weight_scale = torch.tensor([0.002])
    layer.input_scale = torch.full((256,), 0.05)
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    cpu = layer(x)
    gpu = layer.cuda()(x.cuda()).cpu()
    rel = (gpu.float() - cpu.float()).norm() / cpu.float().norm()
    assert rel < 1e-2
