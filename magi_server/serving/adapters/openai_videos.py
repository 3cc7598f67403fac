"""OpenAI videos API (the official ``openai`` SDK's ``client.videos``, 3.51.0): the only place its wire lives.

Routes (``Authorization: Bearer <key>``; every answer is JSON except the downloads):

* ``POST /v1/videos``: a JSON body or ``multipart/form-data`` (the SDK always sends multipart; a file part named
  ``input_reference`` is the first frame) -> the Video object. Fields: ``prompt`` (required), ``model``,
  ``seconds``, ``size``, ``input_reference`` (a file part, or ``{"image_url": <http(s) URL or data URL>}``), and
  the MAGI-1 extension fields ``prompts`` (one prompt per 24-frame chunk), ``seed``, ``num_inference_steps``,
  ``window_size`` (the SDK sends them with ``extra_body``). Any other field is a 400 ``unknown_parameter``.
* ``GET /v1/videos/{video_id}``: the Video object (``status`` queued | in_progress | completed | failed).
* ``GET /v1/videos``: ``?after=&limit=&order=`` -> ``{"object": "list", "data", "first_id", "last_id",
  "has_more"}``, newest first by default (the SDK's cursor page follows ``last_id``).
* ``DELETE /v1/videos/{video_id}`` -> ``{"id", "object": "video.deleted", "deleted": true}``: a queued or running
  video is cancelled first; its files are removed and the id answers 404 from then on.
* ``GET /v1/videos/{video_id}/content?variant=video|thumbnail|spritesheet``: the MP4 (byte ranges), a WebP of
  its middle frame, or a JPEG grid of one frame per second (both made from the MP4 with ffmpeg on request).

Mapping to MAGI-1 (the request is served exactly as asked, or refused naming the field):

* ``seconds``: a whole number from 1 to the server's --max-frames / 24, 60 by default (a string, as the SDK sends
  it, or a JSON integer) -> seconds x 24 frames (MAGI-1 makes 24 fps video in chunks of 24 frames: one chunk per
  second). Absent: the server's default frame count.
* ``size``: one of the six sizes MAGI-1 generates (``1280x720``, ``720x1280``, ``960x960`` at 720p; ``832x480``,
  ``480x832``, ``624x624`` at 480p); any other (Sora's ``1024x1792``, ...) is a 400 naming ``size``. Absent: the
  server's default tier, 16:9, or the input image's nearest aspect ratio. An input image is center-cropped and
  scaled to the size. The answer's ``size`` is the video's real size (a server started with a resolution scale
  renders every size smaller and says so).
* ``model``: absent or ``magi-1``: the server's first served variant; ``magi-1-24b``, ``magi-1-24b-distill``,
  ``magi-1-4.5b``, ``magi-1-4.5b-distill``: the variant WaveSpeed's route of that name runs (serving/routing.py:
  same promise, same ``--route-map`` entry); a served variant's own name (``24B-distill``, ``tiny``, ...): that
  variant. The Video's ``model`` says what runs it: the requested name when the variant keeps its promise, else
  the variant's own name. Anything else (``sora-2``, ...) or a size this server does not serve is a 400 naming
  ``model`` and the served variants, never silently another model.

Errors are OpenAI error objects ``{"error": {"message", "type", "param", "code"}}``: 400 ``invalid_request_error``
for any bad field (``param`` names it; nothing is stored), 401 ``invalid_api_key``, 404 for an unknown or deleted
video (or another key's), 409 for an ``Idempotency-Key`` reused with another body, 429 / 503 with ``Retry-After``.
A job that fails after it was accepted is a Video with ``status: "failed"`` and ``error: {"code", "message"}``
(a cancelled one too, with code ``cancelled``: the API has no cancelled status).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from magi_server.media import InputError
from magi_server.media.ffmpeg import run_ffmpeg
from magi_server.params import (FPS, MAX_PROMPTS, MAX_SEED, RESOLUTION_SIZES, GenerationParams, ModelLimits,
                                ParamError)
from magi_server.serving.common import (
    MAX_IMAGE_REF_CHARS,
    MAX_UPLOAD_BYTES,
    ContinuationInput,
    IdempotencyKey,
    Int,
    Prompt,
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
    read_image_field,
    read_job,
    read_output,
    scene_prompts_field,
    window_size_field,
)
from magi_server.serving.files import StoredFileResponse, StoredObjectResponse, open_stored
from magi_server.serving.jobs import Job, JobStatus
from magi_server.serving.routing import ROUTE_PROMISES, Router, UnservedRoute

log = logging.getLogger("magi_server.serving.adapters.openai_videos")

API = "openai"
VIDEO_ID = re.compile(r"^video_([0-9a-f]{32})$")  # "video_" + our job id: OpenAI's ids name their object
STATUS = MappingProxyType({
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "in_progress",
    JobStatus.COMPLETED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "failed",  # the API has no cancelled status: a failure with code "cancelled"
})
DEFAULT_MODEL = "magi-1"
DEFAULT_ROUTE = "openai"  # not a hosted route: the router's any-variant promise, which --route-map cannot remap
# model name -> the hosted route whose promise (size class, distillation) it carries (serving/routing.py)
SIZED_MODELS = MappingProxyType({
    "magi-1-24b": "wavespeed-ai/magi-1-24b",
    "magi-1-24b-distill": "wavespeed-ai/magi-1-24b-distill",
    "magi-1-4.5b": "wavespeed-ai/magi-1-4.5b",
    "magi-1-4.5b-distill": "wavespeed-ai/magi-1-4.5b-distill",
})
SIZES = MappingProxyType({f"{w}x{h}": key for key, (w, h) in RESOLUTION_SIZES.items()})  # "WxH" -> (tier, aspect)
LIST_DEFAULT_LIMIT, LIST_MAX_LIMIT = 20, 100
LIST_SCAN = 10_000  # the owner's newest videos a list looks through; retention keeps far fewer
INT_FIELDS = ("seed", "num_inference_steps", "window_size")  # multipart sends numbers as text
_ASCII_INT = re.compile(r"^-?[0-9]{1,30}$")
_BRACKETED = re.compile(r"^([a-z_]+)\[([a-z_]*)\]$")  # the SDK's multipart spelling: prompts[], input_reference[x]
# contract parameter -> this API's field, for a refusal by params.validate (and a failed job's error.param)
FIELDS = MappingProxyType({"num_frames": "seconds", "width": "size", "height": "size", "image": "input_reference"})
POLL_AFTER_MS = 500  # what an unfinished video's retrieve suggests to the SDK's poll()
THUMBNAIL_TIMEOUT_S = 60.0
SPRITE_COLUMNS, SPRITE_WIDTH = 5, 256  # the spritesheet: up to 5 frames a row, each 256 pixels wide
ERROR_CODES = MappingProxyType({401: "invalid_api_key", 404: "not_found", 409: "idempotency_key_conflict",
                                410: "damaged", 413: "request_too_large", 415: "unsupported_media_type",
                                429: "rate_limit_exceeded", 503: "service_unavailable"})


# ---------------------------------------------------------------------------------------------- request model


def _number_as_text(value):
    # the API's seconds is a string ("4"); a JSON number is taken too, and judged by to_params like the text
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value) if isinstance(value, float) else str(value)
    return value


Seconds = Annotated[Text, BeforeValidator(_number_as_text),
                    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer"}]})]


class CreateBody(BaseModel):
    """``POST /v1/videos`` (JSON; multipart carries the same fields, ``input_reference`` as a file part).
    ``null`` is leaving a field out; an unknown field is refused."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    model: Text | None = Field(None, max_length=100, description=(
        "magi-1 (default), magi-1-24b, magi-1-24b-distill, magi-1-4.5b, magi-1-4.5b-distill or a served variant"))
    seconds: Seconds | None = Field(None, description=(
        "whole seconds, 1 to the server's --max-frames / 24 (default 60), 24 frames each"))
    size: Text | None = Field(None, max_length=32, description=f"one of {', '.join(SIZES)}")
    input_reference: dict[str, Text] | None = Field(None, description=(
        "the first frame: {\"image_url\": <http(s) URL or data URL>} (multipart: a file part)"))
    prompts: list[Prompt] | None = scene_prompts_field()
    seed: Int | None = Field(None, ge=-1, le=MAX_SEED, description="extension: -1 (or absent): random")
    num_inference_steps: Int | None = Field(None, ge=1, le=256, description="extension: absent: the server's")
    window_size: Int | None = window_size_field()
    continue_from: Text | None = Field(None, max_length=100, description=(
        "extension: the id of an earlier completed video of this key to continue losslessly from its kept latents "
        "(the output holds only the new frames; size absent: the source's)"))
    video: Text | None = Field(None, max_length=MAX_IMAGE_REF_CHARS, description=(
        "extension: a video to continue (an http(s) URL or a data: URL of an MP4/MOV or WebM); the output holds "
        "only the new frames"))


