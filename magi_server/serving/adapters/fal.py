"""fal's queue and sync protocol (fal-client 1.0.3), for the MAGI apps: api-compat.md §3.

Owns: the fal app table (``fal-ai/magi/image-to-video``, ``fal-ai/magi-distilled`` and the two cheap siblings
``fal-ai/magi`` and ``fal-ai/magi-distilled/image-to-video``), the fal input schema -> GenerationParams, the queue
routes (submit, status, result, cancel) and the sync route, ``Authorization: Key`` auth, and fal's response and
error shapes. It is mounted twice by ``server.create_app``: on the queue listener (``sync=False``) and on the sync
listener (``sync=True``), because fal-client posts to the same ``/{app_id}`` path on both and tells them apart only
by host:port.

Wire rules that drive the code below:

* fal-client hard-codes ``https://`` and uses the URLs we return verbatim, so every URL we hand out (queue URLs,
  the output video) is built from the request's own scheme and host: whatever host:port the client reached us on,
  and trusts the certificate of, is where it comes back to.
* fal-client replays 502/503/504 answers that carry no ``x-fal-request-id`` (it takes them for ingress errors), so
  every answer of this router carries that header, including the 5xx of a failed job and of a bug.
* Bad input is a 422 ``{"detail": [{"loc": ["body", field], "msg", "type"}]}`` (FastAPI style; fal-client
  raises ``FalClientHTTPError`` with ``detail`` as the message), raised before anything is stored, never a 5xx.
* A failed or cancelled request still reports status ``COMPLETED`` (with ``error`` / ``error_type``); its error
  reaches the client through the result call's status code.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from dataclasses import dataclass
from types import MappingProxyType

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from magi_server.serving.common import (
    ASPECT_CHOICES,
    FieldError,
    Overloaded,
    ServerContext,
    Unavailable,
    find_job,
    image_params,
    iso_time,
    opt_bool,
    opt_enum,
    opt_int,
    read_image_field,
    req_str,
    resolve_seed,
    submit_job,
    wait_for_terminal_async,
)
from magi_server.serving.jobs import Job, JobStatus
from magi_server.params import GenerationParams

log = logging.getLogger("magi_server.serving.adapters.fal")

REQUEST_ID_HEADER = "x-fal-request-id"
MAX_FAL_SEED = 2**32 - 1  # api-compat.md §5: fal seeds outside [0, 2^32 - 1] are refused
MAX_IMAGE_URL_CHARS = 30_000_000  # a data: URI carries the whole image; the body limit caps it anyway
DISCONNECT_POLL_S = 0.25  # how often a waiting sync request looks whether its client hung up


@dataclass(frozen=True)
class FalApp:
    app_id: str
    needs_image: bool  # image-to-video: image_url required; text-to-video apps ignore it like any unknown field
    steps: tuple[int, ...]

    @property
    def base(self) -> str:
        """``owner/alias``: where fal-client builds status/result/cancel URLs (``fal-ai/magi`` for
        ``fal-ai/magi/image-to-video``)."""
        return app_base(self.app_id)


# The two seed apps (api-compat.md §3.5) and two siblings that cost nothing once the routing exists. Every one runs
# the loaded model: the server holds one checkpoint, whatever the app name says (api-compat.md §8.2).
FAL_APPS = (
    FalApp("fal-ai/magi/image-to-video", needs_image=True, steps=(4, 8, 16, 32, 64)),
    FalApp("fal-ai/magi", needs_image=False, steps=(4, 8, 16, 32, 64)),
    FalApp("fal-ai/magi-distilled", needs_image=False, steps=(4, 8, 16, 32)),
    FalApp("fal-ai/magi-distilled/image-to-video", needs_image=True, steps=(4, 8, 16, 32)),
)
DEFAULT_NUM_FRAMES = 96  # the fal schema's own defaults (not the server's hosted-API defaults: fal exposes them)
DEFAULT_STEPS = 16
DEFAULT_RESOLUTION = "720p"

# job error_code -> (HTTP status of the result call, fal error_type). The 5xx carry x-fal-request-id, so fal-client
# raises at once instead of replaying them.
FAILURE_STATUS = MappingProxyType({
    "invalid_input": (422, "validation_error"),
    "media": (422, "validation_error"),
    "cancelled": (400, "request_cancelled"),
    "timeout": (504, "request_timeout"),
    "oom": (500, "out_of_memory"),
    "interrupted": (500, "interrupted"),
    "internal": (500, "internal_error"),
})
# names the pipeline uses in its InputError messages -> the fal field a client should fix
PIPELINE_FIELDS = MappingProxyType({
    "prompt": "prompt", "image": "image_url", "num_frames": "num_frames", "num_inference_steps": "num_inference_steps",
    "seed": "seed", "width": "resolution", "height": "resolution",
})
_ASCII_INT = re.compile(r"[+-]?[0-9]{1,30}")


def app_base(app_id: str) -> str:
    return "/".join(app_id.split("/")[:2])


class InvalidInput(Exception):
    """One or more fields are invalid; ``errors`` is FastAPI's ``detail`` list."""

    def __init__(self, errors: list[dict]) -> None:
        super().__init__(f"{len(errors)} invalid field(s)")
        self.errors = errors


