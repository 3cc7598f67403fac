"""What every wire protocol shares: the server context, the request-model types, auth, refusals, image intake,
uploads and the submit flow.

The provider adapters (wavespeed.py, fal.py, magichour.py) only translate: a provider's pydantic request model ->
GenerationParams, Job -> provider envelope. Everything that must behave the same whatever the protocol lives here:

* the field types the request models are made of (:data:`Int`, :data:`Text`), which let no bad value through
  (NaN, lone surrogates, bools posing as ints, out-of-range numbers, unknown enums);
* :class:`ProviderRoute`: whatever refuses a request (the request model, the contract's :func:`validate`, a
  dependency such as :func:`api_key_auth`, a full queue) is answered in the route's own provider's error format,
  always a 4xx (or 503) and never a 5xx;
* image intake: fetch (http(s) with the SSRF rules of media.fetch, data: URIs, or our own upload URLs), refuse
  an image above :data:`MAX_INPUT_IMAGE_PIXELS` from its header, then (once the request is valid) decode,
  center-crop and scale it to the job's working size in one ffmpeg pass on a small pool of its own, and store
  that PNG in the uploads folder;
* continuation (MAGI-1 video-to-video): :func:`continuation_input` checks ``continue_from`` (an earlier completed job
  of the same owner that kept its latents, same variant) or reads a ``video`` (URL with the image rules, upload or
  data: URI); :func:`build_params` holds the request to the source's size and stores the job's own copy;
* uploads: one way to store bytes (only what sniffs as an image or video; the name's token is unguessable and
  tagged with its owner), one presigned-URL ticket flow (WaveSpeed and Magic Hour); the signed URLs of stored
  files (:meth:`ServerContext.file_url`; serving.files checks them);
* the submit flow: admission first (:func:`admitted`: a live engine, a queue slot, the key's quota; 429 or 503
  before any fetch or decode, nothing stored), then the request's image, then the job written durably (once per
  Idempotency-Key) and handed to the engine; and one cancel.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Header, Request, Security
from fastapi import params as fastapi_params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from pydantic import AfterValidator, BeforeValidator, Field, Strict
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from magi_server.engine.loop import Engine, QueueFullError
from magi_server.media import InputError
from magi_server.media.fetch import SourcePolicy, open_source, read_path
from magi_server.media.images import fit_image, image_size, read_image_bytes
from magi_server.media.video import MAX_VIDEO_BYTES, load_video
from magi_server.params import (ASPECT_RATIOS, MAX_PROMPTS, MAX_SIDE, MAX_WINDOW, RESOLUTION_SIZES, RESOLUTIONS,
                                GenerationParams, ModelLimits, ParamError, kept_latents_name, nearest_aspect,
                                output_size, resolve_seed, validate)
from magi_server.serving.events import EventHub, StoreBacklog
from magi_server.serving.jobs import (MAX_IDEMPOTENCY_KEY_LEN, DamagedJob, IdempotencyConflict, Job, JobStatus,
                                      JobStore, JobStoreError, QueueFull, QuotaExceeded)
from magi_server.serving.files import ACCEPTED_KINDS, UPLOAD_NAME, FileSigner, MediaKind, read_stored, sniff_media
from magi_server.serving.routing import Choice, Router, UnservedRoute
from magi_server.serving.settings import ServerSettings
from magi_server.serving.webhooks import WebhookKeys

log = logging.getLogger("magi_server.serving.common")

MAX_IMAGE_REF_CHARS = 30_000_000  # a data: URI carries the whole image; the body limit caps it anyway
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
UPLOAD_URL_TTL_S = 3600.0  # how long a presigned upload URL takes its one PUT
IDEMPOTENCY_TTL_S = 24 * 3600.0  # Stripe keeps keys at least this long
# An input image is cropped and scaled down to the job's output size before anything else sees it, so pixels
# beyond what the largest output shows (1280x720 or 960x960, ~0.92 MP: params.RESOLUTION_SIZES) buy nothing.
# 4096 x 4096 (16.7 MP, params.MAX_SIDE squared) is ~18x that: a 12 MP phone photo (4032x3024) or a 4K frame
# fits with room, while the worst decode stays bounded (~50 MB of RGB, inside the ffmpeg subprocess, under a
# second). Anything larger is refused from its header, before it is decoded.
MAX_INPUT_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE
# Concurrent image decodes (one ffmpeg each, a core each): they queue on a pool of their own, so a burst of image
# submits waits for itself instead of filling the default thread pool every other request runs on.
IMAGE_DECODE_WORKERS = 2
# the upload PUTs read the raw bytes of the file (declared so /docs shows it; FastAPI cannot infer it)
RAW_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


class Overloaded(Exception):
    """A 429: the queue is full, or the caller's key has its quota of jobs waiting or running."""

    def __init__(self, retry_after_s: float, message: str = "the queue is full; retry later") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.message = message


class Unavailable(Overloaded):
    """The GPU loop is dead or stopping: a job accepted now would sit queued until a restart (answer 503 with
    Retry-After; nothing is stored). A subclass so code that only knows Overloaded still refuses it safely."""

    def __init__(self, retry_after_s: float, reason: str,
                 message: str = "the server cannot run jobs now: the GPU loop is not running; retry later") -> None:
        super().__init__(retry_after_s, message)  # what the client reads: the reason (a device error) is the log's
        self.reason = reason


# ------------------------------------------------------------------------------------------ request-model types


def _integral(value):
    # JSON has one number type: 8.0 is the integer 8 (8.5, NaN, strings and booleans are not integers)
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _plain_text(value: str) -> str:
    try:
        value.encode("utf-8")  # in C: a 30 MB data URI is checked in milliseconds
    except UnicodeEncodeError:
        raise PydanticCustomError("string_unicode", "contains an unpaired UTF-16 surrogate (invalid unicode)") from None
    if "\x00" in value:
        raise PydanticCustomError("string_nul", "contains a NUL character")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("string_blank", "must not be empty")
    return value


Int = Annotated[int, Strict(), BeforeValidator(_integral)]
Text = Annotated[str, Strict(), AfterValidator(_plain_text)]
Prompt = Annotated[Text, Field(min_length=1), AfterValidator(_not_blank)]  # WaveSpeed and fal require the text


