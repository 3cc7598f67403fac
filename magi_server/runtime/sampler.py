"""Runs one request through MAGI-1's chunk-by-chunk sampler (spec §6), on tensors.

The runner executes, it does not decide: *what* each model call contains comes from the integer plan of
``chunking.plan_sampler_calls`` (window, slot chunks, step indices, kv ranges, prefix overwrite, emission), and
*how* one call turns into a guided velocity comes from ``guidance.guided_velocity_batch``. This file owns the
per-request tensors in between: the latent canvas, the caption rows, the prefix latent and the KV cache.

One request = :class:`SamplerState`; :func:`sampler_step` runs its next model call (the v2v prefix-extraction call
rides along with the first one), integrates the window chunks with an Euler step, and returns the chunk that became
clean, if any, at once: callers stream it (decode, write MP4 frames, send events) while the next call runs.

Memory: the reference keeps every chunk's K/V for the whole video (and copies noisy chunks' rows it never reads).
Here a call writes only the rows some later call reads (the extra clean chunk; the prefix chunks) and, after each
call, every chunk no later call reads is released, so the cache holds at most the window's worth of clean chunks
whatever the video length (spec §11.4). Results are identical: attention only ever sees those rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from magi_server.runtime.chunking import SamplerCall, SamplerPlan, chunk_layout, plan_sampler_calls, tokens_per_chunk
from magi_server.models.config import MagiConfig
from magi_server.models.dit import KVCache
from magi_server.runtime.timesteps import chunk_timesteps, distill_dt, euler_step, init_interval, init_t, nearly_clean
from magi_server.runtime.guidance import GuidanceScales, guided_velocity_batch


@dataclass(frozen=True)
class SamplerSettings:
    """Everything about the sampler that changes the output; it travels with the request."""

    num_steps: int
    window_size: int
    cfg_number: int
    distill: bool
    chunk_width: int = 6
    shortcut_mode: str = "8,16,16"
    clean_t: float = 0.9999
    noise2clean_kvrange: tuple[int, ...] = (5, 4, 3, 2)
    clean_chunk_kvrange: int = 1
    cfg_t_range: tuple[float, ...] = (0.0, 0.0217, 0.1, 0.3, 0.999)
    prev_chunk_scales: tuple[float, ...] = (1.5, 1.5, 1.5, 1.0, 1.0)
    text_scales: tuple[float, ...] = (7.5, 7.5, 7.5, 0.0, 0.0)
    nearly_clean_threshold: float = 0.3
    prev_chunks_scale: float = 0.7

    @classmethod
    def from_config(
        cls, config: MagiConfig, *, num_steps: int | None = None, window_size: int | None = None
    ) -> "SamplerSettings":
        s = config.sampling
        return cls(
            num_steps=int(num_steps if num_steps is not None else s.num_steps),
            window_size=int(window_size if window_size is not None else s.window_size),
            cfg_number=s.cfg_number,
            distill=config.dit.distill,
            chunk_width=s.chunk_width,
            shortcut_mode=s.shortcut_mode,
            clean_t=s.clean_t,
            noise2clean_kvrange=tuple(s.noise2clean_kvrange),
            clean_chunk_kvrange=s.clean_chunk_kvrange,
            cfg_t_range=tuple(s.cfg_t_range),
            prev_chunk_scales=tuple(s.prev_chunk_scales),
            text_scales=tuple(s.text_scales),
            nearly_clean_threshold=s.distill_nearly_clean_chunk_threshold,
            prev_chunks_scale=s.prev_chunks_scale,
        )


@dataclass(frozen=True)
class LatentChunk:
    """A chunk that became clean: output ``index`` (counted from the first generated chunk), absolute ``chunk``,
    and its emitted latent frames (1, C, frames, H, W) fp32 = canvas frames [frame_start, frame_end)."""

    index: int
    chunk: int
    frame_start: int
    frame_end: int
    latents: torch.Tensor


def plan_request(
    settings: SamplerSettings, *, num_frames: int, prefix_frames: int, latent_height: int, latent_width: int,
    patch_size: int = 2, t_patch_size: int = 1,
) -> SamplerPlan:
    layout = chunk_layout(num_frames, prefix_frames, settings.chunk_width)
    tpc = tokens_per_chunk(latent_height, latent_width, settings.chunk_width, patch_size, t_patch_size)
    return plan_sampler_calls(
        layout,
        num_steps=settings.num_steps,
        window_size=settings.window_size,
        tokens_per_chunk=tpc,
        noise2clean_kvrange=settings.noise2clean_kvrange,
        clean_chunk_kvrange=settings.clean_chunk_kvrange,
    )


def _cache_reads(call_kv_ranges, slice_point: int, tpc: int) -> range:
    """Chunks a call reads from the cache: [lowest chunk any range starts in, slice_point) (as VideoDiT does)."""
    lo = min(min(start for start, _ in call_kv_ranges) // tpc, slice_point)
    return range(max(lo, 0), slice_point)


@dataclass
class SamplerState:
    """The tensors of one request between model calls. Created by :func:`start_sampler`."""

    plan: SamplerPlan
    settings: SamplerSettings
    canvas: torch.Tensor  # (1, C, T_lat, H, W) fp32
    captions: torch.Tensor  # (2, n_chunks, L, D): [conditional, null] rows per chunk
    caption_masks: torch.Tensor  # (2, n_chunks, L)
    prefix: torch.Tensor | None  # (1, C, P, H, W), its own dtype (bf16 from the VAE)
    cache: KVCache
    schedule: torch.Tensor  # t[0..num_steps] fp32
    intervals: torch.Tensor
    next_call: int = 0
    prefix_done: bool = False
    # chunks each call must find in the cache afterwards: union of the reads of every later call
    keep_after: list[frozenset[int]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.next_call >= len(self.plan.calls)

    @property
    def calls_total(self) -> int:
        return len(self.plan.calls)

    @property
    def chunks_total(self) -> int:
        return len(self.plan.emissions)


def start_sampler(
    plan: SamplerPlan,
    settings: SamplerSettings,
    *,
    noise: torch.Tensor,
    captions: torch.Tensor,
    caption_masks: torch.Tensor,
    prefix: torch.Tensor | None,
    num_layers: int,
    cache_dtype: torch.dtype,
    cache_device: torch.device | str,
    cache_pinned: bool = False,
) -> SamplerState:
    """The state of a request before its first call. ``noise`` is the initial canvas (1, C, T_lat, H, W).

    ``cache_device`` is where the clean chunks' K/V live between calls: the model's device, or the CPU (pinned with
    ``cache_pinned``) to keep them off a GPU's memory; each call then uploads the rows it reads, layer by layer."""
    layout = plan.layout
    expected_frames = layout.latent_frames
    if noise.dim() != 5 or noise.shape[0] != 1 or noise.shape[2] != expected_frames:
        raise ValueError(f"latents must be (1, C, {expected_frames}, H, W) for this request, got {tuple(noise.shape)}")
    if captions.shape[:2] != (2, layout.num_chunks) or caption_masks.shape[:2] != (2, layout.num_chunks):
        raise ValueError(f"captions must be (2, {layout.num_chunks}, L, D), got {tuple(captions.shape)}")
    if layout.prefix_frames:
        if prefix is None or prefix.shape[2] != layout.prefix_frames:
            raise ValueError(f"the plan expects a prefix of {layout.prefix_frames} latent frames")
        if prefix.shape[1] != noise.shape[1] or prefix.shape[3:] != noise.shape[3:]:
            raise ValueError(f"prefix latent {tuple(prefix.shape)} does not match the canvas {tuple(noise.shape)}")

    reads = [_cache_reads(call.kv_ranges, call.slice_point, plan.tokens_per_chunk) for call in plan.calls]
    keep_after: list[frozenset[int]] = []
    later: set[int] = set()
    for read in reversed(reads):
        keep_after.append(frozenset(later))
        later |= set(read)
    keep_after.reverse()

    device = noise.device
    return SamplerState(
        plan=plan,
        settings=settings,
        canvas=noise.to(torch.float32).clone(),
        captions=captions.to(device=device, dtype=torch.float32),
        caption_masks=caption_masks.to(device=device),
        prefix=None if prefix is None else prefix.to(device),
        cache=KVCache(num_layers, dtype=cache_dtype, device=cache_device, tokens_per_chunk=plan.tokens_per_chunk,
                      pin_memory=cache_pinned),
        schedule=init_t(settings.num_steps, settings.shortcut_mode, device=device),
        intervals=init_interval(settings.num_steps, settings.shortcut_mode),
        keep_after=keep_after,
    )


