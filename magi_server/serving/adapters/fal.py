"""fal's queue and sync protocol (fal-client 1.0.3), for the MAGI apps: api-compat.md §3.

Owns: the fal app table (``fal-ai/magi/image-to-video``, ``fal-ai/magi-distilled`` and the two cheap siblings
``fal-ai/magi`` and ``fal-ai/magi-distilled/image-to-video``), their input models -> GenerationParams, the queue
routes (submit, status, result, cancel) and the sync route, ``Authorization: Key`` auth, and fal's response and
error shapes. It is mounted twice by ``app.create_app``: on the queue listener (``sync=False``) and on the sync
listener (``sync=True``), because fal-client posts to the same ``/{app_id}`` path on both and tells them apart only
by host:port.

Wire rules that drive the code below:

* fal-client hard-codes ``https://`` and uses the URLs we return verbatim, so every URL we hand out (queue URLs,
  the output video) is built from the request's own scheme and host: whatever host:port the client reached us on,
  and trusts the certificate of, is where it comes back to. The video URL is signed (serving.files): it is
  downloaded without the ``Authorization`` header.
* fal-client replays 502/503/504 answers that carry no ``x-fal-request-id`` (it takes them for ingress errors), so
  every answer of these listeners carries that header (the app's middleware), including the 5xx of a failed job
  and of a bug.
* Bad input is a 422 ``{"detail": [{"loc": ["body", field], "msg", "type"}]}`` (FastAPI style; fal-client
  raises ``FalClientHTTPError`` with ``detail`` as the message), raised before anything is stored, never a 5xx.
* The module has no ``from __future__ import annotations``: each app's submit route is annotated with that app's
  input model, which FastAPI must see as a class, not as a string to look up.
* A failed or cancelled request still reports status ``COMPLETED`` (with ``error`` / ``error_type``); its error
  reaches the client through the result call's status code.
"""
import asyncio
import json
import logging
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, Field, StrictBool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from magi_server.params import MAX_FRAMES, MAX_SEED, GenerationParams, ModelLimits, ParamError
from magi_server.serving.common import (
    MAX_IMAGE_REF_CHARS,
    AspectRatio,
    IdempotencyKey,
    Int,
    Prompt,
    ProviderRoute,
    Resolution,
    ContinuationInput,
    ServerContext,
    Text,
    admitted,
    continuation_input,
    api_key_auth,
    build_params,
    cancel_job,
    error_responses,
    fingerprint,
    iso_time,
    read_image_field,
    read_job,
    scene_prompts_field,
    window_size_field,
)
from magi_server.serving.events import wait_for_terminal
from magi_server.serving.jobs import Job, JobStatus
from magi_server.serving.webhooks import MAX_WEBHOOK_URL_CHARS, checked_webhook_url, delivery_view

log = logging.getLogger("magi_server.serving.adapters.fal")

REQUEST_ID_HEADER = "x-fal-request-id"
_ASCII_INT = re.compile(r"[+-]?[0-9]{1,30}")


# ---------------------------------------------------------------------------------------------- request models


def _numeric_string(value):
    # fal's inputs are pydantic's lax integers: "16" is 16. ASCII digits only: str.isdigit() also takes "²" or "١",
    # and a 5000-digit string would trip int()'s limit
    return int(value) if isinstance(value, str) and _ASCII_INT.fullmatch(value.strip()) else value


FalInt = Annotated[Int, BeforeValidator(_numeric_string)]
Steps = Annotated[Literal[4, 8, 16, 32, 64], BeforeValidator(_numeric_string)]
DistilledSteps = Annotated[Literal[4, 8, 16, 32], BeforeValidator(_numeric_string)]


class _Prompt(BaseModel):
    prompt: Prompt


class _ImagePrompt(_Prompt):
    # the other shapes read_image_field knows (bare base64, upload tokens) are WaveSpeed/Magic Hour extensions
    image_url: Text = Field(max_length=MAX_IMAGE_REF_CHARS, pattern=r"^(?i:https?://|data:)",
                            description="the first frame: an http(s) URL or a data: URI")


