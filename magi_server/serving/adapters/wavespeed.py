"""WaveSpeed v3 wire protocol (api-compat.md §1-2): the only place its quirks live.

Routes: ``POST /api/v3/<model>`` (one per served model id, e.g. ``wavespeed-ai/magi-1-24b``), the result routes
``GET /api/v3/predictions/{id}/result`` and ``GET /api/v3/predictions/{id}``, the caller's history
``POST /api/v3/predictions``, both upload flows, Bearer auth, sync
mode, and two extensions: ``POST /api/v3/predictions/{id}/cancel`` and ``GET /api/v3/predictions/{id}/events``
(Server-Sent Events: status, progress and a ``chunk`` event with the URL of each finished chunk's frames; every
event has an ``id:``, and a client reconnecting with ``Last-Event-ID`` gets only the events after it).
Output, chunk preview and upload URLs are signed (serving.files): a bare HTTP client (the SDK's download) reads
them without the key until they expire. Uploads must sniff as an image or video (else a 415).
Every JSON answer is the envelope ``{code, message, data}``; errors use the same shape with the HTTP status as
``code`` and ``data: null``, and never contain "HTTP 5"/"HTTP 429" (the SDK would replay the task). A bad field is a
400 ``"<field>: <reason>"``; a submit with an ``Idempotency-Key`` that was used with another body is a 409.
"""
from __future__ import annotations

import asyncio
import base64
import mimetypes
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from fastapi import APIRouter, Depends, File, Header, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field, StrictBool
from starlette.exceptions import HTTPException

from magi_server.params import FPS, MAX_FRAMES, RANDOM_SEEDS, GenerationParams, ModelLimits, ParamError
from magi_server.serving.common import (
    MAX_IMAGE_REF_CHARS,
    RAW_BODY,
    MAX_UPLOAD_BYTES,
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
    enhance_prompt,
    api_key_auth,
    build_params,
    cancel_job,
    describe,
    error_responses,
    fingerprint,
    iso_time,
    media_kind_of,
    open_upload,
    read_image_field,
    read_job,
    receive_upload,
    save_upload,
    scene_prompts_field,
    window_size_field,
)
from magi_server.serving.events import wait_for_terminal
from magi_server.serving.files import read_stored
from magi_server.serving.jobs import Job, JobStatus
from magi_server.serving.webhooks import MAX_WEBHOOK_URL_CHARS, checked_webhook_url, delivery_view

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
    "timeout": 1405,  # the job outran the server's time limit: a failed task (5004 is the SDK's own sync timeout)
    "cancelled": 1405,
})
QUIET_CHECK_S = 15.0  # how often a quiet event stream looks in the store whether its job ended unannounced


# contract parameter -> WaveSpeed field, for a refusal by params.validate (the rest are named alike)
FIELDS = MappingProxyType({"width": "resolution", "height": "resolution"})
MAX_NUM_FRAMES = 60 * FPS  # WaveSpeed's documented bound, one minute: ServerSettings.max_num_frames's default


class SubmitBody(BaseModel):
    """``POST /api/v3/<model>`` (api-compat.md §1.3, with the legacy fields of the earlier magi-1-24b page).
    Unknown fields are ignored, as WaveSpeed does; ``null`` is the same as leaving a field out."""

    prompt: Prompt
    image: Text | None = Field(None, max_length=MAX_IMAGE_REF_CHARS, description=(
        "first frame: an http(s) URL, a data: URI, bare base64, or an upload's download_url; absent: text-to-video"))
    seed: Int | None = Field(-1, ge=-1, lt=RANDOM_SEEDS, description="-1 (or absent): random")
    num_frames: Int | None = Field(None, ge=FPS, le=MAX_FRAMES, description=(
        "absent: the server's default; at most the server's --max-frames (default 1440, one minute)"))
    frames_per_second: Literal[FPS] | None = None
    resolution: Resolution | None = Field(None, description="absent: the server's default")
    aspect_ratio: AspectRatio | None = None
    num_inference_steps: Int | None = Field(None, ge=4, le=256, multiple_of=4,  # the window holds 4 chunks
                                            description="absent: the server's default")
    enable_safety_checker: StrictBool | None = Field(None, description=(
        "absent or true: the server's safety checker (if it runs one: /health/ready) judges the output and "
        "has_nsfw_contents reports it; false: not checked"))
    prompts: list[Prompt] | None = scene_prompts_field()
    window_size: Int | None = window_size_field()
    video: Text | None = Field(None, max_length=MAX_IMAGE_REF_CHARS, description=(
        "extension: a video to continue (MAGI-1 video-to-video: its first 32 frames condition the new ones): an "
        "http(s) URL, a data: URI or an upload's download_url; the output holds only the new frames"))
    continue_from: Text | None = Field(None, max_length=64, description=(
        "extension: the id of an earlier completed prediction of yours, continued losslessly from its last latent "
        "frames (kept for the retention period); at its size; the output holds only the new frames"))
    enable_prompt_expansion: StrictBool | None = Field(None, description=(
        "rewrite the prompt with the server's prompt enhancer first (the prediction returns enhanced_prompt); "
        "a 400 when the server has none"))
    enable_base64_output: StrictBool | None = None
    enable_sync_mode: StrictBool | None = None
    webhook: Text | None = Field(None, max_length=MAX_WEBHOOK_URL_CHARS, description=(
        "the same as the ?webhook= query parameter (both given: they must agree): POSTed the prediction once it "
        "ends, signed with the secret of GET /api/v3/webhook/secret"))


