"""The engine's executor: a loaded MagiPipeline plus the per-request tensors of every admitted job, keyed by job id.

The engine decides (which jobs to prefill, which to step together, which to release); this class executes on the
device and reports plain records back. Per job it owns the sampler state (canvas, captions, KV cache), the MP4
writer that receives each chunk's frames once the chunk is final, and the chunk preview files that streaming
clients fetch. Outputs are written to a temporary file and renamed into place when the job finishes, so a job that
is re-run after a crash overwrites its own output instead of leaving a half file under the final name.

Only the model calls run on the engine thread. Two worker threads of this executor do the rest, so the running jobs'
next call never waits for them:

* the *prefill* worker validates a request and encodes its prompt (T5, seconds on a CPU), image or video, and opens
  its output. The jobs the engine admitted in one round are prepared as one group and reported together, so jobs
  admitted together still start in lock-step and share their model calls;
* the *output* worker decodes each finished chunk with the VAE (on its own CUDA stream on a GPU), appends its frames
  to the job's MP4 and writes the chunk preview, then closes the MP4 when the job finishes. One thread serves every
  job, in submission order, so a job's chunks are written in order and its close comes after all of them.

Results come back through :meth:`PipelineExecutor.poll` on the engine thread (records ``Prefilled``, ``ChunkDone``,
``Finished``, ``JobFailed``); the workers call the wake-up function the engine registered whenever one is ready.
All bookkeeping of which jobs exist happens on the engine thread; the workers only compute and post.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from magi_server.params import GenerationParams
from magi_server.runtime.memory_model import request_memory_estimate
from magi_server.runtime.pipeline import MagiPipeline
from magi_server.runtime.sampler import LatentChunk, SamplerState, sampler_step_batch
from magi_server.media.video import Mp4Writer

log = logging.getLogger("magi_server.runtime.model_runner")


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


@dataclass(frozen=True)
class JobFailed:
    kind: ClassVar[str] = "failed"
    job_id: str
    stage: str  # "prefill" (bad input: InputError names the parameter) or "output" (decode, encode or close)
    error: Exception


@dataclass
class _Job:
    job_id: str
    params: GenerationParams
    state: SamplerState | None  # None once released (a finishing job's output may still be closing)
    writer: Mp4Writer
    frames_wanted: int | None  # trim the output to this many frames (hosted-API semantics); None: keep all
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
    previews: list[str] = field(default_factory=list)


@dataclass
class _Prepared:
    """What the prefill worker made for one job; the engine thread installs it unless the job was released."""

    job_id: str
    token: object
    job: _Job | None = None
    info: PrefillInfo | None = None
    error: Exception | None = None


def plan_frames_for_output(num_frames: int, task: str) -> int:
    """The MAGI-1 ``num_frames`` that yields the fewest whole chunks covering ``num_frames`` output frames.

    MAGI-1 emits 24-frame chunks; an i2v request also spends one latent frame on the image, so asking MAGI-1 for
    ``num_frames`` there would start one chunk more than needed (96 frames -> 120). Used when the output is trimmed.
    """
    latents = -(-num_frames // 4)
    if task == "i2v":
        return max(4, 4 * (latents - 1))
    return 4 * latents


class _Worker:
    """One daemon thread running submitted callables in submission order (the order is the point). Started on the
    first submit, so an executor built only to answer ``memory_facts`` starts no thread."""

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


class PipelineExecutor:
    def __init__(self, pipe: MagiPipeline, outputs_dir: str | Path, *, chunk_previews: bool = True) -> None:
        self.pipe = pipe
        self.outputs_dir = Path(outputs_dir)
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        self.chunk_previews = chunk_previews
        self.batch_sizes: list[int] = []  # size of every batched model call run (observability and tests)
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

    def set_wakeup(self, wakeup: Callable[[], None]) -> None:
        """``wakeup()`` is called from a worker thread whenever :meth:`poll` has something new."""
        self._wakeup = wakeup

    # ------------------------------------------------------------------------------------------ what a job costs
    def request_memory_bytes(self, params: GenerationParams) -> int:
        """Device bytes admission charges a job (:func:`request_memory_estimate` of :meth:`memory_facts`)."""
        return request_memory_estimate(**self.memory_facts(params)).total_bytes

    def memory_facts(self, params: GenerationParams) -> dict:
        """The arguments of :func:`magi_server.runtime.memory_model.request_memory_estimate` for a job (no tensors touched):
        what admission charges it, checked against the planner's op accounting of this code."""
        s = self.pipe.config.sampling
        frames = plan_frames_for_output(params.num_frames, params.task) if params.trim_to_frames else params.num_frames
        return dict(
            dit=self.pipe.dit.config, width=params.width, height=params.height, num_frames=frames,
            num_steps=params.num_inference_steps or s.num_steps, window_size=params.window_size or s.window_size,
            cfg_number=s.cfg_number, prefix_frames=1 if params.task == "i2v" else 0,
            chunk_width=s.chunk_width, noise2clean_kvrange=tuple(s.noise2clean_kvrange),
            clean_chunk_kvrange=s.clean_chunk_kvrange, max_piece_tokens=self.pipe.dit.max_piece_tokens,
            kv_offload=self.pipe.kv_cache_device != self.pipe.device,
        )

    # ------------------------------------------------------------------------------------------------- prefill
    def output_name(self, job_id: str) -> str:
        return f"{job_id}.mp4"

    @property
    def prefilling(self) -> bool:
        """A prefill group is in flight (its results are not all polled yet)."""
        return self._groups_in_flight > 0

    def start_prefill(self, jobs: Sequence[tuple[str, GenerationParams]]) -> None:
        """Queue the prefill of these jobs as one group on the prefill worker; :meth:`poll` reports a ``Prefilled``
        or a ``JobFailed`` (bad input raises InputError there, naming the parameter) for each, all in one poll."""
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
            with torch.no_grad():
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
        """Validate, encode the prompt and the image/video, draw the noise, open the output. Raises InputError."""
        pipe = self.pipe
        frames_wanted = params.num_frames if params.trim_to_frames else None
        plan_frames = plan_frames_for_output(params.num_frames, params.task) if frames_wanted else params.num_frames
        inputs = pipe.validate(
            prompt=list(params.prompts) if len(params.prompts) > 1 else params.prompts[0],
            image=params.image_path, video=params.video_path, num_frames=plan_frames, height=params.height,
            width=params.width, num_inference_steps=params.num_inference_steps, window_size=params.window_size, seed=params.seed,
            output_type="mp4",
        )
        started = time.monotonic()
        state = pipe.prepare(inputs)
        writer = Mp4Writer(self.outputs_dir / self.output_name(job_id), params.width, params.height,
                           fps=pipe.config.sampling.fps)
        plan = state.plan
        job = _Job(job_id, params, state, writer, frames_wanted, started, chunks_total=len(plan.emissions))
        batch_key = (inputs.settings, plan.layout, plan.tokens_per_chunk, tuple(state.canvas.shape))
        return _Prepared(job_id, token, job=job, info=PrefillInfo(batch_key, plan.num_calls, len(plan.emissions)))

    # ---------------------------------------------------------------------------------------------------- step
    def step(self, job_ids: list[str]) -> list[str]:
        """One batched model call for these jobs. Returns the ids whose call made a chunk final; the chunk's decode
        and write are queued on the output worker and reported by :meth:`poll` as ``ChunkDone``."""
        jobs = [self._jobs[job_id] for job_id in job_ids]
        self.batch_sizes.append(len(jobs))
        chunks = sampler_step_batch(self.pipe.dit, [job.state for job in jobs])
        ready = None
        if self.pipe.device.type == "cuda" and any(chunk is not None for chunk in chunks):
            # the output worker's stream must not read the chunk before this thread's stream has written it
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.pipe.device))
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
            with torch.no_grad(), self._device_stream(chunk.latents, ready):
                frames = self.pipe.decode_chunk(chunk)
            if job.frames_wanted is not None:
                frames = frames[: max(0, job.frames_wanted - job.frames_written)]
            preview = None
            if len(frames):
                # The output and the preview are two x264 encodes in two ffmpeg processes: the output is one
                # continuous stream (its bytes must not depend on the previews), and a chunk of it cannot be played
                # on its own (its frames reference earlier chunks). Feeding both before waiting on either lets the
                # two encoders run at the same time.
                preview_writer = None
                if self.chunk_previews:
                    preview = f"{job.job_id}.chunk{chunk.index}.mp4"
                    preview_writer = Mp4Writer(self.outputs_dir / preview, job.params.width, job.params.height,
                                               fps=self.pipe.config.sampling.fps)
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
            self._output_stream = torch.cuda.Stream(self.pipe.device)
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
        elapsed = int((time.monotonic() - job.started) * 1000)
        self._post(("output", job, Finished(job.job_id, self.output_name(job.job_id), job.frames_written,
                                            max(1, elapsed), job.chunks_total)))

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

    # ---------------------------------------------------------------------------------------------- results
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
        if self.pipe.device.type == "cuda":
            torch.cuda.empty_cache()

    def device_memory_bytes(self) -> int | None:
        if self.pipe.device.type == "cuda":
            return torch.cuda.memory_allocated(self.pipe.device)
        return None
