"""The attention dispatcher on the CPU: ranges, the CUDA SDPA policy (checked with CPU tensors), backend selection
by what actually runs, and the meta-device path the planner's accounting relies on."""
from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from magi_server.models import attention
from magi_server.models.attention import BACKENDS, available_backends, range_attention, select_backend
from tests.golden_utils import REPO_ROOT

Q_RANGES = [(0, 24), (24, 48), (48, 72), (72, 80)]
K_RANGES = [(0, 24), (0, 48), (24, 72), (5, 5)]  # block-causal; the last block has no keys -> zeros


def _qkv(dtype=torch.float32, hq=6, hk=2, d=16, sq=80, sk=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, h, d, generator=g).to(dtype) for s, h in ((sq, hq), (sk, hk), (sk, hk)))


def _reference(q, k, v, q_ranges, k_ranges):
    """Plain softmax(q k^T / sqrt(d)) v per range in float64, kv head h // groups for query head h."""
    q, k, v = (t.double() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = torch.zeros_like(q)
    for (qs, qe), (ks, ke) in zip(q_ranges, k_ranges):
        if qe > qs and ke > ks:
            scores = torch.einsum("qhd,khd->hqk", q[qs:qe], k[ks:ke]) * q.shape[-1] ** -0.5
            out[qs:qe] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[ks:ke])
    return out


def test_ranges_with_gqa_and_empty_blocks():
    q, k, v = _qkv()
    out = range_attention(q, k, v, Q_RANGES, K_RANGES)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out.double() - _reference(q, k, v, Q_RANGES, K_RANGES)).abs().max() < 1e-5
    assert out[72:].abs().max() == 0


def test_flex_is_gone_and_unknown_backends_are_rejected():
    assert BACKENDS == ("sdpa", "flash_attn", "xformers")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend"):
        range_attention(q, k, v, Q_RANGES, K_RANGES, backend="flex")
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_backend("cpu", torch.float32, "flex")


# ------------------------------------------------------------------------------------------- the CUDA SDPA policy
class _Recorder:
    """Stands in for sdpa_kernel and F.scaled_dot_product_attention; records what the CUDA path asks for."""

    def __init__(self, fail_first: int = 0):
        self.contexts, self.calls, self.fail_first = [], [], fail_first
        self.real = F.scaled_dot_product_attention

    @contextlib.contextmanager
    def sdpa_kernel(self, backends, set_priority=False):
        self.contexts.append((list(backends), set_priority))
        yield

    def sdpa(self, q, k, v, **kwargs):
        self.calls.append({"k_heads": k.shape[1], **kwargs})
        if len(self.calls) <= self.fail_first:
            raise RuntimeError("No available kernel. Aborting execution.")
        return self.real(q, k, v, **kwargs)


def _patched(monkeypatch, fail_first=0):
    rec = _Recorder(fail_first)
    monkeypatch.setattr(attention, "sdpa_kernel", rec.sdpa_kernel)
    monkeypatch.setattr(F, "scaled_dot_product_attention", rec.sdpa)
    return rec


def _as4(*tensors):
    return tuple(t.transpose(0, 1)[None] for t in tensors)


def test_cuda_path_sets_the_fused_priority_and_uses_gqa(monkeypatch):
    q, k, v = _qkv(torch.bfloat16)
    rec = _patched(monkeypatch)
    out = attention._sdpa_cuda(*_as4(q[:24], k[:48], v[:48]), 0.25)
    priority = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    assert rec.contexts == [(priority, attention.SDPA_SET_PRIORITY)]
    assert SDPBackend.MATH not in rec.contexts[0][0]
    if attention.SDPA_ENABLE_GQA:  # torch >= 2.5: no k/v copy
        assert rec.calls == [{"k_heads": 2, "scale": 0.25, "enable_gqa": True}]
    ref = _reference(q[:24].float(), k[:48].float(), v[:48].float(), [(0, 24)], [(0, 48)])  # scale 0.25 = d^-1/2
    assert (out[0].transpose(0, 1).double() - ref).abs().max() < 3e-2


def test_cuda_path_without_set_priority_or_enable_gqa(monkeypatch):
    """An older torch: the fused kernels alone are enabled (PyTorch's order) and GQA expands k/v."""
    q, k, v = _qkv(torch.bfloat16)
    rec = _patched(monkeypatch)
    monkeypatch.setattr(attention, "SDPA_SET_PRIORITY", False)
    monkeypatch.setattr(attention, "SDPA_ENABLE_GQA", False)
    attention._sdpa_cuda(*_as4(q[:24], k[:48], v[:48]), 0.25)
    assert rec.contexts == [(list(attention.CUDA_SDPA_PRIORITY), False)]
    assert rec.calls == [{"k_heads": 6, "scale": 0.25}]


def test_cuda_path_fp32_expands_kv(monkeypatch):
    q, k, v = _qkv(torch.float32)
    rec = _patched(monkeypatch)
    attention._sdpa_cuda(*_as4(q[:24], k[:48], v[:48]), 0.25)
    assert rec.calls == [{"k_heads": 6, "scale": 0.25}]


