"""The ASGI apps: the routes every API shares (health, metrics, output files), the provider routers, the
middleware for body size limits and request counting, and the bridge from engine events to the durable job store,
the SSE event hub and the metrics. Building the model and running uvicorn belong to :mod:`magi_server.composition`.
"""
from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from magi_server.serving.common import ServerContext
from magi_server.serving.files import add_file_routes
from magi_server.serving.jobs import JobStatus, JobStoreError
from magi_server.serving.metrics import method_label
from magi_server.serving.webhooks import JWKS_PATH

log = logging.getLogger("magi_server.serving.app")
access_log = logging.getLogger("magi_server.access")


# -------------------------------------------------------------------------------------------------- middleware


def provider_error(role: str, path: str, status: int, message: str) -> JSONResponse:
    """An answer the router or the body limit gives (404 unknown path, 405 wrong method, 413 too large) in the error
    format of the API the path belongs to: fal's ``{"detail"}`` on the fal listeners, WaveSpeed's envelope under
    ``/api/v3/``, OpenAI's ``{"error": {...}}`` under ``/v1/videos``, Magic Hour's ``{"message"}`` under the rest of
    ``/v1/``, else ``{"detail"}``."""
    if role != "main":
        from magi_server.serving.adapters.fal import fal_json

        return fal_json({"detail": message}, status)
    if path.startswith("/api/v3/"):
        from magi_server.serving.adapters.wavespeed import error

        return error(status, message)
    if path == "/v1/videos" or path.startswith("/v1/videos/"):
        from magi_server.serving.adapters.openai_videos import error as openai_error

        return openai_error(status, message)
    if path.startswith("/v1/"):
        return JSONResponse({"message": message}, status_code=status)
    return JSONResponse({"detail": message}, status_code=status)


class BodyLimit:
    """413 for bodies over the limit, by Content-Length up front and by counting streamed bytes (chunked bodies),
    in the format of the API the path belongs to (:func:`provider_error`)."""

    def __init__(self, app, max_bytes: int, role: str = "main") -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.role = role

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    return await self._reject(scope, send)
        received = 0
        started = rejected = False

        async def limited_receive():
            nonlocal received, rejected
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started and not rejected:
                        rejected = True
                        await self._reject(scope, send)
                    # the app sees a client that went away (ClientDisconnect), not an exception it turns into a 500
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if rejected:  # the 413 already went out; whatever the app answers after it is dropped
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _reject(self, scope, send) -> None:
        response = provider_error(self.role, scope.get("path", ""), 413,
                                  f"request body larger than {self.max_bytes} bytes")
        await response({"type": "http"}, None, send)


# a path segment that may be a credential (an upload token, a presigned name) or an id: the access log shows "*"
_SECRET_SEGMENT = re.compile(r"[A-Za-z0-9_.~-]{16,}")


def loggable_path(scope) -> str:
    """The path as the access log shows it: the matched route's template (``/files/uploads/{name}``), else the
    path with every long segment masked; never the query string (it can carry signatures and tokens)."""
    route = getattr(scope.get("route"), "path", None)
    if route:
        return route
    return "/".join("*" if _SECRET_SEGMENT.fullmatch(part) else part for part in scope.get("path", "").split("/"))


