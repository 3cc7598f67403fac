"""MAGI-1's window arithmetic, in integers only (no torch).

Owns: how many chunks a request has, which chunks each stage of the sampler denoises together, the step index of
every chunk in every model call, the block-causal key ranges of each call, when a chunk becomes clean and which of
its latent frames are emitted. ``plan_sampler_calls`` enumerates every model call of one request; the sampler and
the scheduler are built on that list.

Vocabulary (spec §6.2-6.5):

* a **chunk** is ``chunk_width`` (6) consecutive latent frames;
* the **prefix** is P clean latent frames given by the request (0 for t2v, 1 for i2v, 8 for the default v2v); the
  first ``P // chunk_width`` chunks are wholly inside it (**clean chunks**, ``chunk_offset``) and are never denoised;
* a **step** is one DiT forward (with CFG 3, one call of three passes); a chunk needs ``num_steps`` of them;
* a **window** is the set of chunks denoised together in one call, at most ``window_size`` of them, oldest (least
  noisy) first; a **stage** is ``num_steps // window_size`` consecutive calls over the same window;
* the **step index** of a chunk in a call is how many updates it has received before the call (0 = pure noise);
  ``num_steps`` marks the extra clean chunk whose key/value rows a call recomputes for the cache.

Worked example (t2v, 4 chunks, window 4, spec §6.4): stages 0..6 hold chunks {0}, {0,1}, {0,1,2}, {0..3}, {1,2,3},
{2,3}, {3}; chunk k is finished at the last call of stage 3 + k and re-run once as the extra clean chunk at the first
call of the next stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

KeyRange = tuple[int, int]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------------------------------
# Chunk counts and emitted frames
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkLayout:
    """The latent canvas of one request, in chunks.

    ``num_chunks`` counts every chunk of the canvas, prefix chunks included; ``num_clean_chunks`` (the reference's
    ``chunk_offset``) are wholly inside the prefix and never denoised.
    """

    num_chunks: int
    num_clean_chunks: int
    prefix_frames: int
    chunk_width: int = 6

    def __post_init__(self) -> None:
        if self.chunk_width < 1:
            raise ValueError(f"chunk_width must be >= 1, got {self.chunk_width}")
        if self.prefix_frames < 0:
            raise ValueError(f"prefix_frames must be >= 0, got {self.prefix_frames}")
        if self.num_clean_chunks != self.prefix_frames // self.chunk_width:
            raise ValueError("num_clean_chunks must equal prefix_frames // chunk_width")
        if self.num_chunks <= self.num_clean_chunks:
            raise ValueError(
                f"nothing to generate: {self.num_chunks} chunk(s) in the canvas, {self.num_clean_chunks} of them "
                "inside the prefix; ask for more frames"
            )

    @property
    def chunk_offset(self) -> int:
        return self.num_clean_chunks

    @property
    def num_denoised_chunks(self) -> int:
        """Chunks the sampler generates (the reference's ``report_chunk_num``)."""
        return self.num_chunks - self.num_clean_chunks

    @property
    def latent_frames(self) -> int:
        return self.num_chunks * self.chunk_width

    def emitted_frames(self, chunk: int) -> KeyRange | None:
        """Latent frames [start, end) of the canvas emitted when ``chunk`` is finished (None: never emitted)."""
        return emitted_frames(chunk, self.prefix_frames, self.chunk_width)

    def emitted_latent_frames(self) -> int:
        """Total latent frames the request emits."""
        total = 0
        for chunk in range(self.num_clean_chunks, self.num_chunks):
            frames = self.emitted_frames(chunk)
            if frames is not None:
                total += frames[1] - frames[0]
        return total


def chunk_layout(
    num_frames: int, prefix_frames: int = 0, chunk_width: int = 6, temporal_downsample: int = 4
) -> ChunkLayout:
    """Chunk counts of a request (spec §5.6, §6.2).

    ``num_frames`` is the requested pixel frame count, ``prefix_frames`` the number P of prefix latent frames
    (0 t2v, 1 i2v, the encoded prefix length for v2v). n_chunks = ceil((num_frames // 4 + P) / chunk_width).
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    if temporal_downsample < 1:
        raise ValueError(f"temporal_downsample must be >= 1, got {temporal_downsample}")
    latent = num_frames // temporal_downsample + prefix_frames
    return ChunkLayout(
        num_chunks=ceil_div(latent, chunk_width),
        num_clean_chunks=prefix_frames // chunk_width,
        prefix_frames=prefix_frames,
        chunk_width=chunk_width,
    )


def emitted_frames(chunk: int, prefix_frames: int, chunk_width: int = 6) -> KeyRange | None:
    """Latent frames [start, end) emitted for a finished chunk (spec §6.5 step 9).

    From frame max(chunk_width·c, P) to the chunk's end, except that chunk 0 is emitted whole when P = 1 (the i2v
    image frame is part of the output). A chunk wholly inside the prefix is never emitted (None).
    """
    start, end = chunk * chunk_width, (chunk + 1) * chunk_width
    if prefix_frames == 0:
        return (start, end)
    if end <= prefix_frames:
        return None
    if chunk == 0 and prefix_frames == 1:
        return (start, end)
    return (max(start, prefix_frames), end)


def tokens_per_chunk(
    latent_h: int, latent_w: int, chunk_width: int = 6, patch_size: int = 2, t_patch_size: int = 1
) -> int:
    """DiT tokens of one chunk: (chunk_width / t_patch) · (H / patch) · (W / patch) with H, W in latent pixels."""
    return (chunk_width // t_patch_size) * (latent_h // patch_size) * (latent_w // patch_size)


# --------------------------------------------------------------------------------------------------------------------
# Stage schedule (reference generate_sequences)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One stage: the window chunks [chunk_start, chunk_end) and which stage slots [t_start, t_end) they occupy.

    Slot i (0 = newest chunk) is i stages further in the schedule than the newest chunk; the chunk in slot i is at
    step index i · steps_per_stage + d during call d of the stage. ``chunk_end - chunk_start == t_end - t_start``.
    """

    index: int
    chunk_start: int
    chunk_end: int
    t_start: int
    t_end: int

    @property
    def num_window_chunks(self) -> int:
        return self.chunk_end - self.chunk_start


