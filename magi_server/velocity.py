"""One sampler call -> guided velocity (the reference's ``forward_dispatcher``, spec §6.5 step 7, §6.6, §6.7).

This file owns how the DiT passes of one call are assembled and combined:

* cfg_number 3 (base models): text+context pass (reads the KV cache), context/null-text pass (reads and writes
  it), and the unconditional pass with every denoising chunk as its own batch element; mixed per chunk with
  t-bucketed scales (:func:`magi_server.sampling.cfg_scales`).
* cfg_number 1 (distilled / fp8 models): one conditional pass that reads and writes the cache, plus, when the
  first denoising chunk is nearly clean, a context-free copy of it mixed in with weight ``prev_chunks_scale``.

The distilled model's step-size value comes from the caller (:func:`magi_server.sampling.distill_dt`).
Schedules and the step loop live in ``sampling.py``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from magi_server.config import SamplingConfig
from magi_server.sampling import cfg_scales


def _split_rows(tensor: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(tensor)
    if tensor.shape[0] != 2 * rows:
        raise ValueError(f"{name} must have 2·chunks = {2 * rows} rows [cond..., null...], got {tensor.shape[0]}")
    return tensor


def guided_velocity(
    model,
    x: torch.Tensor,
    t: torch.Tensor,
    captions: torch.Tensor,
    caption_mask: torch.Tensor,
    kv_range,
    *,
    cfg_number: int,
    slice_point: int,
    chunk_width: int,
    extra_clean_chunk: bool,
    nearly_clean: bool,
    dt: float | None = None,
    kv_cache=None,
    cfg_t_range: Sequence[float] | None = None,
    prev_chunk_scales: Sequence[float] | None = None,
    text_scales: Sequence[float] | None = None,
    prev_chunks_scale: float = 0.7,
    max_cache_write_chunks: int | None = None,
) -> torch.Tensor:
    """Guided velocity of one sampler call, in the reference dispatcher layout.

    x: (2, C, T, H, W) (both rows the same canvas slice; row 0 is used); t: (2, chunks); captions: (2·chunks, L,
    C_txt) rows [conditional chunks..., null chunks...] (a singleton dim 1 is accepted); caption_mask likewise
    (2·chunks, L); kv_range: (chunks, 2) absolute token ranges. ``chunks`` counts the extra clean chunk (slot 0)
    when ``extra_clean_chunk``. Returns (2, C, T, H, W) fp32 with both rows equal: the guided velocity for every
    denoising chunk; in an extra clean chunk's slot its input latent, except with cfg_number 1 and
    ``nearly_clean``, where it is the model output (the sampler drops that slot either way).
    ``max_cache_write_chunks`` limits the cache write to the call's first chunks (see ``VideoDiT.forward``).
    """
    defaults = SamplingConfig()
    cfg_t_range = defaults.cfg_t_range if cfg_t_range is None else tuple(cfg_t_range)
    prev_chunk_scales = defaults.prev_chunk_scales if prev_chunk_scales is None else tuple(prev_chunk_scales)
    text_scales = defaults.text_scales if text_scales is None else tuple(text_scales)
    if not len(cfg_t_range) == len(prev_chunk_scales) == len(text_scales):
        raise ValueError("cfg_t_range, prev_chunk_scales and text_scales must have the same length")

    t = torch.as_tensor(t, dtype=torch.float32)
    if t.dim() != 2:
        raise ValueError(f"t must be (2, chunks), got shape {tuple(t.shape)}")
    chunks = t.shape[1]
    denoising = chunks - (1 if extra_clean_chunk else 0)
    if denoising < 1:
        raise ValueError("a call needs at least one denoising chunk")
    captions = _split_rows(captions, chunks, "captions")
    caption_mask = _split_rows(caption_mask, chunks, "caption_mask")
    kv = torch.as_tensor(kv_range).reshape(-1, 2)
    if kv.shape[0] != chunks:
        raise ValueError(f"kv_range must have {chunks} rows, got {kv.shape[0]}")

    x0, t0 = x[0:1].float(), t[0:1]
    frames = x0.shape[2]
    if frames != chunks * chunk_width:
        raise ValueError(f"x has {frames} frames but t gives {chunks} chunks of {chunk_width} frames")
    cond_caps, null_caps = captions[:chunks], captions[chunks:]
    cond_mask, null_mask = caption_mask[:chunks], caption_mask[chunks:]
    common = dict(slice_point=slice_point, chunk_width=chunk_width, dt=dt)

    if cfg_number == 3:
        # Per-chunk scales first: they decide which passes can change the result. v = (1-p)·v_u + (p-s)·v_p + s·v_t,
        # and a zero coefficient contributes exactly 0 for finite velocities, so a pass whose coefficient is zero
        # for every chunk (text pass when t >= 0.3 everywhere; uncond pass for chunks with p = 1) is skipped
        # without changing a bit. The reference always runs all three (spec §11.4).
        slots = list(range(chunks - denoising, chunks))
        scales = [cfg_scales(float(t0[0, slot]), cfg_t_range, prev_chunk_scales, text_scales) for slot in slots]
        need_text = any(ts != 0.0 for _, ts in scales)
        uncond_slots = [slot for slot, (ps, _) in zip(slots, scales) if ps != 1.0]

        # pass 1: text + context, reads the cache but leaves it alone
        v_text = None
        if need_text:
            v_text = model(x0, t0, cond_caps, cond_mask, kv, [False], kv_cache=kv_cache, write_cache=False, **common)
        # pass 2: context with null text; this pass produces the cached clean K/V. A nearly-clean flag only keeps
        # the newest chunk's rows out of the cache here.
        v_ctx = model(
            x0, t0, null_caps, null_mask, kv, [True], kv_cache=kv_cache, write_cache=True,
            skip_cache_write_chunks=1 if nearly_clean else 0, max_cache_write_chunks=max_cache_write_chunks,
            **common,
        )
        # pass 3: each chunk that needs it alone as its own batch element, no context, no cache
        v_uncond = {}
        if uncond_slots:
            channels, height, wide = x0.shape[1], x0.shape[3], x0.shape[4]
            uncond_x = torch.stack([x0[0, :, s * chunk_width : (s + 1) * chunk_width] for s in uncond_slots])
            tpc = _tokens_per_chunk(model, chunk_width, height, wide)
            items = len(uncond_slots)
            out_u = model(
                uncond_x, t0[0, uncond_slots].reshape(items, 1), null_caps[uncond_slots], null_mask[uncond_slots],
                [[b * tpc, (b + 1) * tpc] for b in range(items)], [True] * items,
                slice_point=0, chunk_width=chunk_width, dt=dt, kv_cache=None,
            )
            v_uncond = {slot: out_u[i : i + 1] for i, slot in enumerate(uncond_slots)}

        pieces = [x0[:, :, : slots[0] * chunk_width]]  # the extra clean chunk's slot keeps its input
        for slot, (ps, ts) in zip(slots, scales):
            a, b = slot * chunk_width, (slot + 1) * chunk_width
            # the reference's weighted-sum form and order (fp32), less the terms that are exactly zero
            v = (ps - ts) * v_ctx[:, :, a:b]
            if slot in v_uncond:
                v = (1 - ps) * v_uncond[slot] + v
            if ts != 0.0:
                v = v + ts * v_text[:, :, a:b]
            pieces.append(v)
        out = torch.cat(pieces, dim=2)
    elif cfg_number == 1:
        if nearly_clean:
            first = 1 if extra_clean_chunk else 0  # the first denoising chunk, never the clean chunk
            a, b = first * chunk_width, (first + 1) * chunk_width
            height, wide = x0.shape[3], x0.shape[4]
            tpc = _tokens_per_chunk(model, chunk_width, height, wide)
            end = int(kv.max())
            # the copy attends only to itself, placed after every other key of the call
            cat_kv = kv.tolist() + [[end, end + tpc]]
            cat_out = model(
                torch.cat([x0, x0[:, :, a:b]], dim=2),
                torch.cat([t0, t0[:, first : first + 1]], dim=1),
                torch.cat([cond_caps, cond_caps[first : first + 1]], dim=0),
                torch.cat([cond_mask, cond_mask[first : first + 1]], dim=0),
                cat_kv, [False], kv_cache=kv_cache, write_cache=True, skip_cache_write_chunks=1,
                max_cache_write_chunks=max_cache_write_chunks, **common,
            )
            scale = float(prev_chunks_scale)
            out = cat_out[:, :, :frames].clone()
            out[:, :, a:b] = cat_out[:, :, a:b] * scale + cat_out[:, :, frames:] * (1 - scale)
        else:
            out = model(
                x0, t0, cond_caps, cond_mask, kv, [False], kv_cache=kv_cache, write_cache=True,
                max_cache_write_chunks=max_cache_write_chunks, **common,
            )
            if extra_clean_chunk:
                out = torch.cat([x0[:, :, :chunk_width], out[:, :, chunk_width:]], dim=2)
    else:
        raise ValueError(f"cfg_number must be 1 or 3, got {cfg_number}")
    return torch.cat([out, out], dim=0)


def _tokens_per_chunk(model, chunk_width: int, height: int, width: int) -> int:
    cfg = model.config
    return (chunk_width // cfg.t_patch_size) * (height // cfg.patch_size) * (width // cfg.patch_size)
