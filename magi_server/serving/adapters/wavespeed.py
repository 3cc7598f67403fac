"""WaveSpeed v3 wire protocol (api-compat.md §1-2): the only place its quirks live.

Routes: ``POST /api/v3/<model>`` (one per served model id, e.g. ``wavespeed-ai/magi-1-24b``), the result routes
``GET /api/v3/predictions/{id}/result`` and ``GET /api/v3/predictions/{id}``, both upload flows, Bearer auth, sync
mode, and two extensions: ``POST /api/v3/predictions/{id}/cancel`` and ``GET /api/v3/predictions/{id}/events``
(Server-Sent Events: status, progress and a ``chunk`` event with the URL of each finished chunk's frames).
Every JSON answer is the envelope ``{code, message, data}``; errors use the same shape with the HTTP status as
``code`` and ``data: null``, and never contain "HTTP 5"/"HTTP 429" (the SDK would replay the task).
"""
from __future__ import annotations

import asyncio
import json
import mimetypes
import time
from pathlib import Path
from types import MappingProxyType

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from magi_server.serving.common import (
    ASPECT_CHOICES,
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
    opt_str,
    read_image_field,
    req_str,
    resolve_seed,
    save_upload,
    submit_job,
    wait_for_terminal_async,
)
from magi_server.serving.jobs import Job, JobStatus
from magi_server.params import GenerationParams

# public model ids this server answers to; all run the loaded model (the README says which variant that is)
WAVESPEED_MODELS = (
    "wavespeed-ai/magi-1-24b",
    "wavespeed-ai/magi-1-24b-distill",
    "wavespeed-ai/magi-1-4.5b",
    "wavespeed-ai/magi-1-4.5b-distill",
)
STATUS = MappingProxyType({
    JobStatus.QUEUED: "created",
    JobStatus.RUNNING: "processing",
    JobStatus.COMPLETED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
})
ERROR_CODES = MappingProxyType({  # WaveSpeed's documented task error codes
    "invalid_input": 1401,
    "media": 1402,
    "internal": 1403,
    "oom": 1403,
    "interrupted": 1405,
    "timeout": 5004,
    "cancelled": 1405,
})
MAX_UPLOAD_BYTES = 20 * 1024 * 1024


def envelope(data, code: int = 200, message: str = "success", status_code: int | None = None,
             headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message, "data": data}, status_code=status_code or code,
                        headers=headers)


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return envelope(None, code=status, message=message, headers=headers)




def _unauthorized() -> JSONResponse:
    return error(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                 headers={"WWW-Authenticate": "Bearer"})


def prediction_data(ctx: ServerContext, job: Job, *, base64_output: bool = False) -> dict:
    outputs: list[str] = []
    if job.status is JobStatus.COMPLETED:
        if base64_output or job.meta.get("base64_output"):
            import base64

            outputs = [base64.b64encode((ctx.outputs_dir / name).read_bytes()).decode() for name in job.outputs]
        else:
            outputs = [ctx.file_url(name) for name in job.outputs]
    data = {
        "id": job.id,
        "model": job.model,
        "outputs": outputs,
        "urls": {"get": f"{ctx.settings.base_url()}/api/v3/predictions/{job.id}/result"},
        "has_nsfw_contents": [False] * len(outputs),  # no safety classifier runs here (README)
        "status": STATUS[job.status],
        "created_at": iso_time(job.created_at),
        "error": job.error if job.status in (JobStatus.FAILED, JobStatus.CANCELLED) else "",
        "timings": {"inference": job.inference_ms or 0},
        "progress": {"chunks_done": job.progress_done, "chunks_total": job.progress_total},
        "seed": job.params.seed,
    }
    if job.status is JobStatus.FAILED:
        data["code"] = ERROR_CODES.get(job.error_code, 1403)
    return data


