"""The model runner: the loaded model (DiT, VAE, T5, special tokens) and the requests running on it.

Every video, served or offline, is made by the same four calls of :class:`ModelRunner`: :meth:`~ModelRunner.prefill`
(validate, load the image/video, encode the prompt with T5 and the prefix with the VAE, plan the calls, draw the
seeded noise), :meth:`~ModelRunner.advance` (one batched model call), :meth:`~ModelRunner.decode_chunk` (a final
chunk to uint8 frames) and :meth:`~ModelRunner.open_video` (the MP4 they are appended to). ``MagiPipeline`` loops
over them for one request; the engine drives them for many, through the record-based interface below. So offline
and served output are the same bytes by construction.

For the engine the runner owns the per-request state of every admitted job, keyed by job id: the sampler state
(canvas, captions, KV cache), the MP4 writer that receives each chunk's frames once the chunk is final, and the
chunk preview files that streaming clients fetch. The engine decides (which jobs to prefill, which to step together,
which to release); the runner executes on the device and reports plain records back. Outputs are written to a
temporary file and renamed into place when the job finishes, so a job that is re-run after a crash overwrites its
own output instead of leaving a half file under the final name.

Only the model calls run on the engine thread. Two worker threads of the runner do the rest, so the running jobs'
next call never waits for them:

* the *prefill* worker runs :meth:`~ModelRunner.prefill` and opens the output. The jobs the engine admitted in one
  round are prepared as one group and reported together, so jobs admitted together still start in lock-step and
  share their model calls;
* the *output* worker decodes each finished chunk with the VAE (on its own CUDA stream on a GPU), appends its frames
  to the job's MP4 and writes the chunk preview, then closes the MP4 when the job finishes. One thread serves every
  job, in submission order, so a job's chunks are written in order and its close comes after all of them.

Results come back through :meth:`ModelRunner.poll` on the engine thread (records ``Prefilled``, ``ChunkDone``,
``Finished``, ``JobFailed``); the workers call the wake-up function the engine registered whenever one is ready.
All bookkeeping of which jobs exist happens on the engine thread; the workers only compute and post.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from magi_server.media import InputError
from magi_server.media.images import load_image, resize_image
from magi_server.media.mp4 import Mp4Writer
from magi_server.media.video import load_video
from magi_server.models.config import MagiConfig, model_limits
from magi_server.models.text_encoder import CaptionTokenOptions, SpecialTokens, build_chunk_captions
from magi_server.models.vae import TileConfig, decode_to_frames, encode_video_uint8
from magi_server.params import KEPT_LATENT_FRAMES, GenerationParams, ModelLimits, ParamError, kept_latents_name
from magi_server.runtime.memory_model import request_memory_estimate
from magi_server.runtime.sampler import LatentChunk, SamplerSettings, SamplerState, plan_request, sampler_step_batch, start_sampler

log = logging.getLogger("magi_server.runtime.model_runner")

PREFIX_VIDEO_FRAMES = 32  # v2v conditions on the first 32 frames of the video (8 latent frames), as the reference


def leave_a_core_for_serving(device: str | torch.device) -> None:
    """On a CPU device, let the model's intra-op threads use every core but one (never more than torch's default).

    A server's event loop, job store and encoders share the process's cores with the model; torch otherwise takes
    them all (its pool threads spin between the many small ops of a step) and the event loop waits for a core
    behind them: on 2 cores, polls at 200/s while a job generated took seconds to answer (issue #10). The setting
    is process-wide (torch has no per-thread one) and does not change the output (same bytes, fewer threads). A GPU
    device is left alone: there the CPU threads only feed the GPU.
    """
    if torch.device(device).type != "cpu":
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - 1)))


def plan_frames_for_output(num_frames: int, task: str, prefix_frames: int = 0, chunk_width: int = 6) -> int:
    """The MAGI-1 ``num_frames`` that yields the fewest whole chunks covering ``num_frames`` output frames.

    MAGI-1 emits 24-frame chunks; an i2v request also spends one latent frame on the image, so asking MAGI-1 for
    ``num_frames`` there would start one chunk more than needed (96 frames -> 120). Used when the output is trimmed.
    v2v with a known prefix of ``prefix_frames`` latent frames: the chunk holding the prefix's end emits only its
    remaining latent frames, and when that is 3k+1 of them the lone last one of its decode tiles (3 latent frames)
    gives one frame, not 4 (spec §5.6: 8 prefix latents -> 13 frames from that chunk); one more latent frame is asked
    for when the output would otherwise fall short.
    """
    latents = -(-num_frames // 4)
    if task == "i2v":
        return max(4, 4 * (latents - 1))
    if task == "v2v" and prefix_frames > 1 and (chunk_width - prefix_frames % chunk_width) % 3 == 1:
        emitted = -(-(latents + prefix_frames) // chunk_width) * chunk_width - prefix_frames
        if 4 * emitted - 3 < num_frames:
            latents += 1
    return 4 * latents


@dataclass(frozen=True)
class PrefillInfo:
    batch_key: tuple  # equal keys: the same plan, so calls at the same index can be batched
    calls_total: int
    chunks_total: int


# ------------------------------------------------------------------------------- records poll() hands the engine
@dataclass(frozen=True)
class Prefilled:
    kind: ClassVar[str] = "prefilled"
    job_id: str
    info: PrefillInfo


@dataclass(frozen=True)
class ChunkDone:
    kind: ClassVar[str] = "chunk"
    job_id: str
    chunk_index: int
    chunks_total: int
    frames_total: int  # frames written to the output so far
    preview: str | None  # file name (in the outputs folder) of this chunk's frames as a small MP4


@dataclass(frozen=True)
class Finished:
    kind: ClassVar[str] = "finished"
    job_id: str
    output: str  # file name in the outputs folder
    num_frames: int
    inference_ms: int
    chunks_total: int
    safety_checked: bool = False  # the safety checker looked at every chunk written
    nsfw: bool = False  # and flagged at least one of them


@dataclass(frozen=True)
class JobFailed:
    kind: ClassVar[str] = "failed"
    job_id: str
    stage: str  # "prefill" (bad input: a ParamError names the parameter) or "output" (decode, encode or close)
    error: Exception


@dataclass
class _Job:
    job_id: str
    params: GenerationParams
    state: SamplerState | None  # None once released (a finishing job's output may still be closing)
    writer: Mp4Writer
    started: float
    chunks_total: int
    # set on the engine thread only; the output worker reads them to skip work nobody will collect
    dropped: bool = False  # released before it finished (cancel, time limit, failure): its output goes away
    finishing: bool = False  # finish() was called: the close is queued behind its chunks
    # the output worker's own: the preview being written (so a release can stop it too) and counters
    preview_writer: Mp4Writer | None = None
    failed: bool = False
    frames_written: int = 0
    chunks_done: int = 0
    nsfw: bool = False  # the safety checker flagged one of its chunks
    previews: list[str] = field(default_factory=list)
    # the clean latents (CPU, fp32) of the last KEPT_LATENT_FRAMES latent frames written: saved when it finishes
    kept_latents: torch.Tensor | None = None

    @property
    def frames_wanted(self) -> int | None:
        """Trim the output to this many frames (hosted-API semantics); None: keep every frame of whole chunks."""
        return self.params.num_frames if self.params.trim_to_frames else None


@dataclass
class _Prepared:
    """What the prefill worker made for one job; the engine thread installs it unless the job was released."""

    job_id: str
    token: object
    job: _Job | None = None
    info: PrefillInfo | None = None
    error: Exception | None = None


class _Worker:
    """One daemon thread running submitted callables in submission order (the order is the point). Started on the
    first submit, so a runner that only answers memory questions or serves the offline pipeline starts no thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self._queue.put(fn)

    def stop(self, timeout: float) -> None:
        """Run what is queued, then end the thread; wait up to ``timeout`` s for it. A thread left inside a torch or
        ffmpeg call when the interpreter exits can abort the process, so the owner waits here."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            fn = self._queue.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:  # every task reports its own failure; this is a bug in the reporting itself
                log.exception("%s task failed", self.name)


class ModelRunner:
    """DiT + VAE + T5 + special tokens on a device, and the requests running on them."""

    def __init__(
        self,
        dit,
        vae,
        text_encoder,
        special_tokens: SpecialTokens | None,
        config: MagiConfig,
        *,
        device: torch.device | str = "cpu",
        tiles: TileConfig | None = None,
        caption_options: CaptionTokenOptions = CaptionTokenOptions(),
        outputs_dir: str | Path | None = None,
        chunk_previews: bool = True,
        safety_checker=None,
    ) -> None:
        self.dit = dit
        self.vae = vae
        self.text_encoder = text_encoder
        self.special_tokens = special_tokens
        self.config = config
        self.device = torch.device(device)
        self.tiles = tiles or TileConfig(tile_sample_min_length=config.sampling.fps // 2)
        self.caption_options = caption_options
        # the engine's side: where served outputs go (None for the offline pipeline's runner)
        self.outputs_dir = None if outputs_dir is None else Path(outputs_dir)
        if self.outputs_dir is not None:
            self.outputs_dir.mkdir(parents=True, exist_ok=True)
        self.chunk_previews = chunk_previews
        # runtime.safety_checker.SafetyChecker (or anything with check(frames) -> bool): run on each served chunk
        # of a job whose params ask for it; None: outputs go unchecked (and are reported so)
        self.safety_checker = safety_checker
        self.batch_sizes: Counter[int] = Counter()  # batched model calls run, by batch size (bounded by max batch)
        # engine thread only
        self._jobs: dict[str, _Job] = {}
        self._prefilling: dict[str, object] = {}  # job id -> token of its prefill in flight (a re-run gets a new one)
        self._groups_in_flight = 0
        # workers -> engine thread
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup: Callable[[], None] = lambda: None
        self._prefill_worker = _Worker("magi-prefill")
        self._output_worker = _Worker("magi-output")
        self._output_stream = None  # the output worker's CUDA stream, made by that thread on first use
        self._closing = threading.Event()  # shutdown(): the prefill worker skips what it has not begun

    def with_outputs(self, outputs_dir: str | Path, *, chunk_previews: bool = True,
                     safety_checker=None) -> "ModelRunner":
        """A runner over the same loaded model, with no requests yet, whose served jobs write into
        ``outputs_dir`` (what the composition root hands the engine; the weights are shared, not copied) and are
        checked by ``safety_checker`` (runtime.safety_checker.SafetyChecker) when one is given."""
        return ModelRunner(
            self.dit, self.vae, self.text_encoder, self.special_tokens, self.config, device=self.device,
            tiles=self.tiles, caption_options=self.caption_options, outputs_dir=outputs_dir,
            chunk_previews=chunk_previews, safety_checker=safety_checker,
        )

    @property
    def kv_cache_device(self) -> torch.device:
        """Where requests keep their clean-chunk K/V between calls: the CPU (pinned) when the config's
        ``kv_offload`` is on and the model runs on a GPU (spec §11.4: only one clean chunk is read per call, so the
        upload is small against the call), else the model's device."""
        if self.config.kv_offload and self.device.type == "cuda":
            return torch.device("cpu")
        return self.device

    # -------------------------------------------------------------------------------------- what a request may be
    def model_limits(self) -> ModelLimits:
        """The limits this model adds to the request contract (:func:`magi_server.params.validate`)."""
        return model_limits(self.config)

    def request_memory_bytes(self, params: GenerationParams) -> int:
        """Device bytes admission charges a job (:func:`request_memory_estimate` of :meth:`memory_facts`)."""
        return request_memory_estimate(**self.memory_facts(params)).total_bytes

    def memory_facts(self, params: GenerationParams) -> dict:
        """The arguments of :func:`magi_server.runtime.memory_model.request_memory_estimate` for a job (no tensors
        touched): what admission charges it, checked against the planner's op accounting of this code."""
        s = self.config.sampling
        # the prefix's latent frames: an i2v image is one; a v2v prefix is at most 8 (a video's first 32 frames, or
        # the latents a continued job kept), charged at that most since a video's length is known only once decoded
        prefix = {"i2v": 1, "v2v": max(KEPT_LATENT_FRAMES, PREFIX_VIDEO_FRAMES // 4)}.get(params.task, 0)
        frames = (plan_frames_for_output(params.num_frames, params.task, prefix, s.chunk_width)
                  if params.trim_to_frames else params.num_frames)
        return dict(
            dit=self.dit.config, width=params.width, height=params.height, num_frames=frames,
            num_steps=params.num_inference_steps or s.num_steps, window_size=params.window_size or s.window_size,
            cfg_number=s.cfg_number, prefix_frames=prefix,
            chunk_width=s.chunk_width, noise2clean_kvrange=tuple(s.noise2clean_kvrange),
            clean_chunk_kvrange=s.clean_chunk_kvrange, max_piece_tokens=self.dit.max_piece_tokens,
            kv_offload=self.kv_cache_device != self.device,
        )

    # ------------------------------------------------------------------------ one request: the steps every path runs
    @torch.no_grad()
    def prefill(
        self,
        params: GenerationParams,
        *,
        image=None,
        video=None,
        video_latents: torch.Tensor | None = None,
        prompt_embeds=None,
        prompt_attention_mask=None,
        noise: torch.Tensor | None = None,
    ) -> SamplerState:
        """Everything before a request's first model call: encode the image/video prefix, plan the calls, build the
        per-chunk captions and draw the seeded noise. Returns the request's sampler state. ``params`` passed
        :func:`magi_server.params.validate` at its entry point (the HTTP edge, the CLI, ``MagiPipeline``); what only
        shows here raises :class:`ParamError` naming the parameter (InputError: an unreadable image or video).

        ``image`` / ``video``: any source :func:`load_image` / :func:`load_video` read, or an (H, W, 3) uint8 array;
        by default the request's stored ``image_path`` / ``video_path``. ``video_latents``: a prefix already in
        latent space. ``prompt_embeds`` + ``prompt_attention_mask`` replace the T5 encode of ``params.prompts``;
        ``noise`` replaces the seeded draw (the golden fixtures pass the reference's).
        """
        dit_cfg = self.dit.config
        settings = SamplerSettings.from_config(self.config, num_steps=params.num_inference_steps,
                                               window_size=params.window_size)
        # 1. the conditioning prefix (i2v image = 1 latent frame; v2v video; or latents given directly)
        prefix = self.encode_prefix(params, image=image, video=video, video_latents=video_latents)
        prefix_frames = 0 if prefix is None else prefix.shape[2]
        frames = (plan_frames_for_output(params.num_frames, params.task, prefix_frames, settings.chunk_width)
                  if params.trim_to_frames else params.num_frames)
        plan = plan_request(
            settings, num_frames=frames, prefix_frames=0 if prefix is None else prefix.shape[2],
            latent_height=params.height // 8, latent_width=params.width // 8,
            patch_size=dit_cfg.patch_size, t_patch_size=dit_cfg.t_patch_size,
        )
        layout = plan.layout

        # 2. captions: T5 (or the given embeddings), special tokens, null captions, per chunk
        embeds, masks = self._prompt_embeddings(params.prompts, prompt_embeds, prompt_attention_mask,
                                                layout.num_denoised_chunks)
        captions, caption_masks = build_chunk_captions(
            embeds, masks, self.dit.y_embedder.null_caption_embedding.detach().float().cpu(), layout.num_chunks,
            layout.num_clean_chunks, self.special_tokens, self.caption_options,
        )

        # 3. the noise canvas: first draw after seeding, on the device (spec §6.2)
        shape = (1, dit_cfg.latent_channels, layout.latent_frames, params.height // 8, params.width // 8)
        if noise is not None:
            noise = torch.as_tensor(noise)
            if tuple(noise.shape) != shape:
                raise ParamError("latents", f"must have shape {shape} for this request, got {tuple(noise.shape)}")
            noise = noise.to(device=self.device, dtype=torch.float32)
        else:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
            noise = torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32)

        return start_sampler(
            plan, settings, noise=noise, captions=captions.to(self.device),
            caption_masks=caption_masks.to(self.device), prefix=prefix, num_layers=dit_cfg.num_layers,
            cache_dtype=self.dit.compute_dtype, cache_device=self.kv_cache_device,
            cache_pinned=self.kv_cache_device != self.device,
        )

    def encode_prefix(self, params: GenerationParams, *, image=None, video=None,
                      video_latents: torch.Tensor | None = None) -> torch.Tensor | None:
        """The conditioning prefix latents (1, C, P, h, w) of a request, or None for text-to-video."""
        if video_latents is None and image is None and video is None and params.prefix_latents_path is not None:
            video_latents = self._stored_latents(params)
        if video_latents is not None:
            return torch.as_tensor(video_latents).to(self.device)
        image = params.image_path if image is None else image
        video = params.video_path if video is None else video
        s = self.config.sampling
        if image is not None:
            pixels = _as_image(image, params.width, params.height)[None]  # (1, H, W, 3)
        elif video is not None:
            pixels = load_video(video, width=params.width, height=params.height, fps=s.fps,
                                max_frames=PREFIX_VIDEO_FRAMES)
            if pixels.shape[0] < 4:
                raise InputError("video", f"needs at least 4 frames after resampling to {s.fps} fps, got {pixels.shape[0]}")
        else:
            return None
        clip = torch.from_numpy(np.ascontiguousarray(pixels)).permute(3, 0, 1, 2)[None].to(self.device)
        mean = encode_video_uint8(self.vae, clip, self.tiles)
        # the reference scales the bf16 mean in bf16: the prefix latent stays bf16 (spec §5.2 step 6)
        return mean * s.scale_factor

    def _stored_latents(self, params: GenerationParams) -> torch.Tensor:
        """The stored prefix latents of a continuation (``prefix_latents_path``: a copy of an earlier job's kept
        latents), checked against the request's size; exactly as they were saved (fp32), as the library's
        ``video_latents``."""
        try:
            latents = load_file(params.prefix_latents_path)["latents"]
        except (OSError, KeyError, ValueError) as exc:  # gone, or not a file we wrote
            raise ParamError("continue_from", f"the kept latents to continue could not be read ({exc})") from None
        expected = (1, self.dit.config.latent_channels, params.height // 8, params.width // 8)
        shape = tuple(latents.shape)
        if len(shape) != 5 or (shape[0], shape[1], *shape[3:]) != expected or shape[2] < 1:
            raise ParamError("continue_from", f"the kept latents are {shape}, not (1, {expected[1]}, frames, "
                                              f"{expected[2]}, {expected[3]}) for {params.width}x{params.height}")
        return latents

    def _keep_latents(self, job: _Job, latents: torch.Tensor, shown: int, decoded: int) -> None:
        """Output worker: remember the clean latents of the ``shown`` frames (of ``decoded``) this chunk added to
        the output, keeping the last KEPT_LATENT_FRAMES latent frames. A chunk trimmed short keeps the latent frames
        of the frames shown (4 frames each), so a continuation starts where the output ends."""
        if shown == 0:
            return
        count = latents.shape[2] if shown >= decoded else min(latents.shape[2], -(-shown // 4))
        recent = latents[:, :, :count].to(torch.float32)
        if job.kept_latents is not None:
            recent = torch.cat([job.kept_latents, recent], dim=2)
        job.kept_latents = recent[:, :, -KEPT_LATENT_FRAMES:].clone()

    def _save_kept_latents(self, job: _Job) -> None:
        """Output worker: the job's kept latents as ``<job id>.latents.safetensors`` in the outputs folder (written
        to a hidden file, then renamed: a reader sees all of it or nothing)."""
        if job.kept_latents is None:
            return
        name = kept_latents_name(job.job_id)
        partial = self.outputs_dir / f".{name}.part"
        save_file({"latents": job.kept_latents.contiguous()}, str(partial), metadata={"job_id": job.job_id})
        os.replace(partial, self.outputs_dir / name)

    def _prompt_embeddings(self, prompts: Sequence[str], prompt_embeds, prompt_attention_mask, num_denoised: int):
        if prompt_embeds is not None:
            if isinstance(prompt_embeds, torch.Tensor):
                return prompt_embeds.float().cpu(), torch.as_tensor(prompt_attention_mask).cpu()
            return [e.float().cpu() for e in prompt_embeds], [torch.as_tensor(m).cpu() for m in prompt_attention_mask]
        if len(prompts) > num_denoised:
            raise ParamError("prompt", f"{len(prompts)} prompts for a video of {num_denoised} chunks; give at most "
                                       "one per chunk")
        embeds, masks = self.text_encoder.encode(list(prompts))
        embeds, masks = embeds.float().cpu(), masks.cpu()
        if len(prompts) == 1:
            return embeds[0], masks[0]
        per_chunk = [min(i, len(prompts) - 1) for i in range(num_denoised)]  # the last prompt for the rest
        return [embeds[i] for i in per_chunk], [masks[i] for i in per_chunk]

    @torch.no_grad()
    def advance(self, states: Sequence[SamplerState]) -> list[LatentChunk | None]:
        """One batched model call: the next call of each of these requests (all at the same call of the same
        plan). Returns, per request, the chunk this call made final, if any."""
        self.batch_sizes[len(states)] += 1
        return sampler_step_batch(self.dit, list(states))

    @torch.no_grad()
    def decode_chunk(self, chunk: LatentChunk) -> np.ndarray:
        """uint8 frames (T, H, W, 3) of one emitted chunk (tiles of fps/2 frames; one latent frame -> one frame)."""
        scale = self.config.sampling.scale_factor
        frames = decode_to_frames(self.vae, chunk.latents / scale, self.tiles, uint8_output=True)
        return frames.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def open_video(self, path: str | Path, width: int, height: int) -> Mp4Writer:
        """The MP4 a request's decoded frames are appended to (renamed into place on close)."""
        return Mp4Writer(path, width, height, fps=self.config.sampling.fps)

    # ------------------------------------------------------------------------------------------ the engine's side
    def set_wakeup(self, wakeup: Callable[[], None]) -> None:
        """``wakeup()`` is called from a worker thread whenever :meth:`poll` has something new."""
        self._wakeup = wakeup

    def output_name(self, job_id: str) -> str:
        return f"{job_id}.mp4"

    @property
    def prefilling(self) -> bool:
        """A prefill group is in flight (its results are not all polled yet)."""
        return self._groups_in_flight > 0

    def sampler_state(self, job_id: str) -> SamplerState | None:
        """Engine thread: the sampler state of a prefilled job (None once released or finished). Context
        parallelism hands it to the other ranks so they make the job's model calls too."""
        job = self._jobs.get(job_id)
        return None if job is None else job.state

    def start_prefill(self, jobs: Sequence[tuple[str, GenerationParams]]) -> None:
        """Queue the prefill of these jobs as one group on the prefill worker; :meth:`poll` reports a ``Prefilled``
        or a ``JobFailed`` (bad input raises ParamError there, naming the parameter) for each, all in one poll."""
        if self.outputs_dir is None:
            raise RuntimeError("this runner has no outputs folder; serve through runner.with_outputs(folder)")
        group = []
        for job_id, params in jobs:
            self.release(job_id)  # a re-run after a crash starts from nothing
            token = object()
            self._prefilling[job_id] = token
            group.append((job_id, params, token))
        self._groups_in_flight += 1
        self._prefill_worker.submit(lambda: self._prefill_group(group))

    def _prefill_group(self, group) -> None:
        """Prefill worker: prepare each job of the group; one result item for all of them."""
        results = []
        try:
            for job_id, params, token in group:
                if self._closing.is_set():
                    break
                try:
                    results.append(self._prepare(job_id, params, token))
                except Exception as exc:
                    results.append(_Prepared(job_id, token, error=exc))
        finally:
            self._post(("prefill", results))  # always: the engine holds new submits until the group is reported

    def _prepare(self, job_id: str, params: GenerationParams, token: object) -> _Prepared:
        started = time.monotonic()
        state = self.prefill(params)
        writer = self.open_video(self.outputs_dir / self.output_name(job_id), params.width, params.height)
        plan = state.plan
        job = _Job(job_id, params, state, writer, started, chunks_total=state.chunks_total)
        batch_key = (state.settings, plan.layout, plan.tokens_per_chunk, tuple(state.canvas.shape))
        return _Prepared(job_id, token, job=job, info=PrefillInfo(batch_key, plan.num_calls, state.chunks_total))

    def step(self, job_ids: list[str]) -> list[str]:
        """One batched model call for these jobs. Returns the ids whose call made a chunk final; the chunk's decode
        and write are queued on the output worker and reported by :meth:`poll` as ``ChunkDone``."""
        jobs = [self._jobs[job_id] for job_id in job_ids]
        chunks = self.advance([job.state for job in jobs])
        ready = None
        if self.device.type == "cuda" and any(chunk is not None for chunk in chunks):
            # the output worker's stream must not read the chunk before this thread's stream has written it
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        done = []
        for job_id, job, chunk in zip(job_ids, jobs, chunks):
            if chunk is not None:
                self._output_worker.submit(lambda job=job, chunk=chunk: self._write_chunk(job, chunk, ready))
                done.append(job_id)
        return done

    def _write_chunk(self, job: _Job, chunk: LatentChunk, ready) -> None:
        """Output worker: decode one chunk, append it to the MP4, write its preview, report ``ChunkDone``."""
        if job.dropped or job.failed:
            return
        try:
            with self._device_stream(chunk.latents, ready):
                frames = self.decode_chunk(chunk)
                decoded = len(frames)
                if job.frames_wanted is not None:
                    frames = frames[: max(0, job.frames_wanted - job.frames_written)]
                # what a later job continues from (continue_from): a CPU copy, taken on the output stream
                self._keep_latents(job, chunk.latents.detach().cpu(), len(frames), decoded)
                # on the output stream too (a GPU classifier overlaps the next model call); what is written is
                # judged: frames trimmed off the output are not
                if self._checks(job) and len(frames) and self.safety_checker.check(frames):
                    job.nsfw = True
            preview = None
            if len(frames):
                # The output and the preview are two x264 encodes in two ffmpeg processes: the output is one
                # continuous stream (its bytes must not depend on the previews), and a chunk of it cannot be played
                # on its own (its frames reference earlier chunks). Feeding both before waiting on either lets the
                # two encoders run at the same time.
                preview_writer = None
                if self.chunk_previews:
                    preview = f"{job.job_id}.chunk{chunk.index}.mp4"
                    preview_writer = self.open_video(self.outputs_dir / preview, job.params.width, job.params.height)
                    job.preview_writer = preview_writer
                    if job.dropped:  # released meanwhile; release() may have looked before it was set
                        preview_writer.abort()
                try:
                    if preview_writer is not None:
                        preview_writer.append(frames)
                    job.writer.append(frames)
                    job.frames_written += len(frames)
                    if preview_writer is not None:
                        preview_writer.close()
                        job.previews.append(preview)
                except BaseException:
                    if preview_writer is not None:
                        preview_writer.abort()
                    raise
                finally:
                    job.preview_writer = None
            job.chunks_done += 1
            self._post(("output", job, ChunkDone(job.job_id, chunk.index, job.chunks_total, job.frames_written,
                                                 preview)))
        except Exception as exc:
            self._fail_output(job, exc)

    @contextlib.contextmanager
    def _device_stream(self, latents: torch.Tensor, ready):
        """On a GPU, run the block on the output worker's own stream after ``ready``: the VAE decode overlaps the
        next model call instead of queueing behind it. On the CPU, nothing."""
        if ready is None:
            yield
            return
        if self._output_stream is None:
            self._output_stream = torch.cuda.Stream(self.device)
        stream = self._output_stream
        stream.wait_event(ready)
        # the latents were allocated on the engine's stream: keep their memory from being reused there while this
        # stream still reads them
        latents.record_stream(stream)
        with torch.cuda.stream(stream):
            yield

    def finish(self, job_id: str) -> None:
        """The job's last call ran: close its MP4 once its chunks are written; :meth:`poll` reports ``Finished``."""
        job = self._jobs[job_id]
        job.finishing = True
        self._output_worker.submit(lambda: self._close(job))

    def _close(self, job: _Job) -> None:
        if job.dropped or job.failed:
            return
        try:
            job.writer.close()
        except Exception as exc:
            self._fail_output(job, exc)
            return
        try:
            self._save_kept_latents(job)
        except Exception as exc:  # noqa: BLE001 - the video stands; continuing from this job is then refused
            log.warning("job %s: its latents were not kept: %s", job.job_id, exc, extra={"job_id": job.job_id})
        elapsed = int((time.monotonic() - job.started) * 1000)
        self._post(("output", job, Finished(job.job_id, self.output_name(job.job_id), job.frames_written,
                                            max(1, elapsed), job.chunks_total, safety_checked=self._checks(job),
                                            nsfw=job.nsfw)))

    def _checks(self, job: _Job) -> bool:
        """Whether the safety checker judges this job's chunks (there is one, and the request did not opt out)."""
        return self.safety_checker is not None and job.params.safety_check

    def _fail_output(self, job: _Job, exc: Exception) -> None:
        """Output worker: the job's output cannot be completed; later tasks of the job skip, the engine fails it."""
        job.failed = True
        if job.dropped:
            return  # the failure is the release's abort stopping the write; nobody waits for this job
        try:
            job.writer.abort()
        except Exception:
            log.exception("could not abort the output of job %s", job.job_id)
        self._post(("output", job, JobFailed(job.job_id, "output", exc)))

    def _post(self, item) -> None:
        self._results.put(item)
        self._wakeup()

    def poll(self) -> list:
        """Engine thread: the records of the work finished since the last poll, in the order it finished.

        Nothing is reported for a job released meanwhile: its prefill is thrown away, its output left unwritten.
        """
        records = []
        while True:
            try:
                item = self._results.get_nowait()
            except queue.Empty:
                return records
            if item[0] == "prefill":
                self._groups_in_flight -= 1
                for prepared in item[1]:
                    record = self._install(prepared)
                    if record is not None:
                        records.append(record)
            else:
                _, job, record = item
                if not job.dropped:
                    records.append(record)

    def _install(self, prepared: _Prepared):
        if self._prefilling.get(prepared.job_id) is not prepared.token:
            # released while it was being prepared (cancelled, timed out): nobody waits for it
            if prepared.job is not None:
                prepared.job.writer.abort()
            return None
        del self._prefilling[prepared.job_id]
        if prepared.error is not None:
            return JobFailed(prepared.job_id, "prefill", prepared.error)
        self._jobs[prepared.job_id] = prepared.job
        return Prefilled(prepared.job_id, prepared.info)

    def release(self, job_id: str) -> None:
        """Free a job's tensors; unless it is finishing, drop its pending output work and its partial output.
        Tolerates ids it holds nothing for."""
        self._prefilling.pop(job_id, None)
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        job.state = None
        if job.finishing:
            return  # its close is queued behind its chunks; Finished still comes
        job.dropped = True  # its queued chunk writes are skipped
        # Now, not on the output worker behind other jobs' chunks: a client told "cancelled" finds no partial file.
        # If the worker is writing to these files this moment, the abort kills the encoder under it, so its write
        # fails at once and the worker moves on (the failure of a dropped job is not reported).
        job.writer.abort()
        preview = job.preview_writer
        if preview is not None:
            preview.abort()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Drop every job and end the worker threads once their queued work is done (the engine has stopped):
        prefills not yet begun are skipped, chunks of dropped jobs are not written, partial outputs are removed."""
        self._closing.set()
        for job_id in list(self._jobs) + list(self._prefilling):
            self.release(job_id)
        self._prefill_worker.stop(timeout)
        self._output_worker.stop(timeout)

    def empty_device_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def device_memory_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return None


def _as_image(image, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8. Encoded images are decoded and stretched in one ffmpeg pass, as the reference
    does (a JPEG is scaled in its decoder's YUV, not after conversion to RGB)."""
    if isinstance(image, np.ndarray):
        array = image
    elif isinstance(image, torch.Tensor):
        array = image.cpu().numpy()
    else:
        return load_image(image, width=width, height=height)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise InputError("image", f"an array must be (H, W, 3) uint8 RGB, got {array.shape} {array.dtype}")
    return resize_image(array, width, height)
