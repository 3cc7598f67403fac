"""The DiT's fp32-output GEMMs on bf16 operands (linear_fp32) and where requests keep their KV cache."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from magi_server.models.config import preset
from magi_server.models import dit as dit_module
from magi_server.models.dit import linear_fp32, split_bf16_exact
from magi_server.runtime.model_runner import ModelRunner


@pytest.fixture
def tensor_core_path(monkeypatch):
    """Take the CUDA path on the CPU: same products (bf16 x bf16 is exact in fp32), fp32 accumulation."""
    monkeypatch.setattr(dit_module, "fp32_out_gemm_available", lambda device: True)


def test_split_bf16_is_exact():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen) * torch.logspace(-20, 20, 4096)
    hi, mid, lo = split_bf16_exact(x)
    assert hi.dtype == mid.dtype == lo.dtype == torch.bfloat16
    assert torch.equal(hi.float() + mid.float() + lo.float(), x)


def test_bf16_operands_keep_fp32_products(tensor_core_path):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 512, generator=gen).to(torch.bfloat16)
    w = torch.randn(96, 512, generator=gen).to(torch.bfloat16)
    exact = x.double() @ w.double().t()
    out = linear_fp32(x, w)
    assert out.dtype == torch.float32
    scale = exact.abs().max().item()
    assert (out.double() - exact).abs().max().item() <= 1e-6 * scale
    # a bf16 output (what a plain bf16 GEMM gives) is three orders of magnitude further off: the reason for fp32 out
    assert (torch.nn.functional.linear(x, w).double() - exact).abs().max().item() > 1e-4 * scale


def test_fp32_input_with_bf16_valued_weight_matches_fp32_gemm(tensor_core_path):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, 256, generator=gen)
    w = torch.randn(128, 256, generator=gen).to(torch.bfloat16).float()  # a promoted bf16 checkpoint weight
    b = torch.randn(128, generator=gen)
    exact = x.double() @ w.double().t() + b.double()
    out = linear_fp32(x, w, b, weight_bf16_exact=True)
    assert out.shape == (3, 40, 128)
    assert (out.double() - exact).abs().max().item() <= 1e-6 * exact.abs().max().item()


def test_kv_cache_lives_on_the_cpu_when_offloaded():
    config = preset("4.5B-distill")
    assert config.kv_offload  # the reference configs' setting
    on_gpu = ModelRunner(None, None, None, None, config, device="cuda")
    assert on_gpu.kv_cache_device == torch.device("cpu")
    kept = ModelRunner(None, None, None, None, dataclasses.replace(config, kv_offload=False), device="cuda")
    assert kept.kv_cache_device == torch.device("cuda")
    assert ModelRunner(None, None, None, None, config, device="cpu").kv_cache_device == torch.device("cpu")