def scene_prompts_field(replaces: str = "prompt"):
    """The ``prompts`` extension field (MAGI-1's chunk-wise captions) as every API declares it."""
    return Field(None, min_length=1, max_length=MAX_PROMPTS, description=(
        "extension: one prompt per 24-frame chunk (scene changes; the last holds for the chunks after it); "
        f"replaces {replaces} for the generation"))


def window_size_field():
    """The ``window_size`` extension field (chunks denoised together) as every API declares it."""
    return Field(None, ge=1, le=MAX_WINDOW, description=(
        "extension: chunks denoised together (absent: the model's, 4); 1 needs the least memory"))

Resolution = Literal[RESOLUTIONS]
AspectRatio = Literal[("auto", *ASPECT_RATIOS)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=MAX_IDEMPOTENCY_KEY_LEN,
                                              description="a repeat with the same key and body answers the same job")]


# ----------------------------------------------------------------------------------------------- the context

_SIGNER_LOCK = threading.Lock()


@dataclass
class ServerContext:
    settings: ServerSettings
    store: JobStore
    engine: Engine
    executor: Any  # the model runner (runtime.model_runner.ModelRunner) or a test double
    model_name: str  # what /health/ready reports
    notice: str = ""  # e.g. the tiny preset's "noise-like video" warning
    hub: EventHub = field(default_factory=EventHub)
    metrics: Any = None
    started_at: float = field(default_factory=time.time)
    model_limits: ModelLimits = field(default_factory=ModelLimits)  # the served model's (the composition root's)
    janitor: Any = None  # serving.janitor.Janitor when finished jobs have a time to live
    # the image decodes (see IMAGE_DECODE_WORKERS); serving.app.shutdown shuts it down
    image_decoder: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max_workers=IMAGE_DECODE_WORKERS, thread_name_prefix="image-decode"))
    backlog: StoreBacklog = field(default_factory=StoreBacklog)  # job events the store refused, retried (events.py)
    # the requests' store reads (see read_job); serving.app.shutdown shuts it down. One thread: the store serves
    # one call at a time anyway, and a crowd of threads queued on its lock only fights the engine for the GIL
    # (with the shared 40-thread pool, polls at 200/s while a job generated took seconds; issue #10)
    store_reader: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="store-read"))
    file_signer: FileSigner | None = None  # made from the settings on first use (see :attr:`signer`)
    # An API replica (`magi-server api`, serving/cluster.py): the queue bound is the shared store's, checked in each
    # insert's transaction (``engine`` is then a SharedQueue holding no slots), and no job runs in this process
    store_queue_bound: int | None = None
    runs_jobs: bool = True
    listener: Any = None  # the job store's notifications (jobs_postgres.StoreListener), stopped at shutdown
    router: Router | None = None  # which served variant runs each hosted route (serving.routing)
    # rewrites prompts (runtime.prompt_enhancer.PromptEnhancer or anything with enhance(str) -> str); None: none
    prompt_enhancer: Any = None
    # what /health/ready says of the safety checker (runtime.safety_checker, run by the model runner on each
    # output): "configured", "none", or "per-worker" for an API replica (the workers run it; each job records it)
    safety_checker: str = "none"
    # where finished outputs live when not in outputs_dir (settings.output_store): a serving.outputs.OutputStore
    output_store: Any = None
    webhooks: Any = None  # serving.webhooks.WebhookDispatcher sending this store's due webhooks; stopped at shutdown
    _webhook_keys: Any = None

    @property
    def outputs_dir(self) -> Path:
        return Path(self.settings.outputs_dir)

    @property
    def uploads_dir(self) -> Path:
        return Path(self.settings.outputs_dir) / "uploads"

    @property
    def limits(self) -> ModelLimits:
        """What :func:`validate` checks requests against: the model's limits and this server's prompt cap."""
        return replace(self.model_limits, max_prompt_chars=self.settings.max_prompt_chars)

    @property
    def key_quota(self) -> int | None:
        """Waiting or running jobs one API key may have (None: no quota): the configured one, else half the queue
        when several keys share the server, so that one key cannot fill the whole queue."""
        s = self.settings
        if not s.api_keys:
            return None  # no keys, no tenants: the queue bound is the only bound
        if s.max_queue_per_key is not None:
            return s.max_queue_per_key
        return max(1, s.max_queue // 2) if len(s.api_keys) > 1 else None

    @property
    def signer(self) -> FileSigner:
        """Signs the file URLs we hand out (serving.files): the configured secret or the one kept in the outputs
        folder."""
        if self.file_signer is None:
            with _SIGNER_LOCK:  # one secret even when the first URLs are signed on several threads at once
                if self.file_signer is None:
                    self.file_signer = FileSigner.for_settings(self.settings)
        return self.file_signer

    @property
    def media_policy(self) -> SourcePolicy:
        """Where a request's image and video URLs may be fetched from: never a server path; public hosts, plus the
        operator's --allow-private-urls exceptions."""
        return SourcePolicy(allow_paths=False, allow_private_hosts=self.settings.allow_private_image_hosts,
                            private_allowlist=self.settings.allow_private_urls)

    @property
    def webhook_keys(self):
        """serving.webhooks.WebhookKeys, derived from the kept signing secret (the same in every replica)."""
        if self._webhook_keys is None:
            self._webhook_keys = WebhookKeys(self.signer.derive_key("webhooks"))
        return self._webhook_keys

    def file_url(self, name: str, *, base: str | None = None, expires: int | None = None) -> str:
        """The signed URL of an output or chunk preview: the SDKs download it without our API key. ``base``: the
        listener the client used (fal), else the public base URL; ``expires``: unix seconds (default: the TTL)."""
        return (base or self.settings.base_url()) + self.signer.sign(f"/files/{name}", expires)

    def engine_for(self, variant: str | None):
        """The engine that runs ``variant``'s jobs: a member of an EngineGroup, else the one engine (or the API
        replica's shared queue)."""
        member = getattr(self.engine, "member", None)
        return self.engine if member is None else member(variant)

    def remove_output(self, name: str) -> None:
        """Delete an output or preview wherever it lives (the object store too); a missing one is fine."""
        (self.outputs_dir / name).unlink(missing_ok=True)
        if self.output_store is not None:
            try:
                self.output_store.delete(name)
            except Exception as exc:  # noqa: BLE001 - the store's one-line error; the janitor tries again later
                log.warning("could not delete %s from %s: %s", name, self.output_store.location, exc)

    def upload_url(self, name: str) -> str:
        """The signed download URL of an upload (WaveSpeed's ``download_url``)."""
        return self.settings.base_url() + self.signer.sign(f"/files/uploads/{name}")

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


def read_output(ctx: ServerContext, name: str) -> bytes | None:
    """An output, preview or kept file wherever it lives (the reading twin of :meth:`ServerContext.remove_output`):
    this replica's folder (never through a link), else the object store; None when in neither. The object store's
    errors (serving.outputs.OutputStoreError) propagate: the caller says what a read that failed means."""
    data = read_stored(ctx.outputs_dir, name)
    if data is not None or ctx.output_store is None:
        return data
    return ctx.output_store.read(name)


def find_job(ctx: "ServerContext", job_id: str, owner: str, api: str) -> Job | None:
    """The caller's job of one API. With API keys on, another tenant's job is None (a 404, not an existence
    oracle); a job submitted through another API is None too."""
    job = ctx.store.get(job_id, owner=owner if ctx.settings.api_keys else None)
    return job if job is not None and job.api == api else None


async def read_job(ctx: "ServerContext", job_id: str, owner: str, api: str) -> Job | None:
    """:func:`find_job` for a request: on the context's store-reading thread, never on the event loop (the store's
    lock may be held by a write that waits for the disk)."""
    return await asyncio.get_running_loop().run_in_executor(ctx.store_reader, find_job, ctx, job_id, owner, api)


def cancel_job(ctx: ServerContext, job_id: str) -> Job | None:
    """Make the job's row final now (compare-and-set: None when it ended first); the engine stops the work at its
    next safe point."""
    cancelled = ctx.store.cancel(job_id)
    ctx.engine.cancel(job_id)
    if cancelled is not None:  # its streams and sync waiters hear of the end now, not at the engine's safe point
        ctx.hub.publish(job_id, "status", status=JobStatus.CANCELLED)
    return cancelled


def delete_job(ctx: ServerContext, job: Job) -> Job:
    """The owner's DELETE (Magic Hour projects, OpenAI videos), blocking: a job still running is cancelled first;
    the row is marked deleted in the store (``Job.deleted_at``: every replica sees it, and it sticks through
    restarts), then its files go: the video, chunk previews, kept latents (nothing continues a deleted job) and
    stored inputs, here and in the object store. The row itself stays until retention."""
    if not job.is_terminal:
        cancel_job(ctx, job.id)
    job = ctx.store.mark_deleted(job.id) or ctx.store.get(job.id) or job
    names = ({*job.outputs, f"{job.id}.mp4", kept_latents_name(job.id)}
             | {p.name for p in ctx.outputs_dir.glob(f"{job.id}.chunk*.mp4")})
    if ctx.output_store is not None:
        try:
            names |= set(ctx.output_store.names(f"{job.id}.chunk"))
        except Exception as exc:  # noqa: BLE001 - the store's one-line error; the janitor removes them later
            log.warning("could not list %s's previews in %s: %s", job.id, ctx.output_store.location, exc)
    for name in names:
        ctx.remove_output(name)
    uploads = ctx.uploads_dir.resolve()
    for stored in (job.params.image_path, job.params.video_path, job.params.prefix_latents_path):
        if stored and Path(stored).resolve().parent == uploads:  # only our own copies, never a path elsewhere
            Path(stored).unlink(missing_ok=True)
    return job


def api_key_auth(ctx: ServerContext, scheme: str):
    """A dependency answering the caller's tenant for ``Authorization: <scheme> <key>`` ("Bearer" for WaveSpeed and
    Magic Hour, "Key" for fal); a 401 when keys are configured and this is not one of them. It is declared as an
    OpenAPI security scheme, so /docs has a field for the key."""
    header = APIKeyHeader(name="Authorization", scheme_name=f"{scheme}Auth", auto_error=False,
                          description=f"'{scheme} <key>' (only when the server was started with API keys)")

    # async: a few string compares, answered on the event loop. A plain def would be run on a worker thread, a
    # hand-over (and a wait for the GIL) per request
    async def tenant(authorization: str | None = Security(header)) -> str:
        given, _, key = (authorization or "").partition(" ")
        key = key.strip() if given.lower() == scheme.lower() else ""
        if not ctx.key_is_valid(key or None):
            raise HTTPException(401, f"missing or invalid API key: send 'Authorization: {scheme} <key>'",
                                headers={"WWW-Authenticate": scheme})
        return ctx.owner_of(key or None)

    return tenant


# ------------------------------------------------------------------------------------------------- refusals


def field_name(loc) -> str:
    """A pydantic error location as the client wrote the field: ``("body", "assets", "image_file_path")`` ->
    ``assets.image_file_path``, ``("body", "items", 0, "type")`` -> ``items[0].type``; the body itself is ``body``."""
    name = ""
    for part in loc[1:] if len(loc) > 1 else loc:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name


def describe(error: dict) -> str:
    """``<field>: <reason>``, as WaveSpeed's and Magic Hour's error messages read."""
    msg = error["msg"]
    return f"{field_name(error['loc'])}: {msg[:1].lower()}{msg[1:]}"


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return not kind or kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class ProviderRoute(APIRoute):
    """A route of one provider's API. Whatever refuses a request (its JSON, the request model, the contract's
    :func:`validate`, a dependency, the queue, the job store) is answered by the subclass's :meth:`refuse` or
    :meth:`refuse_fields` in that provider's error format. FastAPI's exception handlers are app-wide, and one app
    serves several providers: the route knows whose it is."""

    def refuse(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
        raise NotImplementedError

    def refuse_fields(self, errors: list[dict]) -> Response:
        """``errors``: ``{"loc", "msg", "type"}`` as pydantic reports them, in the order the fields are declared."""
        raise NotImplementedError

    def get_route_handler(self):
        handler = super().get_route_handler()
        takes_json = self.body_field is not None and not isinstance(self.body_field.field_info, fastapi_params.Form)

        async def handle(request: Request) -> Response:
            try:
                if takes_json:
                    await _check_json(request)
                return await handler(request)
            except RequestValidationError as exc:
                return self.refuse_fields([{"loc": tuple(e["loc"]), "msg": e["msg"], "type": e["type"]}
                                           for e in exc.errors()])
            except ParamError as exc:
                return self.refuse_fields([{"loc": ("body", exc.param), "msg": exc.message, "type": exc.kind}])
            except HTTPException as exc:
                return self.refuse(exc.status_code, str(exc.detail), exc.headers)
            except Overloaded as exc:
                retry = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
                if isinstance(exc, Unavailable):  # its reason (a device error) stays in /health/ready and the log
                    return self.refuse(503, exc.message, retry)
                return self.refuse(429, exc.message, retry)
            except UnservedRoute as exc:
                return self.refuse(404, str(exc))
            except IdempotencyConflict as exc:
                return self.refuse(409, f"Idempotency-Key: {exc}")
            except DamagedJob as exc:
                # 410, not a 5xx: the row will not heal, so a client must stop polling (a 503 invites retries
                # forever, and the WaveSpeed SDK replays a task on any 5xx); the reason is for the operator
                log.warning("%s", exc)
                return self.refuse(410, f"job {exc.job_id} is damaged in the server's job store and can no longer "
                                        f"be read; submit it again")
            except JobStoreError:
                return self.refuse(503, "the job store is unavailable; retry later", {"Retry-After": "5"})
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                log.error("out of disk space: %s", exc)  # e.g. storing an input image: the same answer as the store's
                return self.refuse(503, "the server is out of disk space; retry later", {"Retry-After": "30"})

        return handle


async def _check_json(request: Request) -> None:
    """A JSON body that does not parse is a validation error of the body, which the provider's route renders;
    FastAPI would answer a 5000-digit number, deep nesting or bad UTF-8 with a bare 400 of its own. (FastAPI then
    parses the body again, from the cached bytes.)"""
    body = await request.body()
    if body and _is_json(request.headers.get("content-type", "")):
        try:
            json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body",),
                                           "msg": f"the body is not valid JSON: {str(exc)[:200]}"}]) from None


