"""Magic Hour v1 wire protocol (api-compat.md §4-5): image-to-video, video projects and the file upload flow.

Routes (all JSON answers carry ``Content-Type: application/json``: the SDK picks its parser from that header):

* ``POST /v1/files/upload-urls``: ``{"items": [{"extension", "type"}]}`` -> ``{"items": [{"upload_url",
  "file_path", "expires_at"}]}``. ``upload_url`` takes one unauthenticated ``PUT`` of the raw bytes (the
  unguessable token in the URL is the credential, as with a presigned S3 URL); ``file_path`` is
  ``api-assets/<token>.<ext>``, which ``assets.image_file_path`` accepts.
* ``PUT /v1/files/upload/{token}``: the upload itself (200, empty body).
* ``POST /v1/image-to-video`` -> ``{"id", "credits_charged", "estimated_frame_cost"}``.
* ``GET /v1/video-projects/{id}``: every key the SDK's pydantic model requires, the null-able ones included.
* ``DELETE /v1/video-projects/{id}`` -> 204: cancels the job if it is still queued or rendering, removes its video
  and input image, and marks the project deleted (``enabled: false``, no downloads). Deleting twice is a 204 too.

Errors are ``{"message": "<field>: <what is wrong>", "field": "<field>"}`` (``field`` only when one field is at
fault; nested fields are dotted, e.g. ``assets.image_file_path``, ``items[0].extension``): 422 for every invalid
field (nothing is stored), 401 for a missing or wrong Bearer key (only when keys are configured), 404 for an
unknown project (or one owned by another key), 429 with ``Retry-After`` when the queue is full, 503 with
``Retry-After`` when the GPU loop is down or the job store is unavailable.

Mapping to MAGI-1 (api-compat.md §5): frames = round(end_seconds * 24), trimmed to exactly that many; the size
follows the image (the nearest of 16:9 / 9:16 / 1:1, center crop) at 480p or 720p (360p is served as 480p;
1080p and 4k are refused); ``style.prompt`` is the prompt (absent or empty: the empty caption); the seed is random.
Model policy: omitted, ``"default"``, ``"magi-1"`` and ``"magi-1-24b"`` run the loaded MAGI-1 model; every other
name (kling-*, veo3.1, ...) is a 422 rather than silently running a different model than the one asked for.
Credits: ``credits_charged`` = ``estimated_frame_cost`` = ``total_frame_cost`` = frames at our 24 fps (the real
service estimates at 30 fps); a failed or canceled project is refunded (0).

An image URL is fetched while handling the create request, before any job exists, so an unreachable or
undecodable image is a 422 at create time (like the other adapters), not a project in status ``error``. The
``error`` status is what a job that fails after it was accepted reports (time limit, out of memory, ...), with
``error: {"code", "message"}``.
"""
from __future__ import annotations

import asyncio
import json
import math
import re
import time
from pathlib import Path
from types import MappingProxyType

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from magi_server.serving.common import (
    FieldError,
    Overloaded,
    ServerContext,
    Unavailable,
    authorize_bearer,
    check_body,
    find_job,
    image_params,
    iso_time,
    opt_bool,
    opt_enum,
    opt_int,
    opt_number,
    opt_str,
    read_image_field,
    resolve_seed,
    resolve_upload,
    save_upload,
    submit_job,
)
from magi_server.serving.jobs import Job, JobStatus, JobStoreError
from magi_server.params import GenerationParams

