"""Capacity planner: what one request costs on a GPU, by running the project's own code on the meta device.

This file owns ``magi-server plan``: for a model (preset or weights folder), a size, a frame count and a step count
it reports, per model call and per request, FLOPs by kind, bytes moved, kernel launches, the peak of live device
memory (weights + KV cache + activations + VAE decode + T5 where it lives) and a roofline time for a named GPU
profile; whether the request fits a device memory; and, when it does not, which changes would (the fp8 preset, a
smaller window, a lower resolution, context parallelism), found by planning those alternatives too.

How: the DiT is built on meta through the loading path (:func:`magi_server.runtime.loading.build_dit`, fp8 linears
included), the request's calls come from the runner's own plan (:func:`magi_server.runtime.sampler.plan_request`), and each
DISTINCT call is run once through the runner itself (:func:`magi_server.runtime.sampler.sampler_step_batch`, hence
``guidance.guided_velocity_batch`` with its CFG passes and nearly-clean copy) on meta tensors under
:class:`magi_server.runtime.accounting.OpAccountant`, with the KV cache holding exactly the chunks the runner would hold
before that call. Two calls are the same when their structure relative to their first chunk is: slots, key ranges,
extra clean chunk, nearly-clean copy, CFG passes, cached chunks before and kept after.

Layer extrapolation (speed): meta ops cost no memory but each still costs ~0.3 ms of Python dispatch, and a 24B
call has ~50 k of them. So each distinct call runs on a 3-layer DiT (first, one middle, last layer: for fp8 models
the middle one is an fp8 layer, the outer ones bf16, as in the checkpoints), each layer's ops recorded as a stretch
of their own, and the middle layer's stretch is counted L - 2 times (:func:`magi_server.runtime.accounting.repeat_segments`):
FLOPs, bytes and kernels add up, and the live-memory curve is shifted by what each copy leaves behind (cache rows it
writes), so the peak is exact, not scaled. ``layers="all"`` runs the real depth instead; the tests check that both
give the same numbers. The VAE decode of one chunk is accounted the same way over its blocks. One request takes
10-60 s on a 2-core CPU (with alternatives planned when it does not fit, up to about a minute more).

The memory of a request, in the order the server holds it: DiT weights (policy dtypes: fp32 embedders, bf16 blocks
or fp8 linears), VAE weights (bf16), T5-XXL (4.76 B parameters) as the pipeline places it (fp32 on the CPU; or bf16
copied onto the GPU for each encode), then per request the latent canvas, the caption rows, the KV cache (in host
memory with the config's ``kv_offload``: only the rows a layer reads are uploaded) and the call's activations,
and, overlapping any call after the first finished chunk, the VAE decode of a chunk on the output thread. The DiT
runs eagerly here: on a GPU the compiled token-wise pieces fuse their fp32 temporaries away, so the accounted
activations are an upper bound there.

GPU profiles are vendor peak figures (dense, no sparsity), not measurements; see :data:`GPU_PROFILES`.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from magi_server.params import RESOLUTION_SIZES
from magi_server.runtime.memory_model import GB, request_memory_estimate

# the landscape size of each tier, as the hosted APIs and `generate --resolution` size them
RESOLUTIONS = MappingProxyType({tier: RESOLUTION_SIZES[(tier, "16:9")] for tier in ("480p", "720p")})

# T5 v1.1 XXL encoder: 32128 x 4096 embedding, 24 layers of (4 x 4096^2 attention + 2 x 4096 x 10240 gated input +
# 10240 x 4096 output + 2 norms), one relative-position table (32 x 64) and a final norm.
T5_XXL_PARAMS = 32128 * 4096 + 24 * (4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096) + 32 * 64 + 4096
DEFAULT_CAPTION_TOKENS = 100  # valid caption tokens of a text pass (spec §11.1 assumes 100; null passes have 50)


@dataclass(frozen=True)
class GpuProfile:
    """A GPU for the roofline: vendor peak rates (FLOP/s, dense) and bandwidth (bytes/s), memory in bytes."""

    key: str
    name: str
    memory_bytes: int
    bf16_flops: float
    fp8_flops: float
    fp32_flops: float
    tf32_flops: float
    bandwidth: float

    def roofline(self):
        from magi_server.runtime.accounting import Roofline

        return Roofline(self.key, self.bf16_flops, self.fp8_flops, self.fp32_flops, self.tf32_flops, self.bandwidth)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# Vendor peak figures (NVIDIA H100 / H200 SXM datasheets): dense tensor-core bf16 and fp8, TF32, fp32 on the CUDA
# cores (what cuBLAS uses for fp32 GEMMs unless TF32 is allowed), HBM bandwidth, memory size in GB (1e9 bytes).
GPU_PROFILES = MappingProxyType({
    "H100": GpuProfile("H100", "NVIDIA H100 SXM 80GB", 80 * GB, 989e12, 1979e12, 67e12, 495e12, 3.35e12),
    "H200": GpuProfile("H200", "NVIDIA H200 SXM 141GB", 141 * GB, 989e12, 1979e12, 67e12, 495e12, 4.8e12),
})


def gpu_profile(name: str) -> GpuProfile:
    key = str(name).strip().upper()
    if key not in GPU_PROFILES:
        raise ValueError(f"unknown GPU profile {name!r}; choose one of {', '.join(GPU_PROFILES)}")
    return GPU_PROFILES[key]


def parse_resolution(text: str) -> tuple[int, int]:
    """"480p" -> (832, 480), "720p" -> (1280, 720), "WxH" -> (W, H); sides must be multiples of 16."""
    value = str(text).strip().lower()
    if value in RESOLUTIONS:
        return RESOLUTIONS[value]
    match = re.fullmatch(r"(\d+)\s*[x×]\s*(\d+)", value)
    if not match:
        raise ValueError(f"resolution must be 480p, 720p or WxH, got {text!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if width < 16 or height < 16 or width % 16 or height % 16:
        raise ValueError(f"width and height must be positive multiples of 16, got {width}x{height}")
    return width, height


def parse_bytes(text: str | int | float) -> int:
    """"80GB" / "80 GB" / "80G" -> 80e9, "80GiB" -> 80·2^30, a plain number -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
    if not match:
        raise ValueError(f"memory size must look like 80GB, 80GiB or a number of bytes, got {text!r}")
    number, prefix, binary = float(match.group(1)), match.group(2), match.group(3)
    power = " kmgt".index(prefix) if prefix else 0
    return int(number * ((1024 if binary else 1000) ** power))


