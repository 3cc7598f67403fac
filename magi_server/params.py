"""The request contract: :class:`GenerationParams`, its limits, the size table and the one :func:`validate`.

GenerationParams is the one record of "what to generate" that crosses every layer (HTTP -> engine -> runtime).
It is plain, frozen and torch-free, so the provider adapters build it, the job store persists it as JSON, the
scheduler reads its shape and the model runner executes it. Every knob that changes the output travels here,
never in a global. Inputs that came over the network (image, prefix video) are already fetched, validated and
stored as files by the HTTP layer before a job exists; here they are paths.

Every entry point (the three provider adapters, the CLI and its JSONL batches, ``MagiPipeline.__call__``) checks
a request with :func:`validate` against the served model's :class:`ModelLimits`, so a bad seed, frame count,
size or step count is refused by the same rule with the same parameter name everywhere. Each limit below is
defined here and nowhere else. A refusal is a :class:`ParamError` whose ``param`` is data, never parsed back
out of a message.
"""
from __future__ import annotations

import json
import math
import secrets
from dataclasses import asdict, dataclass, fields
from types import MappingProxyType

# ------------------------------------------------------------------------------------------------------ limits
MAX_SEED = 2**32 - 1  # the widest seed range an entry point takes (fal: [0, 2^32 - 1]; api-compat.md §5)
RANDOM_SEEDS = 2**31  # -1 (or none) draws a seed in [0, 2^31 - 1] (api-compat.md §5)
MAX_FRAMES = 24 * 60 * 10  # ten minutes at 24 fps; anything above is almost certainly a typo
MIN_SIDE = 16
MAX_SIDE = 4096
SIDE_MULTIPLE = 16  # the VAE downsamples 8x and the DiT patches 2x2 latents: 16x16 pixels per token
MAX_STEPS = 1000
MAX_WINDOW = 16
MAX_PROMPTS = 256  # chunk-wise prompts: one per chunk at most, and a 10-minute video has 240 chunks
MAX_PROMPT_CHARS = 4000  # per prompt; the server may lower it (ServerSettings.max_prompt_chars)
FPS = 24  # MAGI-1 generates 24 fps video only
# A served job keeps the clean latents of the last frames it output, so a later job can continue from them losslessly
# (``continue_from``): 8 latent frames, the prefix the reference's video-to-video takes (its first 32 frames).
KEPT_LATENT_FRAMES = 8


def kept_latents_name(job_id: str) -> str:
    """The file (in the outputs folder or the output store) holding a finished job's kept latents. Never a job
    output: no route serves it (serving.files serves ``<job id>.mp4`` names only)."""
    return f"{job_id}.latents.safetensors"

RESOLUTIONS = ("480p", "720p")
ASPECT_RATIOS = ("16:9", "9:16", "1:1")
RESOLUTION_SIZES = MappingProxyType({
    # (tier, aspect) -> (width, height): same pixel area within a tier, sides multiples of 16 (api-compat.md §5)
    ("720p", "16:9"): (1280, 720),
    ("720p", "9:16"): (720, 1280),
    ("720p", "1:1"): (960, 960),
    ("480p", "16:9"): (832, 480),
    ("480p", "9:16"): (480, 832),
    ("480p", "1:1"): (624, 624),
})


def nearest_aspect(width: int, height: int) -> str:
    """The listed aspect ratio closest to width:height, by |log(w/h) - log(r)| ("auto" with an image: api-compat.md
    §5): what an image's own shape asks for."""
    ratios = {"16:9": 16 / 9, "9:16": 9 / 16, "1:1": 1.0}
    return min(ASPECT_RATIOS, key=lambda name: abs(math.log(width / height / ratios[name])))


def output_size(resolution: str, aspect_ratio: str, scale: float = 1.0) -> tuple[int, int]:
    """(width, height) for a tier and an aspect ratio ("auto" must be resolved first), optionally scaled down
    (rounded to multiples of 16, at least 32) for small test models."""
    width, height = RESOLUTION_SIZES[(resolution, aspect_ratio)]
    if scale == 1.0:
        return width, height

    def shrink(side: int) -> int:
        return max(32, int(round(side * scale / 16.0)) * 16)

    return shrink(width), shrink(height)


# ------------------------------------------------------------------------------------------------------ errors
class ParamError(ValueError):
    """A request parameter is invalid. ``param`` is its name in the contract (``num_inference_steps``, ``seed``,
    ...); adapters map it to their provider's field name. ``str(err)`` is ``"<param>: <message>"``."""

    def __init__(self, param: str, message: str, kind: str = "value_error") -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message
        self.kind = kind

    @property
    def field(self) -> str:  # the HTTP layer's word for it
        return self.param