def test_cuda_path_falls_back_when_no_fused_kernel_fits(monkeypatch):
    q, k, v = _qkv(torch.bfloat16)
    rec = _patched(monkeypatch, fail_first=1)
    attention._sdpa_cuda(*_as4(q[:24], k[:48], v[:48]), 0.25)
    if attention.SDPA_ENABLE_GQA:  # enable_gqa refused -> expanded k/v, still fused only
        assert [c["k_heads"] for c in rec.calls] == [2, 6] and len(rec.contexts) == 2
    fused_tries = 2 if attention.SDPA_ENABLE_GQA else 1
    rec = _patched(monkeypatch, fail_first=fused_tries)
    with pytest.warns(RuntimeWarning, match="no fused SDPA kernel"):
        out = attention._sdpa_cuda(*_as4(q[:24], k[:48], v[:48]), 0.25)
    assert out.shape == (1, 6, 24, 16)
    assert len(rec.calls) == fused_tries + 1 and len(rec.contexts) == fused_tries  # the last one unrestricted


def test_cuda_path_traces_without_graph_breaks():
    """The layer compile (torch.compile) must see the priority context and SDPA as one graph."""
    q, k, v = _qkv(torch.bfloat16)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(attention._sdpa_cuda)(*_as4(q[:24], k[:48], v[:48]), 0.25)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


# ------------------------------------------------------------------------------------------- backend selection
def test_auto_picks_by_what_runs(monkeypatch):
    assert select_backend("cpu", torch.bfloat16) == "sdpa"
    assert available_backends("cpu", torch.bfloat16) == ["sdpa"]
    runs = {"flash_attn": True, "xformers": False}
    monkeypatch.setattr(attention, "_kernel_runs", lambda name, device, dtype: runs[name])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert available_backends("cuda", torch.bfloat16) == ["sdpa", "flash_attn"]
    assert available_backends("cuda", torch.float32) == ["sdpa"]
    assert select_backend("cuda", torch.bfloat16) == "flash_attn"
    assert select_backend("cuda", torch.float32) == "sdpa"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert select_backend("cuda", torch.bfloat16) == "sdpa"  # Hopper: SDPA's cuDNN attention
    runs["flash_attn"] = False
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert select_backend("cuda", torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="cannot run"):
        select_backend("cuda", torch.bfloat16, "xformers")


def test_kernel_probe_needs_a_working_import_not_just_a_package(monkeypatch, tmp_path):
    broken = tmp_path / "broken" / "flash_attn"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('flash_attn_2_cuda: undefined symbol')\n")
    working = tmp_path / "working" / "flash_attn"
    working.mkdir(parents=True)
    (working / "__init__.py").write_text(
        "import torch\n"
        "def flash_attn_func(q, k, v, softmax_scale=None, causal=False):\n"
        "    g = q.shape[2] // k.shape[2]\n"
        "    k, v = (t.repeat_interleave(g, dim=2).transpose(1, 2) for t in (k, v))\n"
        "    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, scale=softmax_scale)\n"
        "    return out.transpose(1, 2)\n"
    )
    cpu = torch.device("cpu")
    for folder, expected in ((broken.parent, False), (working.parent, True)):
        monkeypatch.syspath_prepend(str(folder))
        monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
        assert attention._kernel_runs("flash_attn", cpu, torch.bfloat16) is expected
        monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
        sys.path.remove(str(folder))


# ------------------------------------------------------------------------------------------- the meta device
class _OpLog(TorchDispatchMode):
    def __init__(self, redirect=None):
        super().__init__()
        self.ops, self.redirect = [], redirect

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        if self.redirect is not None and func is torch.ops.aten._scaled_dot_product_efficient_attention.default:
            return self.redirect(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_path_is_one_fused_op_per_range(backend):
    hq, hk, d = 48, 8, 128
    sq, sk = 4 * 300, 5 * 300
    q = torch.empty(sq, hq, d, device="meta", dtype=torch.bfloat16)
    k = torch.empty(sk, hk, d, device="meta", dtype=torch.bfloat16)
    q_ranges = [(i * 300, (i + 1) * 300) for i in range(4)]
    k_ranges = [(0, (i + 2) * 300) for i in range(4)]
    with _OpLog() as log, FlopCounterMode(display=False) as flops:
        out = range_attention(q, k, k, q_ranges, k_ranges, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device.type == "meta"
    assert log.ops.count("_scaled_dot_product_efficient_attention") == 4
    for materializing in ("bmm", "mm", "_softmax", "_safe_softmax", "clone", "repeat_interleave", "index_select"):
        assert materializing not in log.ops, log.ops
    assert flops.get_total_flops() == sum(4 * hq * (qe - qs) * (ke - ks) * d
                                          for (qs, qe), (ks, ke) in zip(q_ranges, k_ranges))


def test_meta_path_layout_matches_the_reference_on_real_tensors():
    """The view-only GQA layout of the meta path, run on CPU tensors with the fused op swapped for plain SDPA."""
    q, k, v = _qkv(torch.float32)

    def efficient_on_cpu(q4, k4, v4, bias, lse, *rest, scale=None):
        return F.scaled_dot_product_attention(q4, k4, v4, scale=scale), None, None, None

    out = torch.zeros_like(q)
    with _OpLog(redirect=efficient_on_cpu) as log:
        for (qs, qe), (ks, ke) in zip(Q_RANGES, K_RANGES):
            if qe > qs and ke > ks:
                attention._meta_attention(q[qs:qe], k[ks:ke], v[ks:ke], 0.25, out[qs:qe])
    assert log.ops.count("_scaled_dot_product_efficient_attention") == 3
    assert (out.double() - _reference(q, k, v, Q_RANGES, K_RANGES)).abs().max() < 1e-5


def test_importing_attention_never_touches_cuda():
    code = ("import torch, magi_server.models.attention as a; "
            "assert isinstance(a.SDPA_ENABLE_GQA, bool) and isinstance(a.SDPA_SET_PRIORITY, bool); "
            "assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