FPS = 24
MIN_SECONDS, MAX_SECONDS = 1.0, 60.0
PROJECT_TYPE = "IMAGE_TO_VIDEO"
STATUS = MappingProxyType({
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "rendering",
    JobStatus.COMPLETED: "complete",
    JobStatus.FAILED: "error",
    JobStatus.CANCELLED: "canceled",  # Magic Hour spells it with one "l"
})
MAGI_MODELS = ("default", "magi-1", "magi-1-24b")
# The SDK's closed model enum (0.90.0): named in the 422 so a client sees this is a policy, not a typo.
HOSTED_MODELS = (
    "gemini-omni-1.1", "kling-1.6", "kling-2.5", "kling-2.5-audio", "kling-2.6", "kling-3.0", "ltx-2", "ltx-2.3",
    "ltx-2.5", "minimax-h3", "seedance", "seedance-1.5", "seedance-2.0", "seedance-2.0-fast", "seedance-2.0-mini",
    "seedance-2.5", "sora-2", "veo3.1", "veo3.1-audio", "veo3.1-lite", "wan-2.2", "wan-3.0",
)
RESOLUTIONS = ("360p", "480p", "720p", "1080p", "4k")
# What each requested tier renders at: MAGI-1 has 480p and 720p sizes only (api-compat.md §5).
SERVED_TIER = MappingProxyType({"360p": "480p", "480p": "480p", "720p": "720p"})
DEFAULT_RESOLUTION = "720p"  # Magic Hour's default on paid tiers (api-compat.md §4.2)
# The extensions the upload-urls API documents; the image decoder itself takes PNG, JPEG and WebP only.
UPLOAD_EXTENSIONS = frozenset(
    "mp4 m4v mov webm mp3 wav aac flac weba m4a opus ogg oga aiff amr png jpg jpeg jfif heic heif webp avif "
    "jp2 tiff tif bmp gif".split())
UPLOAD_TYPES = ("image", "video", "audio")
MAX_UPLOAD_ITEMS = 10
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
UPLOAD_URL_TTL_S = 3600.0
DOWNLOAD_URL_TTL_S = 24 * 3600.0  # files are kept until deleted; this is what we promise per answer
MAX_NAME_CHARS = 1000
# A file_path we handed out: anything else under api-assets/ (wildcards, "..", other folders) is refused before
# it reaches a filesystem lookup.
ASSET_PATH = re.compile(r"^api-assets/[A-Za-z0-9_-]{16,64}\.[a-z0-9]{1,8}$")
UPLOAD_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
UPLOAD_NAME = re.compile(r"^[A-Za-z0-9_-]{16,64}\.[a-z0-9]{1,8}$")
DELETED_DIR = "magichour-deleted"  # under the outputs folder: one empty marker file per deleted project


# --------------------------------------------------------------------------------------------------- answers


def _json(body: dict, status_code: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status_code, headers=headers)


def _error(status_code: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"message": message}
    if field is not None:
        body["field"] = field
    return _json(body, status_code, headers)


def _field_error(exc: FieldError) -> JSONResponse:
    return _error(422, str(exc), exc.field)


def _unauthorized() -> JSONResponse:
    return _error(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                  headers={"WWW-Authenticate": "Bearer"})


def _overloaded(exc: Overloaded) -> JSONResponse:
    return _error(429, "the queue is full; retry later",
                  headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))})


def _store_unavailable() -> JSONResponse:
    return _error(503, "the job store is unavailable; retry later", headers={"Retry-After": "5"})




async def _json_body(request: Request):
    try:
        return check_body(await request.json())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FieldError("body", "must be a JSON object") from None


# ------------------------------------------------------------------------------------------------ validation


