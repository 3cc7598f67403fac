"""The MAGI-1 DiT ("videodit_ardf") network and its explicit KV cache.

This file owns:

* :class:`VideoDiT` — the transformer, with parameter names and shapes identical to the reference checkpoint
  (spec §2.11), its precision policy (:meth:`VideoDiT.is_fp32_param`, spec §2.10) and one forward call
  (spec §2.1-§2.8): patch embedding, 3-D RoPE, timestep/caption conditioning, block-causal self-attention plus
  per-chunk cross-attention, sandwich-normed gated residuals, final layer and unpatchify.
* :class:`KVCache` — the clean-chunk key/value store that a caller owns and hands to each forward (spec §2.12).
  It is kept per chunk index so a sampler can release chunks that no window reads any more.
* :class:`ContextParallel` — what a forward needs from a context-parallel (Ulysses) group when the runtime sets one
  with :meth:`VideoDiT.set_context_parallel`: each rank then holds 1/N of the call's tokens (the last rank's share
  padded), self-attention runs on the whole sequence for 1/N of the heads (so block-causal ranges, the KV cache and
  every attention backend are unchanged; the cache holds that rank's K/V groups), and the output is gathered. The
  model only calls the three methods; it never creates a process group nor reads the environment.

Memory and speed: the token-wise parts of a layer (projections, q/k norm + RoPE, everything after attention, the
final layer) run in chunk-aligned token pieces (:func:`token_pieces`) with the residual stream updated in place, so
no full-width intermediate of all window tokens is alive; those pieces are plain functions that
:class:`PieceRunner` can run through ``torch.compile``; the fp32 GEMMs of the reference run as bf16-operand GEMMs with
fp32 output where the device has them (:func:`linear_fp32`).

Guidance (CFG passes, the nearly-clean copy) is not here; it lives in ``magi_server/runtime/guidance.py``.
All attention goes through :func:`magi_server.models.attention.range_attention`.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from magi_server.models.config import DEFAULT_MAX_PIECE_TOKENS, DiTConfig
from magi_server.models.attention import range_attention

# Sub-module names whose parameters the reference promotes to fp32 after loading (`_high_precision_promoter`).
# Top-level modules are matched on the first path component, block norms on any component; the cross-attention
# norms are named `*_xattn`, so an exact component match leaves them out, as the reference does.
_FP32_TOP_MODULES = frozenset({"x_embedder", "t_embedder", "y_embedder", "final_linear", "rope"})
_FP32_NORM_MODULES = frozenset(
    {"q_layernorm", "k_layernorm", "self_attn_post_norm", "mlp_post_norm", "final_layernorm"}
)

# The reference reorders [self-attn | cross-attn] outputs in 8 slices before linear_proj, a permutation fixed by
# its tensor-parallel-8 training whatever the head count (spec §2.7 step 7).
_PROJ_INTERLEAVE = 8

_FREQ_EMBED_SIZE = 256
_TIMESTEP_RESCALE = 1000
_ROPE_REF_AREA = 16 * 16


# ----------------------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of already-computed chunks, per layer and per chunk index, owned by the caller.

    Each stored entry is a tensor (tokens_per_chunk, num_query_groups, 2 * kv_channels) laid out per group as
    [key | value]; the key is stored after its q/k-norm and RoPE, the value raw (the reference cache layout).
    Rows are copied into ``dtype`` on ``device`` when written (``pin_memory`` pins CPU copies for faster uploads).
    The chunk size is fixed by the first forward that uses the cache (or by ``tokens_per_chunk``).
    """

    def __init__(
        self,
        num_layers: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        *,
        tokens_per_chunk: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = int(num_layers)
        self.dtype = dtype
        self.device = torch.device(device)
        self.pin_memory = bool(pin_memory) and self.device.type == "cpu"
        self.tokens_per_chunk = tokens_per_chunk
        self._store: list[dict[int, torch.Tensor]] = [{} for _ in range(self.num_layers)]
        self._row_shape: tuple[int, ...] | None = None

    def bind_tokens_per_chunk(self, tokens_per_chunk: int) -> None:
        """Fix the chunk size (first use) or check that a later call uses the same one."""
        if self.tokens_per_chunk is None:
            self.tokens_per_chunk = int(tokens_per_chunk)
        elif self.tokens_per_chunk != tokens_per_chunk:
            raise ValueError(
                f"KV cache holds chunks of {self.tokens_per_chunk} tokens but this call has {tokens_per_chunk} "
                "tokens per chunk (resolution changed mid-video?)"
            )

    def _check_layer(self, layer: int) -> dict[int, torch.Tensor]:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range for a cache of {self.num_layers} layers")
        return self._store[layer]

    def write(self, layer: int, first_chunk: int, rows: torch.Tensor) -> None:
        """Store ``rows`` (whole chunks, (n * tokens_per_chunk, groups, 2 * kv_channels)) as chunks first_chunk.."""
        store = self._check_layer(layer)
        if self.tokens_per_chunk is None:
            raise ValueError("tokens_per_chunk is unknown: pass it to KVCache() or bind_tokens_per_chunk() first")
        if first_chunk < 0:
            raise ValueError(f"first_chunk must be >= 0, got {first_chunk}")
        tpc = self.tokens_per_chunk
        if rows.dim() != 3 or rows.shape[0] % tpc:
            raise ValueError(f"rows {tuple(rows.shape)} do not cover whole chunks of {tpc} tokens")
        if self._row_shape is None:
            self._row_shape = tuple(rows.shape[1:])
        elif tuple(rows.shape[1:]) != self._row_shape:
            raise ValueError(f"rows of shape {tuple(rows.shape[1:])} do not match the cache's {self._row_shape}")
        for i in range(rows.shape[0] // tpc):
            part = rows[i * tpc : (i + 1) * tpc]
            if self.pin_memory:
                # straight into page-locked memory, asynchronously: only later uploads on the same stream read it
                piece = torch.empty(part.shape, dtype=self.dtype, pin_memory=True)
                piece.copy_(part, non_blocking=True)
            else:
                # copy=True: never keep a view that would pin the caller's whole K|V tensor in memory
                piece = part.to(device=self.device, dtype=self.dtype, copy=True)
            store[first_chunk + i] = piece

    def read(self, layer: int, first_chunk: int, end_chunk: int) -> torch.Tensor:
        """Rows of chunks [first_chunk, end_chunk) concatenated, in the cache's dtype and device."""
        store = self._check_layer(layer)
        if end_chunk <= first_chunk:
            shape = (0, *self._row_shape) if self._row_shape is not None else (0,)
            return torch.empty(shape, dtype=self.dtype, device=self.device)
        pieces = []
        for c in range(first_chunk, end_chunk):
            if c not in store:
                raise KeyError(
                    f"KV cache has no chunk {c} for layer {layer} (retained chunks: {sorted(store)}); "
                    "it was never written or has been evicted"
                )
            pieces.append(store[c])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)

    def rows(self, layer: int, first_chunk: int = 0, end_chunk: int | None = None) -> torch.Tensor:
        """Like :meth:`read`; ``end_chunk`` defaults to one past the newest retained chunk of that layer."""
        store = self._check_layer(layer)
        if end_chunk is None:
            end_chunk = max(store) + 1 if store else first_chunk
        return self.read(layer, first_chunk, end_chunk)

    def chunks(self) -> list[int]:
        """Sorted chunk indices retained in any layer."""
        found: set[int] = set()
        for store in self._store:
            found.update(store)
        return sorted(found)

    def has(self, chunk: int) -> bool:
        """True when every layer holds ``chunk``."""
        return all(chunk in store for store in self._store)

    def evict(self, keep: Iterable[int]) -> None:
        """Release every chunk not listed in ``keep``."""
        keep = set(int(c) for c in keep)
        for store in self._store:
            for c in [c for c in store if c not in keep]:
                del store[c]

    def drop_before(self, chunk: int) -> None:
        """Release chunks with index < ``chunk``."""
        for store in self._store:
            for c in [c for c in store if c < chunk]:
                del store[c]

    def clear(self) -> None:
        for store in self._store:
            store.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in self._store for t in store.values())


