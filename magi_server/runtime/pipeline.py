"""The offline library API: ``MagiPipeline.from_pretrained(...)`` then ``pipe(prompt=..., ...)`` (diffusers style).

This file owns turning one set of user inputs into a finished video on the runner: validate everything before any
model work (each error names the parameter and what is allowed), encode the prompt(s) with T5 and pad the
special tokens, encode the image (i2v) or prefix video (v2v) with the VAE, draw the seeded noise canvas, run the
chunked sampler, decode each chunk the moment it is final, hand it to ``callback_on_chunk`` and append it to the
MP4. The same pieces serve the server's engine.
"""
from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from magi_server.models.config import MagiConfig, canonical_preset_name
from magi_server.runtime.loading import (
    load_dit,
    load_text_encoder,
    load_vae,
    resolve_model_folder,
)
from magi_server.models.attention import select_backend
from magi_server.models.text_encoder import CaptionTokenOptions, SpecialTokens, build_chunk_captions
from magi_server.models.vae import TileConfig, decode_to_frames, encode_video_uint8
from magi_server.runtime.sampler import (
    LatentChunk,
    SamplerSettings,
    SamplerState,
    plan_request,
    sampler_step,
    start_sampler,
)
from magi_server.media.video import InputError, Mp4Writer, load_image, load_video, resize_image

log = logging.getLogger("magi_server.runtime.pipeline")

LOAD = "load"  # default for text_encoder= / vae=: load from the weights folder (None skips the part)
MAX_FRAMES = 24 * 60 * 10  # ten minutes at 24 fps; anything above is almost certainly a typo
MAX_SIDE = 4096
OUTPUT_TYPES = ("mp4", "np", "latent")
MAX_SEED = 2**63 - 1


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


@dataclass(frozen=True)
class GenerationInputs:
    """A validated request, ready for the runner (nothing here touched a model yet)."""

    prompts: tuple[str, ...] | None
    image: np.ndarray | None  # (H, W, 3) uint8, already resized
    video: np.ndarray | None  # (T, H, W, 3) uint8, already resized and resampled
    video_latents: torch.Tensor | None
    num_frames: int
    height: int
    width: int
    settings: SamplerSettings
    seed: int
    output_type: str


