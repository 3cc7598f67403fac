"""The ASGI apps: the routes every API shares (health, metrics, output files), the provider routers, the
middleware for body size limits and request counting, and the bridge from engine events to the durable job store,
the SSE event hub and the metrics. Building the model and running uvicorn belong to :mod:`magi_server.composition`.
"""
from __future__ import annotations

import logging
import re
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect

from magi_server.serving.common import ServerContext, resolve_upload
from magi_server.serving.jobs import JobStatus
from magi_server.serving.metrics import method_label

log = logging.getLogger("magi_server.serving.app")

OUTPUT_NAME = re.compile(r"^[0-9a-f]{32}(\.chunk\d{1,5})?\.mp4$")


# -------------------------------------------------------------------------------------------------- middleware


class BodyLimit:
    """413 for bodies over the limit, by Content-Length up front and by counting streamed bytes (chunked bodies)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

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
                    return await self._reject(send)
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
                        await self._reject(send)
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

    async def _reject(self, send) -> None:
        body = (b'{"code": 413, "message": "request body larger than %d bytes", "data": null, "detail": '
                b'"request body too large"}' % self.max_bytes)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class CountRequests:
    """Counts every answer in ``magi_http_requests_total``; on the fal listeners also marks it as ours.

    Plain ASGI (no BaseHTTPMiddleware): it only looks at the response start, so bodies stream through untouched.
    """

    def __init__(self, app, metrics, mark_fal_answers: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.mark_fal_answers = mark_fal_answers

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted_send(message):
            if message["type"] == "http.response.start":
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

        await self.app(scope, receive, counted_send)


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
        _add_common_routes(app, ctx)
        from magi_server.serving.playground import add_playground

        add_playground(app)
    else:
        from magi_server.serving.adapters import fal

        app.include_router(fal.build_router(ctx, sync=(role == "fal_run")))
        _add_file_routes(app, ctx)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect):
        # the client left, or BodyLimit cut an oversized body (and already answered 413): nothing to say
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # a bug must still answer, and be logged
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"code": 500, "message": "internal error; see the server log", "data": None},
                            status_code=500)

    return BodyLimitApp(app, ctx.settings.max_body_bytes)


def BodyLimitApp(app: FastAPI, max_bytes: int):
    wrapped = BodyLimit(app, max_bytes)
    wrapped.fastapi = app  # tests reach routes through it
    return wrapped


def _add_common_routes(app: FastAPI, ctx: ServerContext) -> None:
    @app.get("/health/live")
    async def live():
        return {"status": "alive"}

    @app.get("/health/ready")
    async def ready():
        body = {"model": ctx.model_name, "engine_alive": ctx.engine.alive(), "queue_depth": ctx.engine.queue_depth}
        if ctx.notice:
            body["notice"] = ctx.notice
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
    @app.get("/files/uploads/{name}")
    async def upload_file(name: str):
        path = resolve_upload(ctx, f"{ctx.settings.base_url()}/files/uploads/{name}")
        if path is None:
            return JSONResponse({"detail": "not found"}, status_code=404)
        return FileResponse(path)

    @app.get("/files/{name}")
    async def output_file(name: str):
        # names come from job ids we generated: never join a client string into a path without this check
        if not OUTPUT_NAME.fullmatch(name):
            return JSONResponse({"detail": "not found"}, status_code=404)
        path = ctx.outputs_dir / name
        if not path.is_file():
            return JSONResponse({"detail": "not found"}, status_code=404)
        return FileResponse(path, media_type="video/mp4", filename=name)


# --------------------------------------------------------------------------------------------------- running


def shutdown(ctx: ServerContext) -> None:
    """Graceful stop: the running job goes back to the queue (its attempt refunded), queued jobs stay stored."""
    if ctx.janitor is not None:
        ctx.janitor.stop()
    ctx.engine.stop()
    for job in ctx.store.list([JobStatus.RUNNING], limit=10_000):
        ctx.store.requeue(job.id)
    ctx.store.close()