class EnhanceBody(BaseModel):
    """``POST /api/v3/prompt/enhance``."""

    prompt: Prompt


HISTORY_WINDOW = 1000  # the prediction history covers the caller's newest this-many WaveSpeed jobs


class HistoryBody(BaseModel):
    """``POST /api/v3/predictions``: a page of the caller's prediction history, newest first (WaveSpeed's
    "List predictions"; its window is 7 days, ours the caller's newest ``HISTORY_WINDOW`` jobs)."""

    page: Int = Field(ge=1)
    page_size: Int = Field(ge=1, le=100)
    model: Text | None = Field(None, max_length=200, description="only predictions of this model")
    status: Literal["created", "processing", "completed", "failed", "cancelled"] | None = None
    created_after: datetime | None = Field(None, description="ISO 8601; without a zone: UTC")
    created_before: datetime | None = Field(None, description="ISO 8601; without a zone: UTC")


class UploadTicketBody(BaseModel):
    """``POST /api/v3/media/uploads``: what the SDK says about the file it is about to PUT."""

    filename: Text = Field(min_length=1, max_length=255)
    size: Int = Field(0, ge=0)
    content_type: Text | None = Field(None, max_length=100)


class ErrorEnvelope(BaseModel):
    code: int
    message: str
    data: None


ERRORS = error_responses(ErrorEnvelope, 400, 401, 404, 410, 503)  # what any route may answer; submits and uploads add theirs
SUBMIT_ERRORS = error_responses(ErrorEnvelope, 409, 429)
UPLOAD_ERRORS = error_responses(ErrorEnvelope, 413, 415)


def envelope(data, code: int = 200, message: str = "success", status_code: int | None = None,
             headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message, "data": data}, status_code=status_code or code,
                        headers=headers)


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return envelope(None, code=status, message=message, headers=headers)


class WaveSpeedRoute(ProviderRoute):
    """Refusals as the envelope with ``data: null``; a bad field is a 400 ``"<field>: <reason>"``."""

    def refuse(self, status, message, headers=None):
        return error(status, message, headers)

    def refuse_fields(self, errors):
        return error(400, describe(errors[0]))


class Base64Outputs:
    """``enable_base64_output`` results, encoded once per file and kept for the next polls (a few of them: each is
    4/3 of its MP4). Encoding reads and converts megabytes, so it runs on a worker thread, never the event loop.

    A finished job's poll answer is kept whole too (:meth:`answer`): it never changes, and rendering megabytes of
    JSON holds the GIL for milliseconds, which a worker thread would still take from the event loop at every poll
    (100 polls of a 2 MB result held /health/live up for a quarter of a second)."""

    def __init__(self, outputs_dir: Path, keep: int = 4) -> None:
        self.outputs_dir = outputs_dir
        self.keep = keep
        self._encoded: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()  # one encode per file even when polls race
        self._answers: OrderedDict[str, bytes] = OrderedDict()  # job id -> its rendered poll answer
        self._answers_lock = threading.Lock()

    def rendered(self, job_id: str) -> bytes | None:
        """The job's kept poll answer, if any (a dict read: safe on the event loop, never waits for a render)."""
        return self._answers.get(job_id)

    def answer(self, ctx: ServerContext, job: Job) -> bytes:
        """A finished base64 job's poll answer, rendered once (blocking: run it on a worker thread)."""
        with self._answers_lock:
            if job.id not in self._answers:
                self._answers[job.id] = envelope(prediction_data(ctx, job, self)).body
                while len(self._answers) > self.keep:
                    self._answers.popitem(last=False)
            self._answers.move_to_end(job.id)
            return self._answers[job.id]

    def __call__(self, name: str) -> str:
        with self._lock:
            if name not in self._encoded:
                data = read_stored(self.outputs_dir, name)  # never through a link planted in the folder
                if data is None:
                    raise FileNotFoundError(f"output {name} is missing")
                self._encoded[name] = base64.b64encode(data).decode()
                while len(self._encoded) > self.keep:
                    self._encoded.popitem(last=False)
            self._encoded.move_to_end(name)
            return self._encoded[name]