# --------------------------------------------------------------------------------------------------- responses


def detail_error(field: str | None, message: str, kind: str, where: str = "body") -> dict:
    return {"loc": [where, field] if field else [where], "msg": message, "type": kind}


def fal_json(body, status_code: int = 200, request_id: str | None = None, headers: dict | None = None) -> JSONResponse:
    response = JSONResponse(body, status_code=status_code, headers=headers)
    if request_id:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


def invalid(errors: list[dict]) -> JSONResponse:
    return fal_json({"detail": errors}, 422)


class FalRoute(APIRoute):
    """Every answer of the fal routes carries ``x-fal-request-id`` (a fresh id when the handler set none), and an
    unexpected exception becomes a logged 500 with that header rather than the app-wide handler's bare 500."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def with_request_id(request: Request) -> Response:
            try:
                response = await handler(request)
            except HTTPException as exc:
                response = fal_json({"detail": exc.detail}, exc.status_code, headers=exc.headers)
            except Exception:
                if not getattr(request.state, "fal_body_read", True):
                    # raised while receiving the body: it belongs to the layer that raised it (the server's
                    # body-size limit), not to this route, so it must not be dressed up as our own 500
                    raise
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                response = fal_json({"detail": "internal error; see the server log", "error_type": "internal_error"},
                                    500)
            if REQUEST_ID_HEADER not in response.headers:
                response.headers[REQUEST_ID_HEADER] = uuid.uuid4().hex
            return response

        return with_request_id


# ------------------------------------------------------------------------------------------------------- input


def _int_field(body: dict, name: str, *, low: int, high: int, default: int | None) -> int | None:
    """opt_int, plus pydantic's lax numeric strings ("16"), limited to ASCII digits: str.isdigit() also accepts
    "²" or "١", which int() then refuses or reads in another script, and a 5000-digit string trips int()'s limit."""
    value = body.get(name)
    if isinstance(value, str):
        text = value.strip()
        if not _ASCII_INT.fullmatch(text):
            raise FieldError(name, f"must be an integer in [{low}, {high}], got {value[:40]!r}", "type_error")
        return opt_int({name: int(text)}, name, low=low, high=high, default=default)
    return opt_int(body, name, low=low, high=high, default=default)


def _image_url(body: dict) -> str:
    value = body.get("image_url")
    if value is None:
        raise FieldError("image_url", "field required", "missing")
    if not isinstance(value, str):
        raise FieldError("image_url", f"must be a string, got {type(value).__name__}", "type_error")
    # the other shapes read_image_field knows (bare base64, upload tokens) are WaveSpeed/Magic Hour extensions
    if not value[:8].lower().startswith(("http://", "https://", "data:")):
        raise FieldError("image_url", "must be an http(s) URL or a data: URI", "value_error")
    if len(value) > MAX_IMAGE_URL_CHARS:
        raise FieldError("image_url", f"is longer than {MAX_IMAGE_URL_CHARS} characters")
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value) or "\x00" in value:
        raise FieldError("image_url", "contains invalid characters")
    return value


