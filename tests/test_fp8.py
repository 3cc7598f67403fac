"""fp8 linears: which GEMM runs where (any token count through _scaled_mm on sm_89+ and on meta), and the bits
of the activation quantization and of the CPU fallback against the reference's literal formula (spec §7)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from magi_server.models import fp8
from magi_server.models.fp8 import FP8_DTYPE, Fp8PerTensorLinear, Fp8SmoothedLinear, fp8_gemm_path

# 720x720 video: 90x90 latent, 45x45 patches per frame, 6 frames per chunk -> 12,150 tokens, 12150 % 16 == 6.
TOKENS_720 = 12_150
TOKENS_624 = 39 * 39 * 6  # 9,126: 624x624, 9126 % 16 == 6
HIDDEN_4_5B, FFN_4_5B = 3072, 12288


def literal_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference's div_clamp_to as four unfused steps."""
    return torch.clamp(x.float() / scale, -448, 448).to(torch.bfloat16).to(FP8_DTYPE)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == FP8_DTYPE and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


class RecordScaledMm(TorchDispatchMode):
    """Records every aten._scaled_mm call (the real kernel still runs, its meta kernel included), as the planner's
    op accounting sees it. A dispatch mode rather than a wrapper patched over torch._scaled_mm: dynamo builds its
    table of torch functions on first use, and a patched builtin in that table breaks later compiled tests."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._scaled_mm.default:
            a, b, scale_a, scale_b = args[:4]
            self.calls.append(
                {
                    "a": (tuple(a.shape), a.dtype),
                    "b": (tuple(b.shape), b.stride(), b.dtype),
                    "scale_a": scale_a,
                    "scale_b": scale_b,
                    "out_dtype": kwargs.get("out_dtype", args[6] if len(args) > 6 else None),
                    "use_fast_accum": kwargs.get("use_fast_accum", args[7] if len(args) > 7 else False),
                }
            )
        return func(*args, **kwargs)


@pytest.fixture
def scaled_mm_calls():
    with RecordScaledMm() as recorder:
        yield recorder.calls


def mock_capability(monkeypatch, capability):
    monkeypatch.setattr(fp8, "device_capability", lambda device: capability)


def mock_cuda_properties(monkeypatch, capability):
    """What device_capability reads for a CUDA device, on a machine without one."""
    major, minor = capability
    monkeypatch.setattr(torch.version, "hip", None)
    properties = SimpleNamespace(major=major, minor=minor)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)


# --- which path ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "capability, expected",
    [((9, 0), "scaled_mm"), ((8, 9), "scaled_mm"), ((10, 0), "scaled_mm"), ((8, 6), "fallback"), ((8, 0), "fallback")],
)
def test_gemm_path_follows_cuda_capability(monkeypatch, capability, expected):
    mock_cuda_properties(monkeypatch, capability)
    cuda = torch.device("cuda", 0)
    assert fp8_gemm_path(cuda, TOKENS_720, HIDDEN_4_5B, FFN_4_5B) == expected
    # the token count never matters: neither _scaled_mm nor its meta kernel checks M
    assert fp8_gemm_path(cuda, TOKENS_624, HIDDEN_4_5B, 1024) == expected


def test_gemm_path_needs_in_and_out_multiples_of_16(monkeypatch):
    mock_cuda_properties(monkeypatch, (9, 0))
    cuda = torch.device("cuda")
    assert fp8_gemm_path(cuda, 17, 48, 32) == "scaled_mm"
    assert fp8_gemm_path(cuda, 17, 40, 32) == "fallback"  # K
    assert fp8_gemm_path(cuda, 17, 48, 24) == "fallback"  # N
    assert fp8_gemm_path(cuda, 0, 48, 32) == "fallback"


def test_gemm_path_off_cuda(monkeypatch):
    def no_gpu(device=None):
        raise AssertionError("asked a GPU's capability")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_gpu)
    monkeypatch.setattr(torch.cuda, "get_device_properties", no_gpu)
    assert fp8_gemm_path(torch.device("cpu"), TOKENS_720, HIDDEN_4_5B, FFN_4_5B) == "fallback"
    # the planner's meta device is modelled as an H100
    assert fp8_gemm_path(torch.device("meta"), TOKENS_720, HIDDEN_4_5B, FFN_4_5B) == "scaled_mm"
    # ROCm reports a capability too, but its fp8 GEMM wants fnuz weights
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert fp8_gemm_path(torch.device("cuda"), TOKENS_720, HIDDEN_4_5B, FFN_4_5B) == "fallback"


def test_torch_scaled_mm_meta_kernel_accepts_any_token_count():
    """The torch facts the path choice rests on, checked against this torch's meta kernel."""
    one = torch.ones((), device="meta")
    a = torch.empty(TOKENS_720, 64, dtype=FP8_DTYPE, device="meta")
    w = torch.empty(32, 64, dtype=FP8_DTYPE, device="meta")
    out = torch._scaled_mm(a, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)
    assert out.shape == (TOKENS_720, 32) and out.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="divisible by 16"):
        torch._scaled_mm(a[:, :40].contiguous(), w[:, :40].t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="divisible by 16"):
        torch._scaled_mm(a, w[:24].t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "cls, in_features, out_features",
    [(Fp8PerTensorLinear, HIDDEN_4_5B, FFN_4_5B), (Fp8SmoothedLinear, FFN_4_5B, HIDDEN_4_5B)],
)
def test_720p_chunk_takes_scaled_mm_on_sm90(monkeypatch, scaled_mm_calls, cls, in_features, out_features):
    mock_capability(monkeypatch, (9, 0))
    layer = cls(in_features, out_features, device="meta")
    x = torch.empty(1, TOKENS_720, in_features, dtype=torch.bfloat16, device="meta")
    y = layer(x)
    assert y.shape == (1, TOKENS_720, out_features) and y.dtype == torch.bfloat16 and y.device.type == "meta"
    assert len(scaled_mm_calls) == 1
    call = scaled_mm_calls[0]
    assert call["a"] == ((TOKENS_720, in_features), FP8_DTYPE)
    # the weight goes in column-major, unpadded, and the scales are fp32 scalars (tensorwise scaling)
    assert call["b"] == ((in_features, out_features), (1, in_features), FP8_DTYPE)
    assert call["scale_a"].shape == () and call["scale_a"].dtype == torch.float32
    assert call["scale_b"].shape == () and call["scale_b"].dtype == torch.float32
    assert call["out_dtype"] == torch.bfloat16
    assert call["use_fast_accum"]  # as the reference's cuBLASLt GEMM


