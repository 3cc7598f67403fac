"""What every wire protocol shares: the server context, field validation, image intake and the submit flow.

The provider adapters (wavespeed.py, fal.py, magichour.py) only translate: provider body -> GenerationParams,
Job -> provider envelope. Everything that must behave the same whatever the protocol lives here:

* field validators that never let a bad value through (NaN, lone surrogates, bools posing as ints, out-of-range
  numbers, unknown enums) and raise :class:`FieldError` naming the field, which each adapter renders in its
  provider's error format (a 4xx, never a 5xx);
* image intake: fetch (http(s) with the SSRF rules of video.load_image, data: URIs, or our own upload URLs),
  decode, center-crop to the target aspect ratio, store as a PNG in the uploads folder *before* a job exists;
* the submit flow: reserve a queue slot (429 when full, nothing stored), write the job durably, hand it to the
  engine; and the EventHub that streams job events to SSE clients.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from magi_server.params import RESOLUTION_SIZES, output_size
from magi_server.serving.settings import ServerSettings
from magi_server.engine.loop import Engine, QueueFullError
from magi_server.serving.events import EventHub
from magi_server.serving.jobs import Job, JobStatus, JobStore
from magi_server.params import ASPECT_RATIOS, MAX_SEED, GenerationParams, ParamError
from magi_server.media.video import InputError, SourcePolicy, load_image

ASPECTS = ASPECT_RATIOS


FieldError = ParamError  # a request field is invalid; ``field`` is its name as the client wrote it


class Overloaded(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__("the server is at capacity; retry later")
        self.retry_after_s = retry_after_s


class Unavailable(Overloaded):
    """The GPU loop is dead or stopping: a job accepted now would sit queued until a restart (answer 503 with
    Retry-After; nothing is stored). A subclass so adapters that only know Overloaded still refuse it safely."""

    def __init__(self, retry_after_s: float, reason: str) -> None:
        super().__init__(retry_after_s)
        self.reason = reason


# ------------------------------------------------------------------------------------------------ validation


def _has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)


def req_str(body: dict, name: str, *, max_chars: int, allow_empty: bool = False) -> str:
    if name not in body or body[name] is None:
        raise FieldError(name, "field required", "missing")
    return opt_str(body, name, max_chars=max_chars, allow_empty=allow_empty)


def opt_str(body: dict, name: str, *, max_chars: int = 100_000, allow_empty: bool = True) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise FieldError(name, f"must be a string, got {type(value).__name__}", "type_error")
    if _has_surrogate(value):
        raise FieldError(name, "contains an unpaired UTF-16 surrogate (invalid unicode)")
    if "\x00" in value:
        raise FieldError(name, "contains a NUL character")
    if len(value) > max_chars:
        raise FieldError(name, f"is {len(value)} characters long; at most {max_chars} allowed")
    if not allow_empty and not value.strip():
        raise FieldError(name, "must not be empty")
    return value


def opt_int(body: dict, name: str, *, low: int, high: int, default: int | None = None,
            allow_numeric_string: bool = False) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        raise FieldError(name, f"must be an integer in [{low}, {high}], got a boolean", "type_error")
    # ASCII digits only: str.isdigit() also accepts "²", which int() then rejects
    if isinstance(value, str) and allow_numeric_string and re.fullmatch(r"-?[0-9]{1,30}", value.strip()):
        value = int(value.strip())
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FieldError(name, f"must be a finite integer in [{low}, {high}], got {value}")
        if not value.is_integer():
            raise FieldError(name, f"must be an integer in [{low}, {high}], got {value}", "type_error")
        value = int(value)
    if not isinstance(value, int):
        raise FieldError(name, f"must be an integer in [{low}, {high}], got {type(value).__name__}", "type_error")
    if not low <= value <= high:
        raise FieldError(name, f"must be in [{low}, {high}], got {value}")
    return value


def opt_number(body: dict, name: str, *, low: float, high: float, default: float | None = None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(name, f"must be a number in [{low}, {high}]", "type_error")
    if not math.isfinite(value):
        raise FieldError(name, f"must be a finite number, got {value}")
    if not low <= value <= high:
        raise FieldError(name, f"must be in [{low}, {high}], got {value}")
    return float(value)


def opt_bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise FieldError(name, "must be true or false", "type_error")
    return value


def opt_enum(body: dict, name: str, allowed: tuple, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise FieldError(name, f"must be one of {shown}, got {value!r}")
    return value


def resolve_seed(value: int | None) -> int:
    """-1 / absent = random in [0, 2^31 - 1] (api-compat.md §5); the effective seed is stored with the job."""
    if value is None or value == -1:
        return secrets.randbelow(MAX_SEED + 1)
    return value


def check_body(body: Any) -> dict:
    if not isinstance(body, dict):
        raise FieldError("body", "must be a JSON object")
    return body


# ----------------------------------------------------------------------------------------------- the context


@dataclass
class ServerContext:
    settings: ServerSettings
    store: JobStore
    engine: Engine
    executor: Any  # PipelineExecutor (or a test double)
    model_name: str  # what /health/ready reports
    notice: str = ""  # e.g. the tiny preset's "noise-like video" warning
    hub: EventHub = field(default_factory=EventHub)
    metrics: Any = None
    uploads: dict = field(default_factory=dict)  # upload token -> file path (also persisted on disk)
    webhook_secret: str = field(default_factory=lambda: "whsec_" + secrets.token_hex(24))
    started_at: float = field(default_factory=time.time)

    @property
    def outputs_dir(self) -> Path:
        return Path(self.settings.outputs_dir)

    @property
    def uploads_dir(self) -> Path:
        return Path(self.settings.outputs_dir) / "uploads"

    def file_url(self, name: str) -> str:
        return f"{self.settings.base_url()}/files/{name}"

    def owner_of(self, key: str | None) -> str:
        """Tenant id of an API key: a hash (keys themselves are never stored)."""
        if not key or not self.settings.api_keys:
            return ""
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    def key_is_valid(self, key: str | None) -> bool:
        if not self.settings.api_keys:
            return True
        if not key:
            return False
        # compare against every key in constant time: no early exit that leaks which prefix matched
        matches = [hmac.compare_digest(key.encode(), k.encode()) for k in self.settings.api_keys]
        return any(matches)


def find_job(ctx: "ServerContext", job_id: str, owner: str, api: str) -> Job | None:
    """The caller's job of one API. With API keys on, another tenant's job is None (a 404, not an existence
    oracle); a job submitted through another API is None too."""
    job = ctx.store.get(job_id, owner=owner if ctx.settings.api_keys else None)
    return job if job is not None and job.api == api else None


def bearer_token(headers) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), else None."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authorize_bearer(ctx: "ServerContext", headers) -> tuple[bool, str]:
    """(allowed, tenant) for a Bearer-authenticated API (WaveSpeed, Magic Hour)."""
    token = bearer_token(headers)
    if ctx.settings.api_keys and not ctx.key_is_valid(token):
        return False, ""
    return True, ctx.owner_of(token)


# ---------------------------------------------------------------------------------------------- image intake


def pick_aspect(image: np.ndarray) -> str:
    """The listed aspect ratio closest to the image's, by |log(w/h) - log(r)| (api-compat.md §5)."""
    h, w = image.shape[:2]
    ratios = {"16:9": 16 / 9, "9:16": 9 / 16, "1:1": 1.0}
    return min(ratios, key=lambda a: abs(math.log(w / h) - math.log(ratios[a])))