# ------------------------------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class PlanInputs:
    """What to plan. ``model``: a preset name or a weights folder (or a reference-style config JSON)."""

    model: str
    width: int
    height: int
    frames: int
    steps: int | None = None  # default: the model config's
    window: int | None = None  # default: the model config's window_size
    prefix_frames: int = 0  # latent frames of an i2v / v2v prefix (0: t2v)
    caption_tokens: int = DEFAULT_CAPTION_TOKENS
    t5_device: str | None = None  # "device" or "cpu"; default from the config (t5_device)
    t5_dtype: str | None = None  # default: bfloat16 on the device, float32 on the CPU (as the pipeline loads it)
    t5_offload: bool | None = None  # on the device only while encoding; default: yes when on the device
    kv_offload: bool | None = None  # KV cache in host memory between calls; default from the config (kv_offload)
    cp: int = 1  # context-parallel GPUs (Ulysses): an estimate, the server does not run it
    overlap_decode: bool = True  # the output thread decodes a finished chunk while the next call runs

    def replace(self, **changes) -> "PlanInputs":
        return dataclasses.replace(self, **changes)


def model_config(model: str):
    """(display name, MagiConfig) for a preset name, a weights folder or a reference-style config JSON."""
    from magi_server.models.config import MagiConfig, canonical_preset_name, preset

    name = canonical_preset_name(model)
    if name is not None and not Path(model).exists():
        return name, preset(name)
    path = Path(model)
    if path.is_file() and path.suffix == ".json":
        return path.stem, MagiConfig.from_json(path)
    if path.is_dir():
        from magi_server.runtime.loading import resolve_model_folder

        return path.name, resolve_model_folder(path)
    raise ValueError(f"--model must be a preset ({', '.join(_preset_names())}), a weights folder or a config JSON; "
                     f"got {model!r}")


def _preset_names() -> Sequence[str]:
    from magi_server.models.config import REAL_PRESETS

    return REAL_PRESETS


# ------------------------------------------------------------------------------------------------- the results


@dataclass
class CallAccount:
    """One distinct model call, extrapolated to the real depth. Memory figures exclude the weights."""

    signature: tuple
    example_index: int  # the first call of the request with this signature
    chunks: int  # slots of the call (extra clean chunk included), plus 1 for the nearly-clean copy
    cache_chunks_before: int
    flops: dict[str, int]
    bytes: int
    kernels: int
    roofline_s: dict[str, float]
    peak_bytes: int  # live device memory at the call's peak, weights excluded
    start_bytes: int  # live before the call (canvas, captions, cache), weights excluded
    end_bytes: int  # live after it, weights excluded
    content_after: frozenset[int]  # cached chunks after the call, relative to its slice point
    count: int = 0  # calls of the request with this signature

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    def as_dict(self) -> dict:
        return {
            "example_call": self.example_index, "count": self.count, "chunks": self.chunks,
            "cache_chunks_before": self.cache_chunks_before, "flops": dict(self.flops),
            "total_flops": self.total_flops, "bytes": self.bytes, "kernels": self.kernels,
            "roofline_s": dict(self.roofline_s), "peak_bytes": self.peak_bytes, "start_bytes": self.start_bytes,
            "end_bytes": self.end_bytes,
        }


@dataclass
class RequestPlan:
    """Everything ``magi-server plan`` reports about one request."""

    inputs: PlanInputs
    model_name: str
    gpu: GpuProfile
    device_memory: int
    num_steps: int
    window_size: int
    cfg_number: int
    tokens_per_chunk: int
    num_chunks: int
    num_calls: int
    calls: list[CallAccount]  # distinct calls
    call_signatures: list[int]  # per request call: index into ``calls``
    totals: dict  # flops by kind, bytes, kernels, roofline_s (DiT calls)
    vae_decode: dict  # per chunk: flops, bytes, roofline_s, workspace_bytes; decodes
    memory: dict  # the breakdown (bytes)
    t5: dict  # where the text encoder lives and what it costs
    fits: bool
    suggestions: list[dict] = field(default_factory=list)
    method: str = ""
    wall_s: float = 0.0

    def as_dict(self) -> dict:
        return {
            "model": self.model_name, "inputs": dataclasses.asdict(self.inputs), "gpu": self.gpu.as_dict(),
            "device_memory_bytes": self.device_memory, "num_steps": self.num_steps, "window_size": self.window_size,
            "cfg_number": self.cfg_number, "tokens_per_chunk": self.tokens_per_chunk, "num_chunks": self.num_chunks,
            "num_calls": self.num_calls, "distinct_calls": [c.as_dict() for c in self.calls],
            "call_signatures": self.call_signatures, "totals": self.totals, "vae_decode": self.vae_decode,
            "memory": self.memory, "t5": self.t5, "fits": self.fits, "suggestions": self.suggestions,
            "method": self.method, "wall_s": round(self.wall_s, 2),
            "note": "roofline times use vendor peak figures (dense) and count every op at the roofline of its own "
                    "FLOPs and bytes; real kernels reach less",
        }


# ---------------------------------------------------------------------------------------------- the accounting


def _depth_plan(num_layers: int, layers: str) -> tuple[int, int]:
    """(layers to build, extra copies of its middle layer) for accounting a stack of ``num_layers``."""
    if layers not in ("extrapolate", "all"):
        raise ValueError(f"layers must be 'extrapolate' or 'all', got {layers!r}")
    if layers == "all" or num_layers <= 3:
        return num_layers, 0
    return 3, num_layers - 3


