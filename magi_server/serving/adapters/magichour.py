"""Magic Hour v1 wire protocol (api-compat.md §4-5): image-to-video, video projects and the file upload flow.

Routes (all JSON answers carry ``Content-Type: application/json``: the SDK picks its parser from that header):

* ``POST /v1/files/upload-urls``: ``{"items": [{"extension", "type"}]}`` -> ``{"items": [{"upload_url",
  "file_path", "expires_at"}]}``. ``upload_url`` takes one unauthenticated ``PUT`` of the raw bytes (the
  unguessable token in the URL is the credential, as with a presigned S3 URL); ``file_path`` is
  ``api-assets/<token>.<ext>``, which ``assets.image_file_path`` accepts.
* ``PUT /v1/files/upload/{token}``: the upload itself (200, empty body); bytes that do not sniff as an image or
  video (HTML, SVG, text, audio, ...) are a 415 and leave the ticket open.
* ``POST /v1/image-to-video`` -> ``{"id", "credits_charged", "estimated_frame_cost"}``. Extensions (MAGI-1
  video-to-video, instead of the image): ``assets.video_file_path`` (a video to continue) or ``continue_from`` (an
  earlier project's id, continued from its kept latents); the video then holds only the new frames.
* ``GET /v1/video-projects/{id}``: every key the SDK's pydantic model requires, the null-able ones included. Its
  ``downloads`` URLs are signed (serving.files): the SDK downloads them without the key until ``expires_at``.
* ``DELETE /v1/video-projects/{id}`` -> 204: cancels the job if it is still queued or rendering, removes its video
  and input image, and marks the project deleted (``enabled: false``, no downloads). Deleting twice is a 204 too.

Errors are ``{"message": "<field>: <what is wrong>", "field": "<field>"}`` (``field`` only when one field is at
fault; nested fields are dotted, e.g. ``assets.image_file_path``, ``items[0].extension``): 422 for every invalid
field (nothing is stored), 401 for a missing or wrong Bearer key (only when keys are configured), 404 for an
unknown project (or one owned by another key), 409 for an ``Idempotency-Key`` used before with another body, 429
with ``Retry-After`` when the queue is full, 503 with ``Retry-After`` when the GPU loop is down or the job store is
unavailable.

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
import re
import time
from types import MappingProxyType
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, Field, Strict, StrictBool
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from magi_server.params import FPS, MAX_FRAMES, GenerationParams, ModelLimits, ParamError
from magi_server.serving.common import (
    MAX_IMAGE_REF_CHARS,
    RAW_BODY,
    ContinuationInput,
    IdempotencyKey,
    Int,
    ProviderRoute,
    ServerContext,
    Text,
    admitted,
    api_key_auth,
    build_params,
    continuation_input,
    delete_job,
    describe,
    error_responses,
    field_name,
    fingerprint,
    iso_time,
    open_upload,
    read_image_field,
    read_job,
    receive_upload,
    resolve_upload,
    scene_prompts_field,
    window_size_field,
)
from magi_server.serving.jobs import Job, JobStatus

MIN_SECONDS, MAX_SECONDS = 1.0, MAX_FRAMES / FPS  # Magic Hour's own bound is 60 s; longer: the server's --max-frames
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
# What each requested tier renders at: MAGI-1 has 480p and 720p sizes only (api-compat.md §5).
SERVED_TIER = MappingProxyType({"360p": "480p", "480p": "480p", "720p": "720p"})
DEFAULT_RESOLUTION = "720p"  # Magic Hour's default on paid tiers (api-compat.md §4.2)
# The extensions the upload-urls API documents; the image decoder itself takes PNG, JPEG and WebP only.
UPLOAD_EXTENSIONS = frozenset(
    "mp4 m4v mov webm mp3 wav aac flac weba m4a opus ogg oga aiff amr png jpg jpeg jfif heic heif webp avif "
    "jp2 tiff tif bmp gif".split())
MAX_UPLOAD_ITEMS = 10
MAX_NAME_CHARS = 1000
# A file_path we handed out: anything else under api-assets/ (wildcards, "..", other folders) is refused before
# it reaches a filesystem lookup.
ASSET_PATH = re.compile(r"^api-assets/[A-Za-z0-9_-]{16,64}\.[a-z0-9]{1,8}$")
UPLOAD_NAME = re.compile(r"^[A-Za-z0-9_-]{16,64}\.[a-z0-9]{1,8}$")
LEGACY_DELETED_DIR = "magichour-deleted"  # where versions before the store's deleted mark put a file per deletion
# contract parameter -> Magic Hour field, for a refusal by params.validate
FIELDS = MappingProxyType({"prompt": "style.prompt", "num_frames": "end_seconds", "width": "resolution",
                           "height": "resolution", "image": "assets.image_file_path"})


# ---------------------------------------------------------------------------------------------- request models


def _extension(value: str) -> str:
    extension = value.lower().lstrip(".")
    if extension not in UPLOAD_EXTENSIONS:
        raise PydanticCustomError("extension", f"unsupported extension {extension!r}")
    return extension


class UploadItem(BaseModel):
    extension: Annotated[Text, Field(min_length=1, max_length=16, examples=["png"]), AfterValidator(_extension)]
    type: Literal["image", "video", "audio"]


class UploadUrlsBody(BaseModel):
    """``POST /v1/files/upload-urls``."""

    items: list[UploadItem] = Field(min_length=1, max_length=MAX_UPLOAD_ITEMS)


class Assets(BaseModel):
    image_file_path: Text | None = Field(None, min_length=1, max_length=MAX_IMAGE_REF_CHARS, description=(
        "the first frame: an http(s) URL, a data: URI, or a file_path from POST /v1/files/upload-urls; required "
        "unless the request continues a video (video_file_path or continue_from)"))
    video_file_path: Text | None = Field(None, min_length=1, max_length=MAX_IMAGE_REF_CHARS, description=(
        "extension: a video to continue instead of an image (MAGI-1 video-to-video: its first 32 frames condition "
        "the new ones), given as image_file_path is; the output holds only the new frames"))
    end_image_file_path: Text | None = Field(None, description="a last frame: not supported by MAGI-1 (422)")


class Style(BaseModel):
    prompt: Text | None = Field(None, description="the prompt; absent or empty: the empty caption")
    high_quality: StrictBool | None = Field(None, description="deprecated: 720p / 1080p when resolution is absent")
    quality_mode: Literal["quick", "studio"] | None = Field(None, description="deprecated, as high_quality")


class ImageToVideoBody(BaseModel):
    """``POST /v1/image-to-video`` (api-compat.md §4.2). Unknown fields are ignored; ``null`` is leaving a field
    out."""

    end_seconds: Annotated[float, Strict()] = Field(ge=MIN_SECONDS, le=MAX_SECONDS, allow_inf_nan=False)
    assets: Assets | None = Field(None, description="the image; required unless the request gives continue_from")
    name: Text | None = Field(None, max_length=MAX_NAME_CHARS)
    model: Text | None = Field(None, max_length=100, description=f"one of {', '.join(MAGI_MODELS)}")
    resolution: Literal["360p", "480p", "720p", "1080p", "4k"] | None = Field(
        None, description="360p renders at 480p; 1080p and 4k are refused")
    audio: StrictBool | None = Field(None, description="MAGI-1 makes silent video: true is refused")
    style: Style | None = None
    continue_from: Text | None = Field(None, max_length=64, description=(
        "extension: the id of an earlier completed project of yours, continued losslessly from its last latent "
        "frames (kept for the retention period) instead of an image, at its size; the output holds only the new "
        "frames"))
    prompts: list[Text] | None = scene_prompts_field("style.prompt")
    window_size: Int | None = window_size_field()
    width: Int | None = Field(None, description="deprecated, ignored")
    height: Int | None = Field(None, description="deprecated, ignored")


class MagicHourError(BaseModel):
    message: str
    field: str | None = None


ERRORS = error_responses(MagicHourError, 401, 404, 410, 422, 503)  # what any route may answer; create and PUT add theirs


# --------------------------------------------------------------------------------------------------- answers


def _error(status_code: int, message: str, field: str | None = None, headers=None) -> JSONResponse:
    body = {"message": message}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code, headers=headers)


class MagicHourRoute(ProviderRoute):
    """Refusals as ``{"message"}``; a bad field is a 422 ``{"message": "<field>: <reason>", "field"}`` with nested
    fields dotted (``assets.image_file_path``, ``items[0].type``)."""

    def refuse(self, status, message, headers=None):
        return _error(status, message, headers=headers)

    def refuse_fields(self, errors):
        return _error(422, describe(errors[0]), field_name(errors[0]["loc"]))


# ------------------------------------------------------------------------------------------------ validation


def _model(model: str | None) -> str:
    if model is None or model in MAGI_MODELS:
        return model or "default"
    if model in HOSTED_MODELS:
        raise ParamError("model", f"{model!r} is not served here: this server runs MAGI-1 only; omit model or use "
                                  f"one of {', '.join(repr(m) for m in MAGI_MODELS)}")
    raise ParamError("model", f"must be one of {', '.join(repr(m) for m in MAGI_MODELS)}, got {model!r}")


def _resolution(body: ImageToVideoBody, continued: str | None = None) -> str:
    """The requested tier; the deprecated style.high_quality / style.quality_mode only speak when it is absent, and
    ``continued`` (a continued job's tier) when they are too."""
    field, requested = "resolution", body.resolution
    style = body.style
    if requested is None and style is not None and style.quality_mode is not None:
        field, requested = "style.quality_mode", "1080p" if style.quality_mode == "studio" else "720p"
    elif requested is None and style is not None and style.high_quality is not None:
        field, requested = "style.high_quality", "1080p" if style.high_quality else "720p"
    requested = requested or continued or DEFAULT_RESOLUTION
    if requested not in SERVED_TIER:
        raise ParamError(field, f"asks for {requested}, which MAGI-1 does not support (360p, 480p or 720p; 360p "
                                f"renders at 480p)")
    return requested


async def to_params(ctx: ServerContext, body: ImageToVideoBody, limits: ModelLimits | None = None,
                    continuation: ContinuationInput | None = None) -> tuple[GenerationParams, dict]:
    """A valid Magic Hour body -> GenerationParams (+ meta). Raises ParamError naming the field. Every cheap check
    runs before the image is fetched, and the image is stored (at the working size) only once the request is
    valid."""
    if body.assets is None and continuation is None:
        raise ParamError("assets", "field required (or continue_from, to continue an earlier project)", "missing")
    assets = body.assets or Assets()
    ref = assets.image_file_path
    if assets.end_image_file_path is not None:
        raise ParamError("assets.end_image_file_path", "a last frame is not supported by MAGI-1; omit it")
    if ref is None and continuation is None:
        raise ParamError("assets.image_file_path", "required (or, to continue a video: assets.video_file_path or "
                                                   "continue_from)", "missing")
    if ref is None:
        ref = ""  # no image: the checks below pass it by
    if ref.startswith("api-assets/") and not ASSET_PATH.fullmatch(ref):
        raise ParamError("assets.image_file_path", "is not a file_path returned by POST /v1/files/upload-urls")
    # our own /files/uploads/<name> URLs are read from disk by name: only names we could have minted get there
    own = f"{ctx.settings.base_url()}/files/uploads/"
    if ref.startswith(own) and not UPLOAD_NAME.fullmatch(ref[len(own):].split("?", 1)[0]):
        raise ParamError("assets.image_file_path", "is not an upload URL this server issued")
    model = _model(body.model)
    requested = _resolution(body, continuation.resolution if continuation is not None else None)
    if body.audio:
        raise ParamError("audio", "MAGI-1 generates silent video; omit audio or send false")
    if ref.startswith("api-assets/") and await asyncio.to_thread(resolve_upload, ctx, ref) is None:
        raise ParamError("assets.image_file_path", "unknown or expired file_path; upload the file first")
    image = await read_image_field(ctx, ref, "assets.image_file_path") if ref else None
    params = await build_params(
        ctx, prompt=(body.style and body.style.prompt) or "", image=image,
        resolution=SERVED_TIER[requested], aspect="auto", num_frames=round(body.end_seconds * FPS),
        steps=ctx.settings.default_steps, seed=None, fields=FIELDS, limits=limits, continuation=continuation,
        prompts=body.prompts, window_size=body.window_size,
    )
    name = body.name if body.name is not None else f"Image To Video - {iso_time(time.time())}"
    return params, {"name": name, "end_seconds": body.end_seconds, "resolution": requested, "model": model}


# -------------------------------------------------------------------------------------------------- projects


def _is_deleted(ctx: ServerContext, job: Job) -> bool:
    """Deleted by its owner (the store's mark; or, for a project deleted before the store kept it, the marker file
    earlier versions wrote under the outputs folder)."""
    return job.deleted_at is not None or (ctx.outputs_dir / LEGACY_DELETED_DIR / job.id).exists()


def project_data(ctx: ServerContext, job: Job, *, deleted: bool = False) -> dict:
    """The GET /v1/video-projects/{id} body: every key the SDK requires, null-able ones present."""
    status = STATUS[job.status]
    refunded = job.status in (JobStatus.FAILED, JobStatus.CANCELLED)
    credits = 0 if refunded else job.params.num_frames
    downloads = []
    if job.status is JobStatus.COMPLETED and not deleted:
        # signed URLs (the SDK downloads them without the key) that stop working at expires_at; the SDK names the
        # downloaded file after the URL path's last component: "<id>.mp4"
        expires = ctx.signer.expiry()
        downloads = [{"url": ctx.file_url(name, expires=expires), "expires_at": iso_time(expires)}
                     for name in job.outputs]
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


# ----------------------------------------------------------------------------------------------------- routes


def build_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter(route_class=MagicHourRoute, responses=ERRORS, strict_content_type=False)
    tenant = api_key_auth(ctx, "Bearer")

    async def own_project(job_id: str, owner: str = Depends(tenant)) -> Job:
        job = await read_job(ctx, job_id, owner, "magichour")
        if job is None:
            raise HTTPException(404, f"video project {job_id} not found")
        return job

    @router.post("/v1/image-to-video", responses=error_responses(MagicHourError, 409, 429))
    async def create(body: ImageToVideoBody, owner: str = Depends(tenant), idempotency_key: IdempotencyKey = None):
        # admission (queue, quota) before the image is fetched or decoded
        async with admitted(ctx, owner=owner, idempotency_key=idempotency_key, route="magichour") as admission:
            continuation = await continuation_input(
                ctx, owner, continue_from=body.continue_from,
                video=body.assets.video_file_path if body.assets is not None else None,
                variant=admission.variant_name, video_field="assets.video_file_path")
            params, meta = await to_params(ctx, body, admission.limits, continuation)
            job = await admission.commit(
                api="magichour", model=meta["model"], params=params, meta=meta,
                request_fingerprint=fingerprint("image-to-video", body.model_dump(mode="json")))
        frames = job.params.num_frames
        return {"id": job.id, "credits_charged": frames, "estimated_frame_cost": frames}

    @router.get("/v1/video-projects/{job_id}")
    async def get_project(job: Job = Depends(own_project)):
        return project_data(ctx, job, deleted=await asyncio.to_thread(_is_deleted, ctx, job))

    @router.delete("/v1/video-projects/{job_id}", status_code=204)
    async def delete_project(job: Job = Depends(own_project)):
        await asyncio.to_thread(delete_job, ctx, job)
        return Response(status_code=204)

    # ------------------------------------------------------------------------------------------------ uploads
    @router.post("/v1/files/upload-urls")
    async def upload_urls(body: UploadUrlsBody, owner: str = Depends(tenant)):
        base, answer = ctx.settings.base_url(), []
        for item in body.items:
            ticket = await asyncio.to_thread(open_upload, ctx, "magichour", item.extension, owner)
            answer.append({
                "upload_url": f"{base}/v1/files/upload/{ticket.token}{ticket.query}",
                "file_path": f"api-assets/{ticket.name}",
                "expires_at": iso_time(ticket.expires),
            })
        return {"items": answer}

    @router.put("/v1/files/upload/{token}", openapi_extra=RAW_BODY,
                responses=error_responses(MagicHourError, 413, 415))
    async def upload_put(token: str, request: Request):
        await receive_upload(ctx, "magichour", token, request)
        return Response(status_code=200)

    return router