def stage_schedule(num_chunks: int, window_size: int, chunk_offset: int = 0) -> tuple[Stage, ...]:
    """All stages of a request (spec §6.4): n_chunks + window_size - 1 - chunk_offset of them.

    With i = chunk_offset + s: chunk_start = max(offset, i - W + 1), chunk_end = min(n, i + 1),
    t_start = max(0, i - n + 1), t_end = min(W, i - offset + 1).
    """
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    if not 0 <= chunk_offset < num_chunks:
        raise ValueError(f"chunk_offset must be in [0, num_chunks), got {chunk_offset} with {num_chunks} chunk(s)")
    stages = []
    for s, i in enumerate(range(chunk_offset, num_chunks + window_size - 1)):
        stages.append(
            Stage(
                index=s,
                chunk_start=max(chunk_offset, i - window_size + 1),
                chunk_end=min(num_chunks, i + 1),
                t_start=max(0, i - num_chunks + 1),
                t_end=min(window_size, i - chunk_offset + 1),
            )
        )
    return tuple(stages)


def chunk_step_indices(
    t_start: int,
    t_end: int,
    steps_per_stage: int,
    step_in_stage: int,
    extra_clean_chunk: bool = False,
    num_steps: int | None = None,
) -> tuple[int, ...]:
    """Step index of each chunk of a call, oldest chunk first (reference ``get_denoise_step_of_each_chunk``).

    The window chunks get (t_end - 1 - p) · steps_per_stage + d for position p; with ``extra_clean_chunk`` the clean
    chunk in front gets ``num_steps``, which selects ``clean_chunk_kvrange`` for it.
    """
    steps = [i * steps_per_stage + step_in_stage for i in range(t_end - 1, t_start - 1, -1)]
    if extra_clean_chunk:
        if num_steps is None:
            raise ValueError("num_steps is needed to mark the extra clean chunk")
        steps.insert(0, num_steps)
    return tuple(steps)


# --------------------------------------------------------------------------------------------------------------------
# Key ranges (spec §2.12)
# --------------------------------------------------------------------------------------------------------------------