def parse_input(ctx: ServerContext, app: FalApp, body) -> GenerationParams:
    """fal input JSON -> GenerationParams. Collects every invalid field (FastAPI reports them all), then fetches
    and stores the image only once the rest is valid. Raises InvalidInput. Blocking: run it in a thread."""
    if not isinstance(body, dict):
        raise InvalidInput([detail_error(None, "Input should be a valid dictionary (a JSON object)", "dict_type")])
    errors: list[dict] = []

    def check(parse):
        try:
            return parse()
        except FieldError as exc:
            errors.append(detail_error(exc.field, exc.message, exc.kind))
            return None

    def steps() -> int:
        value = _int_field(body, "num_inference_steps", low=min(app.steps), high=max(app.steps), default=DEFAULT_STEPS)
        if value not in app.steps:
            raise FieldError("num_inference_steps",
                             f"must be one of {', '.join(map(str, app.steps))} for {app.app_id}, got {value}")
        return value

    prompt = check(lambda: req_str(body, "prompt", max_chars=ctx.settings.max_prompt_chars))
    image_ref = check(lambda: _image_url(body)) if app.needs_image else None
    num_frames = check(lambda: _int_field(body, "num_frames", low=96, high=192, default=DEFAULT_NUM_FRAMES))
    seed = check(lambda: _int_field(body, "seed", low=0, high=MAX_FAL_SEED, default=None))
    resolution = check(lambda: opt_enum(body, "resolution", ("480p", "720p"), DEFAULT_RESOLUTION))
    aspect = check(lambda: opt_enum(body, "aspect_ratio", ASPECT_CHOICES, "auto"))
    num_steps = check(steps)
    # accepted for schema parity; no safety classifier runs here (README)
    check(lambda: opt_bool(body, "enable_safety_checker", True))
    if errors:
        raise InvalidInput(errors)

    image = None
    if image_ref is not None:
        try:
            image = read_image_field(ctx, image_ref, "image_url")
        except FieldError as exc:
            raise InvalidInput([detail_error("image_url", exc.message, exc.kind)]) from None
        except Exception:  # a fetch failure the loader did not classify is still the URL's fault, not a 5xx
            log.warning("image_url could not be read", exc_info=True)
            raise InvalidInput([detail_error("image_url", "could not be fetched or decoded", "media_error")]) from None
    try:
        width, height, image_path = image_params(ctx, image, resolution, aspect)
    except FieldError as exc:
        raise InvalidInput([detail_error(exc.field, exc.message, exc.kind)]) from None
    return GenerationParams(
        prompts=(prompt,), width=width, height=height, num_frames=num_frames, num_inference_steps=num_steps,
        seed=resolve_seed(seed), image_path=image_path, trim_to_frames=True,
    )


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
    size = path.stat().st_size if path.is_file() else None
    return {
        "video": {"url": f"{base}/files/{name}", "content_type": "video/mp4", "file_name": name, "file_size": size},
        "seed": job.params.seed,
    }


def failure_response(job: Job) -> JSONResponse:
    """The result call of a failed or cancelled request: the status code and body the model run ended with."""
    status, error_type = FAILURE_STATUS.get(job.error_code, (500, "internal_error"))
    if status == 422:
        head, sep, rest = job.error.partition(": ")
        field = PIPELINE_FIELDS.get(head) if sep else None
        detail = [detail_error(field, rest if field else job.error, error_type)]
    elif job.status is JobStatus.CANCELLED:
        detail = "Request was cancelled"
    else:
        detail = job.error or "the request failed"
    return fal_json({"detail": detail, "error_type": error_type}, status, job.id,
                    headers={"x-fal-error-type": error_type})


