"""fp8 (e4m3) linears of the quantized MAGI-1 checkpoints, and the transform that installs them in a DiT.

Quantization is a transform applied to a plain model (gpt-fast style): the DiT is built as usual, then
:func:`install_fp8_linears` swaps the big linears of layers 1..L-2 for the modules below, whose state-dict
names match ``inference_weight.fp8*`` (spec §7): ``weight`` (1, out, in) float8_e4m3fn, ``weight_scale`` (1),
``input_scale`` (in) or (1), and for the smoothed class ``smooth_scale`` (1, in).

The math is the reference's literal formula: a = e4m3(bf16(clamp(fp32(x) / s, -448, 448))) with s = input_scale
(per-tensor class) or smooth_scale (smoothed class); y = (a @ W^T) * input_scale[0] * weight_scale[0], output
bf16. This file owns both halves and the choice of kernels for them:

* activation quantization: one compiled kernel on CUDA GPUs with fp8 support (:func:`quantize_activation`),
  eager row slices elsewhere; both give the literal formula's bits.
* the GEMM: ``torch._scaled_mm`` wherever :func:`fp8_gemm_path` says the device and shapes allow it (any token
  count), else the fp8 values widened to fp32 and multiplied exactly (fp8 -> fp32 is exact; only the accumulation
  order differs from cuBLASLt). On the meta device the choice is made as for an H100, so the memory/FLOP planner
  sees the same ops a Hopper GPU runs.
"""
from __future__ import annotations

import functools
from typing import Callable, Literal

import torch
from torch import nn
from torch.utils._triton import has_triton

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0

# Which linears of a quantized layer use which class (spec §7).
PER_TENSOR_LINEARS = (
    "self_attention.linear_qkv.q",
    "self_attention.linear_qkv.qx",
    "self_attention.linear_qkv.k",
    "self_attention.linear_qkv.v",
    "mlp.linear_fc1",
)
SMOOTHED_LINEARS = ("self_attention.linear_proj", "mlp.linear_fc2")

# torch._scaled_mm runs on CUDA compute capability 8.9 (Ada) and 9.0+ (Hopper, Blackwell): aten's
# scaled_mm_arch_allowed() is `major >= 9 || (major == 8 && minor == 9)`, which is this tuple comparison.
SCALED_MM_MIN_CAPABILITY = (8, 9)
# The planner runs the models on meta tensors as if on an H100, so meta gets the H100's capability.
META_DEVICE_CAPABILITY = (9, 0)
# _scaled_mm checks (aten _scaled_mm_out_cuda and its meta kernel, torch 2.5 to 2.13): mat1 (M, K) row-major,
# mat2 (K, N) column-major, K % 16 == 0 and N % 16 == 0. M, the token count, is free: no padding needed.
SCALED_MM_DIM_MULTIPLE = 16
# Eager quantization works in row slices whose fp32 temporary stays under this (the reference's 256 MiB).
QUANTIZE_SLICE_BYTES = 256 * 2**20

Fp8GemmPath = Literal["scaled_mm", "fallback"]


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability the fp8 kernels are chosen for; None where no fp8 kernel applies.

    The one place that asks the hardware, so tests can mock it. ROCm reports capabilities too, but its fp8
    GEMM wants the fnuz formats (MI300) rather than the checkpoints' e4m3fn, so it gets the fallback.
    """
    if device.type == "meta":
        return META_DEVICE_CAPABILITY
    if device.type == "cuda" and torch.version.hip is None:
        # get_device_properties rather than get_device_capability: dynamo folds the former to a constant when it
        # traces a compiled layer that holds these linears; the latter would break the graph.
        properties = torch.cuda.get_device_properties(device)
        return (properties.major, properties.minor)
    return None


def fp8_gemm_path(device: torch.device, rows: int, in_features: int, out_features: int) -> Fp8GemmPath:
    """Which kernel multiplies (rows, in) e4m3 activations by an (out, in) e4m3 weight on ``device``."""
    capability = device_capability(device)
    if capability is None or capability < SCALED_MM_MIN_CAPABILITY:
        return "fallback"
    if in_features % SCALED_MM_DIM_MULTIPLE or out_features % SCALED_MM_DIM_MULTIPLE:
        return "fallback"
    if rows == 0:
        # Nothing to multiply: the fallback's empty matmul needs no fp8 kernel.
        return "fallback"
    return "scaled_mm"


def _quantize_literal_(x: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """The reference's div_clamp_to on one slice, written into ``out``: one fp32 temporary, updated in place."""
    # copy=True: for an fp32 input .float() would return x itself and the in-place division would overwrite it.
    wide = x.to(torch.float32, copy=True)
    wide.div_(scale).clamp_(-FP8_MAX, FP8_MAX)
    # Two roundings on purpose (fp32 -> bf16 -> e4m3); copy_ performs the bf16 -> e4m3 cast of .to(FP8_DTYPE).
    out.copy_(wide.to(torch.bfloat16))