async def prediction(ctx: ServerContext, job: Job, encoded: Base64Outputs) -> dict:
    """:func:`prediction_data`, with a base64 job's outputs encoded off the event loop."""
    if job.status is JobStatus.COMPLETED and job.meta.get("base64_output"):
        return await asyncio.to_thread(prediction_data, ctx, job, encoded)
    return prediction_data(ctx, job, encoded)


def prediction_data(ctx: ServerContext, job: Job, encoded: Callable[[str], str] | None) -> dict:
    """The prediction ``data`` object; ``encoded`` turns a base64 job's output names into their base64 (a
    :class:`Base64Outputs`; None where no base64 job can come: webhooks)."""
    outputs: list[str] = []
    if job.status is JobStatus.COMPLETED:
        if job.meta.get("base64_output"):
            outputs = [encoded(name) for name in job.outputs]
        else:
            outputs = [ctx.file_url(name) for name in job.outputs]
    data = {
        "id": job.id,
        "model": job.model,
        "outputs": outputs,
        "urls": {"get": f"{ctx.settings.base_url()}/api/v3/predictions/{job.id}/result"},
        # the safety checker's verdict per output; false also when nothing checked it (safety_checked says which)
        "has_nsfw_contents": _nsfw_verdicts(job, len(outputs)),
        "safety_checked": bool(job.meta.get("safety_checked")) if outputs else False,
        "status": STATUS[job.status],
        "created_at": iso_time(job.created_at),
        "error": job.error if job.status in (JobStatus.FAILED, JobStatus.CANCELLED) else "",
        "timings": {"inference": job.inference_ms or 0},
        "progress": {"chunks_done": job.progress_done, "chunks_total": job.progress_total},
        "seed": job.params.seed,
    }
    if job.variant is not None:  # the served model variant that runs it (model says so too, if not the route's)
        data["variant"] = job.variant
    if job.meta.get("enhanced_prompt"):  # what the model was given instead of the request's prompt
        data["enhanced_prompt"] = job.meta["enhanced_prompt"]
    if job.status is JobStatus.FAILED:
        data["code"] = ERROR_CODES.get(job.error_code, 1403)
    return data


def _nsfw_verdicts(job: Job, count: int) -> list[bool]:
    """One boolean per output: what the safety checker said of it (events.py stores the verdicts at completion)."""
    verdicts = job.meta.get("nsfw")
    if isinstance(verdicts, list) and len(verdicts) == count:
        return [bool(v) for v in verdicts]
    return [False] * count


def webhook_input(body: SubmitBody) -> dict:
    """The request as the webhook's ``input`` echoes it: the fields given, a data URI or base64 image or video
    shortened to a note of its size (the payload would otherwise carry the whole file back)."""
    given = body.model_dump(mode="json", exclude_none=True, exclude={"webhook"})
    for name in ("image", "video"):
        value = given.get(name)
        if isinstance(value, str) and not value.startswith(("http://", "https://")) and len(value) > 256:
            given[name] = f"<inline {name}, {len(value)} characters>"
    return given


def webhook_body(ctx: ServerContext, job: Job) -> dict:
    """What a WaveSpeed webhook POSTs (api-compat.md §1.8): the bare prediction ``data`` plus ``input``."""
    return {**prediction_data(ctx, job, None), "input": job.meta.get("webhook_input", {})}