def error_responses(model, *statuses: int) -> dict:
    """``responses=`` for a route: the error statuses it answers, each with the provider's error body."""
    return {status: {"model": model} for status in statuses}


# ---------------------------------------------------------------------------------------------- image intake


@dataclass(frozen=True)
class ImageInput:
    """A request's image, fetched and sized from its header but not decoded: :func:`build_params` decodes it
    straight to the job's working size once the request is valid."""

    data: bytes  # the encoded PNG, JPEG or WebP
    width: int
    height: int
    field: str  # the provider's name for it, which refusals name


async def read_image_field(ctx: ServerContext, value: str, field_name: str) -> ImageInput:
    """Fetch an image given as an http(s) URL, a data: URI, bare base64, or one of our upload URLs, and read its
    size from its header; an image above :data:`MAX_INPUT_IMAGE_PIXELS` is refused here, before any decode."""
    return await asyncio.to_thread(_read_image_field, ctx, value, field_name)


@contextmanager
def _media_field(field_name: str) -> Iterator[None]:
    """Reading a request's image or video: every failure is the reference's fault (a 4xx naming ``field_name``),
    never a 5xx; one the loaders did not classify is logged."""
    try:
        yield
    except InputError as exc:
        raise ParamError(field_name, exc.message, "media_error") from None
    except ParamError:
        raise
    except Exception:  # a fetch failure the loader did not classify is still the reference's fault, not a 5xx
        log.warning("%s could not be read", field_name, exc_info=True)
        raise ParamError(field_name, "could not be fetched or decoded", "media_error") from None