def parse_body(ctx: ServerContext, body: dict) -> tuple[GenerationParams, dict]:
    """WaveSpeed body -> GenerationParams (+ meta). Raises FieldError naming the field."""
    s = ctx.settings
    body = check_body(body)
    prompt = req_str(body, "prompt", max_chars=s.max_prompt_chars)
    image_ref = opt_str(body, "image", max_chars=30_000_000)
    seed = opt_int(body, "seed", low=-1, high=2147483647, default=-1)
    num_frames = opt_int(body, "num_frames", low=24, high=1440, default=s.default_num_frames)
    fps = opt_int(body, "frames_per_second", low=1, high=240, default=24)
    if fps != 24:
        raise FieldError("frames_per_second", f"MAGI-1 generates 24 fps video only, got {fps}")
    resolution = opt_enum(body, "resolution", ("480p", "720p"), s.default_resolution)
    aspect = opt_enum(body, "aspect_ratio", ASPECT_CHOICES, "auto")
    steps = opt_int(body, "num_inference_steps", low=4, high=256, default=s.default_steps)
    if steps % 4:
        raise FieldError("num_inference_steps", f"must be a multiple of 4 (the window has 4 chunks), got {steps}")
    opt_bool(body, "enable_safety_checker", True)
    base64_output = opt_bool(body, "enable_base64_output", False)
    opt_bool(body, "enable_sync_mode", False)
    image = None
    if image_ref:
        image = read_image_field(ctx, image_ref, "image")
    width, height, image_path = image_params(ctx, image, resolution, aspect)
    params = GenerationParams(
        prompts=(prompt,), width=width, height=height, num_frames=num_frames, num_inference_steps=steps, seed=resolve_seed(seed),
        image_path=image_path, trim_to_frames=True,
    )
    return params, {"base64_output": base64_output, "resolution": resolution}


