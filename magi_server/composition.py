"""The composition root: the one place that wires the layers together.

Loads the model (runtime), builds the model runner, the engine, the job store and the ASGI apps (serving), recovers
what a dead process left behind, and runs uvicorn with the optional TLS listeners fal-client needs. Nothing below
this module imports the runtime and the HTTP layer at once.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from magi_server.engine.loop import Engine
from magi_server.serving.app import create_app, shutdown
from magi_server.serving.events import on_engine_event
from magi_server.serving.janitor import Janitor, disk_bytes
from magi_server.serving.common import ServerContext
from magi_server.serving.jobs import JobStore
from magi_server.serving.metrics import GaugeReaders, Metrics
from magi_server.serving.settings import ServerSettings

log = logging.getLogger("magi_server.composition")


def build_context(settings: ServerSettings, *, pipeline=None) -> ServerContext:
    """Load the model, open the job store, recover what a dead process left, start the engine."""
    from magi_server.runtime.pipeline import MagiPipeline

    notice = ""
    if pipeline is None:
        pipeline = MagiPipeline.from_pretrained(
            settings.model, device=settings.device, cache_dir=settings.cache_dir, compile=settings.compile
        )
    if str(settings.model).lower() == "tiny":
        from magi_server.runtime.tiny import TINY_NOTICE

        notice = TINY_NOTICE
    executor = pipeline.runner.with_outputs(settings.outputs_dir)  # the pipeline's model; the engine's requests
    store = JobStore(settings.db_path)
    holder: dict[str, ServerContext] = {}
    engine = Engine(
        executor, on_event=lambda event: on_engine_event(holder["ctx"], event), max_queue=settings.max_queue,
        memory_budget_bytes=settings.memory_budget_bytes, max_batch_size=settings.max_batch_size,
        job_timeout_s=settings.job_timeout_s,
    )
    metrics = Metrics(GaugeReaders(
        queue_depth=lambda: engine.queue_depth, engine_alive=engine.alive,
        jobs_by_status=lambda: {status.value: n for status, n in store.count_by_status().items()},
        gpu_memory_bytes=executor.device_memory_bytes, outputs_bytes=lambda: disk_bytes(settings.outputs_dir),
    ))
    ctx = ServerContext(settings=settings, store=store, engine=engine, executor=executor,
                        model_name=str(settings.model), notice=notice, metrics=metrics,
                        model_limits=executor.model_limits())
    if settings.keep_jobs_s:
        ctx.janitor = Janitor(store, settings.outputs_dir, settings.keep_jobs_s)
    holder["ctx"] = ctx

    requeued, failed = store.recover_after_restart(settings.max_attempts)
    if requeued or failed:
        log.warning("recovered after restart: %d job(s) re-queued, %d failed as interrupted", len(requeued), len(failed))
    _remove_partial_files(Path(settings.outputs_dir))
    for job in store.queued_in_order():
        engine.submit(job.id, job.params, reserved=False)
    engine.start()
    if ctx.janitor is not None:
        ctx.janitor.start()
    return ctx


def _remove_partial_files(outputs_dir: Path) -> None:
    """Delete the temp files (``.<name>.part``) a killed process left: its encoder's half MP4s and half uploads.

    Nothing else writes them (one server owns the store and its folders, jobs.py) and no job runs yet, so every
    one of them is an orphan; without this each kill -9 mid-job leaks a partial video for good.
    """
    for folder in (outputs_dir, outputs_dir / "uploads"):
        for path in folder.glob(".*.part"):
            try:
                path.unlink()
            except OSError as exc:
                log.warning("could not remove the partial file %s: %s", path, exc)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line (``--log-format json``): control characters in messages are escaped, so a prompt
    can never forge a log line, and the job id is a field of its own."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("job_id", "event", "error_code"):
            value = getattr(record, key, None)
            if value is not None:
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=True)


def serve(settings: ServerSettings, *, log_ready: bool = True) -> None:
    import contextlib
    import signal

    import uvicorn

    class _Server(uvicorn.Server):
        # uvicorn re-raises SIGTERM/SIGINT after its own shutdown, which would kill the process before the job
        # store is drained; the signals are handled once for every listener below instead
        def capture_signals(self):
            return contextlib.nullcontext()

    if not settings.api_keys and settings.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to listen on {settings.host} without --api-key (anyone could use the GPU)")
    started = time.monotonic()
    ctx = build_context(settings)
    servers = [_Server(uvicorn.Config(create_app(ctx), host=settings.host, port=settings.port,
                                      log_level="info", timeout_keep_alive=5))]
    for role, port in (("fal_queue", settings.fal_queue_port), ("fal_run", settings.fal_run_port)):
        if port:
            if not (settings.tls_certfile and settings.tls_keyfile):
                raise SystemExit("fal listeners need --tls-cert and --tls-key (fal-client only speaks https)")
            servers.append(_Server(uvicorn.Config(
                create_app(ctx, role), host=settings.host, port=port, log_level="info",
                ssl_certfile=settings.tls_certfile, ssl_keyfile=settings.tls_keyfile,
            )))
    if log_ready:
        log.info("model %s loaded in %.1f s; serving on %s", settings.model, time.monotonic() - started,
                 settings.base_url())

    async def run_all():
        loop = asyncio.get_running_loop()

        def stop(signame: str) -> None:
            log.info("%s: draining (the running job goes back to the queue; queued jobs stay stored)", signame)
            for server in servers:
                server.should_exit = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop, sig.name)
        await asyncio.gather(*(server.serve() for server in servers))

    try:
        asyncio.run(run_all())
    finally:
        shutdown(ctx)