def _log(ts: float | None, message: str, level: str = "INFO") -> dict:
    return {"message": message, "level": level, "source": "user", "timestamp": iso_time(ts)}


def job_logs(ctx: ServerContext, job: Job) -> list[dict]:
    """Progress lines from the durable record (so they survive a restart), timed by the event hub's chunk events
    when those carry a time ("ts"), else by the job's start."""
    p = job.params
    lines = []
    if job.started_at is not None:
        lines.append(_log(job.started_at, f"started: {p.num_frames} frames at {p.width}x{p.height}, "
                                          f"{p.num_inference_steps} steps, seed {p.seed}"))
    chunk_times = {e.get("index"): e.get("ts") for e in ctx.hub.since(job.id, 0) if e.get("event") == "chunk"}
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


def _api_key(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "key" or not token.strip():
        return None
    return token.strip()


def _flag(value: str | None) -> bool | None:
    if value is None:
        return False
    return {"true": True, "1": True, "false": False, "0": False}.get(value.strip().lower())


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
    router = APIRouter(route_class=FalRoute)

    def authorize(request: Request) -> tuple[JSONResponse | None, str]:
        key = _api_key(request)
        if ctx.settings.api_keys and not ctx.key_is_valid(key):
            return fal_json({"detail": "missing or invalid API key: send 'Authorization: Key <FAL_KEY>'"}, 401,
                            headers={"WWW-Authenticate": "Key"}), ""
        return None, ctx.owner_of(key)

    async def accept(request: Request, app: FalApp, owner: str) -> Job | JSONResponse:
        """Parse, validate and store a request; a Job, or the error answer (nothing stored then)."""
        request.state.fal_body_read = False
        try:
            raw = await request.body()
        except ClientDisconnect:
            return fal_json({"detail": "client disconnected"}, 499)
        request.state.fal_body_read = True

        def parse_and_submit() -> Job:
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a 5000-digit number, deep nesting
                raise InvalidInput([detail_error(None, f"the body is not valid JSON: {str(exc)[:200]}",
                                                 "json_invalid")]) from None
            params = parse_input(ctx, app, body)
            return submit_job(ctx, api="fal", model=app.app_id, params=params, owner=owner,
                              meta={"app": app.app_id})

        try:
            return await asyncio.to_thread(parse_and_submit)
        except InvalidInput as exc:
            return invalid(exc.errors)
        except Unavailable as exc:  # the GPU loop is down: not a full queue, and not worth a blind retry
            return fal_json({"detail": "the server is not ready (GPU loop down); retry later"}, 503,
                            headers={"Retry-After": str(max(1, int(exc.retry_after_s)))})
        except Overloaded as exc:
            return fal_json({"detail": "the queue is full; retry later"}, 429,
                            headers={"Retry-After": str(max(1, int(exc.retry_after_s)))})

    def find(request_id: str, owner: str, route_app: str) -> Job | None:
        job = find_job(ctx, request_id, owner, "fal")
        if job is None:
            return None
        app_id = job.meta.get("app", job.model)
        # the owner/alias form serves every app under it; the full-path form only its own app
        if route_app not in (app_id, app_base(app_id)):
            return None
        return job

    def not_found(request_id: str) -> JSONResponse:
        # never echo a client's path into a header (the wrapper adds a fresh x-fal-request-id)
        return fal_json({"detail": f"Request {request_id} not found"}, 404)

    # ------------------------------------------------------------------------------------------- submit / run
    def submit_route(app: FalApp):
        async def submit(request: Request):
            refused, owner = authorize(request)
            if refused is not None:
                return refused
            if request.query_params.get("fal_webhook"):
                # silently dropping it would leave the caller waiting for a callback that never comes
                return invalid([detail_error("fal_webhook", "webhooks are not supported by this server; poll "
                                             "status_url instead", "value_error", where="query")])
            job = await accept(request, app, owner)
            if isinstance(job, Response):
                return job
            position = ctx.engine.queue_position(job.id)
            body = {"status": "IN_QUEUE", "request_id": job.id, "gateway_request_id": job.id,
                    **queue_urls(base_url(request), job), "queue_position": 0 if position is None else position}
            return fal_json(body, 200, job.id)

        return submit

    def run_route(app: FalApp):
        async def run(request: Request):
            refused, owner = authorize(request)
            if refused is not None:
                return refused
            job = await accept(request, app, owner)
            if isinstance(job, Response):
                return job
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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ctx.settings.sync_timeout_s
        try:
            while not job.is_terminal:
                left = deadline - loop.time()
                if left <= 0:
                    return job
                job = await wait_for_terminal_async(ctx, job.id, min(DISCONNECT_POLL_S, left)) or job
                if not job.is_terminal and gone.done() and gone.result():
                    log.info("the sync client of %s hung up; cancelling it (nobody can fetch its result)", job.id)
                    cancel_job(job.id)
                    return None
            return job
        finally:
            gone.cancel()

    def queue_status_url(request: Request, job: Job) -> str | None:
        port = ctx.settings.fal_queue_port
        host = request.url.hostname
        if not port or not host:
            return None
        host = f"[{host}]" if ":" in host else host
        return queue_urls(f"{request.url.scheme}://{host}:{port}", job)["status_url"]

    def cancel_job(job_id: str) -> Job | None:
        cancelled = ctx.store.cancel(job_id)  # the row is final now; the engine stops the work at a safe point
        ctx.engine.cancel(job_id)
        return cancelled

    for app in FAL_APPS:
        handler = run_route(app) if sync else submit_route(app)
        router.add_api_route(f"/{app.app_id}", handler, methods=["POST"], name=f"fal {app.app_id}")

    if sync:
        return router

    # ----------------------------------------------------------------------------------- status / result / cancel
    def status_route(route_app: str):
        async def status(request_id: str, request: Request):
            refused, owner = authorize(request)
            if refused is not None:
                return refused
            with_logs = _flag(request.query_params.get("logs"))
            if with_logs is None:
                return invalid([detail_error("logs", "must be true, false, 1 or 0", "bool_parsing", where="query")])
            job = find(request_id, owner, route_app)
            if job is None:
                return not_found(request_id)
            body = status_body(ctx, job, base_url(request), with_logs)
            # real fal answers 202 while the request is pending and 200 once it is done (doc)
            return fal_json(body, 200 if body["status"] == "COMPLETED" else 202, job.id)

        return status

    def result_route(route_app: str):
        async def result(request_id: str, request: Request):
            refused, owner = authorize(request)
            if refused is not None:
                return refused
            job = find(request_id, owner, route_app)
            if job is None:
                return not_found(request_id)
            if not job.is_terminal:
                return fal_json({"detail": "Request is still in progress"}, 400, job.id)
            if job.status is JobStatus.COMPLETED:
                return fal_json(output_body(ctx, job, base_url(request)), 200, job.id)
            return failure_response(job)

        return result

    def cancel_route(route_app: str):
        async def cancel(request_id: str, request: Request):
            refused, owner = authorize(request)
            if refused is not None:
                return refused
            job = find(request_id, owner, route_app)
            if job is None:
                return fal_json({"status": "NOT_FOUND", "detail": f"Request {request_id} not found"}, 404)
            if not job.is_terminal and cancel_job(job.id) is not None:
                return fal_json({"status": "CANCELLATION_REQUESTED"}, 202, job.id)
            # terminal already, or it finished between the read and the cancel (the store refused the change)
            return fal_json({"status": "ALREADY_COMPLETED", "detail": f"Request {request_id} already completed"},
                            400, job.id)

        return cancel

    bases = sorted({app.base for app in FAL_APPS} | {app.app_id for app in FAL_APPS})
    for route_app in bases:
        root = f"/{route_app}/requests/{{request_id}}"
        router.add_api_route(f"{root}/status", status_route(route_app), methods=["GET"])
        router.add_api_route(root, result_route(route_app), methods=["GET"])
        router.add_api_route(f"{root}/cancel", cancel_route(route_app), methods=["PUT"])
    return router