# ----------------------------------------------------------------------------------------------------------------
# Context parallelism (the interface; the runtime implements it over torch.distributed)
# ----------------------------------------------------------------------------------------------------------------
class ContextParallel(Protocol):
    """A group of ``size`` ranks running one forward together, Ulysses-style; this process is ``rank``.

    Rows of a call's batch-flattened token sequence (``total`` rows) are sharded contiguously: every rank holds
    ``shard = ceil(total / size)`` rows, rank r the rows [r·shard, (r+1)·shard), the rows past ``total`` being padding
    that the model keeps at zero and that never reaches a result.
    """

    size: int
    rank: int

    def sequence_to_heads(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """(shard, H, D) local rows of every head -> (total, H/size, D): every row of this rank's heads."""
        ...

    def heads_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse: (total, H/size, D) -> (shard, H, D), the padding rows zero."""
        ...

    def gather_sequence(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """(shard, ...) local rows -> (total, ...) every row, on every rank."""
        ...


def shard_rows(total: int, size: int, rank: int) -> tuple[int, int, int]:
    """(first row, real rows, padded shard rows) this rank holds of ``total`` rows (see :class:`ContextParallel`)."""
    shard = -(-total // size)
    first = rank * shard
    return first, max(0, min(first + shard, total) - first), shard


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------
class ZeroCenteredLayerNorm(nn.Module):
    """The reference "FusedLayerNorm": LayerNorm whose effective gain is 1 + weight when ``one_plus``.

    The +1 is formed in the stored dtype (it matters for the bf16 cross-attention norms); the parameters then
    follow the input dtype, so the caller decides the compute precision by casting the input.
    """

    def __init__(self, size: int, eps: float, one_plus: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.size = int(size)
        self.eps = float(eps)
        self.one_plus = bool(one_plus)
        self.weight = nn.Parameter(torch.zeros(size, dtype=dtype) if one_plus else torch.ones(size, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.one_plus else self.weight
        return F.layer_norm(x, (self.size,), weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class PreLayerNorm(nn.LayerNorm):
    """Plain affine LayerNorm (the pre-norms are not zero-centred); runs in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def fp32_out_gemm_available(device: torch.device) -> bool:
    """True where a GEMM of bf16 operands can write fp32 directly (``torch.mm(..., out_dtype=float32)``): CUDA, and
    meta, where the planner accounts the CUDA path. CPU has no such kernel and keeps true fp32 GEMMs, which is also
    what is fastest there."""
    return device.type in ("cuda", "meta")


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for bf16 operands with fp32 accumulation and fp32 output. Every product of two bf16 values is exact in
    fp32, so this equals the fp32 GEMM of the same values up to summation order (a bf16 *output* would not)."""
    if a.device.type == "cpu":  # the same arithmetic where the fused kernel does not exist (tests)
        return a.float() @ b.float()
    return torch.mm(a, b, out_dtype=torch.float32)


def split_bf16_exact(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three bf16 tensors whose fp32 sum is exactly ``x`` (fp32). bf16 keeps 8 significant bits and fp32 24: each
    rounding leaves a remainder that is exact in fp32 with 8 fewer bits, so three pieces hold all 24."""
    hi = x.to(torch.bfloat16)
    rest = x - hi.float()
    mid = rest.to(torch.bfloat16)
    lo = (rest - mid.float()).to(torch.bfloat16)
    return hi, mid, lo


def linear_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                weight_bf16_exact: bool = False) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` with the products and sums of an fp32 GEMM, run on bf16 tensor cores where it can.

    The reference computes these layers under fp32 autocast. Their operands are bf16 values almost everywhere:
    linear_proj reads the bf16 attention outputs with a bf16 weight, and the promoted embedders / final linear hold
    weights that came from bf16 checkpoints (``weight_bf16_exact``). So on CUDA (and meta, for the planner):
    * bf16 input, bf16 weight: one bf16-operand GEMM with fp32 accumulation and output (exact products);
    * fp32 input, bf16-exact weight: the input split into three bf16 pieces (exact), three such GEMMs summed;
    * anything else, and every case on CPU: a true fp32 GEMM.
    No path rounds the output, so the result is that of the fp32 GEMM up to summation order.
    """
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    low = torch.bfloat16
    if fp32_out_gemm_available(flat.device):
        if flat.dtype == low and weight.dtype == low:
            out = mm_fp32_out(flat, weight.t())
        elif flat.dtype == torch.float32 and (weight.dtype == low or weight_bf16_exact):
            w = weight.to(low).t()
            hi, mid, lo = split_bf16_exact(flat)
            out = mm_fp32_out(hi, w)
            out += mm_fp32_out(mid, w)
            out += mm_fp32_out(lo, w)
        else:
            out = flat.float() @ weight.float().t()
    else:
        out = flat.float() @ weight.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.view(*lead, weight.shape[0])


class FP32Linear(nn.Linear):
    """A Linear computed with fp32 accumulation and output whatever the stored dtype (the reference runs these under
    fp32 autocast); see :func:`linear_fp32`. ``weight_bf16_exact`` is set by the loader when the stored fp32 weight
    holds bf16 values (checkpoints are bf16), and assumed on meta (the planner's stand-in for real weights)."""

    weight_bf16_exact: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_fp32(x, self.weight, self.bias, weight_bf16_exact=_holds_bf16_values(self))


def _holds_bf16_values(module: nn.Module) -> bool:
    """The loader's mark (:meth:`VideoDiT.note_bf16_exact_weights`), assumed on meta (the planner's stand-in for
    real, bf16-checkpoint weights)."""
    return getattr(module, "weight_bf16_exact", False) or module.weight.device.type == "meta"


class TimestepEmbedder(nn.Module):
    """Sinusoid of 1000·t (cos first), rounded to the compute dtype, then an fp32 MLP (spec §2.4)."""

    def __init__(self, cond_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            FP32Linear(_FREQ_EMBED_SIZE, cond_dim, bias=True, dtype=torch.float32),
            nn.SiLU(),
            FP32Linear(cond_dim, cond_dim, bias=True, dtype=torch.float32),
        )

    @staticmethod
    def sinusoid(t: torch.Tensor) -> torch.Tensor:
        half = _FREQ_EMBED_SIZE // 2
        # the operation order (t·freq first, ×1000 last) is part of the fp32 parity contract (spec §2.4)
        freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None] * _TIMESTEP_RESCALE
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor, round_dtype: torch.dtype) -> torch.Tensor:
        # the reference feeds the MLP a params_dtype sinusoid: a real rounding step for bf16 models
        emb = self.sinusoid(t).to(round_dtype).float()
        return self.mlp(emb)


class CaptionEmbedder(nn.Module):
    """Caption projections: SiLU(Linear) tokens for cross-attention, and the adaLN flag from the null rows."""

    def __init__(self, caption_channels: int, xattn_dim: int, cond_dim: int, caption_max_length: int) -> None:
        super().__init__()
        self.y_proj_xattn = nn.Sequential(
            FP32Linear(caption_channels, xattn_dim, bias=True, dtype=torch.float32), nn.SiLU()
        )
        self.y_proj_adaln = nn.Sequential(FP32Linear(caption_channels, cond_dim, bias=True, dtype=torch.float32))
        self.null_caption_embedding = nn.Parameter(
            torch.empty(caption_max_length, caption_channels, dtype=torch.float32)
        )
        nn.init.normal_(self.null_caption_embedding)

    def adaln(self, caption_dropout: torch.Tensor) -> torch.Tensor:
        # At inference the adaLN path never sees the caption: row -2 = "text present", row -1 = "text dropped".
        null = self.null_caption_embedding.float()
        rows = torch.where(caption_dropout[:, None], null[-1][None], null[-2][None])
        return self.y_proj_adaln(rows)


class RotaryBands(nn.Module):
    """Learned RoPE frequencies (``rope.bands``) and the 3-D (frame, row, column) table built from them."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        num_bands = head_dim // 8
        exponent = torch.arange(0, num_bands, dtype=torch.int64).to(torch.float32) / num_bands
        self.bands = nn.Parameter(1.0 / (10000.0**exponent))

    def table(self, t_total: int, frames: int, hp: int, wp: int) -> torch.Tensor:
        """cat(sin θ, cos θ) for the last ``frames`` of a T_total-frame grid: (frames·hp·wp, 6·n_bands) fp32."""
        device = self.bands.device
        rescale = math.sqrt((hp * wp) / _ROPE_REF_AREA)
        sizes = (t_total, hp, wp)
        refs = (t_total, hp / rescale, wp / rescale)
        coords = [torch.arange(n, dtype=torch.int64, device=device).to(torch.float32) for n in sizes]
        coords[1] = coords[1] - (hp - 1) / 2
        coords[2] = coords[2] - (wp - 1) / 2
        # only the frames of this call are needed; the per-element arithmetic is that of the full table
        coords[0] = coords[0][t_total - frames :]
        scaled = []
        for coord, n, r in zip(coords, sizes, refs):
            scaled.append(coord if n == 1 else coord / (n - 1) * (r - 1))
        grid = torch.stack(torch.meshgrid(*scaled, indexing="ij"), dim=-1)  # (frames, hp, wp, 3)
        pos = grid.unsqueeze(-1) * self.bands.float()  # axis-major, band-minor
        count = frames * hp * wp
        return torch.cat([pos.sin().reshape(count, -1), pos.cos().reshape(count, -1)], dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first 2·R channels of each head; x (S, H, D), cos/sin (S, R)."""
    r = cos.shape[-1]
    x1, x2, rest = x[..., :r], x[..., r : 2 * r], x[..., 2 * r :]
    c = cos[:, None, :]
    s = sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)


@dataclass(frozen=True)
class _Piece:
    """Rows [start, end) of the batch-flattened tokens, inside one chunk (``element``, ``chunk``); ``position`` is
    the first row's index within its element's sequence (for the RoPE table)."""

    start: int
    end: int
    element: int
    chunk: int
    position: int


def token_pieces(elements: int, chunks: int, tokens_per_chunk: int, max_tokens: int) -> list[_Piece]:
    """Split every chunk of every batch element into the fewest near-equal pieces of at most ``max_tokens`` rows.

    The token-wise parts of a layer (projections, norms, RoPE, gates, MLP) run piece by piece, so no full-width
    intermediate of all window tokens is ever alive (the 24B fc1 output alone is 7.1 GB for a 720p window). Pieces
    never cross a chunk (one gate vector each) nor a batch element (a request's GEMM shapes do not depend on what it
    is batched with), and a given resolution always gives the same piece sizes, so compiled code is reused.
    """
    pieces = []
    count = max(1, -(-tokens_per_chunk // max(1, max_tokens)))
    bounds = [tokens_per_chunk * i // count for i in range(count + 1)]
    seq = chunks * tokens_per_chunk
    for b in range(elements):
        for c in range(chunks):
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                position = c * tokens_per_chunk + lo
                pieces.append(_Piece(b * seq + position, b * seq + c * tokens_per_chunk + hi, b, c, position))
    return pieces


@dataclass
class _CallContext:
    """Per-forward data every layer needs (built once by VideoDiT.forward)."""

    dtype: torch.dtype
    chunks: int
    tokens_per_chunk: int
    cos: torch.Tensor
    sin: torch.Tensor
    condition: torch.Tensor  # (N, chunks, cond_dim), compute dtype
    captions: torch.Tensor  # (valid caption tokens, hidden), compute dtype
    q_ranges: list[tuple[int, int]]
    k_ranges: list[tuple[int, int]]
    xk_ranges: list[tuple[int, int]]
    backend: str
    pieces: list[_Piece]
    run: "PieceRunner"
    caption_tokens: list[int] | None = None  # valid caption tokens of each batch element
    caches: list[KVCache] | None = None  # one per batch element
    read_first: list[int] | None = None  # per element: first cached chunk read
    read_end: int = 0
    write_first: int = 0
    write_chunks: int = 0
    # context parallelism: the group, the call's total rows, and the cross-attention query ranges in local rows
    # (with no group: q_ranges, over every row)
    cp: ContextParallel | None = None
    total_rows: int = 0
    xq_ranges: list[tuple[int, int]] | None = None

    def new_rows(self, like: torch.Tensor, shape: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An uninitialized per-row buffer; zeroed under context parallelism so that padding rows stay finite."""
        if self.cp is None:
            return like.new_empty(shape, dtype=dtype)
        return like.new_zeros(shape, dtype=dtype)

    def per_request_rows(self, fn, rows: torch.Tensor) -> torch.Tensor:
        """fn applied to each batch element's caption tokens separately (batch invariance, see VideoDiT.forward)."""
        if self.caption_tokens is None or len(self.caption_tokens) == 1:
            return fn(rows)
        return torch.cat([fn(part) for part in rows.split(self.caption_tokens)])

    def keys_and_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per element: [cached chunks read_first..read_end ; current rows] as separate key and value tensors,
        writing the current rows' [key | value] into the cache first when asked. ``k``/``v`` are (N·S, groups, hd)."""
        if self.caches is None:
            return k, v
        elements = len(self.caches)
        per_element = k.shape[0] // elements
        tpc = self.tokens_per_chunk
        pasts = []
        for b, cache in enumerate(self.caches):
            rows = slice(b * per_element, (b + 1) * per_element)
            if self.write_chunks:
                written = slice(rows.start, rows.start + self.write_chunks * tpc)
                cache.write(layer, self.write_first, torch.cat([k[written], v[written]], dim=-1))
            if self.read_end > self.read_first[b]:
                pasts.append(cache.read(layer, self.read_first[b], self.read_end))
            else:
                pasts.append(None)
        if all(past is None for past in pasts):
            return k, v
        total = k.shape[0] + sum(0 if past is None else past.shape[0] for past in pasts)
        hd = k.shape[-1]
        key = k.new_empty((total, *k.shape[1:]))
        value = v.new_empty((total, *v.shape[1:]))
        at = 0
        for b, past in enumerate(pasts):
            if past is not None:
                past = past.to(device=k.device, dtype=k.dtype, non_blocking=True)
                key[at : at + past.shape[0]] = past[..., :hd]
                value[at : at + past.shape[0]] = past[..., hd:]
                at += past.shape[0]
            key[at : at + per_element] = k[b * per_element : (b + 1) * per_element]
            value[at : at + per_element] = v[b * per_element : (b + 1) * per_element]
            at += per_element
        return key, value


class PieceRunner:
    """Calls the token-wise piece functions of a layer, eagerly or through ``torch.compile``.

    Compiled once per function with the token dimension dynamic, so every call of any request at any length reuses
    the same graphs (the piece sizes depend only on the resolution). The layers' modules are passed as arguments:
    with PyTorch's inlining of nn.Modules their parameters become graph inputs, so all layers share one graph.
    """

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        self._functions: dict = {}

    def __call__(self, fn, *args):
        if not self.compiled:
            return fn(*args)
        compiled = self._functions.get(fn)
        if compiled is None:
            # dynamic=True: every size (the piece rows) is symbolic from the first compile on
            compiled = self._functions[fn] = torch.compile(fn, dynamic=True)
        return compiled(*args)

    def settings(self):
        """The compiler settings a forward runs under (entered once per forward, not per piece: it costs ~50 µs).

        Without duck shaping, sizes that happen to be equal on one call (a piece of 64 rows and a hidden size of
        64) are not assumed equal forever, which would recompile on the next call where they differ."""
        if not self.compiled:
            return contextlib.nullcontext()
        return torch.fx.experimental._config.patch(use_duck_shape=False)


# ------------------------------------------------------------------------------------------------ token-wise pieces
# Plain functions of (modules, tensors) so torch.compile can fuse each into a few kernels: the fp32 q/k norm + RoPE,
# the gate x branch + post-norm + residual and the SwiGLU are elementwise chains around the GEMMs.
def _self_attention_inputs(att: "ParallelAttention", h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (rows, heads, hd), k, v (rows, groups, hd) of one piece; q/k norm and RoPE in fp32 (spec §2.7 step 3)."""
    rows = h.shape[0]
    a = att.linear_qkv.layer_norm(h)
    q = att.linear_qkv.q(a).to(dtype).view(rows, att.num_heads, att.head_dim)
    q = _apply_rope(att.q_layernorm(q.float()), cos, sin).to(dtype)
    k = att.linear_qkv.k(a).to(dtype).view(rows, att.num_groups, att.head_dim)
    k = _apply_rope(att.k_layernorm(k.float()), cos, sin).to(dtype)
    v = att.linear_qkv.v(a).to(dtype).view(rows, att.num_groups, att.head_dim)
    return q, k, v


def _cross_attention_queries(att: "ParallelAttention", h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """qx of one piece: from the same pre-norm as q/k/v, normed in the compute dtype, no RoPE."""
    a = att.linear_qkv.layer_norm(h)
    qx = att.linear_qkv.qx(a).to(dtype).view(h.shape[0], att.num_heads, att.head_dim)
    return att.q_layernorm_xattn(qx)


def _layer_output(layer: "TransformerLayer", core: torch.Tensor, cross: torch.Tensor, h: torch.Tensor,
                  gate_attn: torch.Tensor, gate_mlp: torch.Tensor) -> torch.Tensor:
    """Everything after attention for one piece: fixed 8-way interleave, fp32 projection, gated sandwich norms, MLP."""
    rows, d = h.shape
    dtype = h.dtype
    z = torch.cat([core, cross], dim=-1)
    z = z.view(rows, 2, _PROJ_INTERLEAVE, -1).transpose(1, 2).reshape(rows, -1)
    # fp8 replacements return bf16; the gate/post-norm math is fp32 either way
    proj = layer.self_attention.linear_proj(z).float()
    h1 = (h.float() + layer.self_attn_post_norm(proj * gate_attn)).to(dtype)
    m = layer.mlp(h1).float()
    return (h1.float() + layer.mlp_post_norm(m * gate_mlp)).to(dtype)


class QKVProjections(nn.Module):
    """``linear_qkv``: the shared pre-norm and the four bias-free projections q, qx, k, v."""

    def __init__(self, hidden: int, q_size: int, kv_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_norm = PreLayerNorm(hidden, eps=eps, dtype=dtype)
        self.q = nn.Linear(hidden, q_size, bias=False, dtype=dtype)
        self.qx = nn.Linear(hidden, q_size, bias=False, dtype=dtype)
        self.k = nn.Linear(hidden, kv_size, bias=False, dtype=dtype)
        self.v = nn.Linear(hidden, kv_size, bias=False, dtype=dtype)


class ParallelAttention(nn.Module):
    """``self_attention``: block-causal self-attention and per-chunk cross-attention from one pre-norm."""

    def __init__(self, config: DiTConfig, dtype: torch.dtype) -> None:
        super().__init__()
        hd = config.kv_channels
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_query_groups
        self.head_dim = hd
        q_size = self.num_heads * hd
        kv_size = self.num_groups * hd
        eps = config.layernorm_epsilon
        one_plus = config.apply_layernorm_1p
        self.linear_qkv = QKVProjections(config.hidden_size, q_size, kv_size, eps, dtype)
        self.linear_kv_xattn = nn.Linear(config.xattn_dim, 2 * kv_size, bias=False, dtype=dtype)
        # stored in params_dtype, computed with fp32 accumulation and output (reference: fp32 autocast)
        self.linear_proj = FP32Linear(2 * q_size, config.hidden_size, bias=False, dtype=dtype)
        self.q_layernorm = ZeroCenteredLayerNorm(hd, eps, one_plus, torch.float32)
        self.k_layernorm = ZeroCenteredLayerNorm(hd, eps, one_plus, torch.float32)
        self.q_layernorm_xattn = ZeroCenteredLayerNorm(hd, eps, one_plus, dtype)
        self.k_layernorm_xattn = ZeroCenteredLayerNorm(hd, eps, one_plus, dtype)

    def forward(self, h: torch.Tensor, ctx: _CallContext, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Self- and cross-attention outputs (N·S, heads·hd) each, compute dtype; ``h`` is (N·S, hidden).

        The two attentions run one after the other so that only one set of queries is alive at a time."""
        rows = h.shape[0]
        dt = ctx.dtype
        nh, ng, hd = self.num_heads, self.num_groups, self.head_dim
        q = ctx.new_rows(h, (rows, nh, hd))
        k = ctx.new_rows(h, (rows, ng, hd))
        v = ctx.new_rows(h, (rows, ng, hd))
        for piece in ctx.pieces:
            at = slice(piece.start, piece.end)
            pos = slice(piece.position, piece.position + piece.end - piece.start)
            q[at], k[at], v[at] = ctx.run(_self_attention_inputs, self, h[at], ctx.cos[pos], ctx.sin[pos], dt)
        if ctx.cp is not None:
            # Ulysses: [local rows, all heads] -> [all rows, this rank's heads]; the ranges, the cache and the kernel
            # below then see the whole sequence exactly as in one process
            q, k, v = (ctx.cp.sequence_to_heads(t, ctx.total_rows) for t in (q, k, v))
        key, value = ctx.keys_and_values(layer, k, v)
        del k, v
        core = range_attention(q, key, value, ctx.q_ranges, ctx.k_ranges, backend=ctx.backend)
        del q, key, value
        if ctx.cp is not None:
            core = ctx.cp.heads_to_sequence(core)

        # cross-attention: linear_kv_xattn rows are per group [k | v]. Each row attends to its own chunk's caption,
        # so under context parallelism it runs on the local rows with every head (no exchange needed)
        qx = ctx.new_rows(h, (rows, nh, hd))
        for piece in ctx.pieces:
            at = slice(piece.start, piece.end)
            qx[at] = ctx.run(_cross_attention_queries, self, h[at], dt)
        kvx = ctx.per_request_rows(self.linear_kv_xattn, ctx.captions).to(dt).view(-1, ng, 2 * hd)
        kx = self.k_layernorm_xattn(kvx[..., :hd]).contiguous()
        vx = kvx[..., hd:].contiguous()
        xq_ranges = ctx.q_ranges if ctx.xq_ranges is None else ctx.xq_ranges
        cross = range_attention(qx, kx, vx, xq_ranges, ctx.xk_ranges, backend=ctx.backend)
        return core.view(rows, nh * hd), cross.view(rows, nh * hd)


class AdaModulate(nn.Module):
    """``ada_modulate_layer``: Linear(SiLU(condition)) -> [attention gate | MLP gate]."""

    def __init__(self, cond_dim: int, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(cond_dim, 2 * hidden, bias=True, dtype=dtype))

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(condition))


class FeedForward(nn.Module):
    """``mlp``: pre-norm, fc1, SwiGLU (gate half first) or exact GELU, fc2."""

    def __init__(self, config: DiTConfig, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, ffn = config.hidden_size, config.ffn_hidden_size
        self.gated = config.gated_linear_unit
        self.layer_norm = PreLayerNorm(hidden, eps=config.layernorm_epsilon, dtype=dtype)
        self.linear_fc1 = nn.Linear(hidden, 2 * ffn if self.gated else ffn, bias=False, dtype=dtype)
        self.linear_fc2 = nn.Linear(ffn, hidden, bias=False, dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dt = h.dtype
        u = self.linear_fc1(self.layer_norm(h)).to(dt)
        if self.gated:
            gate, lin = u.chunk(2, dim=-1)
            # one rounding, like the fused silu_and_mul kernel (compiled: one kernel, no fp32 temporaries)
            u = (F.silu(gate.float()) * lin.float()).to(dt)
        else:
            u = F.gelu(u)
        return self.linear_fc2(u).to(dt)


class TransformerLayer(nn.Module):
    """One layer: parallel self/cross attention, fixed 8-way interleave, fp32 projection, gated sandwich norms."""

    def __init__(self, config: DiTConfig, dtype: torch.dtype) -> None:
        super().__init__()
        eps, one_plus = config.layernorm_epsilon, config.apply_layernorm_1p
        self.ada_modulate_layer = AdaModulate(config.cond_dim, config.hidden_size, dtype)
        self.self_attention = ParallelAttention(config, dtype)
        self.self_attn_post_norm = ZeroCenteredLayerNorm(config.hidden_size, eps, one_plus, torch.float32)
        self.mlp = FeedForward(config, dtype)
        self.mlp_post_norm = ZeroCenteredLayerNorm(config.hidden_size, eps, one_plus, torch.float32)

    def forward(self, h: torch.Tensor, ctx: _CallContext, layer: int) -> torch.Tensor:
        """``h`` (N·S, hidden) in the compute dtype is updated in place, piece by piece, and returned."""
        d = h.shape[-1]
        core, cross = self.self_attention(h, ctx, layer)

        # softcap with cap 1: tanh in fp32, rounded to the compute dtype, then used in fp32
        n = ctx.condition.shape[0]
        ada = torch.cat([self.ada_modulate_layer(ctx.condition[b : b + 1]) for b in range(n)])
        gates = torch.tanh(ada.float()).to(ctx.dtype).float()  # (N, chunks, 2·hidden)
        # per (element, chunk) gate vectors as tensors of their own: compiled code then never sees a view whose
        # base shape depends on the call's chunk count
        gate_attn = {key: gates[key][:d].clone() for key in {(p.element, p.chunk) for p in ctx.pieces}}
        gate_mlp = {key: gates[key][d:].clone() for key in gate_attn}
        for piece in ctx.pieces:
            at = slice(piece.start, piece.end)
            key = (piece.element, piece.chunk)
            h[at] = ctx.run(_layer_output, self, core[at], cross[at], h[at], gate_attn[key], gate_mlp[key])
        return h


class TransformerBlocks(nn.Module):
    """``videodit_blocks``: the layer stack and the final zero-centred LayerNorm."""

    def __init__(self, config: DiTConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(config, dtype) for _ in range(config.num_layers)])
        self.final_layernorm = ZeroCenteredLayerNorm(
            config.hidden_size, config.layernorm_epsilon, config.apply_layernorm_1p, torch.float32
        )


class FinalLinear(nn.Module):
    def __init__(self, hidden: int, out_features: int) -> None:
        super().__init__()
        self.linear = FP32Linear(hidden, out_features, bias=False, dtype=torch.float32)


def _shard_call(ctx: _CallContext, cp: ContextParallel, h: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the residual stream ``h`` (every row), padded with zeros to the shard size; ``ctx`` is
    narrowed to them: the token pieces become the local parts of the same pieces (same chunk, same RoPE position)
    and the cross-attention queries get local ranges. Self-attention keeps the call's ranges over every row."""
    total = h.shape[0]
    first, real, shard = shard_rows(total, cp.size, cp.rank)
    local = h.new_zeros((shard, h.shape[1]))
    local[:real] = h[first : first + real]
    end = first + real
    pieces, xq_ranges, xk_ranges = [], [], []
    for piece in ctx.pieces:
        lo, hi = max(piece.start, first), min(piece.end, end)
        if lo < hi:
            pieces.append(_Piece(lo - first, hi - first, piece.element, piece.chunk, piece.position + lo - piece.start))
    for (qs, qe), xk in zip(ctx.q_ranges, ctx.xk_ranges):
        lo, hi = max(qs, first), min(qe, end)
        if lo < hi:
            xq_ranges.append((lo - first, hi - first))
            xk_ranges.append(xk)
    ctx.pieces, ctx.xq_ranges, ctx.xk_ranges = pieces, xq_ranges, xk_ranges
    ctx.cp, ctx.total_rows = cp, total
    return local


def _as_ranges(value, name: str) -> list[tuple[int, int]]:
    rows = list(value) if isinstance(value, (list, tuple)) else torch.as_tensor(value).reshape(-1, 2).tolist()
    out = []
    for row in rows:
        if len(row) != 2:
            raise ValueError(f"{name} rows must be [start, end) pairs, got {row!r}")
        out.append((int(row[0]), int(row[1])))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------
class VideoDiT(nn.Module):
    """The MAGI-1 DiT. ``state_dict()`` keys and shapes are those of the reference checkpoint (spec §2.11).

    Parameters are created in their policy dtype: the fp32 set of :meth:`is_fp32_param` in float32, the rest in
    ``config.params_dtype``. The module is constructible under ``torch.device("meta")`` (nothing in ``__init__``
    depends on parameter values) for ``load_state_dict(..., assign=True)``.
    """

    def __init__(self, config: DiTConfig, attention_backend: str = "sdpa", *,
                 max_piece_tokens: int = DEFAULT_MAX_PIECE_TOKENS) -> None:
        super().__init__()
        self.config = config
        self.attention_backend = attention_backend
        self.max_piece_tokens = int(max_piece_tokens)
        self.piece_runner = PieceRunner(compiled=False)
        self.context_parallel: ContextParallel | None = None
        self.compute_dtype = getattr(torch, config.params_dtype)
        dt = self.compute_dtype
        pt, p = config.t_patch_size, config.patch_size
        self.x_embedder = nn.Conv3d(
            config.in_channels, config.hidden_size, kernel_size=(pt, p, p), stride=(pt, p, p), bias=False,
            dtype=torch.float32,
        )
        self.t_embedder = TimestepEmbedder(config.cond_dim)
        self.y_embedder = CaptionEmbedder(
            config.caption_channels, config.xattn_dim, config.cond_dim, config.caption_max_length
        )
        # the table is sized from hidden/heads (the config insists this equals kv_channels)
        self.rope = RotaryBands(config.hidden_size // config.num_attention_heads)
        self.videodit_blocks = TransformerBlocks(config, dt)
        self.final_linear = FinalLinear(config.hidden_size, pt * p * p * config.out_channels)

    def set_context_parallel(self, group: ContextParallel | None) -> None:
        """Run every later forward together with the other ranks of ``group`` (None: alone, the default). Every
        rank must then make the same forward calls in the same order; each returns the whole output."""
        if group is not None and group.size > 1:
            cfg = self.config
            if cfg.num_attention_heads % group.size or cfg.num_query_groups % group.size:
                raise ValueError(
                    f"context parallelism over {group.size} ranks needs heads ({cfg.num_attention_heads}) and KV "
                    f"groups ({cfg.num_query_groups}) divisible by {group.size}"
                )
        self.context_parallel = group if group is not None and group.size > 1 else None

    def set_compiled(self, compiled: bool) -> None:
        """Run the token-wise parts of every layer through ``torch.compile`` (dynamic token count) or eagerly."""
        if compiled != self.piece_runner.compiled:
            self.piece_runner = PieceRunner(compiled=compiled)

    @torch.no_grad()
    def note_bf16_exact_weights(self) -> None:
        """Mark the fp32-kept GEMM weights whose values are bf16 (what a bf16 checkpoint gives after promotion), so
        their GEMMs may run on bf16 tensor cores without changing a product (:func:`linear_fp32`)."""
        for module in [self.x_embedder, *(m for m in self.modules() if isinstance(m, FP32Linear))]:
            w = module.weight
            if w.device.type != "meta":
                module.weight_bf16_exact = bool(torch.equal(w, w.to(torch.bfloat16).to(w.dtype)))

    def _patch_embed(self, xs: torch.Tensor) -> torch.Tensor:
        """(1, C, T, H, W) fp32 latent -> (1, hidden, T', H', W') tokens, the Conv3d with kernel = stride.

        Where bf16-operand GEMMs with fp32 output exist it runs as patchify + :func:`linear_fp32` (exact products
        of the bf16-valued weight); elsewhere as the convolution."""
        weight = self.x_embedder.weight
        pt, p = self.config.t_patch_size, self.config.patch_size
        if not fp32_out_gemm_available(xs.device):
            return F.conv3d(xs, weight.float(), stride=(pt, p, p))
        n, c, t, hh, ww = xs.shape
        tp, hp, wp = t // pt, hh // p, ww // p
        patches = xs.view(n, c, tp, pt, hp, p, wp, p).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(n, tp * hp * wp, -1)
        tokens = linear_fp32(patches, weight.reshape(weight.shape[0], -1),
                             weight_bf16_exact=_holds_bf16_values(self.x_embedder))
        return tokens.transpose(1, 2).reshape(n, -1, tp, hp, wp)

    # ------------------------------------------------------------------ precision policy
    @classmethod
    def is_fp32_param(cls, name: str) -> bool:
        """True for the parameters the reference keeps in fp32 whatever params_dtype is (spec §2.10)."""
        parts = name.split(".")
        if parts[0] in _FP32_TOP_MODULES:
            return True
        return any(part in _FP32_NORM_MODULES for part in parts[:-1])

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        captions: torch.Tensor,
        caption_mask: torch.Tensor,
        kv_range,
        caption_dropout,
        *,
        slice_point: int = 0,
        chunk_width: int = 6,
        dt: float | None = None,
        kv_cache: KVCache | Sequence[KVCache] | None = None,
        write_cache: bool = False,
        skip_cache_write_chunks: int = 0,
        max_cache_write_chunks: int | None = None,
        intermediates: dict | None = None,
    ) -> torch.Tensor:
        """One DiT call; returns the fp32 velocity (N, out latent channels, T, H, W).

        x: (N, latent channels, T = chunks·chunk_width, H, W); t: (N, chunks); captions: (N·chunks, L, C) (a
        singleton dim 1 is accepted); caption_mask: (N·chunks, L), nonzero = valid; kv_range: (N·chunks, 2) absolute
        [start, end) rows of the batch-flattened [cache ; current] key sequence; caption_dropout: (N,) bool
        selecting null-caption row -1 (True) or -2 (False) for adaLN; slice_point: index of the call's first chunk;
        dt: the distilled model's step-size value (None for base models). With ``kv_cache`` and (slice_point > 0 or
        ``write_cache``) the cache is used: chunks [lo, slice_point) are read, lo being the lowest chunk any range
        starts in, and with ``write_cache`` the call's chunks except the last ``skip_cache_write_chunks`` are stored
        (at most the first ``max_cache_write_chunks`` of them: a sampler that knows later calls overwrite the noisy
        chunks' rows before reading them can skip those copies).
        """
        cfg = self.config
        cdt = self.compute_dtype
        device = self.x_embedder.weight.device
        pt, p = cfg.t_patch_size, cfg.patch_size

        # ---------------------------------------------------------------- validate the call
        if x.dim() != 5:
            raise ValueError(f"x must be (N, C, T, H, W), got shape {tuple(x.shape)}")
        n, channels, frames, height, width = x.shape
        if channels != cfg.latent_channels:
            raise ValueError(f"x has {channels} channels; this model takes {cfg.latent_channels}-channel latents")
        t = torch.as_tensor(t).to(device=device, dtype=torch.float32)
        if t.dim() != 2 or t.shape[0] != n:
            raise ValueError(f"t must be (N={n}, chunks), got shape {tuple(t.shape)}")
        chunks = t.shape[1]
        if chunks < 1 or frames != chunks * chunk_width:
            raise ValueError(f"x has {frames} frames but t gives {chunks} chunks of {chunk_width} frames")
        if chunk_width % pt or height % p or width % p:
            raise ValueError(f"latent ({chunk_width} frames/chunk, {height}x{width}) is not divisible by the patch")
        if cfg.distill and dt is None:
            raise ValueError("a distilled model needs the step-size value dt (see velocity.distill_dt)")
        if not cfg.distill and dt is not None:
            raise ValueError("dt is only meaningful for distilled models")
        if slice_point < 0:
            raise ValueError(f"slice_point must be >= 0, got {slice_point}")
        if not 0 <= skip_cache_write_chunks <= chunks:
            raise ValueError(f"skip_cache_write_chunks must be in [0, {chunks}], got {skip_cache_write_chunks}")
        caches = None
        if kv_cache is not None:
            caches = [kv_cache] if isinstance(kv_cache, KVCache) else list(kv_cache)
            if len(caches) != n:
                raise ValueError(f"need one KV cache per batch element ({n}), got {len(caches)}")
            for cache in caches:
                if cache.num_layers != cfg.num_layers:
                    raise ValueError(f"KV cache has {cache.num_layers} layers, the model {cfg.num_layers}")

        rows = n * chunks
        captions = torch.as_tensor(captions)
        if captions.dim() == 4:
            captions = captions.squeeze(1)
        if captions.dim() != 3 or captions.shape[0] != rows:
            raise ValueError(f"captions must be (N·chunks={rows}, L, C), got {tuple(captions.shape)}")
        mask = torch.as_tensor(caption_mask).reshape(rows, -1).to(device) != 0
        if mask.shape[1] != captions.shape[1]:
            raise ValueError(f"caption_mask length {mask.shape[1]} != caption length {captions.shape[1]}")
        dropout = torch.as_tensor(caption_dropout, dtype=torch.bool).reshape(-1).to(device)
        if dropout.numel() == 1 and n > 1:
            dropout = dropout.expand(n)
        if dropout.numel() != n:
            raise ValueError(f"caption_dropout must have N={n} entries, got {dropout.numel()}")
        ranges = _as_ranges(kv_range, "kv_range")
        if len(ranges) != rows:
            raise ValueError(f"kv_range must have N·chunks={rows} rows, got {len(ranges)}")

        # ---------------------------------------------------------------- embeddings (fp32)
        # rescale in the input's dtype first: a bf16 prefix latent is rounded there, as in the reference (spec §6.9)
        xs = (x.to(device) * cfg.x_rescale_factor).to(torch.float32)
        if cfg.half_channel_vae:
            xs = torch.cat([xs, xs], dim=1)
        # Batch invariance: a request's numbers must not depend on what it is batched with, and BLAS / oneDNN pick
        # different kernels for different small row counts. So the small per-request products (patch embedding,
        # embedders, gates, caption projections) run one request at a time; the big token GEMMs stay batched.
        tokens = torch.cat([self._patch_embed(xs[b : b + 1]) for b in range(n)])
        tp, hp, wp = tokens.shape[2:]
        tokens = tokens.flatten(2).transpose(1, 2)  # (N, S, h), frame-major token order
        seq = tp * hp * wp
        tpc = seq // chunks
        t_total = tp + (chunk_width // pt) * slice_point  # absolute temporal positions include cached chunks

        rope = self.rope.table(t_total, tp, hp, wp)
        sin, cos = rope.tensor_split(2, dim=-1)

        conditions = []
        for b in range(n):
            t_emb = self.t_embedder(t[b], cdt)
            if dt is not None:
                t_emb = t_emb + self.t_embedder(torch.full_like(t[b], dt), cdt)
            conditions.append(t_emb + self.y_embedder.adaln(dropout[b : b + 1]))
        condition = torch.stack(conditions)

        valid = captions.to(device=device, dtype=torch.float32)[mask]  # (valid tokens, C), row-major over chunks
        per_request_tokens = mask.reshape(n, -1).sum(dim=1).tolist()
        y_flat = torch.cat([self.y_embedder.y_proj_xattn(rows) for rows in valid.split(per_request_tokens)])
        counts = mask.sum(dim=1).tolist()

        if intermediates is not None:
            intermediates["x_tokens"] = tokens.transpose(0, 1)
            intermediates["condition"] = condition
            intermediates["condition_map"] = (
                torch.arange(rows, device=device).repeat_interleave(tpc).reshape(n, seq).transpose(0, 1)
            )
            intermediates["y_xattn_flat"] = y_flat
            intermediates["rope"] = rope

        # ---------------------------------------------------------------- attention ranges and cache plan
        q_ranges = [(i * tpc, (i + 1) * tpc) for i in range(rows)]
        xk_ranges, start = [], 0
        for c in counts:
            xk_ranges.append((start, start + int(c)))
            start += int(c)

        ctx = _CallContext(
            dtype=cdt, chunks=chunks, tokens_per_chunk=tpc, cos=cos, sin=sin,
            condition=condition.to(cdt), captions=y_flat.to(cdt), q_ranges=q_ranges, k_ranges=ranges,
            xk_ranges=xk_ranges, backend=self.attention_backend, caption_tokens=per_request_tokens,
            pieces=token_pieces(n, chunks, tpc, self.max_piece_tokens), run=self.piece_runner,
        )
        key_len = n * seq
        if caches is not None and (slice_point > 0 or write_cache):
            for cache in caches:
                cache.bind_tokens_per_chunk(tpc)
            # Ranges come in the reference layout: element b's keys (its whole cache prefix, then its current rows)
            # at [b·S_k, (b+1)·S_k). Each element reads only the chunks some of its ranges reach: attention is
            # range-based, so shifting its ranges by the unread prefix gives the same result while bounding memory
            # to the window.
            full = slice_point * tpc + seq
            firsts, shifted, base = [], [], 0
            for b in range(n):
                own = ranges[b * chunks : (b + 1) * chunks]
                lo = max(0, min(min((s - b * full) // tpc for s, _ in own), slice_point))
                # fail before any layer writes, so a bad call leaves every cache as it was
                for c in range(lo, slice_point):
                    if not caches[b].has(c):
                        raise KeyError(
                            f"KV cache lacks chunk {c}, which kv_range {own} reads (retained: {caches[b].chunks()})"
                        )
                offset = base - b * full - lo * tpc
                shifted += [(s + offset, e + offset) for s, e in own]
                firsts.append(lo)
                base += (slice_point - lo) * tpc + seq
            ctx.k_ranges = shifted
            ctx.caches = caches
            ctx.read_first, ctx.read_end = firsts, slice_point
            ctx.write_first = slice_point
            ctx.write_chunks = chunks - skip_cache_write_chunks if write_cache else 0
            if max_cache_write_chunks is not None:
                ctx.write_chunks = min(ctx.write_chunks, max(0, int(max_cache_write_chunks)))
            key_len = base
        for s, e in ctx.k_ranges:
            if not 0 <= s <= e <= key_len:
                raise ValueError(
                    f"kv_range {list(ranges)} reaches outside the {key_len} keys of this call "
                    f"(slice_point={slice_point}, cache {'used' if ctx.caches is not None else 'not used'})"
                )

        # ---------------------------------------------------------------- transformer
        # the residual stream (N·S, hidden) is updated in place by each layer
        h = tokens.reshape(n * seq, -1).to(dtype=cdt, memory_format=torch.contiguous_format, copy=True)
        del tokens, xs
        cp = self.context_parallel
        if cp is not None:
            if intermediates is not None:
                raise ValueError("intermediates are only collected by a forward without context parallelism")
            h = _shard_call(ctx, cp, h)
        with self.piece_runner.settings():
            for index, layer in enumerate(self.videodit_blocks.layers):
                h = layer(h, ctx, index)
                if intermediates is not None:
                    intermediates[f"layer{index}.out"] = h.view(n, seq, -1).transpose(0, 1).clone()

        # ---------------------------------------------------------------- final layer and unpatchify (fp32)
        # piece by piece like the layers: the fp32 norm output of all window tokens would be the call's largest
        # tensor (2.7 GB for a 24B 720p window)
        final = self.final_linear.linear
        out = ctx.new_rows(h, (h.shape[0], final.out_features), dtype=torch.float32)  # (N·S, pT·p·p·C), C fastest
        normed = [] if intermediates is not None else None
        for piece in ctx.pieces:
            at = slice(piece.start, piece.end)
            x_piece = self.videodit_blocks.final_layernorm(h[at].float())
            if normed is not None:
                normed.append(x_piece)
            out[at] = final(x_piece)
        del h
        if cp is not None:
            out = cp.gather_sequence(out, n * seq)
        if normed is not None:
            intermediates["blocks_out_after_final_layernorm"] = torch.cat(normed).view(n, seq, -1).transpose(0, 1)
        c_out = cfg.out_channels
        out = out.view(n, tp, hp, wp, pt, p, p, c_out).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = out.reshape(n, c_out, tp * pt, hp * p, wp * p)
        if cfg.half_channel_vae:
            out = out[:, : c_out // 2]
        return (out / cfg.x_rescale_factor).contiguous()