def build_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    def _submit_handler(model_id: str):
        async def submit(request: Request):
            ok, owner = authorize_bearer(ctx, request.headers)
            if not ok:
                return _unauthorized()
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                return error(400, "body: must be a JSON object")
            webhook = request.query_params.get("webhook")
            if webhook:
                if isinstance(body, dict) and body.get("enable_base64_output"):
                    return error(400, "webhook callback does not support base64 output, please use the normal API "
                                      "to use base64 output")
                return error(400, "webhook: webhook delivery is not supported by this server; poll the result URL")
            try:
                params, meta = await asyncio.to_thread(parse_body, ctx, body)
                job = await asyncio.to_thread(submit_job, ctx, api="wavespeed", model=model_id, params=params,
                                              owner=owner, meta=meta)
            except FieldError as exc:
                return error(400, str(exc))
            except Unavailable as exc:
                # the reason (a device error text) stays in /health/ready and the log, not in client answers
                return error(503, "the server cannot run jobs now: the GPU loop is not running; retry later",
                             headers={"Retry-After": str(max(1, int(exc.retry_after_s)))})
            except Overloaded as exc:
                return error(429, "the queue is full; retry later",
                             headers={"Retry-After": str(max(1, int(exc.retry_after_s)))})
            if isinstance(body, dict) and body.get("enable_sync_mode") is True:
                job = await wait_for_terminal_async(ctx, job.id, ctx.settings.sync_timeout_s)
                data = prediction_data(ctx, job)
                if not job.is_terminal:
                    data.update(code=5004, error="Sync mode timed out; query the result later")
                return envelope(data)
            return envelope(prediction_data(ctx, job))

        return submit

    def _own_job(request: Request, job_id: str) -> Job | JSONResponse:
        """The caller's WaveSpeed job, or the 401/404 answer (another tenant's job is a 404: no existence oracle)."""
        ok, owner = authorize_bearer(ctx, request.headers)
        if not ok:
            return _unauthorized()
        job = find_job(ctx, job_id, owner, "wavespeed")
        if job is None:
            return error(404, f"prediction {job_id} not found")
        return job

    for model_id in WAVESPEED_MODELS:
        router.add_api_route(f"/api/v3/{model_id}", _submit_handler(model_id), methods=["POST"])

    @router.get("/api/v3/predictions/{job_id}/result")
    @router.get("/api/v3/predictions/{job_id}")
    async def result(job_id: str, request: Request):
        job = _own_job(request, job_id)
        if isinstance(job, JSONResponse):
            return job
        return envelope(prediction_data(ctx, job))

    @router.post("/api/v3/predictions/{job_id}/cancel")
    async def cancel(job_id: str, request: Request):
        job = _own_job(request, job_id)
        if isinstance(job, JSONResponse):
            return job
        if job.is_terminal:
            return error(400, f"prediction {job_id} already {STATUS[job.status]}")
        cancelled = ctx.store.cancel(job.id)
        ctx.engine.cancel(job.id)
        return envelope(prediction_data(ctx, cancelled or ctx.store.get(job.id)))

    @router.get("/api/v3/predictions/{job_id}/events")
    async def events(job_id: str, request: Request):
        job = _own_job(request, job_id)
        if isinstance(job, JSONResponse):
            return job
        return StreamingResponse(_event_stream(ctx, job.id, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------------------------------------ uploads
    @router.post("/api/v3/media/uploads")
    async def upload_ticket(request: Request):
        ok, _ = authorize_bearer(ctx, request.headers)
        if not ok:
            return _unauthorized()
        try:
            body = check_body(await request.json())
            filename = req_str(body, "filename", max_chars=255)
            size = opt_int(body, "size", low=0, high=MAX_UPLOAD_BYTES, default=0)
            content_type = opt_str(body, "content_type", max_chars=100) or mimetypes.guess_type(filename)[0] or ""
        except FieldError as exc:
            return error(413 if exc.field == "size" and "must be in" in exc.message else 400, str(exc))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "body: must be a JSON object")
        suffix = Path(filename).suffix.lstrip(".") or (content_type.split("/")[-1] if content_type else "bin")
        token, _ = await asyncio.to_thread(save_upload, ctx, b"", suffix)
        ctx.uploads[token] = {"size": size}
        base = ctx.settings.base_url()
        name = f"{token}.{_safe_suffix(suffix)}"
        headers = {"Content-Type": content_type} if content_type else {}
        return envelope({
            "upload": {"method": "PUT", "url": f"{base}/api/v3/media/upload/{token}", "headers": headers},
            "download_url": f"{base}/files/uploads/{name}",
        })

    @router.put("/api/v3/media/upload/{token}")
    async def upload_put(token: str, request: Request):
        # the URL itself is the credential (unguessable token); the SDK sends no Authorization here
        if token not in ctx.uploads:
            return error(404, "unknown or expired upload URL")
        data = bytearray()
        async for part in request.stream():
            data.extend(part)
            if len(data) > MAX_UPLOAD_BYTES:
                return error(413, f"upload larger than {MAX_UPLOAD_BYTES} bytes")
        matches = [p for p in ctx.uploads_dir.glob(f"{token}.*") if not p.name.startswith(".")]
        if not matches:
            return error(404, "unknown or expired upload URL")
        await asyncio.to_thread(matches[0].write_bytes, bytes(data))
        ctx.uploads.pop(token, None)
        return Response(status_code=200)

    @router.post("/api/v3/media/upload/binary")
    async def upload_binary(request: Request):
        ok, _ = authorize_bearer(ctx, request.headers)
        if not ok:
            return _unauthorized()
        try:
            form = await request.form(max_files=1, max_fields=10, max_part_size=MAX_UPLOAD_BYTES)
        except Exception:
            return error(400, "file: send multipart/form-data with one 'file' part")
        upload = form.get("file")
        if upload is None or not hasattr(upload, "read"):
            return error(400, "file: field required (multipart part named 'file')")
        data = await upload.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            return error(413, f"file: larger than {MAX_UPLOAD_BYTES} bytes")
        filename = upload.filename or "upload.bin"
        suffix = Path(filename).suffix.lstrip(".") or "bin"
        token, path = await asyncio.to_thread(save_upload, ctx, data, suffix)
        kind = (upload.content_type or mimetypes.guess_type(filename)[0] or "").split("/")[0] or "file"
        return envelope({"type": kind, "download_url": f"{ctx.settings.base_url()}/files/uploads/{path.name}",
                         "filename": filename, "size": len(data)})

    @router.get("/api/v3/webhook/secret")
    async def webhook_secret(request: Request):
        ok, _ = authorize_bearer(ctx, request.headers)
        if not ok:
            return _unauthorized()
        return envelope({"secret": ctx.webhook_secret})

    return router


def _safe_suffix(suffix: str) -> str:
    return "".join(ch for ch in suffix.lower() if ch.isalnum())[:8] or "bin"


async def _event_stream(ctx: ServerContext, job_id: str, request: Request):
    """SSE: replay this job's events so far, then follow it until a terminal status."""
    index, last_beat = 0, time.monotonic()
    yield _sse("status", {"id": job_id, "status": STATUS[ctx.store.get(job_id).status]})
    while True:
        for event in ctx.hub.since(job_id, index):
            index += 1
            kind = event.get("event", "status")
            payload = {k: v for k, v in event.items() if k != "event"}
            payload["id"] = job_id
            yield _sse(kind, payload)
        job = ctx.store.get(job_id)
        if job is None:
            return
        if job.is_terminal and not ctx.hub.since(job_id, index):
            data = prediction_data(ctx, job)
            yield _sse(data["status"], data)
            return
        if await request.is_disconnected():
            return
        if time.monotonic() - last_beat > 15:
            last_beat = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(0.1)


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
