"""The one attention entry point of the project: dense attention over (query range -> key range) blocks.

MAGI-1 attention is always "block ranges": in self-attention each chunk's queries attend densely to a
contiguous range of keys (block-causal, with a KV cache in front); in cross-attention each chunk's queries
attend to that chunk's valid caption tokens; in the VAE one range covers everything. So every caller hands
over ``q_ranges`` / ``k_ranges`` (pairs of python ints, [start, end)) and the dispatcher picks a kernel.

Backends:
* ``sdpa`` (default, runs everywhere): PyTorch ``scaled_dot_product_attention`` once per range.
* ``flash_attn``: flash-attn 2 ``flash_attn_func`` per range (GPU, fp16/bf16 only).
* ``xformers``: ``xformers.ops.memory_efficient_attention`` per range (GPU).
* ``flex``: PyTorch flex attention, all ranges in one call through a block mask (compiled on GPU; eager
  elsewhere, which materializes the scores and is only for checking).

``auto`` picks flash-attn when it imports on a GPU and SDPA otherwise (SDPA reaches PyTorch's own flash kernel on
CUDA); xformers and flex run only when named, until benchmarks say they are faster.

Optional kernels are imported lazily, only when chosen, so importing this module never touches CUDA.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from types import MappingProxyType

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flash_attn", "xformers", "flex")

Ranges = Sequence[tuple[int, int]]


def available_backends(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Backends usable for tensors on ``device`` of ``dtype`` (sdpa always; the others only on CUDA)."""
    device = torch.device(device)
    found = ["sdpa"]
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
        found.append("flex")
    if device.type != "cuda":
        return found
    if dtype in (torch.float16, torch.bfloat16) and importlib.util.find_spec("flash_attn") is not None:
        found.append("flash_attn")
    if importlib.util.find_spec("xformers") is not None:
        found.append("xformers")
    return found


def select_backend(device: torch.device | str, dtype: torch.dtype, preference: str = "auto") -> str:
    """Resolve "auto" to the fastest importable backend; reject a named backend that cannot run here."""
    usable = available_backends(device, dtype)
    if preference == "auto":
        for name in ("flash_attn", "sdpa"):
            if name in usable:
                return name
    if preference not in BACKENDS:
        raise ValueError(f"unknown attention backend {preference!r}; choose one of auto, {', '.join(BACKENDS)}")
    if preference not in usable:
        raise ValueError(
            f"attention backend {preference!r} cannot run on {torch.device(device)} with {dtype}; usable: {usable}"
        )
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
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "flex":
        return _flex(q, k, v, q_ranges, k_ranges, scale)
    kernel = _KERNELS[backend]
    out = torch.zeros_like(q)
    for (qs, qe), (ks, ke) in zip(q_ranges, k_ranges):
        if qe <= qs or ke <= ks:
            continue
        out[qs:qe] = kernel(q[qs:qe], k[ks:ke], v[ks:ke], scale)
    return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    # (S, H, D) -> (1, H, S, D): the fused SDPA kernels (CPU flash, CUDA flash / mem-efficient) accept only
    # 4-D inputs; 3-D ones silently fall back to the math kernel, which is slower and rounds differently.
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
    if groups > 1 and q.is_cuda:
        out = F.scaled_dot_product_attention(q4, k4, v4, scale=scale, enable_gqa=True)
    else:
        if groups > 1:
            k4 = k4.repeat_interleave(groups, dim=1)
            v4 = v4.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q4, k4, v4, scale=scale)
    return out[0].transpose(0, 1)


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


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges: Ranges, k_ranges: Ranges, scale: float):
    from torch.nn.attention.flex_attention import (  # lazy: compiles on first use
        create_block_mask,
        flex_attention,
    )

    device = q.device
    block_of_query = torch.full((q.shape[0],), -1, dtype=torch.int64, device=device)
    starts = torch.zeros(max(len(k_ranges), 1), dtype=torch.int64, device=device)
    ends = torch.zeros_like(starts)
    for i, ((qs, qe), (ks, ke)) in enumerate(zip(q_ranges, k_ranges)):
        block_of_query[qs:qe] = i
        starts[i], ends[i] = ks, ke

    def mask_mod(batch, head, q_idx, kv_idx):
        block = block_of_query[q_idx]
        safe = block.clamp(min=0)
        return (block >= 0) & (kv_idx >= starts[safe]) & (kv_idx < ends[safe])

    mask = create_block_mask(mask_mod, None, None, q.shape[0], k.shape[0], device=device)
    # torch.compile caches per code object, so wrapping here does not recompile on every call
    attend = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
    out = attend(q4, k4, v4, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    out = out[0].transpose(0, 1)
    # rows outside every range must be zeros like the other kernels (flex leaves them undefined-but-finite)
    return torch.where((block_of_query >= 0)[:, None, None], out, torch.zeros((), dtype=out.dtype, device=device))


_KERNELS = MappingProxyType({"sdpa": _sdpa, "flash_attn": _flash_attn, "xformers": _xformers})