class CountRequests:
    """Counts every answer in ``magi_http_requests_total``, writes the access log (one line per request, with the
    route template rather than the raw path: see :func:`loggable_path`); on the fal listeners also marks every
    answer as ours.

    Plain ASGI (no BaseHTTPMiddleware): it only looks at the response start, so bodies stream through untouched.
    """

    def __init__(self, app, metrics, mark_fal_answers: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.mark_fal_answers = mark_fal_answers

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        started = time.monotonic()
        status = 0

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.metrics is not None:
                    # labels from small fixed sets only (route templates, standard methods), or each odd request
                    # would add a series for good; routing has put the matched route into the scope by now
                    route = getattr(scope.get("route"), "path", "unmatched")
                    self.metrics.http_requests.labels(route=route, method=method_label(scope["method"]),
                                                      code=str(message["status"])).inc()
                headers = list(message.get("headers", []))
                if self.mark_fal_answers and not any(name.lower() == b"x-fal-request-id" for name, _ in headers):
                    # fal-client replays 5xx answers without this header as ingress errors: mark every answer ours
                    message = {**message, "headers": [*headers, (b"x-fal-request-id", uuid.uuid4().hex.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            client = (scope.get("client") or ("-",))[0]
            duration_ms = round((time.monotonic() - started) * 1000, 1)
            path = loggable_path(scope)
            access_log.info("%s %s %s %d %.1fms", client, scope["method"], path, status, duration_ms,
                            extra={"http": {"client": client, "method": method_label(scope["method"]), "path": path,
                                            "status": status, "duration_ms": duration_ms}})


# ---------------------------------------------------------------------------------------------------------- app


def create_app(ctx: ServerContext, role: str = "main") -> FastAPI:
    """The ASGI app. ``role``: "main" (WaveSpeed, Magic Hour, files, ops), "fal_queue" or "fal_run" (fal-client
    tells sync from queue calls only by host/port, so each gets its own listener)."""
    app = FastAPI(title="magi-server", docs_url="/docs" if role == "main" else None, redoc_url=None)

    app.add_middleware(CountRequests, metrics=ctx.metrics, mark_fal_answers=(role != "main"))

    if role == "main":
        from magi_server.serving.adapters import wavespeed

        app.include_router(wavespeed.build_router(ctx))
        try:
            from magi_server.serving.adapters import magichour
        except ImportError:
            magichour = None
        if magichour is not None:
            app.include_router(magichour.build_router(ctx))
        from magi_server.serving.adapters import openai_videos

        app.include_router(openai_videos.build_router(ctx))
        _add_common_routes(app, ctx)
        from magi_server.serving.playground import add_playground

        add_playground(app)
    else:
        from magi_server.serving.adapters import fal

        app.include_router(fal.build_router(ctx, sync=(role == "fal_run")))
        _add_file_routes(app, ctx)

    @app.get(JWKS_PATH)  # on every listener: fal receivers know the fal host
    async def webhook_keys():
        """The public key fal-format webhooks are signed with (serving/webhooks.py), as a JWKS document."""
        return ctx.webhook_keys.jwks()

    @app.exception_handler(StarletteHTTPException)
    async def unrouted(request: Request, exc: StarletteHTTPException):
        # the router's own 404 (no such path) and 405 (wrong method), in the provider's words; routes answer theirs
        message = str(exc.detail)
        if request.scope.get("route") is None:  # the router's: no route matched (a route's own text stands)
            message = {404: f"no such path: {request.method} {request.url.path}",
                       405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                                 message)
        response = provider_error(role, request.url.path, exc.status_code, message)
        for name, value in (exc.headers or {}).items():  # e.g. 405's Allow
            response.headers[name] = value
        return response

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect):
        # the client left, or BodyLimit cut an oversized body (and already answered 413): nothing to say
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # a bug must still answer, and be logged
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"code": 500, "message": "internal error; see the server log", "data": None},
                            status_code=500)

    return BodyLimitApp(app, ctx.settings.max_body_bytes, role)


def BodyLimitApp(app: FastAPI, max_bytes: int, role: str = "main"):
    wrapped = BodyLimit(app, max_bytes, role)
    wrapped.fastapi = app  # tests reach routes through it
    return wrapped


def _add_common_routes(app: FastAPI, ctx: ServerContext) -> None:
    @app.get("/health/live")
    async def live():
        return {"status": "alive"}

    @app.get("/health/ready")
    async def ready():
        body = {"model": ctx.model_name, "engine_alive": ctx.engine.alive(), "queue_depth": ctx.engine.queue_depth,
                "safety_checker": ctx.safety_checker}  # "none": outputs are not checked (has_nsfw_contents: README)
        # what optional features this server has (the playground hides what is missing, and says why)
        body["prompt_enhancer"] = ctx.prompt_enhancer is not None
        if ctx.notice:
            body["notice"] = ctx.notice
        if ctx.engine.draining:  # a graceful stop: take no new work, a balancer should send it elsewhere
            body["status"] = "draining"
            return JSONResponse(body, status_code=503)
        if not body["engine_alive"]:
            body["status"] = "not ready"
            body["reason"] = ctx.engine.dead_reason or "the GPU loop is not running"
            return JSONResponse(body, status_code=503)
        body["status"] = "ready"
        return body

    @app.get("/metrics")
    async def metrics():
        body, content_type = ctx.metrics.exposition()
        return Response(body, headers={"content-type": content_type})

    _add_file_routes(app, ctx)


def _add_file_routes(app: FastAPI, ctx: ServerContext) -> None:
    # outputs, chunk previews, uploads and stored inputs: owner or signed URL only (serving.files)
    add_file_routes(app, ctx)


# --------------------------------------------------------------------------------------------------- running


def shutdown(ctx: ServerContext) -> None:
    """Graceful stop: the running job goes back to the queue (its attempt refunded), queued jobs stay stored."""
    if ctx.janitor is not None:
        ctx.janitor.stop()
    if ctx.webhooks is not None:  # a send under way finishes on its thread or its claim lapses: sent again later
        ctx.webhooks.stop()
    ctx.image_decoder.shutdown(wait=False, cancel_futures=True)  # a decode under way ends with its ffmpeg
    ctx.store_reader.shutdown(wait=True, cancel_futures=True)  # before the store closes under a read
    ctx.engine.stop()
    if ctx.listener is not None:
        ctx.listener.stop()
    if ctx.runs_jobs:  # an API replica's RUNNING rows are the workers' (they give their own back)
        try:
            for job in ctx.store.list([JobStatus.RUNNING], limit=10_000):
                ctx.store.requeue(job.id)
        except JobStoreError as exc:  # e.g. a full disk: those rows stay "running" and the next start re-queues them
            log.error("could not put the running jobs back in the queue: %s (the next start will)", exc)
    ctx.store.close()