def center_crop_to_aspect(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Crop the image's center to the target aspect ratio (the pipeline then resizes): "resize and center crop"."""
    h, w = image.shape[:2]
    target = width / height
    if w / h > target:
        new_w = max(1, round(h * target))
        x0 = (w - new_w) // 2
        return np.ascontiguousarray(image[:, x0 : x0 + new_w])
    new_h = max(1, round(w / target))
    y0 = (h - new_h) // 2
    return np.ascontiguousarray(image[y0 : y0 + new_h])


def read_image_field(ctx: ServerContext, value: str, field_name: str) -> np.ndarray:
    """Decode an image given as an http(s) URL, a data: URI, bare base64, or one of our upload URLs."""
    local = resolve_upload(ctx, value)
    try:
        if local is not None:
            return load_image(local, param=field_name)
        if value.startswith(("http://", "https://", "data:")):
            policy = SourcePolicy(allow_paths=False, allow_private_hosts=ctx.settings.allow_private_image_hosts)
            return load_image(value, param=field_name, policy=policy)
        # bare base64 (WaveSpeed accepts it as a harmless extension)
        import base64
        import binascii

        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise FieldError(field_name, "must be an http(s) URL, a data: URI or base64 image bytes") from None
        return load_image(raw, param=field_name)
    except InputError as exc:
        message = str(exc).split(": ", 1)[-1]
        raise FieldError(field_name, message, "media_error") from None


def store_image(ctx: ServerContext, image: np.ndarray) -> str:
    """Save an accepted input image as PNG in the uploads folder; returns its path (the job's image_path)."""
    from magi_server.media.video import encode_png

    ctx.uploads_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.uploads_dir / f"input-{uuid.uuid4().hex}.png"
    tmp = path.with_suffix(".part")
    tmp.write_bytes(encode_png(image))
    tmp.replace(path)
    return str(path)


def save_upload(ctx: ServerContext, data: bytes, suffix: str) -> tuple[str, Path]:
    """Store uploaded bytes under an unguessable token; returns (token, path)."""
    ctx.uploads_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    safe_suffix = "".join(ch for ch in suffix.lower() if ch.isalnum())[:8] or "bin"
    path = ctx.uploads_dir / f"{token}.{safe_suffix}"
    tmp = ctx.uploads_dir / f".{token}.part"
    tmp.write_bytes(data)
    tmp.replace(path)
    return token, path


def resolve_upload(ctx: ServerContext, value: str) -> Path | None:
    """Our own upload URL (or a Magic Hour ``api-assets/<token>`` path) -> the stored file, without a fetch."""
    token = None
    base = ctx.settings.base_url()
    for prefix in (f"{base}/files/uploads/", "api-assets/"):
        if value.startswith(prefix):
            token = value[len(prefix):].split("?", 1)[0]
    if token is None:
        return None
    # the token becomes a glob pattern below: only the characters our tokens and file names use may reach it
    # ("*" would otherwise match any stored upload, another tenant's included)
    if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9]{1,8})?", token):
        return None
    for path in ctx.uploads_dir.glob(f"{token.split('.')[0]}.*"):
        if path.is_file() and not path.name.startswith("."):
            return path
    return None


