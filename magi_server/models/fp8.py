"""fp8 (e4m3) linears of the quantized MAGI-1 checkpoints, and the transform that installs them in a DiT.

Quantization is a transform applied to a plain model (gpt-fast style): the DiT is built as usual, then
:func:`install_fp8_linears` swaps the big linears of layers 1..L-2 for the modules below, whose state-dict
names match ``inference_weight.fp8*`` (spec §7): ``weight`` (1, out, in) float8_e4m3fn, ``weight_scale`` (1),
``input_scale`` (in) or (1), and for the smoothed class ``smooth_scale`` (1, in).

The math is the reference's literal formula: a = e4m3(bf16(clamp(x / s, -448, 448))) with s = input_scale
(per-tensor class) or smooth_scale (smoothed class); y = (a @ W^T) * input_scale[0] * weight_scale[0], output
bf16. On Hopper/Ada GPUs the GEMM is ``torch._scaled_mm``; elsewhere the fp8 values are widened to fp32 and
multiplied exactly (fp8 -> fp32 is exact, only the accumulation order differs from cuBLASLt).
"""
from __future__ import annotations

import torch
from torch import nn

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


def _quantize_activation(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Two roundings on purpose (fp32 -> bf16 -> e4m3), as the reference's div_clamp_to does.
    return torch.clamp(x.float() / scale, -FP8_MAX, FP8_MAX).to(torch.bfloat16).to(FP8_DTYPE)


def _fp8_matmul(a: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """(a @ weight^T) * alpha * beta in fp32 accumulation, bf16 out. a: (M, in) e4m3, weight: (out, in) e4m3."""
    if a.is_cuda and torch.cuda.get_device_capability(a.device) >= (8, 9) and a.shape[0] % 16 == 0:
        # _scaled_mm wants mat2 column-major: weight is (out, in) row-major, so weight.t() already is.
        return torch._scaled_mm(
            a, weight.t(), scale_a=alpha.reshape(()).float(), scale_b=beta.reshape(()).float(), out_dtype=torch.bfloat16
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
        a = _quantize_activation(x.reshape(-1, self.in_features), self._activation_scale())
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