def _nested(body: dict, name: str) -> dict | None:
    """An optional sub-object (``assets``, ``style``)."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FieldError(name, "must be an object", "type_error")
    return value


def _prefixed(prefix: str, exc: FieldError) -> FieldError:
    return FieldError(f"{prefix}.{exc.field}", exc.message, exc.kind)


def _end_seconds(body: dict) -> float:
    if body.get("end_seconds") is None:
        raise FieldError("end_seconds", "field required", "missing")
    return opt_number(body, "end_seconds", low=MIN_SECONDS, high=MAX_SECONDS)


def _model(body: dict) -> str:
    model = opt_str(body, "model", max_chars=100)
    if model is None:
        return "default"
    if model in MAGI_MODELS:
        return model
    if model in HOSTED_MODELS:
        raise FieldError("model", f"{model!r} is not served here: this server runs MAGI-1 only; omit model or use "
                                  f"one of {', '.join(repr(m) for m in MAGI_MODELS)}")
    raise FieldError("model", f"must be one of {', '.join(repr(m) for m in MAGI_MODELS)}, got {model!r}")


def _resolution(body: dict, style: dict | None) -> str:
    """The requested tier; the deprecated style.high_quality / style.quality_mode only speak when it is absent."""
    requested = opt_enum(body, "resolution", RESOLUTIONS, None)
    legacy = None
    if style is not None:
        try:
            high_quality = opt_bool(style, "high_quality", None)
            quality_mode = opt_enum(style, "quality_mode", ("quick", "studio"), None)
        except FieldError as exc:
            raise _prefixed("style", exc) from None
        if quality_mode is not None:
            legacy = ("style.quality_mode", "1080p" if quality_mode == "studio" else "720p")
        elif high_quality is not None:
            legacy = ("style.high_quality", "1080p" if high_quality else "720p")
    if requested is None and legacy is not None:
        field, requested = legacy
        if requested not in SERVED_TIER:
            raise FieldError(field, f"asks for {requested}, which MAGI-1 does not support (480p or 720p); "
                                    f"send resolution instead")
    if requested is None:
        return DEFAULT_RESOLUTION
    if requested not in SERVED_TIER:
        raise FieldError("resolution", f"{requested!r} is not supported for MAGI-1 (360p, 480p or 720p; "
                                       f"360p renders at 480p)")
    return requested


def _image_ref(assets: dict | None) -> str:
    if assets is None:
        raise FieldError("assets", "field required: give assets.image_file_path", "missing")
    try:
        if assets.get("end_image_file_path") is not None:
            raise FieldError("end_image_file_path", "a last frame is not supported by MAGI-1; omit it")
        if assets.get("image_file_path") is None:
            raise FieldError("image_file_path", "field required", "missing")
        ref = opt_str(assets, "image_file_path", max_chars=30_000_000, allow_empty=False)
    except FieldError as exc:
        raise _prefixed("assets", exc) from None
    if ref.startswith("api-assets/") and not ASSET_PATH.fullmatch(ref):
        raise FieldError("assets.image_file_path", "is not a file_path returned by POST /v1/files/upload-urls")
    return ref


def _check_own_upload_url(ctx: ServerContext, ref: str) -> None:
    """Our own /files/uploads/<name> URLs are read from disk by name: only names we could have minted get there
    (no glob characters, no dots but the extension's)."""
    prefix = f"{ctx.settings.base_url()}/files/uploads/"
    if ref.startswith(prefix) and not UPLOAD_NAME.fullmatch(ref[len(prefix):].split("?", 1)[0]):
        raise FieldError("assets.image_file_path", "is not an upload URL this server issued")


def parse_body(ctx: ServerContext, body: dict) -> tuple[GenerationParams, dict]:
    """Magic Hour image-to-video body -> GenerationParams (+ meta). Raises FieldError naming the field.

    Every cheap check runs before the image is fetched and stored, so a bad field leaves nothing behind.
    """
    s = ctx.settings
    body = check_body(body)
    end_seconds = _end_seconds(body)
    assets = _nested(body, "assets")
    style = _nested(body, "style")
    image_ref = _image_ref(assets)
    _check_own_upload_url(ctx, image_ref)
    model = _model(body)
    requested = _resolution(body, style)
    if opt_bool(body, "audio", False):
        raise FieldError("audio", "MAGI-1 generates silent video; omit audio or send false")
    name = opt_str(body, "name", max_chars=MAX_NAME_CHARS)
    prompt = ""
    if style is not None:
        try:
            prompt = opt_str(style, "prompt", max_chars=s.max_prompt_chars) or ""
        except FieldError as exc:
            raise _prefixed("style", exc) from None
    for deprecated in ("width", "height"):  # accepted for old clients and ignored, as the real API does
        opt_int(body, deprecated, low=-(2**31), high=2**31 - 1)

    frames = round(end_seconds * FPS)
    tier = SERVED_TIER[requested]
    if image_ref.startswith("api-assets/") and resolve_upload(ctx, image_ref) is None:
        raise FieldError("assets.image_file_path", "unknown or expired file_path; upload the file first")
    image = read_image_field(ctx, image_ref, "assets.image_file_path")
    width, height, image_path = image_params(ctx, image, tier, "auto")
    created = time.time()
    params = GenerationParams(
        prompts=(prompt,), width=width, height=height, num_frames=frames, num_inference_steps=s.default_steps,
        seed=resolve_seed(None), image_path=image_path, trim_to_frames=True,
    )
    meta = {
        "name": name if name is not None else f"Image To Video - {iso_time(created)}",
        "end_seconds": end_seconds,
        "resolution": requested,
        "model": model,
    }
    return params, meta


def _upload_items(body: dict) -> list[tuple[str, str]]:
    items = body.get("items")
    if items is None:
        raise FieldError("items", "field required", "missing")
    if not isinstance(items, list) or not items:
        raise FieldError("items", "must be a non-empty list of {extension, type} objects", "type_error")
    if len(items) > MAX_UPLOAD_ITEMS:
        raise FieldError("items", f"at most {MAX_UPLOAD_ITEMS} files per request, got {len(items)}")
    parsed = []
    for i, item in enumerate(items):
        prefix = f"items[{i}]"
        if not isinstance(item, dict):
            raise FieldError(prefix, "must be an object with extension and type", "type_error")
        try:
            if item.get("extension") is None:
                raise FieldError("extension", "field required", "missing")
            extension = opt_str(item, "extension", max_chars=16, allow_empty=False).lower().lstrip(".")
            if extension not in UPLOAD_EXTENSIONS:
                raise FieldError("extension", f"unsupported extension {extension!r}")
            if item.get("type") is None:
                raise FieldError("type", "field required", "missing")
            kind = opt_enum(item, "type", UPLOAD_TYPES, None)
        except FieldError as exc:
            raise _prefixed(prefix, exc) from None
        parsed.append((extension, kind))
    return parsed


# -------------------------------------------------------------------------------------------------- projects


def _deleted_marker(ctx: ServerContext, job_id: str) -> Path:
    return ctx.outputs_dir / DELETED_DIR / job_id


def _is_deleted(ctx: ServerContext, job_id: str) -> bool:
    return _deleted_marker(ctx, job_id).exists()


def project_data(ctx: ServerContext, job: Job, *, deleted: bool = False) -> dict:
    """The GET /v1/video-projects/{id} body: every key the SDK requires, null-able ones present."""
    status = STATUS[job.status]
    refunded = job.status in (JobStatus.FAILED, JobStatus.CANCELLED)
    credits = 0 if refunded else job.params.num_frames
    downloads = []
    if job.status is JobStatus.COMPLETED and not deleted:
        expires_at = iso_time(time.time() + DOWNLOAD_URL_TTL_S)
        # the SDK names the downloaded file after the URL's last path component: "<id>.mp4"
        downloads = [{"url": ctx.file_url(name), "expires_at": expires_at} for name in job.outputs]
    error = None
    if job.status is JobStatus.FAILED:
        error = {"code": job.error_code or "internal", "message": job.error or "the generation failed"}
    return {
        "id": job.id,
        "name": job.meta.get("name"),
        "type": PROJECT_TYPE,
        "status": status,
        "created_at": iso_time(job.created_at),
        "enabled": not deleted,
        "start_seconds": 0.0,
        "end_seconds": float(job.meta.get("end_seconds", job.params.num_frames / FPS)),
        "fps": float(FPS),
        "width": job.params.width,
        "height": job.params.height,
        "credits_charged": credits,
        "total_frame_cost": credits,
        "error": error,
        "download": downloads[0] if downloads else None,
        "downloads": downloads,
    }


def _delete_files(ctx: ServerContext, job: Job) -> None:
    """The project's video (and chunk previews) and its stored input image; the marker makes the deletion stick."""
    marker = _deleted_marker(ctx, job.id)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    names = set(job.outputs) | {f"{job.id}.mp4"}
    for name in names:
        (ctx.outputs_dir / name).unlink(missing_ok=True)
    for preview in ctx.outputs_dir.glob(f"{job.id}.chunk*.mp4"):
        preview.unlink(missing_ok=True)
    if job.params.image_path:
        Path(job.params.image_path).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------- routes


def build_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    def _lookup(job_id: str, owner: str) -> Job | None:
        return find_job(ctx, job_id, owner, "magichour")

    @router.post("/v1/image-to-video")
    async def create(request: Request):
        ok, owner = authorize_bearer(ctx, request.headers)
        if not ok:
            return _unauthorized()
        params = None
        try:
            body = await _json_body(request)
            # parse_body may fetch an image URL: off the event loop
            params, meta = await asyncio.to_thread(parse_body, ctx, body)
            job = await asyncio.to_thread(submit_job, ctx, api="magichour", model=meta["model"], params=params,
                                          owner=owner, meta=meta)
        except FieldError as exc:
            return _field_error(exc)
        except Unavailable as exc:  # the GPU loop is down; its reason stays in /health/ready and the log
            return _error(503, "the server cannot run jobs now: the GPU loop is not running; retry later",
                          headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))})
        except Overloaded as exc:  # submit_job already removed the stored image (both cases)
            return _overloaded(exc)
        except JobStoreError:
            if params is not None and params.image_path:
                Path(params.image_path).unlink(missing_ok=True)
            return _store_unavailable()
        frames = job.params.num_frames
        return _json({"id": job.id, "credits_charged": frames, "estimated_frame_cost": frames})

    @router.get("/v1/video-projects/{job_id}")
    async def get_project(job_id: str, request: Request):
        ok, owner = authorize_bearer(ctx, request.headers)
        if not ok:
            return _unauthorized()
        try:
            job = _lookup(job_id, owner)
        except JobStoreError:
            return _store_unavailable()
        if job is None:
            return _error(404, f"video project {job_id} not found")
        return _json(project_data(ctx, job, deleted=_is_deleted(ctx, job.id)))

    @router.delete("/v1/video-projects/{job_id}")
    async def delete_project(job_id: str, request: Request):
        ok, owner = authorize_bearer(ctx, request.headers)
        if not ok:
            return _unauthorized()
        try:
            job = _lookup(job_id, owner)
            if job is None:
                return _error(404, f"video project {job_id} not found")
            if not job.is_terminal:
                # the row turns final now (compare-and-set); the engine stops the work at its next safe point
                ctx.store.cancel(job.id)
                ctx.engine.cancel(job.id)
                job = ctx.store.get(job.id) or job
        except JobStoreError:
            return _store_unavailable()
        await asyncio.to_thread(_delete_files, ctx, job)
        return Response(status_code=204)

    # ------------------------------------------------------------------------------------------------ uploads
    @router.post("/v1/files/upload-urls")
    async def upload_urls(request: Request):
        ok, _ = authorize_bearer(ctx, request.headers)
        if not ok:
            return _unauthorized()
        try:
            items = _upload_items(await _json_body(request))
        except FieldError as exc:
            return _field_error(exc)
        now = time.time()
        _forget_expired_tickets(ctx, now)
        base = ctx.settings.base_url()
        answer = []
        for extension, kind in items:
            # an empty placeholder now, so the token's file name (and so its file_path) is fixed before the PUT
            token, _ = await asyncio.to_thread(save_upload, ctx, b"", extension)
            ctx.uploads[token] = {"api": "magichour", "expires": now + UPLOAD_URL_TTL_S, "type": kind}
            answer.append({
                "upload_url": f"{base}/v1/files/upload/{token}",
                "file_path": f"api-assets/{token}.{extension}",
                "expires_at": iso_time(now + UPLOAD_URL_TTL_S),
            })
        return _json({"items": answer})

    @router.put("/v1/files/upload/{token}")
    async def upload_put(token: str, request: Request):
        # no Authorization here: the SDK PUTs with a bare HTTP client, so the unguessable URL is the credential
        ticket = ctx.uploads.get(token) if UPLOAD_TOKEN.fullmatch(token) else None
        if not isinstance(ticket, dict) or ticket.get("api") != "magichour" or ticket["expires"] < time.time():
            return _error(404, "unknown or expired upload URL")
        data = bytearray()
        async for part in request.stream():
            data.extend(part)
            if len(data) > MAX_UPLOAD_BYTES:
                return _error(413, f"upload larger than {MAX_UPLOAD_BYTES} bytes")
        matches = [p for p in ctx.uploads_dir.glob(f"{token}.*") if not p.name.startswith(".")]
        if not matches:
            return _error(404, "unknown or expired upload URL")
        await asyncio.to_thread(_write_atomically, matches[0], bytes(data))
        ctx.uploads.pop(token, None)  # one PUT per URL
        return Response(status_code=200)

    return router


def _write_atomically(path: Path, data: bytes) -> None:
    # a create request reading the file while the PUT writes must see the old (empty) or the new bytes, not half
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    tmp.replace(path)


def _forget_expired_tickets(ctx: ServerContext, now: float) -> None:
    """Upload URLs nobody used: drop the ticket and its empty placeholder so neither piles up."""
    expired = [token for token, ticket in list(ctx.uploads.items())
               if isinstance(ticket, dict) and ticket.get("api") == "magichour" and ticket.get("expires", now) < now]
    for token in expired:
        ctx.uploads.pop(token, None)
        for path in ctx.uploads_dir.glob(f"{token}.*"):
            if path.is_file() and path.stat().st_size == 0:
                path.unlink(missing_ok=True)