def image_params(ctx: ServerContext, image: np.ndarray | None, resolution: str, aspect: str) -> tuple[int, int, str | None]:
    """(width, height, stored image path) for a request, after resolving "auto" and center-cropping the image."""
    if aspect == "auto":
        aspect = pick_aspect(image) if image is not None else "16:9"
    if (resolution, aspect) not in RESOLUTION_SIZES:
        raise FieldError("resolution", f"{resolution!r} is not supported for MAGI-1 (480p or 720p)")
    width, height = output_size(resolution, aspect, ctx.settings.resolution_scale)
    path = None
    if image is not None:
        path = store_image(ctx, center_crop_to_aspect(image, width, height))
    return width, height, path


# ------------------------------------------------------------------------------------------------ submitting


def submit_job(ctx: ServerContext, *, api: str, model: str, params: GenerationParams, owner: str,
               meta: dict | None = None) -> Job:
    """Reserve a queue slot (Overloaded when full, Unavailable when the engine is dead: nothing stored either
    way), store the job durably, hand it to the engine."""
    try:
        if not ctx.engine.accepting():
            # reliability goal 11: no job is accepted into a dead GPU loop (readiness is already 503)
            raise Unavailable(ctx.engine.retry_after_s, ctx.engine.dead_reason or "the GPU loop is not running")
        ctx.engine.try_reserve()
    except (QueueFullError, Unavailable) as exc:
        if params.image_path:
            Path(params.image_path).unlink(missing_ok=True)
        full = isinstance(exc, QueueFullError)
        if ctx.metrics is not None:
            ctx.metrics.inc("magi_jobs_rejected_total", {"reason": "queue_full" if full else "engine_dead"})
        if full:
            raise Overloaded(exc.retry_after_s) from None
        raise
    try:
        job = ctx.store.create(Job.new(api, model, params, owner=owner, meta=meta or {}))
    except BaseException:
        ctx.engine.unreserve()
        raise
    ctx.engine.submit(job.id, job.params, reserved=True)
    if ctx.metrics is not None:
        ctx.metrics.inc("magi_jobs_submitted_total", {"api": api})
    ctx.hub.publish(job.id, {"event": "status", "status": JobStatus.QUEUED.value})
    return job


async def wait_for_terminal_async(ctx: ServerContext, job_id: str, timeout_s: float, poll_s: float = 0.05) -> Job | None:
    deadline = time.monotonic() + timeout_s
    job = ctx.store.get(job_id)
    while job is not None and not job.is_terminal and time.monotonic() < deadline:
        await asyncio.sleep(poll_s)
        job = ctx.store.get(job_id)
    return job


def iso_time(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int((ts % 1) * 1000):03d}Z"


ASPECT_CHOICES = ("auto",) + ASPECTS