def _multipart_schema() -> dict:
    schema = CreateBody.model_json_schema()
    schema["properties"] = {**schema["properties"], "input_reference": {
        "type": "string", "format": "binary", "description": "the first frame: a PNG, JPEG or WebP image"}}
    return schema


CREATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": CreateBody.model_json_schema()},
    "multipart/form-data": {"schema": _multipart_schema()}}}}


# --------------------------------------------------------------------------------------------- answer models


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: ErrorDetail


class VideoError(BaseModel):
    code: str
    message: str
    param: str | None = None


class VideoObject(BaseModel):
    id: str
    object: Literal["video"]
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int
    created_at: int
    completed_at: int | None
    expires_at: int | None
    prompt: str | None
    seconds: str
    size: str
    error: VideoError | None
    remixed_from_video_id: str | None
    seed: int = Field(description="extension: the seed the video was generated with")


class VideoList(BaseModel):
    object: Literal["list"]
    data: list[VideoObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"]
    deleted: bool


ERRORS = error_responses(OpenAIError, 400, 401, 404, 410, 503)  # what any route may answer; create adds its own
BINARY = {"schema": {"type": "string", "format": "binary"}}


# --------------------------------------------------------------------------------------------------- answers


def error(status: int, message: str, param: str | None = None, code: str | None = None,
          headers=None) -> JSONResponse:
    """An OpenAI error object (the SDK raises it as openai.BadRequestError, NotFoundError, ... with ``body`` set to
    the inner object)."""
    # OpenAI's own types: a wrong key is an invalid_request_error too (code invalid_api_key)
    kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
    detail = {"message": message, "type": kind, "param": param, "code": code or ERROR_CODES.get(status)}
    return JSONResponse({"error": detail}, status_code=status, headers=headers)


def _error_code(error_type: str) -> str:
    return {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter",
            "json_invalid": "invalid_json"}.get(error_type, "invalid_value")


class OpenAIRoute(ProviderRoute):
    """Refusals as OpenAI error objects; a bad field is a 400 whose ``param`` names it."""

    def refuse(self, status, message, headers=None):
        return error(status, message, headers=headers)

    def refuse_fields(self, errors):
        first = errors[0]
        param = field_name(first["loc"]) if len(first["loc"]) > 1 else None
        return error(400, describe(first) if param else first["msg"], param, _error_code(first["type"]))


def public_id(job_id: str) -> str:
    return f"video_{job_id}"


def _progress(job: Job) -> int:
    if job.status is JobStatus.COMPLETED:
        return 100
    if not job.progress_total:
        return 0
    return min(99, int(100 * job.progress_done / job.progress_total))


def video_object(ctx: ServerContext, job: Job) -> dict:
    """The Video object of a job (every field the SDK's model has, null-able ones present)."""
    finished = int(job.finished_at) if job.is_terminal and job.finished_at is not None else None
    expires = None
    if finished is not None and ctx.settings.keep_jobs_s is not None:  # the janitor removes it then
        expires = int(job.finished_at + ctx.settings.keep_jobs_s)
    failure = None
    if job.status is JobStatus.FAILED:
        failure = {"code": job.error_code or "internal", "message": job.error or "the generation failed",
                   "param": FIELDS.get(job.error_param, job.error_param) or None}
    elif job.status is JobStatus.CANCELLED:
        failure = {"code": "cancelled", "message": "the video was cancelled before it finished", "param": None}
    params = job.params
    return {
        "id": public_id(job.id),
        "object": "video",
        "model": job.model,
        "status": STATUS[job.status],
        "progress": _progress(job),
        "created_at": int(job.created_at),
        "completed_at": finished,
        "expires_at": expires,
        "prompt": job.meta.get("prompt", params.prompts[0] if params.prompts else None),
        "seconds": f"{params.num_frames / FPS:g}",
        "size": f"{params.width}x{params.height}",
        "error": failure,
        "remixed_from_video_id": None,
        "seed": params.seed,
    }


# ---------------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelChoice:
    """How a request's ``model`` runs: the route admission resolves (serving.routing), or the served variant it
    named itself."""

    requested: str
    route: str | None
    variant: str | None


def choose_model(router: Router | None, requested: str | None) -> ModelChoice:
    """The request's ``model`` -> what runs it; a ParamError naming ``model`` (and what is served) when nothing
    served may run it."""
    name = requested or DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        return ModelChoice(name, DEFAULT_ROUTE, None)
    if name in SIZED_MODELS:
        route = SIZED_MODELS[name]
        if router is not None:
            try:
                router.resolve(route)
            except UnservedRoute as exc:
                raise ParamError("model", f"{name!r} asks for {_promise_text(route)}, which this server does not "
                                          f"serve; it serves {', '.join(exc.served)} (use one of "
                                          f"{_accepted(router)})") from None
        return ModelChoice(name, route, None)
    if router is not None and router.variant(name) is not None:
        return ModelChoice(name, None, name)
    served = ", ".join(router.served) if router is not None else "MAGI-1"
    raise ParamError("model", f"{name!r} is not served here: this server runs {served}; use one of "
                              f"{_accepted(router)}")


def _promise_text(route: str) -> str:
    return ROUTE_PROMISES[route].describe()


def _accepted(router: Router | None) -> str:
    names = [DEFAULT_MODEL]
    for name, route in SIZED_MODELS.items():
        try:
            if router is not None:
                router.resolve(route)
            names.append(name)
        except UnservedRoute:
            pass
    names += [v for v in (router.served if router is not None else []) if v not in names]
    return ", ".join(repr(n) for n in names)


def reported_model(choice: ModelChoice, answered: str) -> str:
    """The name the Video gives: the requested one when its variant keeps the promise (admission answers the
    route itself), else the variant's own name."""
    if choice.route is not None and answered == choice.route:
        return choice.requested
    return answered


# ------------------------------------------------------------------------------------------------ validation


def _frames(ctx: ServerContext, seconds) -> int:
    if seconds is None:
        return ctx.settings.default_num_frames
    text = str(seconds).strip()
    longest = ctx.settings.max_num_frames // FPS  # the server's --max-frames
    if not _ASCII_INT.fullmatch(text) or not 1 <= int(text) <= longest:
        raise ParamError("seconds", f"must be a whole number of seconds from 1 to {longest} (MAGI-1 makes "
                                    f"24-frame chunks at {FPS} fps; this server's --max-frames), got {seconds!r}")
    return int(text) * FPS


def _size(size: str | None, has_image: bool, ctx: ServerContext) -> tuple[str, str]:
    """(tier, aspect) of the requested size; absent: the server's tier at 16:9 or the image's aspect ("auto")."""
    if size is None:
        return ctx.settings.default_resolution, "auto" if has_image else "16:9"
    if size not in SIZES:
        raise ParamError("size", f"{size!r} is not a size MAGI-1 generates; use one of {', '.join(SIZES)}")
    return SIZES[size]


def _job_id_of(video_id: str | None) -> str | None:
    """A ``continue_from`` as a job id: this API's ``video_<id>`` or the bare id the other APIs answer with."""
    if video_id is None:
        return None
    match = VIDEO_ID.fullmatch(video_id)
    return match.group(1) if match else video_id


async def to_params(ctx: ServerContext, body: CreateBody, upload: bytes | None,
                    limits: ModelLimits | None = None,
                    continuation: ContinuationInput | None = None) -> GenerationParams:
    """A valid body (and the multipart image's bytes) -> GenerationParams; every cheap check before the image is
    read, and the image stored (at the working size) only once the request is valid. Raises ParamError."""
    reference = body.input_reference
    if reference is not None:
        unknown = sorted(set(reference) - {"image_url", "file_id"})
        if unknown:
            raise ParamError(f"input_reference.{unknown[0]}", "unknown field; give image_url")
        if "file_id" in reference:
            raise ParamError("input_reference.file_id", "this server has no Files API: give image_url (an http(s) "
                                                        "URL or a data URL) or upload the image as a file part")
        if "image_url" not in reference:
            raise ParamError("input_reference.image_url", "required: an http(s) URL or a data URL")
    frames = _frames(ctx, body.seconds)
    has_image = upload is not None or reference is not None
    resolution, aspect = _size(body.size, has_image, ctx)
    if continuation is not None and body.size is None:  # a continuation keeps its source's size
        resolution, aspect = continuation.resolution or resolution, "auto"
    if upload is not None:
        # bare base64 through the shared intake: the same size checks and decoder as every other image
        image = await read_image_field(ctx, base64.b64encode(upload).decode(), "input_reference")
    elif reference is not None:
        image = await read_image_field(ctx, reference["image_url"], "input_reference.image_url")
    else:
        image = None
    return await build_params(
        ctx, prompt=body.prompt, image=image, resolution=resolution, aspect=aspect, num_frames=frames,
        steps=body.num_inference_steps or ctx.settings.default_steps, seed=body.seed, fields=FIELDS,
        limits=limits, prompts=body.prompts, window_size=body.window_size, continuation=continuation)


async def _form_fields(form) -> tuple[dict, bytes | None]:
    """A parsed form as the JSON body it stands for (and the ``input_reference`` file's bytes): ``prompts[]`` (or a
    repeated ``prompts``) is a list, ``input_reference[image_url]`` an object, integers are numbers again."""
    data: dict = {}
    lists: dict[str, list] = {}
    objects: dict[str, dict] = {}
    upload = None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != "input_reference":
                raise _validation_error([{"type": "extra_forbidden", "loc": (key,),
                                          "msg": "unknown file part; only input_reference takes a file"}])
            upload = await value.read(MAX_UPLOAD_BYTES + 1)
            if len(upload) > MAX_UPLOAD_BYTES:
                raise HTTPException(413, f"input_reference: larger than {MAX_UPLOAD_BYTES} bytes")
            continue
        bracketed = _BRACKETED.fullmatch(key)
        if bracketed and bracketed.group(2):
            objects.setdefault(bracketed.group(1), {})[bracketed.group(2)] = value
        elif bracketed or key == "prompts":
            lists.setdefault(bracketed.group(1) if bracketed else key, []).append(value)
        else:
            data[key] = value
    for key, value in (*lists.items(), *objects.items()):
        if key in data:
            raise _validation_error([{"type": "value_error", "loc": (key,), "msg": "given twice"}])
        data[key] = value
    for key in INT_FIELDS:
        if isinstance(data.get(key), str) and _ASCII_INT.fullmatch(data[key].strip()):
            data[key] = int(data[key].strip())
    return data, upload


def _validation_error(errors: list[dict]) -> RequestValidationError:
    return RequestValidationError([{"type": e["type"], "loc": ("body", *e["loc"]), "msg": e["msg"]}
                                   for e in errors])


async def read_create_request(request: Request, max_field_bytes: int) -> tuple[CreateBody, bytes | None]:
    """The create request's fields, from JSON or multipart (numbers as text, ``prompts[]``, ``input_reference[...]``
    as the SDK spells them), validated; and the bytes of a multipart ``input_reference`` file."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    upload = None
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_files=1, max_fields=MAX_PROMPTS + 16, max_part_size=max_field_bytes)
        try:
            data, upload = await _form_fields(form)
        finally:
            await form.close()
    elif content_type and not (content_type == "application/json" or content_type.endswith("+json")):
        raise HTTPException(415, f"unsupported content type {content_type!r}: send application/json or "
                                 f"multipart/form-data")
    else:
        raw = await request.body()
        try:
            data = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError) as exc:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body",),
                                           "msg": f"the body is not valid JSON: {str(exc)[:200]}"}]) from None
        if not isinstance(data, dict):
            raise RequestValidationError([{"type": "model_type", "loc": ("body",),
                                           "msg": "the body must be a JSON object"}])
    if upload is not None and "input_reference" in data:
        raise _validation_error([{"type": "value_error", "loc": ("input_reference",),
                                  "msg": "give the image once: a file part or image_url, not both"}])
    try:
        body = CreateBody.model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as exc:
        raise _validation_error([{**e, "msg": "unknown parameter"} if e["type"] == "extra_forbidden" else e
                                 for e in exc.errors()]) from None
    return body, upload


def _list_videos(ctx: ServerContext, owner: str, after: str | None, limit: int, order: str) -> dict:
    """One page of the owner's videos (blocking: the store's reader thread)."""
    jobs = ctx.store.list(limit=LIST_SCAN, owner=owner if ctx.settings.api_keys else None, api=API)
    if order == "asc":
        jobs.reverse()
    if after is not None:
        index = next((i for i, job in enumerate(jobs) if public_id(job.id) == after), None)
        if index is None:
            raise ParamError("after", f"no video {after!r} to list after")
        jobs = jobs[index + 1:]
    page: list[Job] = []
    has_more = False
    for job in jobs:
        if job.deleted_at is not None:
            continue
        if len(page) == limit:
            has_more = True
            break
        page.append(job)
    data = [video_object(ctx, job) for job in page]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


# ----------------------------------------------------------------------------------------- derived images


def _video_bytes(ctx: ServerContext, name: str) -> bytes | None:
    try:
        return read_output(ctx, name)
    except Exception as exc:  # noqa: BLE001 - the object store's one-line error
        log.warning("could not read %s from %s: %s", name, ctx.output_store.location, exc)
        return None


def render_still(video: bytes, variant: str, num_frames: int, width: int) -> tuple[bytes, str]:
    """A still made from an MP4: ``thumbnail`` (WebP of the middle frame) or ``spritesheet`` (JPEG grid of one
    frame per second, up to SPRITE_COLUMNS a row, each SPRITE_WIDTH pixels wide or the video's width if smaller).
    Returns (bytes, content type)."""
    if variant == "thumbnail":
        picks = f"select=eq(n\\,{num_frames // 2})"
        encode = ["-c:v", "libwebp", "-f", "webp"]
        media = "image/webp"
    else:
        count = max(1, math.ceil(num_frames / FPS))
        columns = min(count, SPRITE_COLUMNS)
        rows = math.ceil(count / columns)
        tile_width = min(width, SPRITE_WIDTH)
        picks = f"select=not(mod(n\\,{FPS})),scale={tile_width}:-2,tile={columns}x{rows}"
        encode = ["-c:v", "mjpeg", "-pix_fmt", "yuvj420p", "-q:v", "4", "-f", "image2pipe"]
        media = "image/jpeg"
    with tempfile.TemporaryDirectory(prefix="magi-still-") as tmp:
        source = Path(tmp) / "video.mp4"
        source.write_bytes(video)  # MP4 needs a seekable input (its index may be at the end)
        still = run_ffmpeg(["-protocol_whitelist", "file", "-f", "mp4", "-i", str(source), "-an", "-vf", picks,
                            "-frames:v", "1", *encode, "pipe:1"], stdin=None, timeout_s=THUMBNAIL_TIMEOUT_S,
                           param="variant", what="video", max_pixels=4096 * 4096, hide=(str(source),))
    if not still:
        raise InputError("variant", "no frame could be decoded")
    return still, media


# ----------------------------------------------------------------------------------------------------- routes


def build_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter(route_class=OpenAIRoute, responses=ERRORS, strict_content_type=False)
    tenant = api_key_auth(ctx, "Bearer")

    async def own_video(video_id: str, owner: str = Depends(tenant)) -> Job:
        """The caller's video (another key's, a deleted one or an unknown id: a 404 alike)."""
        match = VIDEO_ID.fullmatch(video_id)
        job = await read_job(ctx, match.group(1), owner, API) if match else None
        if job is None or job.deleted_at is not None:
            raise HTTPException(404, f"video {video_id!r} not found")
        return job

    @router.post("/v1/videos", openapi_extra=CREATE_BODY, response_model=VideoObject,
                 responses=error_responses(OpenAIError, 409, 413, 415, 429))
    async def create(request: Request, owner: str = Depends(tenant), idempotency_key: IdempotencyKey = None):
        body, upload = await read_create_request(request, ctx.settings.max_body_bytes)
        choice = choose_model(ctx.router, body.model)
        # admission (queue, quota) before the image is fetched or decoded
        async with admitted(ctx, owner=owner, idempotency_key=idempotency_key, route=choice.route,
                            variant=choice.variant) as admission:
            continuation = await continuation_input(
                ctx, owner, continue_from=_job_id_of(body.continue_from), video=body.video,
                variant=admission.variant_name)
            params = await to_params(ctx, body, upload, admission.limits, continuation)
            model = reported_model(choice, admission.model(choice.route or choice.requested))
            request_body = body.model_dump(mode="json")
            if upload is not None:  # the same image again is the same request
                request_body["input_reference"] = {"sha256": hashlib.sha256(upload).hexdigest()}
            job = await admission.commit(api=API, model=model, params=params, meta={"prompt": body.prompt},
                                         request_fingerprint=fingerprint("videos", request_body))
        return JSONResponse(video_object(ctx, job))

    @router.get("/v1/videos", response_model=VideoList)
    async def list_videos(owner: str = Depends(tenant), after: str | None = Query(None, max_length=100),
                          limit: int = Query(LIST_DEFAULT_LIMIT, ge=1, le=LIST_MAX_LIMIT),
                          order: Literal["asc", "desc"] = "desc"):
        page = await asyncio.get_running_loop().run_in_executor(
            ctx.store_reader, _list_videos, ctx, owner, after, limit, order)
        return JSONResponse(page)

    @router.get("/v1/videos/{video_id}", response_model=VideoObject)
    async def retrieve(job: Job = Depends(own_video)):
        # the SDK's poll() waits this long before asking again (its own default is a second)
        headers = None if job.is_terminal else {"openai-poll-after-ms": str(POLL_AFTER_MS)}
        return JSONResponse(video_object(ctx, job), headers=headers)

    @router.delete("/v1/videos/{video_id}", response_model=VideoDeleted)
    async def delete(job: Job = Depends(own_video)):
        job = await asyncio.to_thread(delete_job, ctx, job)
        return JSONResponse({"id": public_id(job.id), "object": "video.deleted", "deleted": True})

    @router.get("/v1/videos/{video_id}/content", response_class=Response, responses={200: {"content": {
        "video/mp4": BINARY, "image/webp": BINARY, "image/jpeg": BINARY}}})
    async def content(request: Request, job: Job = Depends(own_video),
                      variant: Literal["video", "thumbnail", "spritesheet"] = "video"):
        if job.status is not JobStatus.COMPLETED:
            raise HTTPException(400, f"video {public_id(job.id)} is {STATUS[job.status]}: its content is ready "
                                     f"only once it is completed")
        if not job.outputs:
            raise HTTPException(404, f"the content of video {public_id(job.id)} is gone")
        name = job.outputs[0]
        if variant == "video":
            return await _video_response(ctx, name, request.headers.get("range"), _disposition(job, "mp4"))
        video = await asyncio.to_thread(_video_bytes, ctx, name)
        if video is None:
            raise HTTPException(404, f"the content of video {public_id(job.id)} is gone")
        try:
            still, media = await asyncio.to_thread(render_still, video, variant, job.params.num_frames,
                                                   job.params.width)
        except InputError as exc:  # our own MP4 did not decode: the server's fault, not the request's
            log.error("could not make the %s of %s: %s", variant, job.id, exc)
            raise HTTPException(500, f"could not make the {variant} of this video") from None
        extension = "webp" if media == "image/webp" else "jpg"
        return Response(still, media_type=media, headers={"content-disposition": _disposition(job, extension)})

    return router


def _disposition(job: Job, extension: str) -> str:
    return f'attachment; filename="{public_id(job.id)}.{extension}"'


async def _video_response(ctx: ServerContext, name: str, range_header: str | None, disposition: str) -> Response:
    """The MP4, streamed with single byte ranges from the outputs folder or the output store."""
    headers = {"content-type": "video/mp4", "content-disposition": disposition,
               "x-content-type-options": "nosniff", "cache-control": "private"}
    if ctx.output_store is not None:
        try:
            reader = await asyncio.to_thread(ctx.output_store.open, name)
        except Exception as exc:  # noqa: BLE001 - the store's one-line error: gone for now, not a 5xx
            log.warning("could not read %s from %s: %s", name, ctx.output_store.location, exc)
            reader = None
        if reader is None:
            raise HTTPException(404, "the video's content is gone")
        return StoredObjectResponse(reader, range_header, headers)
    found = await asyncio.to_thread(open_stored, ctx.outputs_dir, name)
    if found is None:
        raise HTTPException(404, "the video's content is gone")
    fd, info = found
    return StoredFileResponse(fd, info, range_header, headers)