def denoising_kv_ranges(
    slice_point: int,
    step_indices: Sequence[int],
    tokens_per_chunk: int,
    num_steps: int,
    noise2clean_kvrange: Sequence[int] = (5, 4, 3, 2),
    clean_chunk_kvrange: int = 1,
) -> tuple[KeyRange, ...]:
    """Absolute key-token range [start, end) of each chunk of a denoising call (batch of one).

    Chunk j (absolute chunk slice_point + j) sees chunks [max(0, sp + j + 1 - r_j), sp + j + 1), where r_j is
    ``clean_chunk_kvrange`` for the clean chunk (step index == num_steps; -1 means the last noise2clean entry) and
    ``noise2clean_kvrange[step // (num_steps / len)]`` otherwise. An empty ``noise2clean_kvrange`` means every
    chunk, the clean one included, sees everything before it.
    """
    if not noise2clean_kvrange:
        return tuple((0, (slice_point + j + 1) * tokens_per_chunk) for j in range(len(step_indices)))
    if num_steps % len(noise2clean_kvrange):
        raise ValueError(
            f"num_steps ({num_steps}) must be divisible by len(noise2clean_kvrange) ({len(noise2clean_kvrange)})"
        )
    clean_range = noise2clean_kvrange[-1] if clean_chunk_kvrange == -1 else clean_chunk_kvrange
    steps_per_quarter = num_steps // len(noise2clean_kvrange)
    ranges = []
    for j, step in enumerate(step_indices):
        if not 0 <= step <= num_steps:
            raise ValueError(f"step index {step} outside [0, {num_steps}]")
        chunks_seen = clean_range if step == num_steps else noise2clean_kvrange[step // steps_per_quarter]
        end = slice_point + j + 1
        start = max(0, end - chunks_seen)
        ranges.append((start * tokens_per_chunk, end * tokens_per_chunk))
    return tuple(ranges)


def prefix_kv_ranges(
    num_clean_chunks: int,
    tokens_per_chunk: int,
    noise2clean_kvrange: Sequence[int] = (5, 4, 3, 2),
    clean_chunk_kvrange: int = 1,
) -> tuple[KeyRange, ...]:
    """Key ranges of the prefix-extraction call over clean chunks 0..n-1 (reference
    ``generate_kvrange_for_prefix_video``): each sees ``clean_chunk_kvrange`` chunks ending at itself; -1 means the
    last noise2clean entry, or 8 when that list is empty."""
    if clean_chunk_kvrange != -1:
        chunks_seen = clean_chunk_kvrange
    elif noise2clean_kvrange:
        chunks_seen = noise2clean_kvrange[-1]
    else:
        chunks_seen = 8
    return tuple(
        (max(0, end - chunks_seen) * tokens_per_chunk, end * tokens_per_chunk) for end in range(1, num_clean_chunks + 1)
    )


def uncond_kv_ranges(num_items: int, tokens_per_chunk: int) -> tuple[KeyRange, ...]:
    """Key ranges of the unconditional CFG pass: item b of the batch-flattened keys attends only to itself."""
    return tuple((b * tokens_per_chunk, (b + 1) * tokens_per_chunk) for b in range(num_items))


# --------------------------------------------------------------------------------------------------------------------
# Every model call of a request
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmittedChunk:
    """A chunk that became clean: absolute ``chunk``, output ``index`` (chunk - chunk_offset, as the reference yields
    it) and the canvas latent frames [frame_start, frame_end) to emit."""

    chunk: int
    index: int
    frame_start: int
    frame_end: int

    @property
    def num_frames(self) -> int:
        return self.frame_end - self.frame_start


@dataclass(frozen=True)
class PrefixCall:
    """The one call that writes the clean prefix chunks' keys/values before the first step (v2v with P >= 6).

    x = prefix latent frames [0, chunk_width · num_chunks), every chunk at t = clean_t with the null caption;
    slice_point 0, range_num = denoising_range_num = num_chunks; distill_interval = init_interval(...)[0].
    """

    num_chunks: int
    kv_ranges: tuple[KeyRange, ...]
    frame_end: int

    @property
    def slice_point(self) -> int:
        return 0

    @property
    def range_num(self) -> int:
        return self.num_chunks

    @property
    def denoising_range_num(self) -> int:
        return self.num_chunks

    @property
    def step_in_stage(self) -> int:
        return 0


@dataclass(frozen=True)
class SamplerCall:
    """One model call (one forward_dispatcher call) of the sampler.

    ``chunk_start``/``chunk_end`` are the window chunks; with ``extra_clean_chunk`` the finished chunk
    chunk_start - 1 is prepended as slot 0 (t = clean_t, null caption, its K/V written to the cache) and
    ``slice_point`` = chunk_start - 1. Slots run from ``slice_point`` to ``range_num`` - 1, oldest first.
    ``step_indices`` has one entry per slot (``num_steps`` for the clean chunk); chunk timesteps are
    schedule[step]. ``prefix_overwrite`` leading frames of the call's x are replaced by prefix frames starting at
    prefix frame chunk_width · slice_point. ``emitted`` is the chunk that becomes clean after this call's Euler step.
    """

    index: int
    stage: int
    step_in_stage: int
    chunk_start: int
    chunk_end: int
    t_start: int
    t_end: int
    extra_clean_chunk: bool
    slice_point: int
    range_num: int
    denoising_range_num: int
    step_indices: tuple[int, ...]
    kv_ranges: tuple[KeyRange, ...]
    prefix_overwrite: int
    emitted: EmittedChunk | None

    @property
    def first_denoising_slot(self) -> int:
        """Slot of the oldest window chunk: it keys the nearly-clean flag and is the chunk copied by it."""
        return 1 if self.extra_clean_chunk else 0

    @property
    def window_step_indices(self) -> tuple[int, ...]:
        """Step indices of the window chunks only (the ones the Euler step advances)."""
        return self.step_indices[self.first_denoising_slot:]

    @property
    def slot_chunks(self) -> tuple[int, ...]:
        """Absolute chunk index of each slot."""
        return tuple(range(self.slice_point, self.range_num))

    @property
    def num_window_chunks(self) -> int:
        return self.chunk_end - self.chunk_start


@dataclass(frozen=True)
class SamplerPlan:
    """Every model call of one request, in order. ``prefix_call`` (if any) runs before ``calls[0]``."""

    layout: ChunkLayout
    num_steps: int
    window_size: int
    tokens_per_chunk: int
    stages: tuple[Stage, ...]
    prefix_call: PrefixCall | None
    calls: tuple[SamplerCall, ...]

    @property
    def steps_per_stage(self) -> int:
        return self.num_steps // self.window_size

    @property
    def num_calls(self) -> int:
        """Denoising calls (the prefix-extraction call is not counted, as in the reference)."""
        return len(self.calls)

    @property
    def emissions(self) -> tuple[EmittedChunk, ...]:
        return tuple(call.emitted for call in self.calls if call.emitted is not None)


def plan_sampler_calls(
    layout: ChunkLayout,
    *,
    num_steps: int,
    window_size: int,
    tokens_per_chunk: int,
    noise2clean_kvrange: Sequence[int] = (5, 4, 3, 2),
    clean_chunk_kvrange: int = 1,
) -> SamplerPlan:
    """Enumerate every model call of a request (reference ``SampleTransport.walk`` without the tensors).

    Call g is call d = g % steps_per_stage of stage g // steps_per_stage. The extra clean chunk is added at d = 0
    whenever the window no longer starts at the first denoised chunk.
    """
    if num_steps < 1 or window_size < 1:
        raise ValueError(f"num_steps and window_size must be >= 1, got {num_steps} and {window_size}")
    if num_steps % window_size:
        raise ValueError(f"num_steps ({num_steps}) must be divisible by window_size ({window_size})")
    if noise2clean_kvrange and num_steps % len(noise2clean_kvrange):
        raise ValueError(
            f"num_steps ({num_steps}) must be divisible by len(noise2clean_kvrange) ({len(noise2clean_kvrange)})"
        )
    if clean_chunk_kvrange == 0 or clean_chunk_kvrange < -1:
        raise ValueError(f"clean_chunk_kvrange must be >= 1 or -1, got {clean_chunk_kvrange}")
    if tokens_per_chunk < 1:
        raise ValueError(f"tokens_per_chunk must be >= 1, got {tokens_per_chunk}")

    noise2clean_kvrange = tuple(noise2clean_kvrange)
    offset = layout.num_clean_chunks
    width = layout.chunk_width
    steps_per_stage = num_steps // window_size
    stages = stage_schedule(layout.num_chunks, window_size, offset)

    prefix_call = None
    if offset > 0:
        prefix_call = PrefixCall(
            num_chunks=offset,
            kv_ranges=prefix_kv_ranges(offset, tokens_per_chunk, noise2clean_kvrange, clean_chunk_kvrange),
            frame_end=offset * width,
        )

    calls = []
    for stage in stages:
        for d in range(steps_per_stage):
            extra = stage.chunk_start > offset and d == 0
            slice_point = stage.chunk_start - 1 if extra else stage.chunk_start
            steps = chunk_step_indices(stage.t_start, stage.t_end, steps_per_stage, d, extra, num_steps)
            drn = len(steps)
            kv_ranges = denoising_kv_ranges(
                slice_point, steps, tokens_per_chunk, num_steps, noise2clean_kvrange, clean_chunk_kvrange
            )
            prefix_overwrite = max(0, min(layout.prefix_frames - slice_point * width, drn * width))

            # The oldest window chunk has had steps[first] updates before this call; after it, one more.
            emitted = None
            if steps[1 if extra else 0] == num_steps - 1:
                frames = layout.emitted_frames(stage.chunk_start)
                if frames is not None:
                    emitted = EmittedChunk(stage.chunk_start, stage.chunk_start - offset, frames[0], frames[1])

            calls.append(
                SamplerCall(
                    index=len(calls),
                    stage=stage.index,
                    step_in_stage=d,
                    chunk_start=stage.chunk_start,
                    chunk_end=stage.chunk_end,
                    t_start=stage.t_start,
                    t_end=stage.t_end,
                    extra_clean_chunk=extra,
                    slice_point=slice_point,
                    range_num=slice_point + drn,
                    denoising_range_num=drn,
                    step_indices=steps,
                    kv_ranges=kv_ranges,
                    prefix_overwrite=prefix_overwrite,
                    emitted=emitted,
                )
            )
    return SamplerPlan(
        layout=layout,
        num_steps=num_steps,
        window_size=window_size,
        tokens_per_chunk=tokens_per_chunk,
        stages=stages,
        prefix_call=prefix_call,
        calls=tuple(calls),
    )
