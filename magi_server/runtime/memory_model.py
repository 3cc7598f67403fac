"""Arithmetic per-request device-memory estimate for admission control (no torch).

This file owns :func:`request_memory_estimate`: the device memory one admitted request holds at the peak of its
model calls, above the weights, from integers only (the scheduler imports it; it must stay torch-free). It covers
what the runner keeps per request (latent canvas, caption rows, KV cache) and the activations of its largest call,
and is checked against the planner's op-by-op accounting of the real code (``tests/test_planner.py``: estimate
>= accounted peak and <= 1.3 x it for the six presets at 720p and more; the accounted figures are in
``tests/data/plan_peaks.json``, rewritten by ``magi-server plan --write-fixture``).

The terms mirror how ``models/dit.py``, ``runtime/guidance.py`` and ``runtime/sampler.py`` allocate today; when those
change, rerun the fixture and adjust the term that moved (each is named after what it counts):

* canvas: the whole latent video in fp32; caption rows: [conditional, null] x chunks x 800 x 4096 fp32 (+ masks);
* per call, the caption rows it gathers (conditional, null, and the rows of the nearly-clean copy);
* KV cache: the chunks the runner retains before the call plus those it writes, every layer, K|V in the compute
  dtype (the retention is simulated on the sampler plan, exactly as the runner does it); none with ``kv_offload``
  (host memory), where a layer holds only the upload of the rows it reads;
* activations of the call's S query tokens (the nearly-clean copy included), the largest of:
  - self-attention: the residual stream, the queries, the output and the cross-attention queries as full-width
    tensors, one chunk's kernel output, the keys/values gathered with the cached rows they read;
  - the token-wise part: residual stream and both attention outputs full-width, plus one token piece's
    projection / MLP workspace (pieces of at most ``max_piece_tokens`` tokens, as ``models/dit.py`` cuts them);
  - the final layer: the residual stream, the fp32 output, and one piece's fp32 norm output and exact three-way
    bf16 split of the final linear.

Model weights, the VAE decode workspace, T5 and allocator fragmentation are not per request: the server takes them
off the budget before admitting anything (the planner reports them).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from magi_server.runtime.chunking import chunk_layout, plan_sampler_calls, tokens_per_chunk
from magi_server.models.config import DEFAULT_MAX_PIECE_TOKENS, DiTConfig

GB = 10**9

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The final layer runs piece by piece: per token of a piece and hidden unit, its fp32 LayerNorm output plus, in the
# exact bf16 split of the fp32-output final linear, the hi/mid bf16 pieces and three fp32 temporaries.
FINAL_LAYER_BYTES_PER_PIECE_TOKEN_HIDDEN = 20
# Per-call tensors the terms below do not name (timestep and caption embeddings, RoPE tables, the velocity and
# latent slices of the call): a small floor in bytes, plus a share of the largest term.
OTHER_BYTES = 256 * 10**6
SAFETY = 1.04
CAPTION_TOKENS = 800  # the padded caption length every row has (text_encoder.PADDED_CAPTION_TOKENS)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one request holds at its peak call, above the weights; ``total_bytes`` is what admission charges."""

    canvas_bytes: int
    captions_bytes: int
    call_captions_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    other_bytes: int
    total_bytes: int
    peak_call: int
    peak_query_tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