@pytest.mark.parametrize("cls", [Fp8PerTensorLinear, Fp8SmoothedLinear])
def test_pre_ada_gpu_falls_back(monkeypatch, scaled_mm_calls, cls):
    mock_capability(monkeypatch, (8, 0))
    layer = cls(HIDDEN_4_5B, 1024, device="meta")
    y = layer(torch.empty(TOKENS_720, HIDDEN_4_5B, dtype=torch.bfloat16, device="meta"))
    assert y.shape == (TOKENS_720, 1024) and y.dtype == torch.bfloat16
    assert scaled_mm_calls == []


def test_cpu_and_meta_never_compile(monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile called off CUDA")

    monkeypatch.setattr(torch, "compile", no_compile)
    fp8._compiled_quantizer.cache_clear()
    layer = Fp8PerTensorLinear(32, 16)
    layer.weight = torch.ones(1, 16, 32).to(FP8_DTYPE)
    layer.weight_scale = torch.tensor([1.0])
    layer.input_scale = torch.ones(32)
    assert layer(torch.ones(3, 32, dtype=torch.bfloat16)).shape == (3, 16)
    Fp8SmoothedLinear(32, 16, device="meta")(torch.empty(3, 32, dtype=torch.bfloat16, device="meta"))


def test_import_touches_no_cuda():
    script = (
        "import torch\n"
        "def boom(*a, **k): raise AssertionError('CUDA or compile at import')\n"
        "torch.cuda.get_device_capability = torch.cuda.get_device_properties = boom\n"
        "torch.cuda.is_available = torch.cuda.init = torch.compile = boom\n"
        "import magi_server.models.fp8\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[1])


def test_a_compiled_caller_traces_the_linears_whole_and_keeps_scaled_mm():
    """A compiled layer holding these linears (meta device, dynamo only): one graph without breaks for several
    token counts, with _scaled_mm in it and the quantization traced inline rather than a nested compile."""
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    layer = Fp8SmoothedLinear(FFN_4_5B, HIDDEN_4_5B, device="meta")
    compiled = torch.compile(layer, backend=record, fullgraph=True, dynamic=True)
    for tokens in (TOKENS_720, TOKENS_624, 4 * TOKENS_720):
        y = compiled(torch.empty(tokens, FFN_4_5B, dtype=torch.bfloat16, device="meta"))
        assert y.shape == (tokens, HIDDEN_4_5B) and y.dtype == torch.bfloat16
    assert len(graphs) == 1
    targets = {node.target for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert torch._scaled_mm in targets


# --- numerics -----------------------------------------------------------------------------------------------


def awkward_activations(rows: int, width: int, scale: torch.Tensor, seed: int) -> torch.Tensor:
    """bf16 activations spanning far past +-448 * scale, with zeros, -0, infinities and tiny values."""
    generator = torch.Generator().manual_seed(seed)
    magnitude = torch.exp2(torch.randint(-20, 12, (rows, width), generator=generator).float())
    x = torch.randn(rows, width, generator=generator) * magnitude * scale
    flat = x.view(-1)
    flat[:5] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-30])
    flat[5:9] = torch.tensor([448.0, -448.0, 449.0, 1e6]) * scale.reshape(-1)[5:9]
    return x.to(torch.bfloat16)


def quotients_on_the_rounding_edges(scale: torch.Tensor) -> torch.Tensor:
    """fp32 activations x whose x / scale lands within a few fp32 ulps of q = (e4m3 tie) + half a bf16 ulp:
    there fp32 -> bf16 -> e4m3 and a single rounding part ways, and a quotient 1 ulp off flips the result, so
    only an exactly rounded division and both roundings give the reference's bits."""
    mantissas = torch.tensor([1 + (2 * k + 1) / 16 for k in range(8)], dtype=torch.float64)
    exponents = torch.exp2(torch.arange(-8, 9, dtype=torch.float64))
    edges = (mantissas[:, None] * exponents[None, :]).reshape(-1)
    half_bf16_ulp = (exponents * 2.0**-8).repeat(len(mantissas))
    q = torch.cat([edges + half_bf16_ulp, edges - half_bf16_ulp, edges])
    x = (q[:, None] * scale.double()[None, :]).float()
    bits = x.view(torch.int32)
    return torch.cat([(bits + step).view(torch.float32) for step in (-2, -1, 0, 1, 2)])


@pytest.mark.parametrize("rows, slice_rows", [(37, 8), (1, 4), (64, 64), (100, 7)])
def test_sliced_quantization_equals_the_unfused_formula(rows, slice_rows):
    width = 48
    scale = torch.rand(width, generator=torch.Generator().manual_seed(rows)) * 0.1 + 1e-3
    for x in (awkward_activations(rows, width, scale, seed=rows), awkward_activations(rows, width, scale, 1).float()):
        before = x.clone()
        sliced = fp8.quantize_activation_sliced(x, scale, slice_bytes=slice_rows * width * 4)
        assert same_bits(sliced, literal_quantize(x, scale))
        assert torch.equal(x, before)  # the in-place slice work never writes into the caller's activations
        assert same_bits(fp8.quantize_activation(x, scale.reshape(1, -1)), literal_quantize(x, scale))
    edge = quotients_on_the_rounding_edges(scale)
    assert same_bits(fp8.quantize_activation_sliced(edge, scale, slice_bytes=slice_rows * width * 4),
                     literal_quantize(edge, scale))


def test_fusable_quantization_equals_the_unfused_formula():
    """The form compiled for CUDA (fp64 division, bf16 rounding on the bits), run eagerly: same bits."""
    width = 64
    scale = torch.rand(width, generator=torch.Generator().manual_seed(0)) * 0.1 + 1e-3
    x = awkward_activations(4096, width, scale, seed=0)
    assert same_bits(fp8.quantize_activation_fusable(x, scale), literal_quantize(x, scale))
    # fp32 inputs whose quotient sits exactly on a bf16 rounding tie (low 16 bits 0x8000), both parities of the
    # kept bit, just below a carry into the exponent, near +-448, and random bit patterns
    generator = torch.Generator().manual_seed(1)
    random_bits = torch.randint(0x2F000000, 0x44000000, (4096,), generator=generator, dtype=torch.int32)
    ties = (random_bits & -65536) | 0x8000
    near_carry = (random_bits & -0x800000) | 0x7FFFFF
    patterns = torch.cat([random_bits, ties, near_carry, ties + 1, ties - 1]).view(torch.float32)
    values = torch.cat([patterns, -patterns, torch.tensor([447.5, 447.9, 448.1, -447.9, 1e-40, -1e-40])])
    ones = torch.ones(1)
    assert same_bits(fp8.quantize_activation_fusable(values[:, None], ones), literal_quantize(values[:, None], ones))
    edge = quotients_on_the_rounding_edges(scale)
    assert same_bits(fp8.quantize_activation_fusable(edge, scale), literal_quantize(edge, scale))


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_compiled_quantizer_keeps_the_bits_and_one_graph():
    """The process-wide compiled quantizer (inductor's CPU backend here): same bits, no recompile per token count."""
    from torch._dynamo.utils import counters

    compiled = fp8._compiled_quantizer()
    assert fp8._compiled_quantizer() is compiled
    scale = torch.rand(96, generator=torch.Generator().manual_seed(2)) * 0.1 + 1e-3
    graphs_before = counters["stats"]["unique_graphs"]
    for rows in (TOKENS_720 // 90, 257, 1000):
        x = awkward_activations(rows, 96, scale, seed=rows)
        assert same_bits(compiled(x, scale), literal_quantize(x, scale))
    assert counters["stats"]["unique_graphs"] - graphs_before <= 1
    edge = quotients_on_the_rounding_edges(scale)  # fp32 activations: a graph of their own
    assert same_bits(compiled(edge, scale), literal_quantize(edge, scale))


def test_quantized_linears_match_an_fp64_emulation_on_cpu():
    """The CPU fallback against the literal formula evaluated in fp64, within bf16 output rounding."""
    generator = torch.Generator().manual_seed(3)
    in_features, out_features, rows = 96, 40, 23  # neither a multiple of 16 rows nor a _scaled_mm shape needed
    weight = (torch.randn(1, out_features, in_features, generator=generator) * 40).to(FP8_DTYPE)
    x = (torch.randn(2, rows, in_features, generator=generator) * 3).to(torch.bfloat16)

    per_tensor = Fp8PerTensorLinear(in_features, out_features)
    per_tensor.weight, per_tensor.weight_scale = weight, torch.tensor([0.003])
    per_tensor.input_scale = torch.rand(in_features, generator=generator) * 0.02 + 0.005  # only [0] scales y
    smoothed = Fp8SmoothedLinear(in_features, out_features)
    smoothed.weight, smoothed.weight_scale, smoothed.input_scale = weight, torch.tensor([0.002]), torch.tensor([0.4])
    smoothed.smooth_scale = torch.rand(1, in_features, generator=generator) * 0.02 + 0.005

    for layer, activation_scale in ((per_tensor, per_tensor.input_scale), (smoothed, smoothed.smooth_scale)):
        a = literal_quantize(x.reshape(-1, in_features), activation_scale).double()
        w = layer.weight[0].double()
        alpha, beta = layer.input_scale.reshape(-1)[0].double(), layer.weight_scale[0].double()
        exact = (a @ w.t()) * alpha * beta
        magnitude = (a.abs() @ w.abs().t()) * alpha * beta
        y = layer(x)
        assert y.dtype == torch.bfloat16 and y.shape == (2, rows, out_features)
        error = (y.reshape(-1, out_features).double() - exact).abs()
        # half a bf16 ulp of the result plus fp32 accumulation (in_features terms) and the fp32 scale product
        bound = 2.0**-8 * exact.abs() + in_features * 2.0**-23 * magnitude + 1e-30
        assert (error <= bound).all(), (error / bound).max()


# --- on a GPU (skipped on CPU machines) -----------------------------------------------------------------------

needs_fp8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs an sm_89+ GPU"
)


@needs_fp8_gpu
def test_gpu_compiled_quantization_has_the_eager_bits():
    scale = (torch.rand(HIDDEN_4_5B) * 0.1 + 1e-3).cuda()
    for rows in (TOKENS_720, 4 * TOKENS_720 + 7):
        x = awkward_activations(rows, HIDDEN_4_5B, scale.cpu(), seed=rows).cuda()
        assert same_bits(fp8.quantize_activation(x, scale), literal_quantize(x, scale))


@needs_fp8_gpu
def test_gpu_720p_chunk_through_scaled_mm():
    generator = torch.Generator().manual_seed(4)
    layer = Fp8PerTensorLinear(HIDDEN_4_5B, 1024)
    layer.weight = (torch.randn(1, 1024, HIDDEN_4_5B, generator=generator) * 16).to(FP8_DTYPE)
    layer.weight_scale = torch.tensor([0.002])
    layer.input_scale = torch.full((HIDDEN_4_5B,), 0.05)
    x = torch.randn(TOKENS_720, HIDDEN_4_5B, generator=generator).to(torch.bfloat16)
    cpu = layer(x)
    assert fp8_gemm_path(torch.device("cuda"), TOKENS_720, HIDDEN_4_5B, 1024) == "scaled_mm"
    gpu = layer.cuda()(x.cuda()).cpu()
    assert ((gpu.float() - cpu.float()).norm() / cpu.float().norm()) < 1e-2