class _Options(BaseModel):
    # the fal schema's own defaults (not the server's hosted-API defaults: fal exposes them)
    num_frames: FalInt = Field(96, ge=96, le=MAX_FRAMES, description=(
        "96-192 as fal; extension: up to the server's --max-frames (default 1440)"))
    seed: FalInt | None = Field(None, ge=0, le=MAX_SEED, description="absent: random; the output carries the seed")
    resolution: Resolution = "720p"
    aspect_ratio: AspectRatio = Field("auto", description="auto: the image's; 16:9 without one")
    enable_safety_checker: StrictBool = Field(True, description=(
        "the server's safety checker (if it runs one: /health/ready) judges the output; a flagged request fails "
        "with a 422 content_policy_violation"))
    # extensions (MAGI-1 video-to-video): what the request continues; the output holds only the new frames
    video_url: Text | None = Field(None, max_length=MAX_IMAGE_REF_CHARS, pattern=r"^(?i:https?://|data:)",
                                   description="extension: a video to continue (its first 32 frames condition the "
                                               "new ones): an http(s) URL or a data: URI")
    continue_from: Text | None = Field(None, max_length=64, description=(
        "extension: the request_id of an earlier completed request of yours, continued losslessly from its last "
        "latent frames (kept for the retention period), at its size (resolution and aspect_ratio default to it)"))
    prompts: list[Prompt] | None = scene_prompts_field()
    window_size: FalInt | None = window_size_field()


# One model per app kind. The mixin order puts the fields in fal's schema order (prompt, image_url, num_frames, ...),
# which is the order a 422 lists them in. Unknown fields (image_url for a text app) are ignored, as fal does.
class TextToVideoInput(_Options, _Prompt):
    num_inference_steps: Steps = 16


class ImageToVideoInput(_Options, _ImagePrompt):
    num_inference_steps: Steps = 16


class DistilledTextToVideoInput(_Options, _Prompt):
    num_inference_steps: DistilledSteps = 16


class DistilledImageToVideoInput(_Options, _ImagePrompt):
    num_inference_steps: DistilledSteps = 16


class FalError(BaseModel):
    detail: str


ERRORS = error_responses(FalError, 401, 404, 410, 503)  # what any route may answer (and FastAPI's 422); others add theirs


@dataclass(frozen=True)
class FalApp:
    app_id: str
    input: type[BaseModel]

    @property
    def base(self) -> str:
        """``owner/alias``: where fal-client builds status/result/cancel URLs (``fal-ai/magi`` for
        ``fal-ai/magi/image-to-video``)."""
        return app_base(self.app_id)


# The two seed apps (api-compat.md §3.5) and two siblings that cost nothing once the routing exists. Every one runs
# the loaded model: the server holds one checkpoint, whatever the app name says (api-compat.md §8.2).
FAL_APPS = (
    FalApp("fal-ai/magi/image-to-video", ImageToVideoInput),
    FalApp("fal-ai/magi", TextToVideoInput),
    FalApp("fal-ai/magi-distilled", DistilledTextToVideoInput),
    FalApp("fal-ai/magi-distilled/image-to-video", DistilledImageToVideoInput),
)

# job error_code -> (HTTP status of the result call, fal error_type). The 5xx carry x-fal-request-id, so fal-client
# raises at once instead of replaying them.
FAILURE_STATUS = MappingProxyType({
    "invalid_input": (422, "validation_error"),
    "content_flagged": (422, "content_policy_violation"),  # the safety checker flagged the output (fal's type)
    "media": (422, "validation_error"),
    "cancelled": (400, "request_cancelled"),
    "timeout": (504, "request_timeout"),
    "oom": (500, "out_of_memory"),
    "interrupted": (500, "interrupted"),
    "internal": (500, "internal_error"),
})
# contract parameter -> the fal field a client should fix
FIELDS = MappingProxyType({
    "prompt": "prompt", "image": "image_url", "num_frames": "num_frames", "num_inference_steps": "num_inference_steps",
    "seed": "seed", "width": "resolution", "height": "resolution", "video": "video_url",
    "continue_from": "continue_from",
})


