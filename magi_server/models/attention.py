"""The one attention entry point of the project: dense attention over (query range -> key range) blocks.

MAGI-1 attention is always "block ranges": in self-attention each chunk's queries attend densely to a
contiguous range of keys (block-causal, with a KV cache in front); in cross-attention each chunk's queries
attend to that chunk's valid caption tokens; in the VAE one range covers everything. So every caller hands
over ``q_ranges`` / ``k_ranges`` (pairs of python ints, [start, end)) and the dispatcher picks a kernel.

Backends:
* ``sdpa`` (default, runs everywhere): PyTorch ``scaled_dot_product_attention`` once per range. On CUDA it runs
  under ``sdpa_kernel([CUDNN_ATTENTION, FLASH_ATTENTION, EFFICIENT_ATTENTION], set_priority=True)``: cuDNN
  attention first, then PyTorch's flash kernel, then the memory-efficient one, and never the math kernel (which
  materializes the query x key scores). Grouped-query attention passes ``enable_gqa=True`` where this torch
  accepts it (a feature check at import, not a version string), and expands k/v otherwise.
* ``flash_attn``: flash-attn 2 ``flash_attn_func`` per range (GPU, fp16/bf16 only).
* ``xformers``: ``xformers.ops.memory_efficient_attention`` per range (GPU).

``auto`` picks flash-attn only where ``import flash_attn`` succeeds *and* a tiny call runs on this GPU, and only
below sm90: on Hopper and later SDPA reaches cuDNN attention, which outruns flash-attn 2. Otherwise SDPA.
xformers runs only when named.

On the **meta** device (the planner runs the real models there under a dispatch mode that counts FLOPs and live
memory) every backend takes one fused op per range, ``aten._scaled_dot_product_efficient_attention`` with
``compute_log_sumexp=False``: it has a meta kernel and returns the output alone (no query x key score tensor, an
empty log-sum-exp), so the accounting sees one attention op of 4·Hq·Sq·Sk·D FLOPs per range. GQA is expressed with
views only: the query groups become the batch dimension and k/v are ``expand``-ed over it (stride 0, no copy).

Optional kernels are imported lazily, only when chosen, so importing this module never touches CUDA.
"""
from __future__ import annotations

import importlib.util
import inspect
import warnings
from collections.abc import Sequence
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("sdpa", "flash_attn", "xformers")

# the fused CUDA SDPA kernels, fastest first on Hopper; the math kernel is deliberately absent
CUDA_SDPA_PRIORITY = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)

Ranges = Sequence[tuple[int, int]]


def _sdpa_accepts_enable_gqa() -> bool:
    """Whether this torch's SDPA takes ``enable_gqa`` (torch >= 2.5): try it on two tiny CPU tensors."""
    q, k = torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 1, 8)
    try:
        F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    except TypeError:
        return False
    return True


SDPA_ENABLE_GQA = _sdpa_accepts_enable_gqa()
# sdpa_kernel(..., set_priority=True) exists from torch 2.6 (and torch.compile honours it from 2.7); without it the
# three fused kernels are still the only ones enabled, in PyTorch's own order
SDPA_SET_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters


def available_backends(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Backends usable for tensors on ``device`` of ``dtype``: sdpa always; the others only on a CUDA device where
    the package imports and a tiny call runs (not merely where it is installed)."""
    device = torch.device(device)
    found = ["sdpa"]
    if device.type != "cuda":
        return found
    if dtype in (torch.float16, torch.bfloat16) and _kernel_runs("flash_attn", device, dtype):
        found.append("flash_attn")
    if _kernel_runs("xformers", device, dtype):
        found.append("xformers")
    return found


def _kernel_runs(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the optional kernel ``name`` (its package has the same name) imports and runs a tiny call here."""
    if importlib.util.find_spec(name) is None:
        return False
    try:  # import errors (ABI mismatch with this torch), missing kernels for this GPU, ...: all mean "no"
        q = torch.zeros(8, 2, 64, device=device, dtype=dtype)
        _KERNELS[name](q, q[:, :1], q[:, :1], 0.125)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - any failure of an optional kernel means it is not usable here
        return False
    return True


def select_backend(device: torch.device | str, dtype: torch.dtype, preference: str = "auto") -> str:
    """Resolve "auto" to the fastest usable backend; reject a named backend that cannot run here."""
    device = torch.device(device)
    if preference == "auto":
        if (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
                and torch.cuda.get_device_capability(device) < (9, 0) and _kernel_runs("flash_attn", device, dtype)):
            return "flash_attn"
        return "sdpa"
    if preference not in BACKENDS:
        raise ValueError(f"unknown attention backend {preference!r}; choose one of auto, {', '.join(BACKENDS)}")
    usable = available_backends(device, dtype)
    if preference not in usable:
        raise ValueError(f"attention backend {preference!r} cannot run on {device} with {dtype}; usable: {usable}")
    return preference


def range_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_ranges: Ranges,
    k_ranges: Ranges,
    *,
    scale: float | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Dense attention of each query block on its key block.

    q: (Sq, Hq, D); k, v: (Sk, Hk, D) with Hq a multiple of Hk (grouped-query: query head h reads kv head
    h // (Hq/Hk)). ``q_ranges[i]`` attends to ``k_ranges[i]``. Query rows outside every range, and blocks whose
    key range is empty, come out as zeros. The output has q's shape and dtype.
    """
    if len(q_ranges) != len(k_ranges):
        raise ValueError(f"{len(q_ranges)} query ranges but {len(k_ranges)} key ranges")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of kv heads {k.shape[1]}")
    if backend not in _KERNELS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    if q.device.type == "meta":
        for (qs, qe), (ks, ke) in zip(q_ranges, k_ranges):
            if qe > qs and ke > ks:
                _meta_attention(q[qs:qe], k[ks:ke], v[ks:ke], scale, out[qs:qe])
        return out
    kernel = _KERNELS[backend]
    for (qs, qe), (ks, ke) in zip(q_ranges, k_ranges):
        if qe <= qs or ke <= ks:
            continue
        out[qs:qe] = kernel(q[qs:qe], k[ks:ke], v[ks:ke], scale)
    return out


def _meta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dest: torch.Tensor) -> None:
    """One fused op with a meta kernel, output only; GQA through views (see the module docstring)."""
    heads_kv = k.shape[1]
    groups = q.shape[1] // heads_kv
    # (S, Hk·g, D) -> (g, Hk, S, D): query head hk·g + j sits at batch j, head hk, as kv head hk expects
    q4 = q.unflatten(1, (heads_kv, groups)).permute(2, 1, 0, 3)
    k4, v4 = (t.transpose(0, 1)[None].expand(groups, -1, -1, -1) for t in (k, v))
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q4, k4, v4, None, False, scale=scale)[0]
    dest.unflatten(1, (heads_kv, groups)).copy_(out.permute(2, 1, 0, 3))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # (S, H, D) -> (1, H, S, D): the fused SDPA kernels (CPU flash, CUDA cuDNN / flash / mem-efficient) accept only
    # 4-D inputs; 3-D ones silently fall back to the math kernel, which is slower and rounds differently.
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
    if q.is_cuda:
        out = _sdpa_cuda(q4, k4, v4, scale)
    else:
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k4 = k4.repeat_interleave(groups, dim=1)
            v4 = v4.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q4, k4, v4, scale=scale)
    return out[0].transpose(0, 1)


def _fused_only():
    """The context that restricts SDPA to the fused kernels, cuDNN attention first."""
    if SDPA_SET_PRIORITY:
        return sdpa_kernel(list(CUDA_SDPA_PRIORITY), set_priority=True)
    return sdpa_kernel(list(CUDA_SDPA_PRIORITY))


def _sdpa_cuda(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, scale: float) -> torch.Tensor:
    """(1, H, S, D) SDPA restricted to cuDNN > flash > efficient. Written for CUDA; device-agnostic so it can be
    checked on the CPU (where FLASH_ATTENTION is the CPU flash kernel).

    Grouped-query attention passes ``enable_gqa`` for fp16/bf16 (no k/v copy; flash and, on recent torch, cuDNN
    and efficient accept it); fp32 (checks only, never the fast path) expands k/v. Should no fused kernel accept
    the inputs, expanded k/v are tried, then (with a warning) every kernel.
    """
    groups = q4.shape[1] // k4.shape[1]
    if groups > 1 and (not SDPA_ENABLE_GQA or q4.dtype not in (torch.float16, torch.bfloat16)):
        k4, v4, groups = k4.repeat_interleave(groups, dim=1), v4.repeat_interleave(groups, dim=1), 1
    try:
        with _fused_only():
            if groups > 1:
                return F.scaled_dot_product_attention(q4, k4, v4, scale=scale, enable_gqa=True)
            return F.scaled_dot_product_attention(q4, k4, v4, scale=scale)
    except RuntimeError as exc:
        if "No available kernel" not in str(exc):
            raise
    if groups > 1:
        k4, v4 = k4.repeat_interleave(groups, dim=1), v4.repeat_interleave(groups, dim=1)
        try:
            with _fused_only():
                return F.scaled_dot_product_attention(q4, k4, v4, scale=scale)
        except RuntimeError as exc:
            if "No available kernel" not in str(exc):
                raise
    warnings.warn(
        f"no fused SDPA kernel accepts {q4.dtype} attention with head dim {q4.shape[-1]} on {q4.device}; "
        "using PyTorch's default choice (possibly the slow math kernel)",
        RuntimeWarning,
        stacklevel=3,
    )
    return F.scaled_dot_product_attention(q4, k4, v4, scale=scale)


def sdpa_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> str:
    """Name of the SDPA kernel (e.g. ``CUDNN_ATTENTION``) the ``sdpa`` backend picks first for these (S, H, D)
    tensors on CUDA, or ``ERROR: ...`` when no fused kernel accepts them. For benchmarks and diagnostics."""
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
    groups = q4.shape[1] // k4.shape[1]
    kwargs = {"scale": scale}
    if groups > 1 and SDPA_ENABLE_GQA and q4.dtype in (torch.float16, torch.bfloat16):
        kwargs["enable_gqa"] = True
    elif groups > 1:
        k4, v4 = k4.repeat_interleave(groups, dim=1), v4.repeat_interleave(groups, dim=1)
    names = {int(member): name for name, member in SDPBackend.__members__.items()}
    try:
        with _fused_only():
            choice = torch._fused_sdp_choice(q4, k4, v4, None, 0.0, False, **kwargs)
    except RuntimeError as exc:
        return f"ERROR: {str(exc).splitlines()[0][:200]}"
    return names.get(int(choice), str(choice))


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_func  # lazy: GPU-only optional dependency

    return flash_attn_func(q[None], k[None], v[None], softmax_scale=scale, causal=False)[0]


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from xformers.ops import (
        memory_efficient_attention,  # lazy: GPU-only optional dependency
    )

    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return memory_efficient_attention(q[None], k[None], v[None], scale=scale)[0]


_KERNELS = MappingProxyType({"sdpa": _sdpa, "flash_attn": _flash_attn, "xformers": _xformers})