async def to_params(ctx: ServerContext, body: SubmitBody, limits: ModelLimits | None = None,
                    prompt: str | None = None, continuation: ContinuationInput | None = None) -> GenerationParams:
    """A valid WaveSpeed body -> GenerationParams (checked against ``limits``: the variant's that will run it;
    ``prompt``: the enhanced prompt, when asked for); fetches the image and stores it at the working size. Raises
    ParamError naming the field."""
    s = ctx.settings
    return await build_params(
        ctx, prompt=prompt or body.prompt, image=await read_image_field(ctx, body.image, "image") if body.image else None,
        resolution=body.resolution or (continuation and continuation.resolution) or s.default_resolution,
        aspect=body.aspect_ratio or "auto", continuation=continuation,
        num_frames=body.num_frames or s.default_num_frames, steps=body.num_inference_steps or s.default_steps,
        seed=body.seed, fields=FIELDS, limits=limits, prompts=None if prompt else body.prompts,
        window_size=body.window_size, safety_check=body.enable_safety_checker is not False,
    )


def build_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter(route_class=WaveSpeedRoute, responses=ERRORS, strict_content_type=False)
    tenant = api_key_auth(ctx, "Bearer")
    encoded = Base64Outputs(ctx.outputs_dir)

    async def own_job(job_id: str, owner: str = Depends(tenant)) -> Job:
        """The caller's WaveSpeed job (another tenant's job is a 404: no existence oracle)."""
        job = await read_job(ctx, job_id, owner, "wavespeed")
        if job is None:
            raise HTTPException(404, f"prediction {job_id} not found")
        return job

    def submit_route(model_id: str):
        async def submit(body: SubmitBody, webhook: str | None = None, owner: str = Depends(tenant),
                         idempotency_key: IdempotencyKey = None):
            if webhook and body.webhook and webhook.strip() != body.webhook.strip():
                raise HTTPException(400, "webhook: the query parameter and the body field name different URLs")
            webhook = webhook or body.webhook
            if webhook:
                if body.enable_base64_output:
                    raise HTTPException(400, "webhook callback does not support base64 output, please use the "
                                             "normal API to use base64 output")
                try:
                    webhook = await checked_webhook_url(ctx, webhook, "webhook")
                except ParamError as exc:
                    raise HTTPException(400, str(exc)) from None

            # admission (queue, quota) before the image is fetched or decoded
            async with admitted(ctx, owner=owner, idempotency_key=idempotency_key, route=model_id) as admission:
                continuation = await continuation_input(ctx, owner, continue_from=body.continue_from,
                                                        video=body.video, variant=admission.variant_name)
                enhanced = (await enhance_prompt(ctx, body.prompt, "enable_prompt_expansion")
                            if body.enable_prompt_expansion else None)
                job = await admission.commit(
                    api="wavespeed", model=admission.model(model_id),
                    params=await to_params(ctx, body, admission.limits, prompt=enhanced,
                                           continuation=continuation),
                    meta={"base64_output": bool(body.enable_base64_output),
                          "resolution": (body.resolution or (continuation and continuation.resolution)
                                         or ctx.settings.default_resolution),
                          **({"original_prompt": body.prompt, "enhanced_prompt": enhanced} if enhanced else {}),
                          **({"webhook": webhook, "webhook_input": webhook_input(body)} if webhook else {})},
                    request_fingerprint=fingerprint(model_id, body.model_dump(mode="json"),
                                                    *([webhook] if webhook else [])))
            if body.enable_sync_mode:
                job = await wait_for_terminal(ctx, job.id, ctx.settings.sync_timeout_s) or job
                data = await prediction(ctx, job, encoded)
                if not job.is_terminal:
                    data.update(code=5004, error="Sync mode timed out; query the result later")
                return envelope(data)
            return envelope(await prediction(ctx, job, encoded))

        return submit

    for model_id in WAVESPEED_MODELS:
        router.add_api_route(f"/api/v3/{model_id}", submit_route(model_id), methods=["POST"],
                             name=f"submit {model_id}", responses=SUBMIT_ERRORS)

    @router.post("/api/v3/prompt/enhance", responses=error_responses(ErrorEnvelope, 503))
    async def enhance(body: EnhanceBody, owner: str = Depends(tenant)):
        """The server's prompt enhancer on its own: what ``enable_prompt_expansion`` would send to the model."""
        return envelope({"prompt": await enhance_prompt(ctx, body.prompt, "prompt"), "original_prompt": body.prompt})

    @router.post("/api/v3/predictions")
    async def history(body: HistoryBody, owner: str = Depends(tenant)):
        """A page of the caller's WaveSpeed predictions, newest first, with ``total`` matches (another key's jobs
        are never listed; with API keys off every job is everyone's). Outputs are URLs here, also for
        ``enable_base64_output`` jobs, whose result route gives the base64."""
        scope = owner if ctx.settings.api_keys else None
        jobs = await asyncio.get_running_loop().run_in_executor(
            ctx.store_reader, lambda: ctx.store.list(limit=HISTORY_WINDOW, owner=scope, api="wavespeed"))
        items = [job for job in jobs if _listed(job, body)]
        start = (body.page - 1) * body.page_size
        # a history lists many jobs: never a base64 encode of each MP4 (the URL stands in for it, as said above)
        return envelope({"page": body.page, "page_size": body.page_size, "total": len(items),
                         "items": [prediction_data(ctx, job, ctx.file_url)
                                   for job in items[start:start + body.page_size]]})

    @router.get("/api/v3/predictions/{job_id}/result")
    @router.get("/api/v3/predictions/{job_id}")
    async def result(job: Job = Depends(own_job)):
        if job.status is JobStatus.COMPLETED and job.meta.get("base64_output"):
            body = encoded.rendered(job.id) or await asyncio.to_thread(encoded.answer, ctx, job)
            return Response(body, media_type="application/json")
        return envelope(await prediction(ctx, job, encoded))

    # the cancel takes no fields: an empty (or any) JSON object is what a client may send
    @router.post("/api/v3/predictions/{job_id}/cancel", openapi_extra={"requestBody": {
        "required": False, "content": {"application/json": {"schema": {"type": "object"}}}}})
    async def cancel(job: Job = Depends(own_job)):
        if job.is_terminal:
            raise HTTPException(400, f"prediction {job.id} already {STATUS[job.status]}")
        return envelope(await prediction(ctx, cancel_job(ctx, job.id) or ctx.store.get(job.id), encoded))

    # its refusals are JSON envelopes, not events: said per status, or OpenAPI would file them under the stream's type
    json_errors = {status: {"content": {"application/json": {"schema": ErrorEnvelope.model_json_schema()}}}
                   for status in ERRORS}

    @router.get("/api/v3/predictions/{job_id}/events", response_class=EventSourceResponse, responses=json_errors)
    async def events(job: Job = Depends(own_job), last_event_id: str | None = Header(
            None, description="a reconnecting client's last event id: only the events after it are sent")):
        async for event in _event_stream(ctx, job.id, _event_number(last_event_id), encoded):
            yield event

    # ------------------------------------------------------------------------------------------------ uploads
    @router.post("/api/v3/media/uploads", responses=UPLOAD_ERRORS)
    async def upload_ticket(body: UploadTicketBody, owner: str = Depends(tenant)):
        if body.size > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"size: at most {MAX_UPLOAD_BYTES} bytes, got {body.size}")
        content_type = body.content_type or mimetypes.guess_type(body.filename)[0] or ""
        suffix = Path(body.filename).suffix.lstrip(".") or (content_type.split("/")[-1] if content_type else "bin")
        ticket = await asyncio.to_thread(open_upload, ctx, "wavespeed", suffix, owner)
        return envelope({
            "upload": {"method": "PUT",
                       "url": f"{ctx.settings.base_url()}/api/v3/media/upload/{ticket.token}{ticket.query}",
                       "headers": {"Content-Type": content_type} if content_type else {}},
            # signed: a bare HTTP client can read it back; the server reads it from disk when a submit names it
            "download_url": ctx.upload_url(ticket.name),
        })

    @router.put("/api/v3/media/upload/{token}", openapi_extra=RAW_BODY, responses=UPLOAD_ERRORS)
    async def upload_put(token: str, request: Request):
        await receive_upload(ctx, "wavespeed", token, request)
        return Response(status_code=200)

    @router.post("/api/v3/media/upload/binary", responses=UPLOAD_ERRORS)
    async def upload_binary(file: UploadFile = File(description="the file (multipart part named 'file')"),
                            owner: str = Depends(tenant)):
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"file: larger than {MAX_UPLOAD_BYTES} bytes")
        filename = file.filename or "upload.bin"
        kind = media_kind_of(data)  # a 415 for anything but an image or video, whatever its name says
        path = await asyncio.to_thread(save_upload, ctx, data, kind.extension, owner)
        return envelope({"type": kind.family, "download_url": ctx.upload_url(path.name), "filename": filename,
                         "size": len(data)})

    @router.get("/api/v3/webhook/secret")
    async def webhook_secret(owner: str = Depends(tenant)):
        """The secret this API key's webhooks are signed with (the same after a restart and on every replica)."""
        return envelope({"secret": ctx.webhook_keys.wavespeed_secret(owner)})

    @router.get("/api/v3/predictions/{job_id}/webhooks")
    async def webhook_log(job: Job = Depends(own_job)):
        """Extension: the prediction's webhook deliveries, each with its attempts (time, HTTP status, error)."""
        deliveries = await asyncio.to_thread(ctx.store.webhook_deliveries, job.id)
        return envelope({"deliveries": [delivery_view(d) for d in deliveries]})

    return router