def app_base(app_id: str) -> str:
    return "/".join(app_id.split("/")[:2])


async def to_params(ctx: ServerContext, body: BaseModel, limits: ModelLimits | None = None,
                    continuation: ContinuationInput | None = None) -> GenerationParams:
    """A valid fal input -> GenerationParams (checked against ``limits``: the variant's that will run it); fetches
    the image and stores it at the working size. Raises ParamError naming the field."""
    image_url = getattr(body, "image_url", None)
    image = None if image_url is None else await read_image_field(ctx, image_url, "image_url")
    return await build_params(
        ctx, prompt=body.prompt, image=image,
        resolution=(body.resolution if "resolution" in body.model_fields_set or continuation is None
                    else continuation.resolution or body.resolution),
        aspect=body.aspect_ratio, num_frames=body.num_frames,
        steps=body.num_inference_steps, seed=body.seed, fields=FIELDS, limits=limits,
        safety_check=body.enable_safety_checker, continuation=continuation, prompts=body.prompts,
        window_size=body.window_size,
    )


# --------------------------------------------------------------------------------------------------- responses


def detail_error(field: str | None, message: str, kind: str, where: str = "body") -> dict:
    return {"loc": [where, field] if field else [where], "msg": message, "type": kind}


def fal_json(body, status_code: int = 200, request_id: str | None = None, headers: dict | None = None) -> JSONResponse:
    response = JSONResponse(body, status_code=status_code, headers=headers)
    if request_id:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


class FalRoute(ProviderRoute):
    """fal's refusals: ``{"detail": "<message>"}``, a bad field a 422 with FastAPI's ``detail`` list. An unexpected
    exception becomes a logged fal-style 500 here, inside the middleware that puts ``x-fal-request-id`` on every
    answer, rather than the app-wide handler's bare 500 outside it."""

    def refuse(self, status, message, headers=None):
        return fal_json({"detail": message}, status, headers=headers)

    def refuse_fields(self, errors):
        return fal_json({"detail": [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]}, 422)

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def or_internal_error(request: Request):
            try:
                return await handler(request)
            except ClientDisconnect:
                raise  # while receiving the body: the server's body-size limit has answered already
            except Exception:
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return fal_json({"detail": "internal error; see the server log", "error_type": "internal_error"}, 500)

        return or_internal_error


# ------------------------------------------------------------------------------------------------------ output


def base_url(request: Request) -> str:
    """scheme://host:port the client used (uvicorn honours X-Forwarded-Proto from trusted proxies)."""
    return str(request.base_url).rstrip("/")


def queue_urls(base: str, job: Job) -> dict:
    root = f"{base}/{app_base(job.meta.get('app', job.model))}/requests/{job.id}"
    return {"response_url": root, "status_url": f"{root}/status", "cancel_url": f"{root}/cancel"}


def output_body(ctx: ServerContext, job: Job, base: str) -> dict:
    name = job.outputs[0]
    path = ctx.outputs_dir / name
    size = path.stat().st_size if path.is_file() and not path.is_symlink() else None
    return {  # a signed URL: fal-client downloads it without the Authorization header
        "video": {"url": ctx.file_url(name, base=base), "content_type": "video/mp4", "file_name": name,
                  "file_size": size},
        "seed": job.params.seed,
        **({"variant": job.variant} if job.variant is not None else {}),  # the served model variant that ran it
    }


def failure_response(job: Job) -> JSONResponse:
    """The result call of a failed or cancelled request: the status code and body the model run ended with."""
    status, error_type = FAILURE_STATUS.get(job.error_code, (500, "internal_error"))
    if status == 422:
        # the job keeps the parameter its ParamError named; its text reads "<param>: <message>"
        field = FIELDS.get(job.error_param) if job.error_param else None
        message = job.error.removeprefix(f"{job.error_param}: ") if field else job.error
        detail = [detail_error(field, message, error_type)]
    elif job.status is JobStatus.CANCELLED:
        detail = "Request was cancelled"
    else:
        detail = job.error or "the request failed"
    return fal_json({"detail": detail, "error_type": error_type}, status, job.id,
                    headers={"x-fal-error-type": error_type})