def check_int(name: str, value, low: int, high: int) -> int:
    """An integer in [low, high]: integral floats are accepted, booleans, NaN and other types are not."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ParamError(name, f"must be an integer in [{low}, {high}], got {value!r}", "type_error")
    value = int(value)
    if not low <= value <= high:
        raise ParamError(name, f"must be in [{low}, {high}], got {value}")
    return value


def resolve_seed(value) -> int:
    """-1 / None = a random seed below RANDOM_SEEDS; the effective seed is stored with the job and reported."""
    if value is None or (not isinstance(value, bool) and isinstance(value, int) and value == -1):
        return secrets.randbelow(RANDOM_SEEDS)
    if isinstance(value, bool) or not hasattr(value, "__index__") or not 0 <= int(value) <= MAX_SEED:
        raise ParamError("seed", f"must be an integer in [0, {MAX_SEED}] or -1 for random, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class GenerationParams:
    prompts: tuple[str, ...]  # one prompt, or one per chunk/scene (chunk-wise prompts)
    width: int
    height: int
    num_frames: int  # requested output frames
    num_inference_steps: int
    seed: int  # always resolved (a random request seed is drawn before the job is stored)
    model: str = "default"  # served variant key, e.g. "magi-1-24b"
    image_path: str | None = None  # stored first frame (i2v)
    video_path: str | None = None  # stored prefix video (v2v)
    # stored latents to continue (v2v from an earlier job's kept latents: ``continue_from``); the runner loads them
    # as the library's ``video_latents``
    prefix_latents_path: str | None = None
    trim_to_frames: bool = False  # the hosted APIs return exactly num_frames frames; MAGI-1 itself whole chunks
    window_size: int | None = None  # None: the model's
    # run the server's safety checker (if it has one) on the output; not part of shape_key: it changes no model call
    safety_check: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))

    @property
    def task(self) -> str:
        if self.image_path is not None:
            return "i2v"
        if self.video_path is not None or self.prefix_latents_path is not None:
            return "v2v"  # a prefix video, or a prefix already in latent space
        return "t2v"

    def shape_key(self) -> tuple:
        """Requests with equal keys run the same sequence of model calls and can share batched DiT calls."""
        return (self.model, self.task, self.width, self.height, self.num_frames, self.num_inference_steps,
                self.window_size)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GenerationParams":
        data = json.loads(text)
        if "steps" in data:  # jobs stored before the field took its diffusers name
            data.setdefault("num_inference_steps", data.pop("steps"))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class ModelLimits:
    """What the served model adds to the contract's own limits (the runtime fills it from the model config)."""

    window_size: int = 4  # denoising window, in chunks
    kv_quarters: int = 4  # len(noise2clean_kvrange): the steps of a window split into this many stages
    temporal_downsample: int = 4  # frames per latent frame: text-to-video needs at least this many
    max_prompt_chars: int = MAX_PROMPT_CHARS

    def step_problem(self, steps: int, window_size: int | None = None) -> str | None:
        """Why ``steps`` cannot be sampled with this window (None when it can)."""
        divisors = {window_size or self.window_size, self.kv_quarters or 1}
        if steps < 1 or any(steps % d for d in divisors):
            allowed = " and ".join(str(d) for d in sorted(divisors))
            return f"must be a positive multiple of {allowed} (window_size and the kv-range quarters)"
        return None


def validate(params: GenerationParams, limits: ModelLimits = ModelLimits()) -> GenerationParams:
    """Every rule a request must meet, whatever door it came in by; raises :class:`ParamError` naming the
    parameter. Returns ``params`` unchanged (validation never rewrites a request)."""
    prompts = params.prompts
    if not prompts:
        raise ParamError("prompt", "required: a string, or a list of strings (one per chunk or scene)", "missing")
    if len(prompts) > MAX_PROMPTS:
        raise ParamError("prompt", f"at most {MAX_PROMPTS} chunk-wise prompts, got {len(prompts)}")
    for text in prompts:
        _check_text("prompt", text, limits.max_prompt_chars)
    for name in ("width", "height"):
        value = check_int(name, getattr(params, name), MIN_SIDE, MAX_SIDE)
        if value % SIDE_MULTIPLE:
            raise ParamError(name, f"must be a multiple of {SIDE_MULTIPLE} (the DiT patches 16x16 pixels), got {value}")
    frames = check_int("num_frames", params.num_frames, 1, MAX_FRAMES)
    if params.task == "t2v" and frames < limits.temporal_downsample:
        raise ParamError("num_frames", f"must be at least {limits.temporal_downsample} for text-to-video, got {frames}")
    window = params.window_size
    if window is not None:
        window = check_int("window_size", window, 1, MAX_WINDOW)
    steps = check_int("num_inference_steps", params.num_inference_steps, 1, MAX_STEPS)
    problem = limits.step_problem(steps, window)
    if problem:
        raise ParamError("num_inference_steps", f"{steps} {problem}")
    if isinstance(params.seed, bool) or not isinstance(params.seed, int) or not 0 <= params.seed <= MAX_SEED:
        raise ParamError("seed", f"must be an integer in [0, {MAX_SEED}] or -1 for random, got {params.seed!r}")
    if params.image_path is not None and params.video_path is not None:
        raise ParamError("video", "give either image (image-to-video) or video (video-to-video), not both")
    if params.prefix_latents_path is not None and params.image_path is not None:
        raise ParamError("continue_from", "give either image (image-to-video) or continue_from, not both")
    if params.prefix_latents_path is not None and params.video_path is not None:
        raise ParamError("continue_from", "give either video or continue_from (both are the video to continue)")
    return params


def _check_text(name: str, value, max_chars: int) -> str:
    if not isinstance(value, str):
        raise ParamError(name, f"must be a string, got {type(value).__name__}", "type_error")
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
        raise ParamError(name, "contains an unpaired UTF-16 surrogate (invalid unicode)")
    if "\x00" in value:
        raise ParamError(name, "contains a NUL character")
    if len(value) > max_chars:
        raise ParamError(name, f"is {len(value)} characters long; at most {max_chars} allowed")
    return value  # "" is the empty caption (Magic Hour's absent style.prompt); the APIs that require text say so
