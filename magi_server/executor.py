"""The engine's executor: a loaded MagiPipeline plus the per-request tensors of every admitted job, keyed by job id.

The engine decides (which jobs to prefill, which to step together, which to release); this class executes on the
device and reports plain records back. Per job it owns the sampler state (canvas, captions, KV cache), the MP4
writer that receives each chunk's frames the moment the chunk is final, and the chunk preview files that streaming
clients fetch. Outputs are written to a temporary file and renamed into place when the job finishes, so a job that
is re-run after a crash overwrites its own output instead of leaving a half file under the final name.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from magi_server.chunking import tokens_per_chunk
from magi_server.params import GenerationParams
from magi_server.pipeline import MagiPipeline
from magi_server.runner import LatentChunk, SamplerState, sampler_step_batch
from magi_server.video import Mp4Writer

log = logging.getLogger("magi_server.executor")


@dataclass(frozen=True)
class PrefillInfo:
    batch_key: tuple  # equal keys: the same plan, so calls at the same index can be batched
    calls_total: int
    chunks_total: int


@dataclass(frozen=True)
class ChunkDone:
    job_id: str
    chunk_index: int
    chunks_total: int
    frames_total: int  # frames written to the output so far
    preview: str | None  # file name (in the outputs folder) of this chunk's frames as a small MP4


@dataclass(frozen=True)
class Finished:
    job_id: str
    output: str  # file name in the outputs folder
    num_frames: int
    inference_ms: int


@dataclass
class _Job:
    params: GenerationParams
    state: SamplerState
    writer: Mp4Writer
    frames_wanted: int | None  # trim the output to this many frames (hosted-API semantics); None: keep all
    started: float
    frames_written: int = 0
    chunks_done: int = 0
    previews: list[str] = field(default_factory=list)


def plan_frames_for_output(num_frames: int, task: str) -> int:
    """The MAGI-1 ``num_frames`` that yields the fewest whole chunks covering ``num_frames`` output frames.

    MAGI-1 emits 24-frame chunks; an i2v request also spends one latent frame on the image, so asking MAGI-1 for
    ``num_frames`` there would start one chunk more than needed (96 frames -> 120). Used when the output is trimmed.
    """
    latents = -(-num_frames // 4)
    if task == "i2v":
        return max(4, 4 * (latents - 1))
    return 4 * latents


class PipelineExecutor:
    def __init__(self, pipe: MagiPipeline, outputs_dir: str | Path, *, chunk_previews: bool = True) -> None:
        self.pipe = pipe
        self.outputs_dir = Path(outputs_dir)
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        self.chunk_previews = chunk_previews
        self._jobs: dict[str, _Job] = {}
        self.batch_sizes: list[int] = []  # size of every batched model call run (observability and tests)

    # ------------------------------------------------------------------------------------------ what a job costs
    def memory_facts(self, params: GenerationParams) -> dict:
        """Arithmetic facts for the scheduler's memory estimate (no tensors touched)."""
        dit = self.pipe.dit.config
        s = self.pipe.config.sampling
        latent_h, latent_w = params.height // 8, params.width // 8
        frames = plan_frames_for_output(params.num_frames, params.task) if params.trim_to_frames else params.num_frames
        return dict(
            latent_frames=max(1, frames // 4 + (1 if params.task == "i2v" else 0)),
            latent_h=latent_h, latent_w=latent_w,
            window_chunks=params.window_size or s.window_size, chunk_width=s.chunk_width,
            tokens_per_chunk=tokens_per_chunk(latent_h, latent_w, s.chunk_width, dit.patch_size, dit.t_patch_size),
            hidden=dit.hidden_size, num_layers=dit.num_layers, kv_groups=dit.num_query_groups,
            head_dim=dit.kv_channels, bytes_per_elem=torch.tensor([], dtype=self.pipe.dit.compute_dtype).element_size(),
            cfg_passes=3 if s.cfg_number == 3 else 1, latent_channels=dit.latent_channels,
        )

    # ------------------------------------------------------------------------------------------------- prefill
    def output_name(self, job_id: str) -> str:
        return f"{job_id}.mp4"

    def prefill(self, job_id: str, params: GenerationParams) -> PrefillInfo:
        """Validate, encode the prompt and the image/video, draw the noise, open the output. Raises InputError."""
        self.release(job_id)  # a re-run after a crash starts from nothing
        pipe = self.pipe
        frames_wanted = params.num_frames if params.trim_to_frames else None
        plan_frames = plan_frames_for_output(params.num_frames, params.task) if frames_wanted else params.num_frames
        inputs = pipe.validate(
            prompt=list(params.prompts) if len(params.prompts) > 1 else params.prompts[0],
            image=params.image_path, video=params.video_path, num_frames=plan_frames, height=params.height,
            width=params.width, num_inference_steps=params.steps, window_size=params.window_size, seed=params.seed,
            output_type="mp4",
        )
        started = time.monotonic()
        state = pipe.prepare(inputs)
        writer = Mp4Writer(self.outputs_dir / self.output_name(job_id), params.width, params.height,
                           fps=pipe.config.sampling.fps)
        self._jobs[job_id] = _Job(params, state, writer, frames_wanted, started)
        plan = state.plan
        batch_key = (inputs.settings, plan.layout, plan.tokens_per_chunk, tuple(state.canvas.shape))
        return PrefillInfo(batch_key, plan.num_calls, len(plan.emissions))

    # ---------------------------------------------------------------------------------------------------- step
    def step(self, job_ids: list[str]) -> list[ChunkDone]:
        """One batched model call for these jobs; decode and write every chunk that became final."""
        jobs = [self._jobs[job_id] for job_id in job_ids]
        self.batch_sizes.append(len(jobs))
        chunks = sampler_step_batch(self.pipe.dit, [job.state for job in jobs])
        done = []
        for job_id, job, chunk in zip(job_ids, jobs, chunks):
            if chunk is not None:
                done.append(self._write_chunk(job_id, job, chunk))
        return done

    def _write_chunk(self, job_id: str, job: _Job, chunk: LatentChunk) -> ChunkDone:
        frames = self.pipe.decode_chunk(chunk)
        if job.frames_wanted is not None:
            frames = frames[: max(0, job.frames_wanted - job.frames_written)]
        preview = None
        if len(frames):
            job.writer.append(frames)
            job.frames_written += len(frames)
            if self.chunk_previews:
                preview = f"{job_id}.chunk{chunk.index}.mp4"
                with Mp4Writer(self.outputs_dir / preview, job.params.width, job.params.height,
                               fps=self.pipe.config.sampling.fps) as writer:
                    writer.append(frames)
                job.previews.append(preview)
        job.chunks_done += 1
        return ChunkDone(job_id, chunk.index, job.state.chunks_total, job.frames_written, preview)

    def finish(self, job_id: str) -> Finished:
        job = self._jobs.pop(job_id)
        job.writer.close()
        elapsed = int((time.monotonic() - job.started) * 1000)
        return Finished(job_id, self.output_name(job_id), job.frames_written, max(1, elapsed))

    def release(self, job_id: str) -> None:
        """Free a job's tensors and drop its partial output (tolerates ids it holds nothing for)."""
        job = self._jobs.pop(job_id, None)
        if job is not None:
            job.writer.abort()

    def empty_device_cache(self) -> None:
        if self.pipe.device.type == "cuda":
            torch.cuda.empty_cache()

    def device_memory_bytes(self) -> int | None:
        if self.pipe.device.type == "cuda":
            return torch.cuda.memory_allocated(self.pipe.device)
        return None