def webhook_body(ctx: ServerContext, job: Job) -> dict:
    """What a fal webhook POSTs (api-compat.md §3.6): the result on success, the failure's status and body else."""
    common = {"request_id": job.id, "gateway_request_id": job.id}
    if job.status is JobStatus.COMPLETED:
        base = job.meta.get("webhook_base") or ctx.settings.base_url()
        return {**common, "status": "OK", "payload": output_body(ctx, job, base), "error": None}
    failure = failure_response(job)
    return {**common, "status": "ERROR", "error": f"Invalid status code: {failure.status_code}",
            "payload": json.loads(failure.body)}


def _log(ts: float | None, message: str, level: str = "INFO") -> dict:
    return {"message": message, "level": level, "source": "user", "timestamp": iso_time(ts)}


def job_logs(ctx: ServerContext, job: Job) -> list[dict]:
    """Progress lines from the durable record (so they survive a restart), timed by the event hub's chunk events
    while the hub keeps them, else by the job's start."""
    p = job.params
    lines = []
    if job.started_at is not None:
        lines.append(_log(job.started_at, f"started: {p.num_frames} frames at {p.width}x{p.height}, "
                                          f"{p.num_inference_steps} steps, seed {p.seed}"))
    chunk_times = {e.data["index"]: e.ts for e in ctx.hub.since(job.id) if e.kind == "chunk"}
    for k in range(job.progress_done):
        lines.append(_log(chunk_times.get(k) or job.started_at, f"chunk {k + 1}/{job.progress_total} done"))
    if job.status is JobStatus.COMPLETED:
        lines.append(_log(job.finished_at, f"completed in {(job.inference_ms or 0) / 1000:.2f} s"))
    elif job.status is JobStatus.FAILED:
        lines.append(_log(job.finished_at, f"failed: {job.error}", "ERROR"))
    elif job.status is JobStatus.CANCELLED:
        lines.append(_log(job.finished_at, "cancelled", "WARNING"))
    return lines


def status_body(ctx: ServerContext, job: Job, base: str, with_logs: bool) -> dict:
    body = {"request_id": job.id, **queue_urls(base, job)}
    if job.status is JobStatus.QUEUED:
        position = ctx.engine.queue_position(job.id)
        # None: the engine is handing it to the GPU this instant; it is next in any case
        body.update(status="IN_QUEUE", queue_position=0 if position is None else position, logs=None)
    elif job.status is JobStatus.RUNNING:
        body.update(status="IN_PROGRESS", logs=job_logs(ctx, job) if with_logs else None)
    else:
        body.update(status="COMPLETED", logs=job_logs(ctx, job) if with_logs else None, metrics={})
        if job.inference_ms is not None:
            body["metrics"]["inference_time"] = job.inference_ms / 1000.0
        if job.status is not JobStatus.COMPLETED:
            body["error"] = job.error or job.status.value
            body["error_type"] = FAILURE_STATUS.get(job.error_code, (500, "internal_error"))[1]
    return body


# ------------------------------------------------------------------------------------------------------ router


async def _client_gone(request: Request) -> bool:
    """True once the client has hung up; False when that cannot be told (then the request is never cancelled)."""
    try:
        while True:
            # a late empty body message can come first (uvicorn), then only http.disconnect
            if (await request.receive())["type"] == "http.disconnect":
                return True
    except Exception:  # e.g. a middleware that refuses a second body message: assume the client is still there
        log.debug("cannot watch the sync client for a disconnect", exc_info=True)
        return False