def _call_captions(state: SamplerState, slots: list[int], null_slots: set[int]) -> tuple[torch.Tensor, ...]:
    """(conditional rows, conditional masks, null rows, null masks) of the call's slots, (len(slots), L, ...)."""
    cond_rows = [1 if slot in null_slots else 0 for slot in slots]
    return (
        state.captions[cond_rows, slots], state.caption_masks[cond_rows, slots],
        state.captions[1, slots], state.caption_masks[1, slots],
    )


def _dt(state: SamplerState, step_in_stage: int) -> float | None:
    if not state.settings.distill:
        return None
    return distill_dt(state.settings.num_steps, state.intervals[step_in_stage].item())


def _scales(settings: SamplerSettings) -> GuidanceScales:
    return GuidanceScales(
        settings.cfg_t_range, settings.prev_chunk_scales, settings.text_scales, settings.prev_chunks_scale
    )


def _run_prefix_call(model, state: SamplerState) -> None:
    """Write the clean prefix chunks' K/V (v2v with a prefix of >= one chunk); its output is discarded."""
    call = state.plan.prefix_call
    s = state.settings
    x = state.prefix[:, :, : call.frame_end]  # the bf16 prefix as is: the model rescales it in bf16 (spec §6.9)
    t = torch.full((1, call.num_chunks), s.clean_t, dtype=torch.float32, device=x.device)
    slots = list(range(call.num_chunks))
    _, _, null_caps, null_masks = _call_captions(state, slots, null_slots=set(slots))
    # null captions in both halves (spec §6.9)
    guided_velocity_batch(
        model, x, t, null_caps, null_masks, null_caps, null_masks, call.kv_ranges,
        cfg_number=s.cfg_number, slice_point=0, chunk_width=s.chunk_width, extra_clean_chunk=False,
        nearly_clean=False, dt=_dt(state, 0), kv_caches=[state.cache], scales=_scales(s),
    )


