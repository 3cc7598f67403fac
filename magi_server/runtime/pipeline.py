"""The offline library API: ``MagiPipeline.from_pretrained(...)`` then ``pipe(prompt=..., ...)`` (diffusers style).

This file owns loading a model folder (or a preset) into a :class:`~magi_server.runtime.model_runner.ModelRunner`
and the loop of one call: validate the inputs (the request contract's rules, plus what only the library takes:
output types, tensors, prompt embeddings), then the runner's prefill, one model call at a time until the plan is
done, each chunk decoded the moment it is final, handed to ``callback_on_chunk`` and appended to the MP4. The
server's engine drives the same runner methods, so the library and the server produce the same bytes.
``from_pretrained(..., cp=N)`` spreads every model call over N processes (runtime/context_parallel.py).
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from magi_server.models.attention import select_backend
from magi_server.models.config import MagiConfig, canonical_preset_name
from magi_server.models.text_encoder import SpecialTokens
from magi_server.params import GenerationParams, ParamError, resolve_seed, validate
from magi_server.runtime.loading import (
    find_downloaded_model,
    load_dit,
    load_text_encoder,
    load_vae,
    resolve_model_folder,
)
from magi_server.runtime.model_runner import ModelRunner

log = logging.getLogger("magi_server.runtime.pipeline")

LOAD = "load"  # default for text_encoder= / vae=: load from the weights folder (None skips the part)
OUTPUT_TYPES = ("mp4", "np", "latent")
EMBEDDED_PROMPT = "(prompt_embeds)"  # the request's prompt when the caller passes its T5 embeddings instead


@dataclass
class ChunkEvent:
    """What ``callback_on_chunk`` receives when a chunk is final (before the next chunk is)."""

    index: int  # output chunk index, 0-based
    total: int  # chunks this request will emit
    latents: torch.Tensor  # (1, C, latent frames, h, w) fp32
    frames: np.ndarray | None  # (frames, H, W, 3) uint8, None for output_type="latent"
    first_frame: int  # index of this chunk's first frame in the output video


@dataclass
class MagiOutput:
    seed: int
    latents: torch.Tensor | None = None  # (1, C, emitted latent frames, h, w) fp32
    frames: np.ndarray | None = None  # (T, H, W, 3) uint8 (output_type "np")
    path: str | None = None  # the MP4 (output_type "mp4")
    num_frames: int = 0
    fps: int = 24


def _runner_part(name: str) -> property:
    return property(lambda self: getattr(self.runner, name), doc=f"The runner's ``{name}``.")


class MagiPipeline:
    """A loaded :class:`ModelRunner`; call it to generate one video."""

    dit = _runner_part("dit")
    vae = _runner_part("vae")
    text_encoder = _runner_part("text_encoder")
    special_tokens = _runner_part("special_tokens")
    config = _runner_part("config")
    device = _runner_part("device")

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: str | Path | MagiConfig | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        text_encoder=LOAD,
        vae=LOAD,
        special_tokens: str | Path | SpecialTokens | None = None,
        attention_backend: str = "auto",
        cache_dir: str | Path | None = None,
        compile: bool | None = None,
        cp: int = 1,
        cp_rendezvous: str | None = None,
    ) -> "MagiPipeline":
        """Load from a weights folder in the official layout, or a preset name (``tiny``, or a real preset that
        ``magi-server download`` put in the Hugging Face cache).

        ``config``: a reference-style JSON (its relative paths resolve against its folder) or a MagiConfig;
        ``dtype``: the DiT's compute dtype (default: the config's params_dtype); ``text_encoder=None`` /
        ``vae=None`` skip those parts (then pass ``prompt_embeds`` / ask for ``output_type="latent"``); a loaded
        module may be passed instead. ``special_tokens``: an npz or safetensors file (default: the one beside the
        weights). ``cache_dir``: where the ``tiny`` preset's generated weights live (default ~/.cache/magi-server).
        ``compile``: torch.compile the DiT's token-wise layer parts (default: on CUDA only; the first call of each
        resolution then pays the compile, later calls of any length reuse it).
        ``cp``: context parallelism over this many ranks (Ulysses; heads and KV groups must divide by it): ranks
        1..cp-1 are started here as processes that load the DiT only (on cuda:i+1.. when ``device`` is cuda:i), and
        this process leads them; :meth:`close` stops them (they also end with this process). With
        ``cp_rendezvous`` (``tcp://host:port``, e.g. torchrun's master address) nothing is started: ranks 1..cp-1 are
        processes of their own that call :func:`magi_server.runtime.context_parallel.run_follower`.
        """
        if cp > 1:
            return cls._from_pretrained_parallel(
                cp, cp_rendezvous, path, config, device=device, dtype=dtype, text_encoder=text_encoder, vae=vae,
                special_tokens=special_tokens, attention_backend=attention_backend, cache_dir=cache_dir,
                compile=compile,
            )
        device = torch.device(device)
        folder, resolved, dit = _load_model_dit(path, config, device=device, dtype=dtype,
                                                attention_backend=attention_backend, cache_dir=cache_dir,
                                                compile=compile)

        if vae == LOAD:
            if not resolved.vae_pretrained:
                raise FileNotFoundError(f"no VAE folder found for {folder} (expected vae/ beside it); pass vae=None")
            vae = load_vae(resolved.vae_pretrained, device=device, dtype=torch.bfloat16)
        if text_encoder == LOAD:
            if not resolved.t5_pretrained:
                raise FileNotFoundError(f"no T5 folder found for {folder} (expected t5/ beside it); pass text_encoder=None")
            text_encoder = _load_t5(resolved.t5_pretrained, resolved.t5_device, device)

        if special_tokens is None:
            special_tokens = resolved.special_tokens
        if isinstance(special_tokens, (str, Path)):
            if not Path(special_tokens).is_file():
                raise FileNotFoundError(
                    f"special tokens file not found: {special_tokens} (magi-server download puts special_tokens.npz "
                    "beside vae/ and t5/)"
                )
            special_tokens = SpecialTokens.load(special_tokens)
        if special_tokens is None:
            raise FileNotFoundError(f"no special_tokens.npz found beside {folder}; pass special_tokens=PATH")
        return cls(ModelRunner(dit, vae, text_encoder, special_tokens, resolved, device=device))

    @classmethod
    def _from_pretrained_parallel(cls, cp: int, rendezvous: str | None, path, config, *, device, dtype, compile,
                                  attention_backend, cache_dir, **parts) -> "MagiPipeline":
        """from_pretrained(..., cp=N): start the followers (they load while this process does), then lead them."""
        from magi_server.runtime.context_parallel import ContextParallelLaunch, rank_device

        if rendezvous is not None:
            launch = ContextParallelLaunch(cp, device, rendezvous)
        else:
            load_follower = functools.partial(load_dit_runner, path, config, dtype=dtype, compile=compile,
                                              attention_backend=attention_backend, cache_dir=cache_dir)
            launch = ContextParallelLaunch.spawn(cp, load_follower, device=device)
        try:
            pipe = cls.from_pretrained(path, config, device=rank_device(device, 0), dtype=dtype, compile=compile,
                                       attention_backend=attention_backend, cache_dir=cache_dir, **parts)
        except BaseException:
            launch.abort()
            raise
        return cls(launch.lead(pipe.runner))

    def close(self) -> None:
        """Stop the runner's worker threads and, with context parallelism, the follower ranks."""
        self.runner.shutdown()

    # ---------------------------------------------------------------------------------------------- validation
    def validate(
        self,
        *,
        prompt=None,
        image=None,
        video=None,
        video_latents=None,
        num_frames=None,
        height=None,
        width=None,
        num_inference_steps=None,
        window_size=None,
        seed=None,
        prompt_embeds=None,
        prompt_attention_mask=None,
        output_type="mp4",
    ) -> GenerationParams:
        """Check the inputs before any model work and return the request (the model config's defaults filled in,
        a random seed drawn); raises ParamError naming the parameter. The image or video itself is read by the
        runner's prefill, still before any model runs."""
        if output_type not in OUTPUT_TYPES:
            raise ParamError("output_type", f"must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if output_type != "latent" and self.vae is None:
            raise ParamError("output_type", "this pipeline was loaded with vae=None; only output_type='latent' works")
        given = [n for n, v in (("image", image), ("video", video), ("video_latents", video_latents)) if v is not None]
        if len(given) > 1:
            raise ParamError(given[1], "give only one of image, video, video_latents")
        if prompt_embeds is None:
            if prompt is not None and self.text_encoder is None:
                raise ParamError("prompt", "this pipeline was loaded with text_encoder=None; pass prompt_embeds")
            prompts = () if prompt is None else as_prompts(prompt)
        elif prompt_attention_mask is None:
            raise ParamError("prompt_attention_mask", "required with prompt_embeds")
        else:
            prompts = (EMBEDDED_PROMPT,)

        s = self.config.sampling
        params = GenerationParams(
            prompts=prompts, width=_integral(s.video_size_w if width is None else width),
            height=_integral(s.video_size_h if height is None else height),
            num_frames=_integral(s.num_frames if num_frames is None else num_frames),
            num_inference_steps=_integral(s.num_steps if num_inference_steps is None else num_inference_steps),
            seed=resolve_seed(seed), window_size=_integral(window_size),
            # the contract names stored files; an in-memory input is named by its type (prefill gets the object)
            image_path=_input_name(image), video_path=_input_name(video if video_latents is None else video_latents),
        )
        validate(params, self.runner.model_limits())
        if video_latents is not None:
            shape = tuple(torch.as_tensor(video_latents).shape)
            expected = (1, self.dit.config.latent_channels, params.height // 8, params.width // 8)
            if len(shape) != 5 or (shape[0], shape[1], *shape[3:]) != expected:
                raise ParamError("video_latents", f"must be (1, {expected[1]}, frames, {expected[2]}, {expected[3]}) "
                                                  f"for {params.width}x{params.height}, got {shape}")
        return params

    # -------------------------------------------------------------------------------------------- generation
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        image=None,
        video=None,
        video_latents: torch.Tensor | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        window_size: int | None = None,
        seed: int | None = None,
        prompt_embeds: torch.Tensor | Sequence[torch.Tensor] | None = None,
        prompt_attention_mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "mp4",
        output_path: str | Path | None = None,
        callback_on_chunk: Callable[[ChunkEvent], None] | None = None,
        callback_on_step: Callable[[int, int], None] | None = None,
    ) -> MagiOutput:
        """Generate one video. See the module docstring; ``prompt`` may be a list (chunk-wise prompts: prompt i
        from chunk i on, the last one for the remaining chunks). ``latents``: the initial noise instead of the
        seeded draw."""
        params = self.validate(
            prompt=prompt, image=image, video=video, video_latents=video_latents, num_frames=num_frames,
            height=height, width=width, num_inference_steps=num_inference_steps, window_size=window_size, seed=seed,
            prompt_embeds=prompt_embeds, prompt_attention_mask=prompt_attention_mask, output_type=output_type,
        )
        runner = self.runner
        state = runner.prefill(params, image=image, video=video, video_latents=video_latents,
                               prompt_embeds=prompt_embeds, prompt_attention_mask=prompt_attention_mask, noise=latents)
        writer = None
        if output_type == "mp4":
            path = Path(output_path) if output_path is not None else Path(f"magi-{params.seed}.mp4")
            writer = runner.open_video(path, params.width, params.height)
        latents_out, frames_out, frames_done = [], [], 0
        try:
            while not state.done:
                (chunk,) = runner.advance([state])
                if callback_on_step is not None:
                    callback_on_step(state.next_call, state.calls_total)
                if chunk is None:
                    continue
                frames = None if output_type == "latent" else runner.decode_chunk(chunk)
                event = ChunkEvent(chunk.index, state.chunks_total, chunk.latents, frames, frames_done)
                if frames is not None:
                    frames_done += frames.shape[0]
                    if writer is not None:
                        writer.append(frames)
                    else:
                        frames_out.append(frames)
                latents_out.append(chunk.latents)
                if callback_on_chunk is not None:
                    callback_on_chunk(event)
            result = MagiOutput(seed=params.seed, latents=torch.cat(latents_out, dim=2), fps=self.config.sampling.fps)
            if writer is not None:
                result.path = str(writer.close())
                result.num_frames = frames_done
            elif frames_out:
                result.frames = np.concatenate(frames_out, axis=0)
                result.num_frames = result.frames.shape[0]
            return result
        except BaseException:
            if writer is not None:
                writer.abort()
            raise


def as_prompts(value) -> tuple[str, ...]:
    """One prompt or a list of chunk-wise prompts as the contract's tuple; the texts are checked by ``validate``."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not value:
        raise ParamError("prompt", "must be a string or a non-empty list of strings (one per chunk or scene)")
    return tuple(value)


def _integral(value):
    """Integral floats and numpy integers as ``int``; anything else as given, for ``validate`` to refuse by name."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return int(value) if isinstance(value, np.integer) else value


def _input_name(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return str(value) if isinstance(value, Path) else f"<{type(value).__name__}>"


def _load_model_dit(path, config, *, device: torch.device, dtype, attention_backend: str, cache_dir, compile):
    """(weights folder, resolved MagiConfig, loaded DiT) for a folder or preset name (see from_pretrained)."""
    folder = Path(path)
    if not folder.exists():
        name = canonical_preset_name(str(path))
        if name == "tiny":
            from magi_server.runtime.tiny import TINY_NOTICE, ensure_tiny_weights

            root = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "magi-server"
            folder = ensure_tiny_weights(root / "tiny-weights")
            log.warning(TINY_NOTICE)
        elif name is not None:
            folder = find_downloaded_model(name)
        else:
            raise FileNotFoundError(f"model folder not found: {path}")
    resolved = resolve_model_folder(folder, config)
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        resolved = resolved.replace(dit=replace(resolved.dit, params_dtype=name))
    backend = select_backend(device, getattr(torch, resolved.dit.params_dtype), attention_backend)
    dit = load_dit(folder, resolved.dit, device=device, attention_backend=backend)
    dit.set_compiled(device.type == "cuda" if compile is None else bool(compile))
    return folder, resolved, dit


def load_dit_runner(path: str | Path, config: str | Path | MagiConfig | None = None, *,
                    device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None,
                    attention_backend: str = "auto", cache_dir: str | Path | None = None,
                    compile: bool | None = None) -> ModelRunner:
    """A runner with the DiT alone (no T5, VAE or special tokens): what a context-parallel follower rank needs,
    since it only makes model calls on sampler states the leader prepared. Arguments as in from_pretrained."""
    device = torch.device(device)
    _, resolved, dit = _load_model_dit(path, config, device=device, dtype=dtype, attention_backend=attention_backend,
                                       cache_dir=cache_dir, compile=compile)
    return ModelRunner(dit, None, None, None, resolved, device=device)


def _load_t5(path: str | Path, t5_device: str, device: torch.device):
    """The T5 encoder where the config's ``t5_device`` puts it, kept off the DiT's device memory either way.

    ``"cpu"`` (the 4.5B presets): float32 on the CPU, as the reference. Anything else (the 24B presets' ``"cuda"``):
    bfloat16 on the pipeline's device when that is a GPU, with the weights in pinned host memory between encodes
    (``offload``): 9.5 GB copied onto the GPU for each encode and freed after it, instead of 19 GB of fp32 weights
    resident beside the DiT for the whole life of the server. On a CPU pipeline: float32 on the CPU.
    """
    if t5_device == "cpu" or device.type != "cuda":
        return load_text_encoder(path, device="cpu")
    from magi_server.runtime.loading import find_t5_folder
    from magi_server.models.text_encoder import T5TextEncoder

    return T5TextEncoder.from_pretrained(find_t5_folder(path), device=device, dtype=torch.bfloat16, offload=True)
