"""One sampler call -> guided velocity (the reference's ``forward_dispatcher``, spec §6.5 step 7, §6.6, §6.7).

This file owns how the DiT passes of one call are assembled and combined, for one request or for a batch of
requests whose calls have the same structure (same slots, kv ranges and timesteps: requests in lock-step):

* cfg_number 3 (base models): text+context pass (reads the KV cache), context/null-text pass (reads and writes
  it), and the unconditional pass with every denoising chunk as its own batch element; mixed per chunk with
  t-bucketed scales (:func:`magi_server.runtime.timesteps.cfg_scales`).
* cfg_number 1 (distilled / fp8 models): one conditional pass that reads and writes the cache, plus, when the
  first denoising chunk is nearly clean, a context-free copy of it mixed in with weight ``prev_chunks_scale``.

Batching puts the requests side by side in the DiT's batch axis; every row of every GEMM, norm and attention
range only ever sees its own request, so each request's result is the one it gets alone.
The distilled model's step-size value comes from the caller (:func:`magi_server.runtime.timesteps.distill_dt`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from magi_server.models.config import SamplingConfig
from magi_server.runtime.chunking import uncond_kv_ranges
from magi_server.runtime.timesteps import cfg_scales


@dataclass(frozen=True)
class GuidanceScales:
    cfg_t_range: tuple[float, ...]
    prev_chunk_scales: tuple[float, ...]
    text_scales: tuple[float, ...]
    prev_chunks_scale: float = 0.7

    @classmethod
    def defaults(cls) -> "GuidanceScales":
        s = SamplingConfig()
        return cls(s.cfg_t_range, s.prev_chunk_scales, s.text_scales, s.prev_chunks_scale)


def _tokens_per_chunk(model, chunk_width: int, height: int, width: int) -> int:
    cfg = model.config
    return (chunk_width // cfg.t_patch_size) * (height // cfg.patch_size) * (width // cfg.patch_size)


def _flatten_ranges(ranges: Sequence[Sequence[int]], items: int, keys_per_item: int) -> list[list[int]]:
    """Per-item kv ranges repeated for ``items`` batch elements in the batch-flattened key layout (spec §2.1)."""
    return [[b * keys_per_item + s, b * keys_per_item + e] for b in range(items) for s, e in ranges]


def guided_velocity_batch(
    model,
    x: torch.Tensor,
    t: torch.Tensor,
    cond_captions: torch.Tensor,
    cond_masks: torch.Tensor,
    null_captions: torch.Tensor,
    null_masks: torch.Tensor,
    kv_ranges: Sequence[Sequence[int]],
    *,
    cfg_number: int,
    slice_point: int,
    chunk_width: int,
    extra_clean_chunk: bool,
    nearly_clean: bool,
    dt: float | None,
    kv_caches: Sequence | None,
    scales: GuidanceScales | None = None,
    max_cache_write_chunks: int | None = None,
) -> torch.Tensor:
    """Guided velocity of one call for N requests. Returns (N, C, T, H, W) fp32.

    x: (N, C, T, H, W), one canvas slice per request (extra clean chunk first when ``extra_clean_chunk``);
    t: (N, chunks); cond_/null_captions: (N·chunks, L, D) with row b·chunks + j for chunk j of request b (the
    extra clean chunk's conditional row is the null caption); masks likewise (N·chunks, L); kv_ranges: the
    call's (chunks) ranges of ONE request in absolute token units of its [cache ; current] keys (they are the same
    for every request of a lock-step batch); kv_caches: one KVCache per request, or None. Slot contents as the
    reference: the guided velocity for every denoising chunk; in an extra clean chunk's slot its input latent,
    except with cfg_number 1 and ``nearly_clean``, where it is the model output.
    """
    scales = scales or GuidanceScales.defaults()
    if not len(scales.cfg_t_range) == len(scales.prev_chunk_scales) == len(scales.text_scales):
        raise ValueError("cfg_t_range, prev_chunk_scales and text_scales must have the same length")
    x = x.float()
    t = torch.as_tensor(t, dtype=torch.float32)
    n, channels, frames, height, width = x.shape
    if t.dim() != 2 or t.shape[0] != n:
        raise ValueError(f"t must be (N={n}, chunks), got shape {tuple(t.shape)}")
    chunks = t.shape[1]
    denoising = chunks - (1 if extra_clean_chunk else 0)
    if denoising < 1:
        raise ValueError("a call needs at least one denoising chunk")
    if frames != chunks * chunk_width:
        raise ValueError(f"x has {frames} frames but t gives {chunks} chunks of {chunk_width} frames")
    for name, rows in (("cond_captions", cond_captions), ("null_captions", null_captions),
                       ("cond_masks", cond_masks), ("null_masks", null_masks)):
        if rows.shape[0] != n * chunks:
            raise ValueError(f"{name} must have N·chunks = {n * chunks} rows, got {rows.shape[0]}")
    ranges = [[int(s), int(e)] for s, e in torch.as_tensor(kv_ranges).reshape(-1, 2).tolist()]
    if len(ranges) != chunks:
        raise ValueError(f"kv_ranges must have {chunks} rows, got {len(ranges)}")
    if kv_caches is not None and len(kv_caches) != n:
        raise ValueError(f"need one KV cache per request ({n}), got {len(kv_caches)}")

    tpc = _tokens_per_chunk(model, chunk_width, height, width)
    keys_per_item = (slice_point + chunks) * tpc  # the reference layout: whole cache prefix + current rows
    flat = _flatten_ranges(ranges, n, keys_per_item)
    caches = None if kv_caches is None else list(kv_caches)
    common = dict(slice_point=slice_point, chunk_width=chunk_width, dt=dt)
    if cfg_number == 3:
        return _cfg3(model, x, t, cond_captions, cond_masks, null_captions, null_masks, flat, caches, common, scales,
                     chunks, denoising, chunk_width, tpc, nearly_clean, max_cache_write_chunks)
    if cfg_number == 1:
        return _cfg1(model, x, t, cond_captions, cond_masks, ranges, caches, common, scales, chunks,
                     extra_clean_chunk, nearly_clean, chunk_width, tpc, slice_point, max_cache_write_chunks)
    raise ValueError(f"cfg_number must be 1 or 3, got {cfg_number}")


def _cfg3(model, x, t, cond_caps, cond_masks, null_caps, null_masks, flat, caches, common, scales, chunks, denoising,
          width, tpc, nearly_clean, max_cache_write_chunks):
    n = x.shape[0]
    slots = list(range(chunks - denoising, chunks))
    # Per-chunk scales first: they decide which passes can change the result. v = (1-p)·v_u + (p-s)·v_p + s·v_t,
    # and a zero coefficient contributes exactly 0 for finite velocities, so a pass whose coefficient is zero for
    # every chunk (text pass when t >= 0.3 everywhere; uncond pass for chunks with p = 1) is skipped without
    # changing a bit. The reference always runs all three (spec §11.4).
    table = [
        [cfg_scales(float(t[b, slot]), scales.cfg_t_range, scales.prev_chunk_scales, scales.text_scales) for slot in slots]
        for b in range(n)
    ]
    need_text = any(ts != 0.0 for row in table for _, ts in row)
    uncond_items = [(b, slot) for b in range(n) for slot, (ps, _) in zip(slots, table[b]) if ps != 1.0]
    text_on, text_dropped = [False] * n, [True] * n  # caption_dropout per request: adaLN row -2 / -1

    # pass 1: text + context, reads the cache but leaves it alone
    v_text = None
    if need_text:
        v_text = model(x, t, cond_caps, cond_masks, flat, text_on, kv_cache=caches, write_cache=False, **common)
    # pass 2: context with null text; this pass produces the cached clean K/V. A nearly-clean flag only keeps the
    # newest chunk's rows out of the cache here.
    v_ctx = model(
        x, t, null_caps, null_masks, flat, text_dropped, kv_cache=caches, write_cache=True,
        skip_cache_write_chunks=1 if nearly_clean else 0, max_cache_write_chunks=max_cache_write_chunks, **common,
    )
    # pass 3: each chunk that needs it alone as its own batch element, no context, no cache
    v_uncond = {}
    if uncond_items:
        items = len(uncond_items)
        uncond_x = torch.stack([x[b, :, s * width : (s + 1) * width] for b, s in uncond_items])
        rows = [b * chunks + s for b, s in uncond_items]
        out_u = model(
            uncond_x, torch.stack([t[b, s] for b, s in uncond_items]).reshape(items, 1), null_caps[rows],
            null_masks[rows], [list(r) for r in uncond_kv_ranges(items, tpc)], [True] * items,
            slice_point=0, chunk_width=width, dt=common["dt"], kv_cache=None,
        )
        v_uncond = {item: out_u[i] for i, item in enumerate(uncond_items)}

    out = x.clone()  # the extra clean chunk's slot keeps its input
    for b in range(n):
        for slot, (ps, ts) in zip(slots, table[b]):
            a, e = slot * width, (slot + 1) * width
            # the reference's weighted-sum form and order (fp32), less the terms that are exactly zero
            v = (ps - ts) * v_ctx[b, :, a:e]
            if (b, slot) in v_uncond:
                v = (1 - ps) * v_uncond[(b, slot)] + v
            if ts != 0.0:
                v = v + ts * v_text[b, :, a:e]
            out[b, :, a:e] = v
    return out


def _cfg1(model, x, t, cond_caps, cond_masks, ranges, caches, common, scales, chunks, extra, nearly_clean, width, tpc,
          slice_point, max_cache_write_chunks):
    n, frames = x.shape[0], x.shape[2]
    if not nearly_clean:
        flat = _flatten_ranges(ranges, n, (slice_point + chunks) * tpc)
        out = model(
            x, t, cond_caps, cond_masks, flat, [False] * n, kv_cache=caches, write_cache=True,
            max_cache_write_chunks=max_cache_write_chunks, **common,
        )
        if extra:
            out[:, :, :width] = x[:, :, :width]
        return out
    # The first denoising chunk (slot 1 with the extra clean chunk, never the clean chunk) is copied to the end of
    # the call; the copy attends only to itself, after every other key of the call.
    first = 1 if extra else 0
    a, e = first * width, (first + 1) * width
    end = (slice_point + chunks) * tpc
    cat_ranges = ranges + [[end, end + tpc]]
    rows = torch.tensor([[b * chunks + j for j in range(chunks)] + [b * chunks + first] for b in range(n)]).flatten()
    cat_out = model(
        torch.cat([x, x[:, :, a:e]], dim=2), torch.cat([t, t[:, first : first + 1]], dim=1),
        cond_caps[rows], cond_masks[rows], _flatten_ranges(cat_ranges, n, end + tpc), [False] * n,
        kv_cache=caches, write_cache=True, skip_cache_write_chunks=1,
        max_cache_write_chunks=max_cache_write_chunks, **common,
    )
    mix = float(scales.prev_chunks_scale)
    out = cat_out[:, :, :frames].clone()
    out[:, :, a:e] = cat_out[:, :, a:e] * mix + cat_out[:, :, frames:] * (1 - mix)
    return out