def call_signature(state: SamplerState) -> tuple:
    """Two requests whose next calls have equal signatures can run them as one batched DiT call."""
    call = state.plan.calls[state.next_call]
    return (
        state.settings, state.plan.tokens_per_chunk, tuple(state.canvas.shape[1:2]) + tuple(state.canvas.shape[3:]),
        call.slice_point, call.range_num, call.extra_clean_chunk, call.step_indices, call.kv_ranges,
        call.step_in_stage, call.prefix_overwrite,
    )


def sampler_step_batch(model, states: list[SamplerState]) -> list[LatentChunk | None]:
    """Run the next model call of every request in ``states`` as one batched call (their call signatures must be
    equal); return, per request, the chunk it finished, if any."""
    if not states:
        return []
    for state in states:
        if state.done:
            raise RuntimeError("the sampler has already finished every call")
    signature = call_signature(states[0])
    if any(call_signature(state) != signature for state in states[1:]):
        raise ValueError("requests in one batch must be at the same call of the same plan (equal call signatures)")
    for state in states:
        if state.plan.prefix_call is not None and not state.prefix_done:
            _run_prefix_call(model, state)
        state.prefix_done = True

    lead = states[0]
    call: SamplerCall = lead.plan.calls[lead.next_call]
    s = lead.settings
    width = s.chunk_width
    first = call.first_denoising_slot
    slots = list(call.slot_chunks)
    window_steps = list(call.window_step_indices)
    null_slots = {slots[0]} if call.extra_clean_chunk else set()

    # 1-5. each request's latents (extra clean chunk first, prefix frames re-imposed), timesteps and caption rows
    xs, rows = [], []
    for state in states:
        x = state.canvas[:, :, width * call.slice_point : width * call.range_num].clone()
        if call.prefix_overwrite:
            start = width * call.slice_point
            x[:, :, : call.prefix_overwrite] = state.prefix[:, :, start : start + call.prefix_overwrite].to(x.dtype)
        xs.append(x)
        rows.append(_call_captions(state, slots, null_slots))
    x = torch.cat(xs, dim=0)
    t = chunk_timesteps(lead.schedule, window_steps, s.clean_t if call.extra_clean_chunk else None)[None]
    t = t.expand(len(states), -1).contiguous()
    cond_caps, cond_masks, null_caps, null_masks = (torch.cat([r[i] for r in rows], dim=0) for i in range(4))

    # 6-7. guided velocity; the caches keep only the extra clean chunk's rows (the only ones a later call reads)
    velocity = guided_velocity_batch(
        model, x, t, cond_caps, cond_masks, null_caps, null_masks, call.kv_ranges,
        cfg_number=s.cfg_number, slice_point=call.slice_point, chunk_width=width,
        extra_clean_chunk=call.extra_clean_chunk, nearly_clean=nearly_clean(t[0, first], s.nearly_clean_threshold),
        dt=_dt(lead, call.step_in_stage), kv_caches=[state.cache for state in states], scales=_scales(s),
        max_cache_write_chunks=1 if call.extra_clean_chunk else 0,
    )

    # 8. Euler step on the window chunks (the clean chunk's slot is dropped), written back into each canvas
    t_now = lead.schedule[window_steps]
    t_next = lead.schedule[[step + 1 for step in window_steps]]
    results: list[LatentChunk | None] = []
    for b, state in enumerate(states):
        window = euler_step(x[b : b + 1, :, first * width :], velocity[b : b + 1, :, first * width :], t_now, t_next)
        state.canvas[:, :, width * call.chunk_start : width * call.chunk_end] = window
        state.cache.evict(state.keep_after[call.index])
        state.next_call += 1
        # 9. the oldest window chunk is final after its last step: emit its frames now
        e = call.emitted
        results.append(
            None if e is None
            else LatentChunk(e.index, e.chunk, e.frame_start, e.frame_end,
                             state.canvas[:, :, e.frame_start : e.frame_end].clone())
        )
    return results