def build_router(ctx: ServerContext, *, sync: bool) -> APIRouter:
    """The fal routes of one listener: the queue API (``sync=False``) or the sync ``fal.run`` API (``sync=True``)."""
    router = APIRouter(route_class=FalRoute, responses=ERRORS, strict_content_type=False)
    tenant = api_key_auth(ctx, "Key")

    async def accept(app: FalApp, body: BaseModel, owner: str, idempotency_key: str | None,
                     webhook: dict | None = None) -> Job:
        """Admit (queue, quota: before the image is fetched or decoded), validate, store the image and the job
        (nothing stored when refused). ``webhook``: the job meta of a checked ``fal_webhook``."""
        async with admitted(ctx, owner=owner, idempotency_key=idempotency_key, route=app.app_id) as admission:
            continuation = await continuation_input(ctx, owner, continue_from=body.continue_from,
                                                    video=body.video_url, variant=admission.variant_name,
                                                    video_field="video_url")
            return await admission.commit(
                api="fal", model=admission.model(app.app_id),
                params=await to_params(ctx, body, admission.limits, continuation),
                meta={"app": app.app_id, **(webhook or {})},
                request_fingerprint=fingerprint(app.app_id, body.model_dump(mode="json"),
                                                *([webhook["webhook"]] if webhook else [])))

    async def find(request_id: str, owner: str, route_app: str) -> Job | None:
        job = await read_job(ctx, request_id, owner, "fal")
        if job is None:
            return None
        app_id = job.meta.get("app", job.model)
        # the owner/alias form serves every app under it; the full-path form only its own app
        if route_app not in (app_id, app_base(app_id)):
            return None
        return job

    async def found(request_id: str, owner: str, route_app: str) -> Job:
        job = await find(request_id, owner, route_app)
        if job is None:  # never echo a client's path into a header: the id goes into the body only
            raise HTTPException(404, f"Request {request_id} not found")
        return job

    # ------------------------------------------------------------------------------------------- submit / run
    def submit_route(app: FalApp):
        async def submit(request: Request, body: app.input, owner: str = Depends(tenant),
                         fal_webhook: str | None = Query(None, max_length=MAX_WEBHOOK_URL_CHARS, description=(
                             "POSTed the result once the request ends, signed with the key at "
                             "/.well-known/jwks.json")),
                         idempotency_key: IdempotencyKey = None):
            webhook = None
            if fal_webhook:
                try:
                    url = await checked_webhook_url(ctx, fal_webhook, "fal_webhook")
                except ParamError as exc:
                    raise RequestValidationError([{"loc": ("query", "fal_webhook"), "type": "value_error",
                                                   "msg": exc.message}]) from None
                webhook = {"webhook": url, "webhook_base": base_url(request)}
            job = await accept(app, body, owner, idempotency_key, webhook)
            position = ctx.engine.queue_position(job.id)
            answer = {"status": "IN_QUEUE", "request_id": job.id, "gateway_request_id": job.id,
                      **queue_urls(base_url(request), job), "queue_position": 0 if position is None else position}
            return fal_json(answer, 200, job.id)

        return submit

    def run_route(app: FalApp):
        async def run(request: Request, body: app.input, owner: str = Depends(tenant),
                      idempotency_key: IdempotencyKey = None):
            job = await accept(app, body, owner, idempotency_key)
            job = await wait_while_connected(request, job)
            if job is None:  # the client went away: nobody can fetch this result, so free the GPU
                return fal_json({"detail": "client disconnected"}, 499)
            if not job.is_terminal:
                detail = (f"the request did not finish within the server's sync limit of "
                          f"{ctx.settings.sync_timeout_s:g} s; it keeps running")
                queue = queue_status_url(request, job)
                if queue:
                    detail += f": poll {queue}"
                return fal_json({"detail": detail, "error_type": "request_timeout", "request_id": job.id}, 504,
                                job.id)
            if job.status is JobStatus.COMPLETED:
                return fal_json(output_body(ctx, job, base_url(request)), 200, job.id)
            return failure_response(job)

        return run

    async def wait_while_connected(request: Request, job: Job) -> Job | None:
        """Wait for the job until it ends or the sync cap passes; None when the client hung up first."""
        # Request.is_disconnected() cannot see a disconnect through the app's BaseHTTPMiddleware (the message is
        # lost when its zero-timeout probe is cancelled), so a task blocks on receive() instead: once the body has
        # been read, the only message left to arrive is http.disconnect.
        gone = asyncio.ensure_future(_client_gone(request))
        ended = asyncio.ensure_future(wait_for_terminal(ctx, job.id, ctx.settings.sync_timeout_s))
        try:
            await asyncio.wait((gone, ended), return_when=asyncio.FIRST_COMPLETED)
            if not ended.done() and gone.result():
                log.info("the sync client of %s hung up; cancelling it (nobody can fetch its result)", job.id)
                cancel_job(ctx, job.id)
                return None
            return await ended or job
        finally:
            gone.cancel()
            ended.cancel()

    def queue_status_url(request: Request, job: Job) -> str | None:
        port = ctx.settings.fal_queue_port
        host = request.url.hostname
        if not port or not host:
            return None
        host = f"[{host}]" if ":" in host else host
        return queue_urls(f"{request.url.scheme}://{host}:{port}", job)["status_url"]

    for app in FAL_APPS:
        handler = run_route(app) if sync else submit_route(app)
        router.add_api_route(f"/{app.app_id}", handler, methods=["POST"], name=f"fal {app.app_id}",
                             responses=error_responses(FalError, 409, 429, *((500, 504) if sync else ())))

    if sync:
        return router

    # ----------------------------------------------------------------------------------- status / result / cancel
    def status_route(route_app: str):
        async def status(request: Request, request_id: str, logs: bool = False, owner: str = Depends(tenant)):
            job = await found(request_id, owner, route_app)
            body = status_body(ctx, job, base_url(request), logs)
            # real fal answers 202 while the request is pending and 200 once it is done (doc)
            return fal_json(body, 200 if body["status"] == "COMPLETED" else 202, job.id)

        return status

    def result_route(route_app: str):
        async def result(request: Request, request_id: str, owner: str = Depends(tenant)):
            job = await found(request_id, owner, route_app)
            if not job.is_terminal:
                return fal_json({"detail": "Request is still in progress"}, 400, job.id)
            if job.status is JobStatus.COMPLETED:
                return fal_json(output_body(ctx, job, base_url(request)), 200, job.id)
            return failure_response(job)

        return result

    def cancel_route(route_app: str):
        async def cancel(request_id: str, owner: str = Depends(tenant)):
            job = await find(request_id, owner, route_app)
            if job is None:
                return fal_json({"status": "NOT_FOUND", "detail": f"Request {request_id} not found"}, 404)
            if not job.is_terminal and cancel_job(ctx, job.id) is not None:
                return fal_json({"status": "CANCELLATION_REQUESTED"}, 202, job.id)
            # terminal already, or it finished between the read and the cancel (the store refused the change)
            return fal_json({"status": "ALREADY_COMPLETED", "detail": f"Request {request_id} already completed"},
                            400, job.id)

        return cancel

    def webhook_log_route(route_app: str):
        async def webhook_log(request_id: str, owner: str = Depends(tenant)):
            """Extension: the request's webhook deliveries, each with its attempts (time, HTTP status, error)."""
            job = await found(request_id, owner, route_app)
            deliveries = await asyncio.to_thread(ctx.store.webhook_deliveries, job.id)
            return fal_json({"deliveries": [delivery_view(d) for d in deliveries]}, 200, job.id)

        return webhook_log

    bases = sorted({app.base for app in FAL_APPS} | {app.app_id for app in FAL_APPS})
    for route_app in bases:
        root = f"/{route_app}/requests/{{request_id}}"
        router.add_api_route(f"{root}/status", status_route(route_app), methods=["GET"])
        # the result of a failed request is the status it failed with (FAILURE_STATUS)
        router.add_api_route(root, result_route(route_app), methods=["GET"],
                             responses=error_responses(FalError, 400, 500, 504))
        router.add_api_route(f"{root}/cancel", cancel_route(route_app), methods=["PUT"],
                             responses=error_responses(FalError, 400))
        router.add_api_route(f"{root}/webhooks", webhook_log_route(route_app), methods=["GET"])
    return router