def quantize_activation_sliced(
    x: torch.Tensor, scale: torch.Tensor, slice_bytes: int = QUANTIZE_SLICE_BYTES
) -> torch.Tensor:
    """The literal formula on (M, in) ``x`` in eager mode, in row slices: at most one fp32 temporary of
    ``slice_bytes`` is alive at a time instead of three of the whole activation."""
    rows, width = x.shape
    out = torch.empty(rows, width, dtype=FP8_DTYPE, device=x.device)
    rows_per_slice = max(1, slice_bytes // (4 * max(width, 1)))
    for start in range(0, rows, rows_per_slice):
        stop = min(rows, start + rows_per_slice)
        _quantize_literal_(x[start:stop], scale, out[start:stop])
    return out


def _round_fp32_to_bf16_values(values: torch.Tensor) -> torch.Tensor:
    """bf16(values) kept in fp32, by round-to-nearest-even on the bits (what c10 and the GPU's cvt do).

    A compiler keeps bf16 intermediates in fp32 registers and drops a bf16 cast that feeds another cast
    (inductor: bf16 compute type is fp32), which would turn the formula's two roundings into one. Integer
    arithmetic on the bits cannot be dropped. The input is clamped to +-448, so the add cannot overflow;
    NaN is passed through (the add could carry a NaN's mantissa into its sign bit).
    """
    bits = values.view(torch.int32)
    lowest_kept_bit = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lowest_kept_bit) & -65536).view(torch.float32)  # -65536 == 0xFFFF0000
    return torch.where(torch.isnan(values), values, rounded)