def _read_image_field(ctx: ServerContext, value: str, field_name: str) -> ImageInput:
    local = resolve_upload(ctx, value)
    with _media_field(field_name):
        if local is not None:
            data = read_image_bytes(local, param=field_name)
        elif value.startswith(("http://", "https://", "data:")):
            data = read_image_bytes(value, param=field_name, policy=ctx.media_policy)
        else:
            try:  # bare base64 (WaveSpeed accepts it as a harmless extension)
                raw = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ParamError(field_name, "must be an http(s) URL, a data: URI or base64 image bytes") from None
            data = read_image_bytes(raw, param=field_name)
        width, height = image_size(data, param=field_name)
    if width * height > MAX_INPUT_IMAGE_PIXELS:
        raise ParamError(field_name, f"the image is {width}x{height} ({width * height / 1e6:.1f} megapixels); at "
                                     f"most {MAX_INPUT_IMAGE_PIXELS / 1e6:.1f} megapixels (e.g. 4096x4096) are "
                                     "accepted", "media_error")
    return ImageInput(data, width, height, field_name)


async def store_input_image(ctx: ServerContext, image: ImageInput, path: Path, width: int, height: int) -> None:
    """Decode ``image`` once, center-cropped to width:height's aspect ratio and scaled to width x height (one
    ffmpeg pass: :func:`fit_image`), and store that PNG at ``path``; on the decode pool, never the default one."""

    def decode_and_store() -> None:
        try:
            png = fit_image(image.data, width, height, param=image.field, max_pixels=MAX_INPUT_IMAGE_PIXELS)
        except InputError as exc:
            raise ParamError(image.field, exc.message, "media_error") from None
        _write_atomically(path, png)

    stopping = Unavailable(ctx.engine.retry_after_s, "stopping", "the server is shutting down; retry shortly")
    try:
        work = ctx.image_decoder.submit(decode_and_store)
    except RuntimeError:  # the pool is shut down: the server is stopping
        raise stopping from None
    try:
        await asyncio.wrap_future(work)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if work.cancelled() and not (task is not None and task.cancelling()):
            raise stopping from None  # the pool dropped it at shutdown; this request itself goes on
        # the request is gone: a decode not yet started is dropped, one under way leaves no file behind
        if not work.cancel():
            work.add_done_callback(lambda _: path.unlink(missing_ok=True))
        raise


def _write_atomically(path: Path, data: bytes) -> None:
    # a reader (a create request, a download) sees the old bytes or the new ones, never half
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    tmp.replace(path)