@contextmanager
def _layer_phases(accountant, layers, depth: int):
    """Each layer's ops as a phase of its own: ``layer.mid`` for the middle layer of a 3-layer stand-in (the one
    :func:`repeat_segments` copies), ``layer.<i>`` otherwise."""
    def enter(name):
        def hook(module, args):
            accountant.push_phase(name)  # a pre-hook's return value would replace the layer's arguments

        return hook

    def leave(module, args, out):
        accountant.pop_phase()

    handles = []
    for index, layer in enumerate(layers):
        name = "layer.mid" if depth == 3 and index == 1 else f"layer.{index}"
        handles.append(layer.register_forward_pre_hook(enter(name)))
        handles.append(layer.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _repeat(accountant, prefix: tuple[str, ...], extra: int):
    """(counts, peak, end) of the segments under phase path ``prefix``, the middle layer repeated ``extra`` times."""
    from magi_server.runtime.accounting import repeat_segments

    chosen = [seg for seg in accountant.segments if seg.path[: len(prefix)] == prefix]
    return repeat_segments(chosen, {"layer.mid": extra})


def _host_kv_cache_class():
    from magi_server.models.dit import KVCache

    class HostKVCache(KVCache):
        """The runner's KV cache in pinned host memory (kv_offload), on meta: the stored rows are declared host
        memory to the accountant, and each read returns a fresh device copy, as the upload of a real call does."""

        def __init__(self, accountant, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.accountant = accountant

        def write(self, layer: int, first_chunk: int, rows) -> None:
            super().write(layer, first_chunk, rows)
            tpc = self.tokens_per_chunk
            for chunk in range(first_chunk, first_chunk + rows.shape[0] // tpc):
                self.accountant.mark_host(self._store[layer][chunk])

        def read(self, layer: int, first_chunk: int, end_chunk: int):
            rows = super().read(layer, first_chunk, end_chunk)
            self.accountant.mark_host(rows)  # a cat of host pieces is made on the host
            return rows.clone()  # the upload: device memory while the layer runs

    return HostKVCache


def _HostKVCache(accountant, *args, **kwargs):
    return _host_kv_cache_class()(accountant, *args, **kwargs)


class _Session:
    """Models and per-request constants shared by every call accounted for one request."""

    def __init__(self, config, inputs: PlanInputs, profiles: Sequence[GpuProfile], layers: str) -> None:
        import torch

        from magi_server.runtime.loading import build_dit
        from magi_server.runtime.model_runner import model_limits
        from magi_server.runtime.sampler import SamplerSettings, plan_request
        from magi_server.runtime.timesteps import init_t

        self.torch = torch
        self.config = config
        self.inputs = inputs
        self.rooflines = [p.roofline() for p in profiles]
        self.settings = SamplerSettings.from_config(config, num_steps=inputs.steps, window_size=inputs.window)
        problem = model_limits(config).step_problem(self.settings.num_steps, self.settings.window_size)
        if problem:
            raise ValueError(f"steps {self.settings.num_steps}: {problem}")
        dit = config.dit
        self.latent_h, self.latent_w = inputs.height // 8, inputs.width // 8
        self.plan = plan_request(
            self.settings, num_frames=inputs.frames, prefix_frames=inputs.prefix_frames,
            latent_height=self.latent_h, latent_width=self.latent_w, patch_size=dit.patch_size,
            t_patch_size=dit.t_patch_size,
        )
        self.schedule = init_t(self.settings.num_steps, self.settings.shortcut_mode)
        self.full_model = build_dit(dit)
        # a 3-layer stand-in whose middle layer is repeated (fp8 models: layers 0 and L-1 stay bf16, so layer 1 of
        # the stand-in is an fp8 layer like every middle one)
        self.depth, self.extra_layers = _depth_plan(dit.num_layers, layers)
        self.model = self.full_model if self.depth == dit.num_layers else build_dit(
            dataclasses.replace(dit, num_layers=self.depth))
        self.compute_dtype = getattr(torch, dit.params_dtype)
        # the pipeline keeps the cache in pinned host memory on a GPU when the config says kv_offload
        self.kv_offload = bool(config.kv_offload if inputs.kv_offload is None else inputs.kv_offload)
        self.cache_chunk_layer_bytes = (  # one chunk's K|V rows in one layer
            self.plan.tokens_per_chunk * dit.num_query_groups * 2 * dit.kv_channels
            * torch.empty((), dtype=self.compute_dtype).element_size())

    # ---------------------------------------------------------------------------------------- call structure
    def keep_after(self) -> list[frozenset[int]]:
        """The runner's retention sets (chunks each call must leave in the cache), from a meta sampler state."""
        state = self._state(self.model, accountant=None)
        return list(state.keep_after)

    def call_structure(self, index: int) -> tuple:
        """What, besides the cache, decides a call's cost, relative to its first chunk."""
        from magi_server.runtime.timesteps import cfg_scales, chunk_timesteps, nearly_clean

        call = self.plan.calls[index]
        s = self.settings
        tpc = self.plan.tokens_per_chunk
        clean_t = s.clean_t if call.extra_clean_chunk else None
        t = chunk_timesteps(self.schedule, list(call.window_step_indices), clean_t)
        near = nearly_clean(t[call.first_denoising_slot], s.nearly_clean_threshold)
        passes: tuple = ()
        if s.cfg_number == 3:
            scales = [cfg_scales(float(t[j]), s.cfg_t_range, s.prev_chunk_scales, s.text_scales)
                      for j in range(call.first_denoising_slot, len(t))]
            passes = (any(ts != 0.0 for _, ts in scales), tuple(ps != 1.0 for ps, _ in scales))
        base = call.slice_point * tpc
        ranges = tuple((a - base, b - base) for a, b in call.kv_ranges)
        return (call.range_num - call.slice_point, call.extra_clean_chunk, ranges, near, passes,
                call.prefix_overwrite > 0, call.emitted is not None,
                index == 0 and self.plan.prefix_call is not None)

    # ----------------------------------------------------------------------------------------------- tensors
    def _state(self, model, accountant, cache_chunks: Iterable[int] = ()):
        """A meta sampler state as ``pipeline.prepare`` builds it, with ``cache_chunks`` already in the cache."""
        torch = self.torch
        from magi_server.models.text_encoder import NULL_CAPTION_VALID_TOKENS
        from magi_server.runtime.sampler import start_sampler

        dit = self.config.dit
        layout = self.plan.layout
        length = dit.caption_max_length
        masks = torch.zeros(2, layout.num_chunks, length, dtype=torch.int64)
        masks[0, :, : min(self.inputs.caption_tokens, length)] = 1
        masks[1, :, : min(NULL_CAPTION_VALID_TOKENS, length)] = 1
        captions = torch.empty(2, layout.num_chunks, length, dit.caption_channels, device="meta")
        noise = torch.empty(1, dit.latent_channels, layout.latent_frames, self.latent_h, self.latent_w, device="meta")
        prefix = None
        if layout.prefix_frames:
            prefix = torch.empty(1, dit.latent_channels, layout.prefix_frames, self.latent_h, self.latent_w,
                                 device="meta", dtype=torch.bfloat16)
        state = start_sampler(
            self.plan, self.settings, noise=noise, captions=captions, caption_masks=masks, prefix=prefix,
            num_layers=model.config.num_layers, cache_dtype=self.compute_dtype, cache_device="meta",
        )
        del noise
        # the schedule must carry values (nearly-clean flag, CFG buckets); on a GPU it lives there, values known
        state.schedule = self.schedule.clone()
        if self.kv_offload and accountant is not None:
            state.cache = _HostKVCache(accountant, model.config.num_layers, dtype=self.compute_dtype,
                                       device="meta", tokens_per_chunk=self.plan.tokens_per_chunk)
        tpc = self.plan.tokens_per_chunk
        for chunk in sorted(cache_chunks):
            rows = torch.empty(tpc, dit.num_query_groups, 2 * dit.kv_channels, device="meta", dtype=self.compute_dtype)
            for layer in range(model.config.num_layers):
                state.cache.write(layer, chunk, rows)
            del rows
        return state

    def run_call(self, index: int, cache_before: frozenset[int]):
        """Account call ``index`` with ``cache_before`` in the cache; returns (counts, start, peak, end, cache
        after), memory above the weights and extrapolated to the real depth."""
        from magi_server.runtime.accounting import OpAccountant, storage_bytes
        from magi_server.runtime.sampler import sampler_step_batch

        model = self.model
        weights = storage_bytes(model.state_dict().values())
        acc = OpAccountant(rooflines=self.rooflines, segments=True)
        acc.track(model.state_dict().values())
        with acc:
            with acc.phase("setup"):
                state = self._state(model, acc, cache_before)
                state.next_call = index
                state.prefix_done = not (index == 0 and self.plan.prefix_call is not None)
            start = acc.live_bytes
            with acc.phase("call"), _layer_phases(acc, model.videodit_blocks.layers, self.depth):
                chunk = sampler_step_batch(model, [state])[0]
            del chunk
            end = acc.live_bytes
        after = frozenset(state.cache.chunks())
        counts, peak, _ = _repeat(acc, ("call",), self.extra_layers)
        # cached rows exist in every layer of the real model: those held before the call (alive until its end),
        # those held after it (in host memory with kv_offload: no device bytes)
        per_chunk = 0 if self.kv_offload else self.extra_layers * self.cache_chunk_layer_bytes
        held = per_chunk * len(cache_before)
        return counts, start - weights + held, peak - weights + held, end - weights + per_chunk * len(after), after


def _account_calls(session: _Session, only: Iterable[int] | None = None) -> tuple[list[CallAccount], list[int]]:
    """Walk the request's calls in order, accounting each distinct one once."""
    plan = session.plan
    tpc_calls = plan.calls
    keep_after = session.keep_after()
    wanted = None if only is None else set(only)
    found: dict[tuple, CallAccount] = {}
    order: list[CallAccount] = []
    per_call: list[int] = []
    content: frozenset[int] = frozenset()  # a v2v prefix call (run with call 0) writes the prefix chunks
    for index, call in enumerate(tpc_calls):
        sp = call.slice_point
        rel_before = frozenset(c - sp for c in content)
        rel_keep = frozenset(c - sp for c in keep_after[index])
        signature = (session.call_structure(index), rel_before, rel_keep)
        account = found.get(signature)
        if account is None and (wanted is None or index in wanted):
            account = _account_one(session, index, content, signature)
            found[signature] = account
            order.append(account)
        if account is None:
            per_call.append(-1)
            # not accounted (memory-only planning): follow the runner's retention without running the call
            written = {sp} if call.extra_clean_chunk else set()
            content = frozenset((content | written) & keep_after[index])
            continue
        account.count += 1
        per_call.append(order.index(account))
        content = frozenset(c + sp for c in account.content_after)
    return order, per_call


def _account_one(session: _Session, index: int, content: frozenset[int], signature: tuple) -> CallAccount:
    call = session.plan.calls[index]
    structure = signature[0]
    chunks = call.range_num - call.slice_point + (1 if structure[3] and session.settings.cfg_number == 1 else 0)
    stats, start, peak, end, after = session.run_call(index, content)
    sp = call.slice_point
    return CallAccount(
        signature=signature, example_index=index, chunks=chunks, cache_chunks_before=len(content),
        flops=dict(stats.flops), bytes=stats.bytes, kernels=stats.kernels, roofline_s=dict(stats.seconds),
        peak_bytes=peak, start_bytes=start, end_bytes=end, content_after=frozenset(c - sp for c in after),
    )


def rows_bytes(tokens: int, dit, dtype) -> int:
    """Bytes of ``tokens`` K|V cache rows of one layer."""
    import torch

    return tokens * dit.num_query_groups * 2 * dit.kv_channels * torch.empty((), dtype=dtype).element_size()


def account_forward(
    model: str,
    width: int,
    height: int,
    *,
    kv_chunks: Sequence[int] = (2, 3, 4, 5),
    caption_tokens: int = DEFAULT_CAPTION_TOKENS,
    text: bool = True,
    layers: str = "extrapolate",
    profiles: Sequence[GpuProfile] = tuple(GPU_PROFILES.values()),
) -> dict:
    """One bare DiT forward (no sampler): ``len(kv_chunks)`` chunks, chunk j attending to the ``kv_chunks[j]``
    chunks ending at itself, the ones before the call read from a meta KV cache (spec §11.2's steady-state call is
    the default: 4 chunks, 14 chunk-pairs, one cached chunk). ``text``: conditional captions with
    ``caption_tokens`` valid tokens, else the null caption (50). Returns the counts extrapolated to the real depth,
    with ``peak_bytes`` above the weights and the call's ``chunk_forwards`` / ``chunk_pairs``."""
    import torch

    from magi_server.runtime.accounting import OpAccountant, storage_bytes
    from magi_server.runtime.chunking import tokens_per_chunk
    from magi_server.runtime.loading import build_dit
    from magi_server.models.dit import KVCache
    from magi_server.models.text_encoder import NULL_CAPTION_VALID_TOKENS
    from magi_server.runtime.timesteps import distill_dt

    _, config = model_config(model)
    dit = config.dit
    width6 = config.sampling.chunk_width
    chunks = len(kv_chunks)
    cached = max(0, max(r - j - 1 for j, r in enumerate(kv_chunks)))
    tpc = tokens_per_chunk(height // 8, width // 8, width6, dit.patch_size, dit.t_patch_size)
    ranges = [((cached + j + 1 - r) * tpc, (cached + j + 1) * tpc) for j, r in enumerate(kv_chunks)]
    valid = caption_tokens if text else NULL_CAPTION_VALID_TOKENS
    depth, extra = _depth_plan(dit.num_layers, layers)
    dtype = getattr(torch, dit.params_dtype)
    net = build_dit(dataclasses.replace(dit, num_layers=depth))
    weights = storage_bytes(net.state_dict().values())
    acc = OpAccountant(rooflines=[p.roofline() for p in profiles], segments=True)
    acc.track(net.state_dict().values())
    masks = torch.zeros(chunks, dit.caption_max_length, dtype=torch.int64)
    masks[:, :valid] = 1
    with acc:
        cache = KVCache(depth, dtype=dtype, device="meta", tokens_per_chunk=tpc)
        rows = torch.empty(tpc, dit.num_query_groups, 2 * dit.kv_channels, dtype=dtype, device="meta")
        for layer in range(depth):
            for chunk in range(cached):
                cache.write(layer, chunk, rows)
        del rows
        x = torch.empty(1, dit.latent_channels, chunks * width6, height // 8, width // 8, device="meta")
        captions = torch.empty(chunks, dit.caption_max_length, dit.caption_channels, device="meta")
        t = torch.full((1, chunks), 0.5)
        with acc.phase("forward"), _layer_phases(acc, net.videodit_blocks.layers, depth):
            out = net(x, t, captions, masks, ranges, [not text], slice_point=cached, chunk_width=width6,
                      dt=distill_dt(config.sampling.num_steps) if dit.distill else None,
                      kv_cache=cache if cached else None)
            del out
    stats, peak, _ = _repeat(acc, ("forward",), extra)
    held = extra * cached * rows_bytes(tpc, dit, dtype)
    flops, nbytes, kernels, seconds = dict(stats.flops), stats.bytes, stats.kernels, dict(stats.seconds)
    peak = peak - weights + held
    return {
        "flops": flops, "total_flops": sum(flops.values()), "bytes": nbytes, "kernels": kernels,
        "roofline_s": seconds, "peak_bytes": peak, "tokens_per_chunk": tpc, "kv_ranges": ranges,
        "chunk_forwards": chunks, "chunk_pairs": sum(kv_chunks), "cached_chunks": cached,
    }


def account_vae_decode(width: int, height: int, frames: int = 6, *, vae_config=None, fps: int = 24,
                       profiles: Sequence[GpuProfile] = tuple(GPU_PROFILES.values()), layers: str = "extrapolate"):
    """FLOPs, bytes, roofline time and workspace (peak live bytes above the VAE weights) of decoding one chunk of
    ``frames`` latent frames at ``width`` x ``height`` with the bf16 VAE, as the output thread does.

    The reference decodes under bf16 autocast; meta has no autocast, so the VAE runs with bf16 weights and a bf16
    latent (the same GEMM dtypes; autocast's fp32 norms would add small temporaries)."""
    import torch

    from magi_server.runtime.accounting import OpAccountant, storage_bytes
    from magi_server.models.config import VAEConfig
    from magi_server.models.vae import TileConfig, ViTVAE, frames_to_uint8, tiled_decode

    base = vae_config or VAEConfig()
    depth, extra = _depth_plan(base.depth, layers)
    tiles = TileConfig(tile_sample_min_length=fps // 2)
    with torch.device("meta"):
        vae = ViTVAE(dataclasses.replace(base, depth=depth)).to(torch.bfloat16).eval().requires_grad_(False)
    weights = storage_bytes(vae.state_dict().values())
    acc = OpAccountant(rooflines=[p.roofline() for p in profiles], segments=True)
    acc.track(vae.state_dict().values())
    with acc, torch.no_grad():
        with acc.phase("decode"), _layer_phases(acc, vae.decoder.blocks, depth):
            latent = torch.empty(1, base.z_chans, frames, height // 8, width // 8, device="meta")
            video = tiled_decode(vae, latent.to(torch.bfloat16), tiles)
            n, c, t, h, w = video.shape
            out = frames_to_uint8(video.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w))
            del latent, video, out
    stats, peak, _ = _repeat(acc, ("decode",), extra)
    flops, nbytes, kernels, seconds = dict(stats.flops), stats.bytes, stats.kernels, dict(stats.seconds)
    workspace = peak - weights
    with torch.device("meta"):
        full = ViTVAE(base).to(torch.bfloat16)
    return {
        "flops": flops, "total_flops": sum(flops.values()), "bytes": nbytes, "kernels": kernels,
        "roofline_s": seconds, "workspace_bytes": workspace, "weights_bytes": storage_bytes(full.state_dict().values()),
    }


def _vae_config(config):
    """The VAE architecture: from the weights folder's config.json when there is one, the tiny preset's for the
    tiny DiT, else the real checkpoint's (the VAEConfig defaults)."""
    from magi_server.models.config import TINY_DIT, TINY_VAE

    if config.vae_pretrained and Path(config.vae_pretrained).is_dir():
        from magi_server.runtime.loading import read_vae_config

        return read_vae_config(config.vae_pretrained)
    return TINY_VAE if config.dit == TINY_DIT else None


def _t5_facts(config, inputs: PlanInputs) -> dict:
    """Where the T5-XXL encoder lives and what it holds on the device, as ``pipeline._load_t5`` places it: the
    config's ``t5_device: cpu`` keeps it in fp32 on the CPU; anything else puts it in bf16 on the GPU with its weights
    in pinned host memory between encodes (copied on for each encode, then freed)."""
    where = inputs.t5_device or ("cpu" if str(config.t5_device) == "cpu" else "device")
    if where not in ("device", "cpu"):
        raise ValueError(f"t5_device must be 'device' or 'cpu', got {where!r}")
    on_device = where == "device"
    dtype = inputs.t5_dtype or ("bfloat16" if on_device else "float32")
    size = {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(dtype).replace("torch.", ""))
    if size is None:
        raise ValueError(f"t5 dtype must be float32 or bfloat16, got {dtype!r}")
    offload = on_device if inputs.t5_offload is None else bool(inputs.t5_offload)
    weights = T5_XXL_PARAMS * size
    # encode workspace: the longest prompt (at most 800 tokens) through 4096-wide layers: the 10240-wide gated
    # MLP, the attention scores (64 heads x 800^2) and the 800 x 4096 fp32 output
    workspace = (800 * 10240 * 3 + 64 * 800 * 800) * size + 800 * 4096 * 4
    return {
        "where": where, "dtype": str(dtype), "offload": offload, "params": T5_XXL_PARAMS, "weights_bytes": weights,
        "resident_bytes": weights if on_device and not offload else 0,
        "encode_peak_bytes": weights + workspace if on_device else 0,
        "note": ("on the device for the whole run" if on_device and not offload else
                 "in host memory, copied onto the device for each encode and freed after it" if on_device else
                 "on the CPU: no device memory"),
    }


def plan(
    inputs: PlanInputs,
    *,
    gpu: str = "H100",
    device_memory: int | None = None,
    layers: str = "extrapolate",
    suggest: bool = True,
    only_calls: Iterable[int] | str | None = None,
    config=None,
) -> RequestPlan:
    """Plan one request (see the module docstring).

    ``only_calls``: account just these call indices, or ``"largest"``: the three largest distinct calls, where the
    memory peak is (a memory-only plan, seconds instead of a minute; FLOP totals then cover only those calls and
    the other calls are listed with signature -1). ``config``: a MagiConfig to use instead of resolving
    ``inputs.model`` (which then only names it)."""
    started = time.monotonic()
    profile = gpu_profile(gpu)
    memory_limit = int(device_memory) if device_memory is not None else profile.memory_bytes
    name, config = (inputs.model, config) if config is not None else model_config(inputs.model)
    if inputs.frames < 1:
        raise ValueError(f"frames must be >= 1, got {inputs.frames}")
    if inputs.cp < 1:
        raise ValueError(f"cp must be >= 1, got {inputs.cp}")
    session = _Session(config, inputs, tuple(GPU_PROFILES.values()), layers)
    if only_calls == "largest":
        only_calls = _largest_calls(session)
    calls, per_call = _account_calls(session, only_calls)
    splan = session.plan

    totals = {"flops": {}, "bytes": 0, "kernels": 0, "roofline_s": {}}
    for account in calls:
        for kind, value in account.flops.items():
            totals["flops"][kind] = totals["flops"].get(kind, 0) + value * account.count
        totals["bytes"] += account.bytes * account.count
        totals["kernels"] += account.kernels * account.count
        for key, value in account.roofline_s.items():
            totals["roofline_s"][key] = totals["roofline_s"].get(key, 0.0) + value * account.count
    totals["total_flops"] = sum(totals["flops"].values())

    vae_cfg = _vae_config(config)
    frames_per_chunk = {e.num_frames for e in splan.emissions} or {splan.layout.chunk_width}
    vae = account_vae_decode(inputs.width, inputs.height, max(frames_per_chunk), vae_config=vae_cfg,
                             fps=config.sampling.fps, layers=layers)
    vae["decodes"] = len(splan.emissions)
    vae["frames_per_chunk"] = max(frames_per_chunk)

    from magi_server.runtime.accounting import storage_bytes

    t5 = _t5_facts(config, inputs)
    dit_weights = storage_bytes(session.full_model.state_dict().values())
    static = dit_weights + vae["weights_bytes"] + t5["resident_bytes"]
    first_emit = min((i for i, c in enumerate(splan.calls) if c.emitted is not None), default=len(splan.calls))
    request_peak, peak_call, decode_overlap = 0, None, 0
    for index, which in enumerate(per_call):
        if which < 0:
            continue
        account = calls[which]
        overlap = vae["workspace_bytes"] if inputs.overlap_decode and index > first_emit else 0
        if account.peak_bytes + overlap > request_peak:
            request_peak, peak_call, decode_overlap = account.peak_bytes + overlap, index, overlap
    # after the last call the last chunk still decodes
    last = calls[per_call[-1]] if per_call and per_call[-1] >= 0 else None
    if last is not None and last.end_bytes + vae["workspace_bytes"] > request_peak:
        request_peak, decode_overlap = last.end_bytes + vae["workspace_bytes"], vae["workspace_bytes"]
        peak_call = len(per_call)
    dit_request_peak = max((c.peak_bytes for c in calls), default=0)

    cp = inputs.cp
    cp_note = None
    if cp > 1:
        # Ulysses context parallelism splits tokens (activations, cache rows, canvas) over cp GPUs; weights are
        # replicated. An estimate: magi-server runs one GPU per model today.
        request_peak = -(-request_peak // cp)
        dit_request_peak = -(-dit_request_peak // cp)
        cp_note = f"estimate for {cp}-GPU context parallelism (per GPU); magi-server runs on one GPU today"
        for key in totals["roofline_s"]:
            totals["roofline_s"][key] /= cp
    total_peak = max(static + request_peak, dit_weights + vae["weights_bytes"] + t5["encode_peak_bytes"])
    memory = {
        "dit_weights_bytes": dit_weights,
        "vae_weights_bytes": vae["weights_bytes"],
        "t5_resident_bytes": t5["resident_bytes"],
        "t5_encode_peak_bytes": t5["encode_peak_bytes"],
        "static_bytes": static,
        "request_peak_bytes": request_peak,  # per request above the static part, decode overlap included
        "dit_call_peak_bytes": dit_request_peak,  # the DiT calls' own peak above the weights (canvas, captions,
        # KV cache, activations): what the scheduler's per-request estimate must cover
        "vae_decode_workspace_bytes": vae["workspace_bytes"],
        "decode_overlap_bytes": decode_overlap,
        "peak_call": peak_call,
        "kv_cache": "host memory" if session.kv_offload else "device",
        "total_peak_bytes": total_peak,
        "device_memory_bytes": memory_limit,
    }
    if cp_note:
        memory["cp_note"] = cp_note
    fits = total_peak <= memory_limit
    method = (f"each distinct call run once through the runner on meta with a {session.depth}-layer DiT whose middle "
              f"layer is counted {session.extra_layers + 1} times" if session.extra_layers else
              f"each distinct call run once through the runner on meta with all {config.dit.num_layers} layers")
    result = RequestPlan(
        inputs=inputs, model_name=name, gpu=profile, device_memory=memory_limit,
        num_steps=session.settings.num_steps, window_size=session.settings.window_size,
        cfg_number=session.settings.cfg_number, tokens_per_chunk=splan.tokens_per_chunk,
        num_chunks=splan.layout.num_chunks, num_calls=len(splan.calls), calls=calls, call_signatures=per_call,
        totals=totals, vae_decode=vae, memory=memory, t5=t5, fits=fits, method=method,
    )
    if suggest and not fits:
        result.suggestions = _suggestions(inputs, name, config, session, gpu, memory_limit, layers)
    result.wall_s = time.monotonic() - started
    return result


# ---------------------------------------------------------------------------------------------- what would fit


def _largest_calls(session: _Session, count: int = 3) -> list[int]:
    """Indices of the calls with the most query and key tokens (where the activation peak lives)."""
    keyed = []
    seen = set()
    for index, call in enumerate(session.plan.calls):
        structure = session.call_structure(index)
        if structure in seen:
            continue
        seen.add(structure)
        queries = structure[0] + (1 if structure[3] else 0)
        keys = max(b - a for a, b in structure[2])
        keyed.append(((queries, keys, call.extra_clean_chunk), index))
    keyed.sort(reverse=True)
    return [index for _, index in keyed[:count]]


def _quick_peak(inputs: PlanInputs, gpu: str, memory_limit: int, layers: str) -> dict:
    """Memory-only plan of an alternative: the largest calls only."""
    result = plan(inputs, gpu=gpu, device_memory=memory_limit, layers=layers, suggest=False, only_calls="largest")
    return {"total_peak_bytes": result.memory["total_peak_bytes"], "fits": result.fits}


def _lower_resolution(width: int, height: int) -> tuple[int, int] | None:
    """The 480p size of the same aspect as a 720p one (the API's tiers), else the size scaled to the 480p area;
    None when the request is already that small."""
    from magi_server.params import RESOLUTION_SIZES

    for (tier, aspect), size in RESOLUTION_SIZES.items():
        if tier == "720p" and size == (width, height):
            return RESOLUTION_SIZES[("480p", aspect)]
    area = width * height
    if area <= 832 * 480:
        return None
    scale = math.sqrt(832 * 480 / area)
    return max(16, int(round(width * scale / 16)) * 16), max(16, int(round(height * scale / 16)) * 16)


def _suggestions(inputs, name, config, session, gpu, memory_limit, layers) -> list[dict]:
    from magi_server.models.config import canonical_preset_name

    out = []

    def attempt(label: str, flag: str, alt: PlanInputs, note: str = "") -> None:
        try:
            quick = _quick_peak(alt, gpu, memory_limit, layers)
        except ValueError as exc:
            out.append({"change": label, "flag": flag, "error": str(exc)})
            return
        out.append({"change": label, "flag": flag, "total_peak_bytes": quick["total_peak_bytes"],
                    "fits": quick["fits"], **({"note": note} if note else {})})

    preset_name = canonical_preset_name(inputs.model)
    if preset_name and not config.dit.fp8_quant:
        size = preset_name.split("-")[0]
        quant = f"{size}-distill-quant"
        steps = inputs.steps or session.settings.num_steps
        attempt(f"fp8 weights ({quant})", f"--model {quant} --steps {steps}", inputs.replace(model=quant, steps=steps))
    window = session.settings.window_size
    steps = session.settings.num_steps
    for smaller in range(window - 1, 0, -1):
        if steps % smaller == 0:
            attempt(f"window {smaller}", f"--window {smaller}", inputs.replace(window=smaller))
            break
    smaller_size = _lower_resolution(inputs.width, inputs.height)
    if smaller_size is not None:
        w, h = smaller_size
        attempt(f"resolution {w}x{h}", f"--resolution {w}x{h}", inputs.replace(width=w, height=h))
    if not session.kv_offload:
        attempt("KV cache in host memory", "--kv-cache host (config: kv_offload)", inputs.replace(kv_offload=True))
    t5 = _t5_facts(config, inputs)
    if t5["resident_bytes"] > 0:
        attempt("T5 encoder off the device between encodes", "(config: t5_device cuda = bf16, offloaded)",
                inputs.replace(t5_dtype="bfloat16", t5_offload=True))
    for cp in (2, 4, 8):
        if cp > inputs.cp:
            attempt(f"{cp} GPUs with context parallelism", f"--cp {cp}", inputs.replace(cp=cp),
                    "estimate: magi-server does not run context parallelism yet")
            if out[-1].get("fits"):
                break
    return out


# ------------------------------------------------------------------------------------------------- the table


def _gb(value: int) -> str:
    return f"{value / GB:.2f} GB"


def _pf(value: float) -> str:
    return f"{value / 1e15:.3f} PFLOP"


def format_plan(result: RequestPlan) -> str:
    """The human-readable report of ``magi-server plan``."""
    inp = result.inputs
    key = result.gpu.key
    m = result.memory
    lines = [
        f"{result.model_name}: {inp.width}x{inp.height}, {inp.frames} frames, {result.num_steps} steps, "
        f"window {result.window_size}, cfg {result.cfg_number}"
        + (f", context parallel {inp.cp} GPUs (estimate)" if inp.cp > 1 else ""),
        f"  {result.num_chunks} chunks of {result.tokens_per_chunk} tokens, {result.num_calls} model calls "
        f"({len(result.calls)} distinct)",
        "",
        "memory (device)",
        f"  DiT weights        {_gb(m['dit_weights_bytes']):>10}",
        f"  VAE weights        {_gb(m['vae_weights_bytes']):>10}",
        f"  T5-XXL encoder     {_gb(result.t5['resident_bytes']):>10}  {result.t5['dtype']} "
        f"{_gb(result.t5['weights_bytes'])}, {result.t5['note']}",
        f"  per request        {_gb(m['request_peak_bytes']):>10}  at its peak: canvas, captions, "
        f"KV cache ({m['kv_cache']}), activations"
        + (f", VAE decode {_gb(m['decode_overlap_bytes'])}" if m["decode_overlap_bytes"] else ""),
        f"  total peak         {_gb(m['total_peak_bytes']):>10}  of {_gb(result.device_memory)}: "
        + ("fits" if result.fits else "DOES NOT FIT"),
    ]
    if "cp_note" in m:
        lines.append(f"  ({m['cp_note']})")
    t = result.totals
    secs = t["roofline_s"].get(key, 0.0)
    vae = result.vae_decode
    vae_s = vae["roofline_s"].get(key, 0.0) * vae["decodes"]
    flops = t["flops"]
    lines += [
        "",
        f"compute per request (DiT calls; roofline on {result.gpu.name}, vendor peak figures)",
        f"  attention {_pf(flops.get('attention', 0))}, bf16 GEMM {_pf(flops.get('gemm_bf16', 0))}, "
        f"fp8 GEMM {_pf(flops.get('gemm_fp8', 0))}, fp32 GEMM {_pf(flops.get('gemm_fp32', 0))}, "
        f"conv {_pf(flops.get('conv', 0))}",
        f"  total {_pf(t['total_flops'])}, {t['bytes'] / 1e12:.2f} TB moved, {t['kernels']:,} kernels",
        f"  roofline: DiT {secs:.1f} s + VAE decode {vae_s:.1f} s ({vae['decodes']} chunks, "
        f"{vae['total_flops'] / 1e12:.0f} TFLOP each)",
        "",
        "distinct calls (per call; memory above the weights)",
        f"  {'call':>5} {'count':>5} {'chunks':>6} {'cached':>6} {'PFLOP':>8} {'attn %':>6} {'fp32 GEMM':>10} "
        f"{'kernels':>8} {'peak':>10} {'time s':>7}",
    ]
    for c in result.calls:
        total = c.total_flops or 1
        lines.append(
            f"  {c.example_index:>5} {c.count:>5} {c.chunks:>6} {c.cache_chunks_before:>6} "
            f"{c.total_flops / 1e15:>8.3f} {100 * c.flops.get('attention', 0) / total:>6.1f} "
            f"{c.flops.get('gemm_fp32', 0) / 1e12:>7.1f} TF {c.kernels:>8,} {_gb(c.peak_bytes):>10} "
            f"{c.roofline_s.get(key, 0.0):>7.2f}"
        )
    if result.suggestions:
        lines += ["", "what would fit:"]
        for s in result.suggestions:
            if "error" in s:
                lines.append(f"  {s['change']}: not possible ({s['error']})")
                continue
            verdict = "fits" if s["fits"] else "does not fit"
            note = f" ({s['note']})" if s.get("note") else ""
            lines.append(f"  {s['change']:<34} {s['flag']:<34} {_gb(s['total_peak_bytes'])}: {verdict}{note}")
    lines += ["", f"method: {result.method}; planned in {result.wall_s:.0f} s"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- server and fixtures


def model_memory(config, *, width: int, height: int, t5_device: str | None = None, t5_dtype: str | None = None,
                 t5_offload: bool | None = None) -> dict:
    """What a loaded model holds on the device whatever the requests (bytes): DiT and VAE weights, the T5 encoder
    (resident, or, when offloaded, its weights and workspace during an encode, which the prefill thread runs while
    other jobs' calls go on), and the VAE decode workspace of one chunk at ``width`` x ``height`` (the output thread
    decodes one chunk at a time). ``static_bytes`` is their sum: take it off the budget before admitting requests,
    and refuse to start when static_bytes + request_memory_estimate(smallest request) exceeds the device."""
    from magi_server.runtime.accounting import storage_bytes
    from magi_server.runtime.loading import build_dit

    dit_bytes = storage_bytes(build_dit(config.dit).state_dict().values())
    vae = account_vae_decode(width, height, config.sampling.chunk_width, vae_config=_vae_config(config),
                             fps=config.sampling.fps)
    inputs = PlanInputs("", width, height, 1, t5_device=t5_device, t5_dtype=t5_dtype, t5_offload=t5_offload)
    t5 = _t5_facts(config, inputs)
    t5_bytes = max(t5["resident_bytes"], t5["encode_peak_bytes"])
    static = dit_bytes + vae["weights_bytes"] + t5_bytes + vae["workspace_bytes"]
    return {
        "dit_weights_bytes": dit_bytes, "vae_weights_bytes": vae["weights_bytes"],
        "vae_decode_workspace_bytes": vae["workspace_bytes"], "t5_resident_bytes": t5["resident_bytes"],
        "t5_encode_peak_bytes": t5["encode_peak_bytes"], "t5": t5["note"], "static_bytes": static,
    }


def startup_problem(config, device_memory: int, *, name: str = "the model", max_size: tuple[int, int] = (1280, 720),
                    min_size: tuple[int, int] = (832, 480), kv_offload: bool | None = None) -> str | None:
    """None when the model plus the smallest request fits ``device_memory`` bytes; else one line saying why not.

    The model part is :func:`model_memory` with the decode workspace of the largest size served (``max_size``);
    the smallest request is one chunk (24 frames) at ``min_size`` with the config's steps and window, estimated by
    :func:`magi_server.runtime.memory_model.request_memory_estimate` (what admission charges)."""
    static = model_memory(config, width=max_size[0], height=max_size[1])
    s = config.sampling
    request = request_memory_estimate(
        config.dit, width=min_size[0], height=min_size[1], num_frames=s.chunk_width * 4, num_steps=s.num_steps,
        window_size=s.window_size, cfg_number=s.cfg_number, chunk_width=s.chunk_width,
        noise2clean_kvrange=tuple(s.noise2clean_kvrange), clean_chunk_kvrange=s.clean_chunk_kvrange,
        kv_offload=config.kv_offload if kv_offload is None else kv_offload,
    ).total_bytes
    need = static["static_bytes"] + request
    if need <= device_memory:
        return None
    t5 = max(static["t5_resident_bytes"], static["t5_encode_peak_bytes"])
    parts = (f"DiT {static['dit_weights_bytes'] / GB:.1f} GB, VAE {static['vae_weights_bytes'] / GB:.1f} GB, "
             f"decode workspace {static['vae_decode_workspace_bytes'] / GB:.1f} GB"
             + (f", T5 {t5 / GB:.1f} GB" if t5 else ""))
    return (f"{name} does not fit this device: the model needs {static['static_bytes'] / GB:.1f} GB ({parts}) and "
            f"the smallest request ({min_size[0]}x{min_size[1]}, {s.chunk_width * 4} frames) "
            f"{request / GB:.1f} GB more, "
            f"{need / GB:.1f} GB > {device_memory / GB:.1f} GB; use an fp8 (-quant) model or a larger GPU "
            f"(`magi-server plan` shows what fits)")


# The requests whose accounted per-request peaks tests/data/plan_peaks.json holds (acceptance: the six presets at
# 720p and 96 frames with their default steps, one 480p and one 240-frame request; then two with the KV cache on
# the device instead of the configs' host memory): (preset, width, height, frames, steps or None for the
# preset's, kv_offload or None for the config's).
MEMORY_FIXTURE_CASES = (
    ("24B-base", 1280, 720, 96, None, None),
    ("24B-distill", 1280, 720, 96, None, None),
    ("24B-distill-quant", 1280, 720, 96, None, None),
    ("4.5B-base", 1280, 720, 96, None, None),
    ("4.5B-distill", 1280, 720, 96, None, None),
    ("4.5B-distill-quant", 1280, 720, 96, None, None),
    ("4.5B-distill-quant", 832, 480, 96, 16, None),
    ("24B-distill", 1280, 720, 240, 16, None),
    ("24B-distill", 1280, 720, 96, 16, False),
    ("4.5B-distill", 832, 480, 240, 16, False),
)


def fixture_case(model: str, width: int, height: int, frames: int, steps: int | None,
                 kv_offload: bool | None = None) -> dict:
    """The accounted figures of one request, as the fixture stores them."""
    result = plan(PlanInputs(model, width, height, frames, steps, kv_offload=kv_offload), suggest=False)
    return {
        "model": model, "width": width, "height": height, "frames": frames, "steps": result.num_steps,
        "window": result.window_size, "cfg_number": result.cfg_number,
        "kv_offload": result.memory["kv_cache"] == "host memory",
        "dit_call_peak_bytes": result.memory["dit_call_peak_bytes"], "peak_call": result.memory["peak_call"],
        "total_peak_bytes": result.memory["total_peak_bytes"], "static_bytes": result.memory["static_bytes"],
        "total_flops": result.totals["total_flops"], "flops": result.totals["flops"],
    }


def write_memory_fixture(path: Path, *, progress=None) -> dict:
    """Recompute every MEMORY_FIXTURE_CASES request and write them to ``path`` (JSON)."""
    import json

    import torch

    cases = []
    for case in MEMORY_FIXTURE_CASES:
        started = time.monotonic()
        cases.append(fixture_case(*case))
        if progress is not None:
            row = cases[-1]
            progress(f"{row['model']} {row['width']}x{row['height']} {row['frames']} frames {row['steps']} steps: "
                     f"{row['dit_call_peak_bytes'] / GB:.2f} GB per request ({time.monotonic() - started:.0f} s)")
    data = {
        "about": "accounted per-request device-memory peaks (above the weights: canvas, captions, KV cache, "
                 "activations) of magi-server plan; rewrite with `magi-server plan --write-fixture PATH` whenever "
                 "models/dit.py, runtime/guidance.py or runtime/sampler.py change how they allocate",
        "torch": torch.__version__,
        "cases": cases,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data