async def _event_stream(ctx: ServerContext, job_id: str, last_seen: int, encoded: Base64Outputs):
    """SSE in WaveSpeed's words: the job's events after ``last_seen`` (a reconnecting client's Last-Event-ID), then
    each new one as the hub hands it over, ending with an event named by the final status that carries the
    prediction. Every event has the hub's id; a status that repeats the one before it is not sent."""
    kept = ctx.hub.since(job_id)
    if last_seen > (kept[-1].id if kept else 0):
        last_seen = 0  # an id this process never gave (one from before a restart): start over
    if kept and kept[-1].ends_job and kept[-1].id <= last_seen:
        return  # the client has seen the end
    said = next((STATUS[e.data["status"]] for e in reversed(kept) if e.kind == "status" and e.id <= last_seen), None)
    if not kept or kept[0].id > last_seen + 1:
        # what the client has not seen is no longer kept, or never was (a job from before a restart): the job's
        # state stands in for it
        job = ctx.store.get(job_id)
        last_seen = kept[0].id - 1 if kept else 0
        if job is None or job.is_terminal:
            yield await _final_event(ctx, job, kept[-1].id if kept else 0, encoded)
            return
        said = STATUS[job.status]
        yield ServerSentEvent(event="status", data={"id": job_id, "status": said}, id=str(last_seen))
    events = [e for e in kept if e.id > last_seen]
    while True:
        for event in events:
            last_seen = event.id
            if event.ends_job:
                yield await _final_event(ctx, ctx.store.get(job_id), event.id, encoded)  # the row was final before the event
                return
            data = dict(event.data)
            if event.kind == "status":
                if STATUS[event.data["status"]] == said:
                    continue
                said = data["status"] = STATUS[event.data["status"]]
            elif event.kind == "chunk" and data.pop("preview", None):
                data["url"] = ctx.file_url(event.data["preview"])
            yield ServerSentEvent(event=event.kind, data={**data, "ts": event.ts, "id": job_id}, id=str(event.id))
        # quiet for a while (FastAPI sends the keep-alive comments): look whether the job's end got lost on the way
        events = await ctx.hub.wait(job_id, last_seen, QUIET_CHECK_S)
        if not events:
            job = ctx.store.get(job_id)
            if job is None or job.is_terminal:
                yield await _final_event(ctx, job, last_seen, encoded)
                return


def _listed(job: Job, body: HistoryBody) -> bool:
    """Whether a history request's filters keep ``job``."""
    def epoch(moment: datetime) -> float:
        return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()

    return ((body.model is None or job.model == body.model)
            and (body.status is None or STATUS[job.status] == body.status)
            and (body.created_after is None or job.created_at >= epoch(body.created_after))
            and (body.created_before is None or job.created_at < epoch(body.created_before)))


async def _final_event(ctx: ServerContext, job: Job | None, event_id: int, encoded: Base64Outputs) -> ServerSentEvent:
    """The final event: named by the job's status, carrying its prediction (a comment when the job is gone)."""
    if job is None:
        return ServerSentEvent(comment="the job is gone")
    data = await prediction(ctx, job, encoded)
    return ServerSentEvent(event=data["status"], data=data, id=str(event_id))


def _event_number(last_event_id: str | None) -> int:
    """The event a reconnecting client saw last (its Last-Event-ID); 0 when absent or not one of ours."""
    value = (last_event_id or "").strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) < 19 else 0