def resolve_upload(ctx: ServerContext, value: str) -> Path | None:
    """Our own upload URL (signed or not: knowing the unguessable name is the credential here, as for a Magic Hour
    ``api-assets/<token>`` path) -> the stored file, without a fetch. A link planted in the folder is not one."""
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
    stem = token.split(".")[0]
    for path in ctx.uploads_dir.glob(f"{stem}.*"):
        if not path.is_symlink() and path.is_file() and UPLOAD_NAME.fullmatch(path.name):
            return path
    return _fetch_shared_upload(ctx, stem)


def _fetch_shared_upload(ctx: ServerContext, stem: str) -> Path | None:
    """An upload another replica took (outputs in an object store: each replica has a folder of its own), copied
    from the store into this replica's uploads folder; None when there is none."""
    if ctx.output_store is None:
        return None
    try:
        names = [n for n in ctx.output_store.names(f"uploads/{stem}.") if UPLOAD_NAME.fullmatch(n.split("/", 1)[1])]
        data = ctx.output_store.read(names[0]) if names else None
    except Exception as exc:  # noqa: BLE001 - serving.outputs.OutputStoreError, one line
        log.warning("upload %s not fetched from the output store: %s", stem, exc)
        return None
    if not data:
        return None
    path = ctx.uploads_dir / names[0].split("/", 1)[1]
    _write_atomically(path, data)
    return path


# ---------------------------------------------------------------------------------------------- continuation


@dataclass(frozen=True)
class ContinuationInput:
    """What a request continues (MAGI-1 video-to-video): an earlier job of the same owner, from the clean latents it
    kept (``continue_from``: lossless), or a video given by URL, upload or data: URI (its first 32 frames are
    encoded, as the reference's v2v does). Read and checked by :func:`continuation_input`; stored for the job by
    :func:`build_params` once the whole request is valid. ``field``: the provider's name for what was given, which
    refusals name."""

    field: str
    source: Job | None = None  # continue_from: the completed job whose kept latents are continued
    video: bytes | None = None  # a video (sniffed as one, decodable, at least a few frames)
    video_extension: str = "mp4"
    source_format: tuple[str, str] | None = None  # the source's (resolution, aspect_ratio), when it is one of ours

    @property
    def resolution(self) -> str | None:
        """The source job's resolution tier: a continuation's default (None: a video, or an unlisted size)."""
        return None if self.source_format is None else self.source_format[0]

    @property
    def aspect_ratio(self) -> str | None:
        """The source job's aspect ratio: what "auto" means for a continuation."""
        return None if self.source_format is None else self.source_format[1]

    def check_size(self, width: int, height: int) -> None:
        """A continuation of a job runs at that job's size (its latents are that size): a 4xx naming the field."""
        source = self.source
        if source is not None and (source.params.width, source.params.height) != (width, height):
            said = f" ({self.source_format[0]}, {self.source_format[1]})" if self.source_format else ""
            raise ParamError(self.field, f"job {source.id} is {source.params.width}x{source.params.height}{said}, "
                                         f"this request {width}x{height}: a continuation keeps its source's size "
                                         "(leave resolution and aspect_ratio out, or give the source's)")

    def planned_paths(self, ctx: ServerContext) -> dict[str, str]:
        """The GenerationParams fields naming where :meth:`store` will put the job's copy of the input."""
        stem = ctx.uploads_dir / f"input-{uuid.uuid4().hex}"
        if self.source is not None:
            return {"prefix_latents_path": str(stem.with_suffix(".safetensors"))}
        return {"video_path": str(stem.with_suffix(f".{self.video_extension}"))}

    def store(self, ctx: ServerContext, params: GenerationParams) -> None:
        """Blocking: write the job's own copy of its input (the source's kept latents, or the video) where
        ``params`` names it, shared through the output store when there is one. The copy is the job's: it is
        removed with the job (janitor), whatever becomes of the source meanwhile."""
        if self.source is not None:
            data = _read_kept_latents(ctx, self.source.id)
            if data is None:
                raise ParamError(self.field, f"job {self.source.id} no longer has its latents (removed after the "
                                             "retention period, or with the job)")
            path = Path(params.prefix_latents_path)
        else:
            data, path = self.video, Path(params.video_path)
        _write_atomically(path, data)
        if ctx.output_store is not None:  # workers on other machines fetch it from there (serving/worker.py)
            _share_input(ctx, path)


MIN_VIDEO_FRAMES = 4  # a prefix video must give at least one latent frame (4 frames at 24 fps)


async def continuation_input(ctx: ServerContext, owner: str, *, continue_from: str | None = None,
                             video: str | None = None, variant: str | None = None,
                             continue_field: str = "continue_from",
                             video_field: str = "video") -> ContinuationInput | None:
    """The video a request continues, checked (None when it gives neither). Call it inside :func:`admitted` (it
    fetches), then pass the result to :func:`build_params` as ``continuation=``.

    ``continue_from``: the id of an earlier job of ``owner`` (another tenant's job, an unknown id and a removed job
    are all refused alike, so nothing leaks) that has completed, kept its latents, and ran on ``variant`` (the
    variant this request runs on: :attr:`Admission.variant_name`). ``video``: an http(s) URL (the image URLs'
    SSRF rules), one of our upload URLs or file paths, or a data: URI, holding an MP4/MOV or WebM video. Refusals
    are ParamError naming ``continue_field`` / ``video_field`` (the provider's names for the two)."""
    if continue_from is not None and video is not None:
        raise ParamError(continue_field, f"give either {continue_field} or {video_field}, not both")
    if continue_from is not None:
        continued = await asyncio.get_running_loop().run_in_executor(
            ctx.store_reader, _continued_job, ctx, owner, continue_from, variant, continue_field)
        # not on the store-reading thread: with an object store this is a request over the network
        if not await asyncio.to_thread(_has_kept_latents, ctx, continued.source.id):
            raise ParamError(continue_field, f"job {continued.source.id} kept no latents to continue from (made "
                                             "before they were kept, or its files were deleted)")
        return continued
    if video is not None:
        data, extension = await asyncio.to_thread(_read_video_field, ctx, video, video_field)
        return ContinuationInput(video_field, video=data, video_extension=extension)
    return None