class MagiPipeline:
    """DiT + VAE + T5 + special tokens on a device; call it to generate one video."""

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
    ) -> None:
        self.dit = dit
        self.vae = vae
        self.text_encoder = text_encoder
        self.special_tokens = special_tokens
        self.config = config
        self.device = torch.device(device)
        self.tiles = tiles or TileConfig(tile_sample_min_length=config.sampling.fps // 2)
        self.caption_options = caption_options

    @property
    def kv_cache_device(self) -> torch.device:
        """Where requests keep their clean-chunk K/V between calls: the CPU (pinned) when the config's
        ``kv_offload`` is on and the model runs on a GPU (spec §11.4: only one clean chunk is read per call, so the
        upload is small against the call), else the model's device."""
        if self.config.kv_offload and self.device.type == "cuda":
            return torch.device("cpu")
        return self.device

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
    ) -> "MagiPipeline":
        """Load from a weights folder in the official layout, or a preset name (``tiny``).

        ``config``: a reference-style JSON (its relative paths resolve against its folder) or a MagiConfig;
        ``dtype``: the DiT's compute dtype (default: the config's params_dtype); ``text_encoder=None`` /
        ``vae=None`` skip those parts (then pass ``prompt_embeds`` / ask for ``output_type="latent"``); a loaded
        module may be passed instead. ``special_tokens``: an npz or safetensors file (default: the one beside the
        weights). ``cache_dir``: where the ``tiny`` preset's generated weights live (default ~/.cache/magi-server).
        ``compile``: torch.compile the DiT's token-wise layer parts (default: on CUDA only; the first call of each
        resolution then pays the compile, later calls of any length reuse it).
        """
        device = torch.device(device)
        folder = Path(path)
        if not folder.exists():
            name = canonical_preset_name(str(path))
            if name == "tiny":
                from magi_server.runtime.tiny import TINY_NOTICE, ensure_tiny_weights

                root = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "magi-server"
                folder = ensure_tiny_weights(root / "tiny-weights")
                log.warning(TINY_NOTICE)
            elif name is not None:
                raise FileNotFoundError(
                    f"weights for {name} not found at {path}: run `magi-server download {name}` and pass the folder "
                    f"it prints (e.g. weights/{name.replace('-', '_')})"
                )
            else:
                raise FileNotFoundError(f"model folder not found: {path}")
        resolved = resolve_model_folder(folder, config)
        if dtype is not None:
            name = str(dtype).replace("torch.", "")
            resolved = resolved.replace(dit=replace(resolved.dit, params_dtype=name))
        backend = select_backend(device, getattr(torch, resolved.dit.params_dtype), attention_backend)
        dit = load_dit(folder, resolved.dit, device=device, attention_backend=backend)
        dit.set_compiled(device.type == "cuda" if compile is None else bool(compile))

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
                    "beside the weights)"
                )
            special_tokens = SpecialTokens.load(special_tokens)
        if special_tokens is None:
            raise FileNotFoundError(f"no special_tokens.npz found beside {folder}; pass special_tokens=PATH")
        return cls(dit, vae, text_encoder, special_tokens, resolved, device=device)

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
    ) -> GenerationInputs:
        """Check and normalize every input; raises InputError naming the parameter. No model runs here."""
        s = self.config.sampling
        if output_type not in OUTPUT_TYPES:
            raise InputError("output_type", f"must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if output_type != "latent" and self.vae is None:
            raise InputError("output_type", "this pipeline was loaded with vae=None; only output_type='latent' works")

        num_frames = _int_param("num_frames", s.num_frames if num_frames is None else num_frames, 1, MAX_FRAMES)
        height = _int_param("height", s.video_size_h if height is None else height, 16, MAX_SIDE)
        width = _int_param("width", s.video_size_w if width is None else width, 16, MAX_SIDE)
        for name, value in (("height", height), ("width", width)):
            if value % 16:
                raise InputError(name, f"must be a multiple of 16 (the DiT patches 16x16 pixels), got {value}")
        window = _int_param("window_size", s.window_size if window_size is None else window_size, 1, 16)
        steps = _int_param("num_inference_steps", s.num_steps if num_inference_steps is None else num_inference_steps, 1, 1000)
        settings = replace(SamplerSettings.from_config(self.config), num_steps=steps, window_size=window)
        problem = settings.step_problem()
        if problem:
            raise InputError("num_inference_steps", f"{steps} {problem}")
        if num_frames // 4 < 1 and image is None and video is None and video_latents is None:
            raise InputError("num_frames", f"must be at least 4 for text-to-video, got {num_frames}")

        if seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and seed == -1):
            seed = secrets.randbelow(2**31)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
            raise InputError("seed", f"must be an integer in [0, {MAX_SEED}] or -1 for random, got {seed!r}")

        given = [n for n, v in (("image", image), ("video", video), ("video_latents", video_latents)) if v is not None]
        if len(given) > 1:
            raise InputError(given[1], "give only one of image, video, video_latents")

        prompts = None
        if prompt_embeds is None:
            if prompt is None:
                raise InputError("prompt", "required (or pass prompt_embeds)")
            prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt)
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise InputError("prompt", "must be a string or a non-empty list of strings (one per chunk or scene)")
            if self.text_encoder is None:
                raise InputError("prompt", "this pipeline was loaded with text_encoder=None; pass prompt_embeds")
        elif prompt_attention_mask is None:
            raise InputError("prompt_attention_mask", "required with prompt_embeds")

        image_array = video_array = latents_prefix = None
        if image is not None:
            image_array = _as_image(image, width, height)
        if video is not None:
            video_array = load_video(video, width=width, height=height, fps=s.fps, max_frames=32)
            if video_array.shape[0] < 4:
                raise InputError("video", f"needs at least 4 frames after resampling to {s.fps} fps, got {video_array.shape[0]}")
        if video_latents is not None:
            latents_prefix = torch.as_tensor(video_latents)
            expected = (1, self.dit.config.latent_channels, height // 8, width // 8)
            if latents_prefix.dim() != 5 or (latents_prefix.shape[0], latents_prefix.shape[1], *latents_prefix.shape[3:]) != expected:
                raise InputError(
                    "video_latents",
                    f"must be (1, {expected[1]}, frames, {expected[2]}, {expected[3]}) for "
                    f"{width}x{height}, got {tuple(latents_prefix.shape)}",
                )
        return GenerationInputs(
            prompts=prompts, image=image_array, video=video_array, video_latents=latents_prefix,
            num_frames=num_frames, height=height, width=width, settings=settings, seed=int(seed),
            output_type=output_type,
        )

    # -------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
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
        from chunk i on, the last one for the remaining chunks)."""
        inputs = self.validate(
            prompt=prompt, image=image, video=video, video_latents=video_latents, num_frames=num_frames,
            height=height, width=width, num_inference_steps=num_inference_steps, window_size=window_size, seed=seed,
            prompt_embeds=prompt_embeds, prompt_attention_mask=prompt_attention_mask, output_type=output_type,
        )
        s = self.config.sampling
        state = self.prepare(inputs, prompt_embeds=prompt_embeds, prompt_attention_mask=prompt_attention_mask,
                             latents=latents)

        # 4. run; decode and hand out each chunk as it becomes final
        writer = None
        if inputs.output_type == "mp4":
            path = Path(output_path) if output_path is not None else Path(f"magi-{inputs.seed}.mp4")
            writer = Mp4Writer(path, inputs.width, inputs.height, fps=s.fps)
        latents_out, frames_out, frames_done = [], [], 0
        try:
            for chunk in self._chunks(state, callback_on_step):
                frames = None if inputs.output_type == "latent" else self.decode_chunk(chunk)
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
            result = MagiOutput(seed=inputs.seed, latents=torch.cat(latents_out, dim=2), fps=s.fps)
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

    # ------------------------------------------------------------------------------------------------ pieces
    @torch.no_grad()
    def prepare(self, inputs: GenerationInputs, *, prompt_embeds=None, prompt_attention_mask=None,
                latents: torch.Tensor | None = None) -> SamplerState:
        """Everything before the first model call: prefix encode, plan, captions, noise. Returns the sampler state."""
        device = self.device
        dit_cfg = self.dit.config

        # 1. the conditioning prefix (i2v image = 1 latent frame; v2v video; or latents given directly)
        prefix = self._prefix_latents(inputs)
        prefix_frames = 0 if prefix is None else prefix.shape[2]
        plan = plan_request(
            inputs.settings, num_frames=inputs.num_frames, prefix_frames=prefix_frames,
            latent_height=inputs.height // 8, latent_width=inputs.width // 8,
            patch_size=dit_cfg.patch_size, t_patch_size=dit_cfg.t_patch_size,
        )
        layout = plan.layout

        # 2. captions: T5 (or the given embeddings), special tokens, null captions, per chunk
        embeds, masks = self._prompt_embeddings(inputs, prompt_embeds, prompt_attention_mask, layout.num_denoised_chunks)
        captions, caption_masks = build_chunk_captions(
            embeds, masks, self.dit.y_embedder.null_caption_embedding.detach().float().cpu(), layout.num_chunks,
            layout.num_clean_chunks, self.special_tokens, self.caption_options,
        )

        # 3. the noise canvas: first draw after seeding, on the device (spec §6.2)
        shape = (1, dit_cfg.latent_channels, layout.latent_frames, inputs.height // 8, inputs.width // 8)
        if latents is not None:
            noise = torch.as_tensor(latents)
            if tuple(noise.shape) != shape:
                raise InputError("latents", f"must have shape {shape} for this request, got {tuple(noise.shape)}")
            noise = noise.to(device=device, dtype=torch.float32)
        else:
            generator = torch.Generator(device=device).manual_seed(inputs.seed)
            noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)

        state = start_sampler(
            plan, inputs.settings, noise=noise, captions=captions.to(device), caption_masks=caption_masks.to(device),
            prefix=prefix, num_layers=dit_cfg.num_layers, cache_dtype=self.dit.compute_dtype,
            cache_device=self.kv_cache_device, cache_pinned=self.kv_cache_device != device,
        )

        return state

    def _chunks(self, state, callback_on_step):
        while not state.done:
            chunk = sampler_step(self.dit, state)
            if callback_on_step is not None:
                callback_on_step(state.next_call, state.calls_total)
            if chunk is not None:
                yield chunk

    def _prefix_latents(self, inputs: GenerationInputs) -> torch.Tensor | None:
        scale = self.config.sampling.scale_factor
        if inputs.video_latents is not None:
            return inputs.video_latents.to(self.device)
        if inputs.image is None and inputs.video is None:
            return None
        pixels = inputs.image[None] if inputs.image is not None else inputs.video  # (T, H, W, 3)
        video = torch.from_numpy(np.ascontiguousarray(pixels)).permute(3, 0, 1, 2)[None].to(self.device)
        mean = encode_video_uint8(self.vae, video, self.tiles)
        # the reference scales the bf16 mean in bf16: the prefix latent stays bf16 (spec §5.2 step 6)
        return mean * scale

    def _prompt_embeddings(self, inputs, prompt_embeds, prompt_attention_mask, num_denoised: int):
        if inputs.prompts is None:
            if isinstance(prompt_embeds, torch.Tensor):
                return prompt_embeds.float().cpu(), torch.as_tensor(prompt_attention_mask).cpu()
            return [e.float().cpu() for e in prompt_embeds], [torch.as_tensor(m).cpu() for m in prompt_attention_mask]
        prompts = inputs.prompts
        if len(prompts) > num_denoised:
            raise InputError("prompt", f"{len(prompts)} prompts for a video of {num_denoised} chunks; give at most one per chunk")
        embeds, masks = self.text_encoder.encode(list(prompts))
        embeds, masks = embeds.float().cpu(), masks.cpu()
        if len(prompts) == 1:
            return embeds[0], masks[0]
        per_chunk = [min(i, len(prompts) - 1) for i in range(num_denoised)]
        return [embeds[i] for i in per_chunk], [masks[i] for i in per_chunk]

    def decode_chunk(self, chunk: LatentChunk) -> np.ndarray:
        """uint8 frames (T, H, W, 3) of one emitted chunk (tiles of fps/2 frames; one latent frame -> one frame)."""
        scale = self.config.sampling.scale_factor
        frames = decode_to_frames(self.vae, chunk.latents / scale, self.tiles, uint8_output=True)
        return frames.permute(0, 2, 3, 1).contiguous().cpu().numpy()


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


def _int_param(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InputError(name, f"must be an integer in [{low}, {high}], got {value!r}")
    if not low <= int(value) <= high:
        raise InputError(name, f"must be in [{low}, {high}], got {value}")
    return int(value)


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