def _piece_tokens(tpc: int, max_tokens: int) -> int:
    count = max(1, -(-tpc // max(1, max_tokens)))
    return -(-tpc // count)


def request_memory_estimate(
    dit: DiTConfig,
    *,
    width: int,
    height: int,
    num_frames: int,
    num_steps: int,
    window_size: int,
    cfg_number: int,
    prefix_frames: int = 0,
    chunk_width: int = 6,
    temporal_downsample: int = 4,
    noise2clean_kvrange: tuple[int, ...] = (5, 4, 3, 2),
    clean_chunk_kvrange: int = 1,
    caption_length: int = CAPTION_TOKENS,
    max_piece_tokens: int = DEFAULT_MAX_PIECE_TOKENS,
    kv_offload: bool = False,
    extra_bytes: int = 0,
) -> MemoryEstimate:
    """Device memory of one request at its largest call, above the model weights (see the module docstring).

    ``width``/``height`` in pixels, ``num_frames`` as the sampler is asked (after any trim rounding),
    ``prefix_frames`` the latent frames of an i2v (1) / v2v prefix. ``kv_offload``: the KV cache lives in host
    memory between calls (the pipeline's ``kv_cache_device`` is the CPU); each layer then uploads the rows it reads.
    ``extra_bytes``: anything the caller knows beyond this (e.g. an uploaded prefix video's latents).
    """
    if min(width, height, num_frames, num_steps, window_size) < 1:
        raise ValueError("width, height, num_frames, num_steps and window_size must be >= 1")
    if cfg_number not in (1, 3):
        raise ValueError(f"cfg_number must be 1 or 3, got {cfg_number}")
    if extra_bytes < 0:
        raise ValueError(f"extra_bytes must be >= 0, got {extra_bytes}")
    lh, lw = height // 8, width // 8
    layout = chunk_layout(num_frames, prefix_frames, chunk_width, temporal_downsample)
    tpc = tokens_per_chunk(lh, lw, chunk_width, dit.patch_size, dit.t_patch_size)
    plan = plan_sampler_calls(
        layout, num_steps=num_steps, window_size=window_size, tokens_per_chunk=tpc,
        noise2clean_kvrange=noise2clean_kvrange, clean_chunk_kvrange=clean_chunk_kvrange,
    )
    elem = _DTYPE_BYTES[dit.params_dtype]
    d = dit.hidden_size
    q_width = dit.num_attention_heads * dit.kv_channels
    kv_width = dit.num_query_groups * dit.kv_channels
    ffn = dit.ffn_hidden_size
    out_width = dit.t_patch_size * dit.patch_size**2 * dit.out_channels
    n = layout.num_chunks
    row_bytes = caption_length * dit.caption_channels * 4

    canvas = dit.latent_channels * layout.latent_frames * lh * lw * 4
    captions = 2 * n * row_bytes + 2 * n * caption_length * 8
    chunk_cache_bytes = dit.num_layers * tpc * 2 * kv_width * elem  # one chunk's K|V rows, every layer

    # the runner's cache retention (runner.start_sampler / sampler_step_batch): a call reads the chunks
    # [lowest chunk its ranges start in, slice point); after it, only chunks some later call reads are kept
    reads = []
    for call in plan.calls:
        lo = min(min(start for start, _ in call.kv_ranges) // tpc, call.slice_point)
        reads.append(set(range(max(lo, 0), call.slice_point)))
    keep_after, later = [], set()
    for read in reversed(reads):
        keep_after.append(set(later))
        later |= read
    keep_after.reverse()

    # one token piece of the layer's token-wise part after attention: [core | cross] interleaved, its fp32
    # projection, the gated residual (bf16) and its pre-norm, then the MLP at its widest: the fc1 output and (run
    # eagerly) the fp32 SwiGLU temporaries, or GELU's bf16 output
    piece = _piece_tokens(tpc, max_piece_tokens)
    if dit.gated_linear_unit:
        mlp = 2 * ffn * elem + 3 * ffn * 4
    else:
        mlp = 2 * ffn * elem + ffn * 4
    piece_bytes = piece * (2 * q_width * elem + d * 4 + 3 * d * elem + mlp)

    best = None
    held: set[int] = set(range(layout.num_clean_chunks)) if plan.prefix_call else set()
    threshold_step = 3 * num_steps / 4  # the first denoising chunk is nearly clean (t > 0.3) from here on
    for index, call in enumerate(plan.calls):
        slots = call.range_num - call.slice_point
        written = {call.slice_point} if call.extra_clean_chunk else set()
        copy = 1 if cfg_number == 1 and call.window_step_indices[0] >= threshold_step else 0
        queries = (slots + copy) * tpc
        past = len(reads[index]) * tpc
        cache = 0 if kv_offload else len(held | written) * chunk_cache_bytes
        # cfg 3 runs its passes one after another, each over the call's slots; cfg 1 gathers its rows again
        # for the nearly-clean copy
        call_captions = (2 * slots + (slots + copy if copy else 0)) * row_bytes
        # self-attention: residual, queries, the zero-initialised output and one chunk's kernel output, with the
        # keys/values of the call and of the cached chunks it reads
        attention = (queries * (d + 3 * q_width) + tpc * q_width + (queries + past) * 2 * kv_width) * elem
        if kv_offload:
            attention += past * 2 * kv_width * elem  # the uploaded copy of the cached rows
        # token-wise part: residual, self- and cross-attention outputs, one piece's workspace
        tokenwise = queries * (d + 2 * q_width) * elem + piece_bytes
        # final layer: residual stream, the fp32 output of every token, one piece's norm and split workspace
        final = queries * (d * elem + out_width * 4) + piece * d * FINAL_LAYER_BYTES_PER_PIECE_TOKEN_HIDDEN
        activations = max(attention, tokenwise, final)
        total = cache + call_captions + activations
        if best is None or total > best[0]:
            best = (total, index, queries, cache, call_captions, activations)
        held = (held | written) & keep_after[index]
    _, index, queries, cache, call_captions, activations = best
    other = OTHER_BYTES
    core = canvas + captions + call_captions + cache + activations
    total = int(core * SAFETY) + other + extra_bytes
    return MemoryEstimate(
        canvas_bytes=canvas, captions_bytes=captions, call_captions_bytes=call_captions, kv_cache_bytes=cache,
        activation_bytes=activations, other_bytes=total - core - extra_bytes, total_bytes=total, peak_call=index,
        peak_query_tokens=queries,
    )