_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def _continued_job(ctx: ServerContext, owner: str, job_id: str, variant: str | None,
                   field: str) -> ContinuationInput:
    job = None
    if _JOB_ID.fullmatch(job_id):
        job = ctx.store.get(job_id, owner=owner if ctx.settings.api_keys else None)
    if job is None:
        raise ParamError(field, f"no job {job_id[:64]!r} of yours to continue (unknown, another key's, or removed "
                                "after the retention period)", "not_found")
    if job.status is not JobStatus.COMPLETED:
        raise ParamError(field, f"job {job.id} is {job.status.value}; only a completed job can be continued")
    if variant is not None and job.variant is not None and job.variant != variant:
        raise ParamError(field, f"job {job.id} ran on {job.variant}, this request on {variant}: a job is continued "
                                "by the model variant that made it")
    return ContinuationInput(field, source=job, source_format=_listed_format(ctx, job.params.width,
                                                                             job.params.height))


def _listed_format(ctx: ServerContext, width: int, height: int) -> tuple[str, str] | None:
    """(resolution, aspect_ratio) whose size on this server is width x height; None for any other size."""
    for tier, aspect in RESOLUTION_SIZES:
        if output_size(tier, aspect, ctx.settings.resolution_scale) == (width, height):
            return tier, aspect
    return None


def _has_kept_latents(ctx: ServerContext, job_id: str) -> bool:
    return bool(_kept_latents(ctx, job_id, read=False))


def _read_kept_latents(ctx: ServerContext, job_id: str) -> bytes | None:
    """The bytes of a job's kept latents file (this replica's folder, else the output store), or None."""
    return _kept_latents(ctx, job_id, read=True) or None


def _kept_latents(ctx: ServerContext, job_id: str, *, read: bool) -> bytes | bool | None:
    """Whether a job's kept latents exist (``read=False``; the object store is asked without a download) or their
    bytes (``read=True``): in this replica's folder, else the output store."""
    name = kept_latents_name(job_id)
    try:
        if read:
            return read_output(ctx, name)
        path = ctx.outputs_dir / name
        if path.is_file() and not path.is_symlink():
            return True
        return ctx.output_store is not None and ctx.output_store.exists(name)
    except Exception as exc:  # noqa: BLE001 - serving.outputs.OutputStoreError, one line
        log.error("could not %s %s: %s", "read" if read else "look up", name, exc)
        raise Unavailable(10.0, str(exc), "the server cannot read its output store now; retry later") from None


def _read_video_field(ctx: ServerContext, value: str, field_name: str) -> tuple[bytes, str]:
    """A video given as an http(s) URL (SSRF rules as for images), a data: URI, or one of our uploads: its bytes
    and extension, once it sniffs as a video and decodes to at least :data:`MIN_VIDEO_FRAMES` frames."""
    local = resolve_upload(ctx, value)
    with _media_field(field_name):
        if local is not None:
            data = read_path(local, param=field_name, max_bytes=MAX_VIDEO_BYTES)
        elif value.startswith(("http://", "https://", "data:")):
            data = open_source(value, param=field_name, max_bytes=MAX_VIDEO_BYTES, policy=ctx.media_policy)
        else:
            raise ParamError(field_name, "must be an http(s) URL, a data: URI or an upload's URL")
        kind = sniff_media(data[:64])
        if kind is None or kind.family != "video":
            raise ParamError(field_name, "must be an MP4/MOV or WebM video", "media_error")
        # decoded once, small and quickly, so a video that cannot be continued is refused now, not as a failed job
        frames = load_video(data, width=16, height=16, max_frames=MIN_VIDEO_FRAMES, param=field_name)
    if len(frames) < MIN_VIDEO_FRAMES:
        raise ParamError(field_name, f"has {len(frames)} frame(s) at 24 fps; a video to continue needs at least "
                                     f"{MIN_VIDEO_FRAMES}", "media_error")
    return data, kind.extension


# --------------------------------------------------------------------------------------------------- uploads


def media_kind_of(data: bytes) -> MediaKind:
    """The sniffed image/video kind of uploaded bytes (serving.files.sniff_media); a 415 for anything else, so no
    HTML, SVG or script is ever stored to be served from our origin."""
    kind = sniff_media(data[:64])
    if kind is None:
        raise HTTPException(415, f"unsupported file type: an upload must be {ACCEPTED_KINDS} (judged by its "
                                 f"content, not its name)")
    return kind


def save_upload(ctx: ServerContext, data: bytes, suffix: str, owner: str = "") -> Path:
    """Store uploaded bytes as ``<token>.<ext>`` in the uploads folder; returns the path. The token is unguessable
    and carries an owner tag (FileSigner.upload_token): the owner's key reads it back without a signed URL. Bytes
    are stored only when they sniff as an image or video (its extension then follows the content); empty bytes are a
    ticket's placeholder, named with the client's ``suffix``."""
    if data:
        safe_suffix = media_kind_of(data).extension
    else:
        safe_suffix = "".join(ch for ch in suffix.lower() if ch.isalnum())[:8] or "bin"
    path = ctx.uploads_dir / f"{ctx.signer.upload_token(owner)}.{safe_suffix}"
    _write_atomically(path, data)
    if data and ctx.output_store is not None:  # replicas on other machines read it from there (resolve_upload)
        _share_input(ctx, path)
    return path


@dataclass(frozen=True)
class UploadTicket:
    """A presigned upload (WaveSpeed's and Magic Hour's flows): one PUT of ``name`` until ``expires`` (unix
    seconds), to the API's PUT route for ``token`` with ``query`` appended. Everything the PUT needs is in its URL
    (signed with the URL secret), so any API replica takes it, not only the one that issued it."""

    token: str  # the file's stem: unguessable, tagged with its owner (FileSigner.upload_token)
    name: str  # <token>.<extension> in the uploads folder
    expires: int
    query: str


def open_upload(ctx: ServerContext, api: str, suffix: str, owner: str = "") -> UploadTicket:
    """A presigned-URL ticket: an empty placeholder fixes the file's name (an unused one is removed by the janitor
    once old); :func:`receive_upload` takes the bytes."""
    path = save_upload(ctx, b"", suffix, owner)
    expires = int(time.time() + UPLOAD_URL_TTL_S)
    extension = path.suffix.lstrip(".")
    signature = ctx.signer.sign_upload(api, path.name, expires)
    return UploadTicket(path.stem, path.name, expires, f"?ext={extension}&exp={expires}&sig={signature}")