def quantize_activation_fusable(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The literal formula in a form that keeps its bits when compiled into one kernel.

    * fp32(x) / s is computed in fp64, then rounded to fp32: Triton lowers fp32 division to an approximate
      instruction (up to 2 ulp off), fp64 division is IEEE. x is bf16 or fp32 and s fp32 (24 bits), and
      rounding an fp64 (53 >= 2 * 24 + 2 bits) quotient to fp32 gives the correctly rounded fp32 quotient
      (double rounding is innocuous at that width, Figueroa 1995), i.e. exactly the eager fp32 division.
    * the bf16 rounding is done on the bits (:func:`_round_fp32_to_bf16_values`); the e4m3 cast of a value
      that is already a bf16 then equals the eager bf16 -> e4m3 cast.
    """
    quotient = (x.to(torch.float64) / scale.to(torch.float64)).to(torch.float32)
    clamped = torch.clamp(quotient, -FP8_MAX, FP8_MAX)
    return _round_fp32_to_bf16_values(clamped).to(FP8_DTYPE)


@functools.cache
def _compiled_quantizer() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The fused quantization kernel, compiled on first use (never at import).

    functools.cache rather than a per-module attribute: the compiled function depends on nothing in a module,
    and one process-wide instance lets every fp8 linear share one dynamo cache (each token-count class compiles
    once, not once per linear). It is a memo of a pure function, not state that changes behaviour.
    dynamic=True keeps the row and channel counts symbolic, so new token counts do not recompile.
    """
    return torch.compile(quantize_activation_fusable, dynamic=True, fullgraph=True)


def _uses_compiled_quantizer(device: torch.device) -> bool:
    # Triton has e4m3 conversions from sm_89 on, the same GPUs that have the fp8 GEMM; meta tensors cannot be
    # compiled and CPU keeps eager (the compile would cost more than it saves there).
    if device.type != "cuda":
        return False
    capability = device_capability(device)
    if capability is None or capability < SCALED_MM_MIN_CAPABILITY:
        return False
    return has_triton()


def quantize_activation(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """a = e4m3(bf16(clamp(fp32(x) / scale, -448, 448))) for (M, in) ``x`` and a scale that broadcasts over
    the input channels: one fused kernel on fp8 GPUs, eager row slices elsewhere, the same bits either way.

    On the meta device (the planner) the eager slices run: four small kernels per slice and at most one
    slice's temporaries (QUANTIZE_SLICE_BYTES of fp32 plus half that of bf16), where the GPU runs one kernel
    that reads x and writes a.
    """
    if torch.compiler.is_compiling():
        # Traced as part of a compiled caller (a compiled transformer layer): its compiler fuses the formula into
        # its own kernels, and a nested compile or the row loop would only get in its way.
        return quantize_activation_fusable(x, scale.reshape(-1))
    if _uses_compiled_quantizer(x.device):
        # One (in,) shape for both classes' scales, so input_scale and smooth_scale share one compiled graph.
        return _compiled_quantizer()(x, scale.reshape(-1))
    return quantize_activation_sliced(x, scale)


def _fp8_matmul(a: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """(a @ weight^T) * alpha * beta in fp32 accumulation, bf16 out. a: (M, in) e4m3, weight: (out, in) e4m3."""
    rows, in_features = a.shape
    if fp8_gemm_path(a.device, rows, in_features, weight.shape[0]) == "scaled_mm":
        # _scaled_mm wants mat1 row-major and mat2 column-major: weight is (out, in) row-major, so weight.t()
        # already is. use_fast_accum: the reference's cuBLASLt GEMM (flashinfer bmm_fp8) runs with FAST_ACCUM on.
        return torch._scaled_mm(
            a.contiguous(),
            weight.t(),
            scale_a=alpha.reshape(()).float(),
            scale_b=beta.reshape(()).float(),
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )
    y = a.float() @ weight.float().t()
    return (y * (alpha.reshape(()) * beta.reshape(()))).to(torch.bfloat16)


class _Fp8LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, device=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.empty(1, out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.empty(1, dtype=torch.float32, device=device))

    def _activation_scale(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        a = quantize_activation(x.reshape(-1, self.in_features), self._activation_scale())
        # cuBLASLt reads a scalar through the activation-scale pointer: the first element of input_scale.
        y = _fp8_matmul(a, self.weight[0], self.input_scale.reshape(-1)[0], self.weight_scale.reshape(-1)[0])
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3"


class Fp8PerTensorLinear(_Fp8LinearBase):
    """q/qx/k/v/fc1 of a quantized layer: activations divided by the ``input_scale`` vector."""

    def __init__(self, in_features: int, out_features: int, device=None) -> None:
        super().__init__(in_features, out_features, device)
        self.register_buffer("input_scale", torch.empty(in_features, dtype=torch.float32, device=device))

    def _activation_scale(self) -> torch.Tensor:
        return self.input_scale


class Fp8SmoothedLinear(_Fp8LinearBase):
    """linear_proj/fc2 of a quantized layer: activations divided by ``smooth_scale`` (SmoothQuant style)."""

    def __init__(self, in_features: int, out_features: int, device=None) -> None:
        super().__init__(in_features, out_features, device)
        self.register_buffer("input_scale", torch.empty(1, dtype=torch.float32, device=device))
        self.register_buffer("smooth_scale", torch.empty(1, in_features, dtype=torch.float32, device=device))

    def _activation_scale(self) -> torch.Tensor:
        return self.smooth_scale


def quantized_layer_indices(num_layers: int) -> range:
    """Layers whose big linears are fp8 in the quantized checkpoints: all but the first and the last."""
    return range(1, num_layers - 1)


def install_fp8_linears(dit: nn.Module, num_layers: int) -> None:
    """Replace the quantizable linears of layers 1..L-2 of ``dit`` (built on any device, usually meta)."""
    layers = dit.get_submodule("videodit_blocks.layers")
    for index in quantized_layer_indices(num_layers):
        layer = layers[index]
        for path, cls in [(p, Fp8PerTensorLinear) for p in PER_TENSOR_LINEARS] + [
            (p, Fp8SmoothedLinear) for p in SMOOTHED_LINEARS
        ]:
            parent_path, _, name = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            old = getattr(parent, name)
            device = old.weight.device
            setattr(parent, name, cls(old.in_features, old.out_features, device=device))


def is_fp8_scale_name(name: str) -> bool:
    return name.endswith((".weight_scale", ".input_scale", ".smooth_scale"))