async def receive_upload(ctx: ServerContext, api: str, token: str, request: Request) -> None:
    """The PUT of a ticket's bytes: unauthenticated (the SDKs PUT with a bare HTTP client, so the signed,
    unguessable URL is the credential), one per ticket; 404 for an unknown, expired or used one, 413 above the size
    limit, 415 for bytes that are not an image or video (the ticket stays open for a right one)."""
    query = request.query_params
    name = f"{token}.{query.get('ext', '')}"
    if (not UPLOAD_NAME.fullmatch(name)
            or ctx.signer.check_upload(api, name, query.get("exp", ""), query.get("sig", "")) != "valid"):
        raise HTTPException(404, "unknown or expired upload URL")
    path = ctx.uploads_dir / name
    if await asyncio.to_thread(_holds_bytes, path):
        raise HTTPException(404, "this upload URL was used already")
    data = bytearray()
    async for part in request.stream():
        data.extend(part)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"upload larger than {MAX_UPLOAD_BYTES} bytes")
    media_kind_of(bytes(data[:64]))
    await asyncio.to_thread(_write_atomically, path, bytes(data))
    if ctx.output_store is not None:  # replicas on other machines read it from there (resolve_upload)
        await asyncio.to_thread(_share_input, ctx, path)


def _holds_bytes(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ submitting


async def build_params(ctx: ServerContext, *, prompt: str, image: ImageInput | None, resolution: str, aspect: str,
                       num_frames: int, steps: int, seed: int | None, fields: Mapping[str, str],
                       limits: ModelLimits | None = None, prompts: Sequence[str] | None = None,
                       window_size: int | None = None, safety_check: bool = True,
                       continuation: ContinuationInput | None = None) -> GenerationParams:
    """A provider request as the contract's GenerationParams, checked by :func:`validate` against the served
    model's limits; a refusal names the provider's field (``fields`` maps the contract's parameter names to the
    provider's). The input image ("auto" takes the aspect ratio from its header) is decoded and stored at the
    output's size only once the request is valid, so a refused request leaves nothing behind. ``safety_check``:
    run the server's safety checker (if it has one) on the output. ``continuation``: the video or earlier job the
    request continues (:func:`continuation_input`), stored for the job once the request is valid. ``prompts``: the
    chunk-wise captions, which replace ``prompt`` (a refusal about the prompt then names the ``prompts`` field)."""
    if prompts:
        fields = {**fields, "prompt": "prompts"}
    if num_frames > ctx.settings.max_num_frames:
        raise ParamError(fields.get("num_frames", "num_frames"),
                         f"at most {ctx.settings.max_num_frames} frames on this server (--max-frames), got "
                         f"{num_frames}")
    if aspect == "auto" and continuation is not None and continuation.aspect_ratio is not None:
        aspect = continuation.aspect_ratio  # a continuation keeps its source's shape
    if aspect == "auto":
        aspect = nearest_aspect(image.width, image.height) if image is not None else "16:9"
    width, height = output_size(resolution, aspect, ctx.settings.resolution_scale)
    continued: dict[str, str] = {}
    if continuation is not None:
        continuation.check_size(width, height)
        continued = continuation.planned_paths(ctx)
        fields = {**fields, "video": continuation.field, "continue_from": continuation.field}
    image_path = ctx.uploads_dir / f"input-{uuid.uuid4().hex}.png" if image is not None else None
    try:
        params = validate(GenerationParams(
            prompts=tuple(prompts) if prompts else (prompt,), width=width, height=height, num_frames=num_frames,
            num_inference_steps=steps, seed=resolve_seed(seed), window_size=window_size,
            image_path=None if image_path is None else str(image_path), trim_to_frames=True,
            safety_check=safety_check, **continued,
        ), ctx.limits if limits is None else limits)
    except ParamError as exc:
        raise ParamError(fields.get(exc.param, exc.param), exc.message, exc.kind) from None
    if image is not None:
        await store_input_image(ctx, image, image_path, width, height)
        if ctx.output_store is not None:  # workers on other machines fetch it from there (serving/worker.py)
            await asyncio.to_thread(_share_input, ctx, image_path)
    if continuation is not None:
        await asyncio.to_thread(continuation.store, ctx, params)
    return params


def _share_input(ctx: ServerContext, path: Path) -> None:
    """A copy of a stored input image or upload in the object store, as ``uploads/<name>`` (the local one stays:
    this replica's file routes serve it)."""
    copy = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        copy.write_bytes(path.read_bytes())
        ctx.output_store.publish(copy, f"uploads/{path.name}")
    except Exception as exc:  # noqa: BLE001 - serving.outputs.OutputStoreError, one line
        copy.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        log.error("could not share an input image: %s", exc)
        raise Unavailable(30.0, str(exc), "the server cannot store input images now; retry later") from None


async def enhance_prompt(ctx: ServerContext, prompt: str, field: str) -> str:
    """The prompt rewritten by the configured enhancer (on a worker thread: a generation takes a while). A request
    that asks for it on a server without one is refused naming ``field``, never silently served as is."""
    if ctx.prompt_enhancer is None:
        raise ParamError(field, "this server has no prompt enhancer (start it with --prompt-enhancer PATH); leave "
                                "it out or set it to false")
    try:
        return await asyncio.to_thread(ctx.prompt_enhancer.enhance, prompt)
    except Exception as exc:  # noqa: BLE001 - the model's failure is the server's, not the request's
        log.error("prompt enhancer failed: %s", exc)
        raise Unavailable(10.0, str(exc), f"the prompt enhancer failed ({exc}); retry, or leave {field} out") from None


def fingerprint(*parts) -> str:
    """What makes two submits "the same request" for an Idempotency-Key: the route and the validated body."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Admission:
    """A submit let in by :func:`admitted`: it holds a queue slot of its variant's engine until :meth:`commit`
    hands it to the job (or the submit ends without a job and the slot is given back). ``choice``: the variant
    the route runs and the model name responses give (serving.routing; None on a context without a router)."""

    def __init__(self, ctx: ServerContext, owner: str, idempotency_key: str | None, engine, choice) -> None:
        self.ctx, self.owner, self.idempotency_key = ctx, owner, idempotency_key
        self.engine, self.choice = engine, choice
        self._holds_slot = True

    @property
    def limits(self) -> ModelLimits:
        """What the request is validated against: its variant's limits (and this server's prompt cap)."""
        if self.choice is None:
            return self.ctx.limits
        return replace(self.choice.variant.limits, max_prompt_chars=self.ctx.settings.max_prompt_chars)

    @property
    def variant_name(self) -> str | None:
        """The served variant that will run this submit (None on a context without a router)."""
        return None if self.choice is None else self.choice.variant.name

    def model(self, route: str) -> str:
        """The model name this submit's responses give: the route's own id, or the variant that runs instead."""
        return route if self.choice is None else self.choice.model

    def release(self) -> None:
        if self._holds_slot:
            self._holds_slot = False
            self.engine.unreserve()

    async def commit(self, *, api: str, model: str, params: GenerationParams, meta: dict | None = None,
                     request_fingerprint: str = "") -> Job:
        """Store the job durably and hand it to the engine. With an Idempotency-Key, a repeat of an earlier submit
        (same key and ``request_fingerprint``) answers that submit's job and starts nothing; the key with another
        request raises IdempotencyConflict. A request that made no job leaves nothing stored (its input image is
        removed) and gives its slot back."""
        self._holds_slot = False  # _commit owns the slot now, and settles it even if this request is cancelled
        variant = None if self.choice is None else self.choice.variant.name
        return await asyncio.to_thread(_commit, self.ctx, self.engine, api=api, model=model, params=params,
                                       owner=self.owner, meta=meta, idempotency_key=self.idempotency_key,
                                       request_fingerprint=request_fingerprint, variant=variant)


@asynccontextmanager
async def admitted(ctx: ServerContext, *, owner: str, idempotency_key: str | None = None,
                   route: str | None = None, variant: str | None = None) -> AsyncIterator[Admission]:
    """Admission, before the request costs anything (no fetch, no decode, nothing stored): the route must have a
    variant to run it (else UnservedRoute: a 4xx naming the served variants), its engine must take work (else
    Unavailable: 503), a queue slot is reserved (else Overloaded: 429) and the owner must be under its key quota
    (Overloaded). Inside the block the request reads its image and commits; a block that ends without
    :meth:`Admission.commit` gives the slot back. ``variant``: a served variant the request named itself (the
    OpenAI adapter's ``model``): it runs, under its own name, instead of the route's choice."""
    named = ctx.router.variant(variant) if ctx.router is not None else None
    if named is not None:
        choice = Choice(named, named.name)
    else:
        choice = ctx.router.resolve(route) if ctx.router is not None and route is not None else None
    engine = ctx.engine_for(None if choice is None else choice.variant.name)
    if not engine.accepting():
        _count_rejection(ctx, "engine_dead")
        if engine.draining:
            raise Unavailable(engine.retry_after_s, "draining",
                              "the server is shutting down; retry shortly (another instance may take it)")
        # reliability goal 11: no job is accepted into a dead GPU loop (readiness is already 503)
        raise Unavailable(engine.retry_after_s, engine.dead_reason or "the GPU loop is not running")
    try:
        engine.try_reserve()
    except QueueFullError as exc:
        _count_rejection(ctx, "queue_full")
        raise Overloaded(exc.retry_after_s) from None
    admission = Admission(ctx, owner, idempotency_key, engine, choice)
    try:
        quota = ctx.key_quota
        # a cheap look at the owner's jobs (the store's create(quota=) stays the final word). Skipped with an
        # Idempotency-Key: a replay is never refused, and the queue slot already bounds what the request may cost
        if quota is not None and idempotency_key is None:
            active = len(await asyncio.to_thread(ctx.store.list, (JobStatus.QUEUED, JobStatus.RUNNING),
                                                 limit=quota, owner=owner))
            if active >= quota:
                _count_rejection(ctx, "key_quota")
                raise Overloaded(engine.retry_after_s, str(QuotaExceeded(active, quota)))
        yield admission
    finally:
        admission.release()


def _count_rejection(ctx: ServerContext, reason: str) -> None:
    if ctx.metrics is not None:
        ctx.metrics.jobs_rejected.labels(reason=reason).inc()


def _commit(ctx: ServerContext, engine, *, api: str, model: str, params: GenerationParams, owner: str,
            meta: dict | None, idempotency_key: str | None, request_fingerprint: str, variant: str | None) -> Job:
    """:meth:`Admission.commit`'s blocking part; it settles the queue slot the submit holds in ``engine``."""
    try:
        job, created = Job.new(api, model, params, owner=owner, meta=meta or {}, variant=variant), True
        bounds = {"quota": ctx.key_quota, "max_queued": ctx.store_queue_bound}
        if idempotency_key is None:
            job = ctx.store.create(job, **bounds)
        else:
            job, created = ctx.store.create_idempotent(job, idempotency_key, request_fingerprint,
                                                       ttl_s=IDEMPOTENCY_TTL_S, **bounds)
    except (QuotaExceeded, QueueFull) as exc:
        engine.unreserve()
        _discard_input(params)
        _count_rejection(ctx, "key_quota" if isinstance(exc, QuotaExceeded) else "queue_full")
        raise Overloaded(engine.retry_after_s, str(exc)) from None
    except BaseException:
        engine.unreserve()
        _discard_input(params)
        raise
    if not created:  # a repeat: the first submit's job stands
        engine.unreserve()
        _discard_input(params)
        return job
    engine.submit(job.id, job.params, reserved=True)
    if ctx.metrics is not None:
        ctx.metrics.jobs_submitted.labels(api=api).inc()
    ctx.hub.publish(job.id, "status", status=JobStatus.QUEUED)
    return job


def _discard_input(params: GenerationParams) -> None:
    for stored in (params.image_path, params.video_path, params.prefix_latents_path):
        if stored:
            Path(stored).unlink(missing_ok=True)


def iso_time(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int((ts % 1) * 1000):03d}Z"
