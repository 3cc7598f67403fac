"""The composition root: the one place that wires the layers together.

Loads the model (runtime), builds the model runner, the engine, the job store and the ASGI apps (serving), recovers
what a dead process left behind, and runs uvicorn with the optional TLS listeners fal-client needs. Nothing below
this module imports the runtime and the HTTP layer at once. Its own imports are light (no FastAPI, no torch): the
listeners bind and answer before the heavy modules load.

Three process shapes: ``serve`` (:func:`build_context`: HTTP, engine and model in one process over its own store),
``api`` (:func:`build_api_context`: HTTP only, no model; the queue is a PostgreSQL store shared with the workers)
and ``worker`` (:func:`run_worker`: a model and an engine fed by claims on that store, no HTTP).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from magi_server.serving.jobs import JobStore
from magi_server.serving.stores import open_job_store
from magi_server.serving.settings import ServerSettings

if TYPE_CHECKING:
    from magi_server.serving.common import ServerContext

log = logging.getLogger("magi_server.composition")


def model_specs(settings: ServerSettings) -> list[tuple[str, str]]:
    """(variant name, preset or weights folder) of each served model (``--model``, repeatable): ``NAME=PATH`` names
    a folder; a preset goes by its canonical name (``4.5B-distill``, ``tiny``); a bare folder by its own name."""
    from magi_server.models.config import canonical_preset_name

    specs = []
    for spec in (settings.model, *settings.more_models):
        spec = str(spec)
        name, sep, path = spec.partition("=")
        if sep and name.strip() and path.strip():
            specs.append((name.strip(), path.strip()))
        else:
            specs.append((canonical_preset_name(spec) or Path(spec).name or spec, spec))
    return specs


def variant_for(name: str, config):
    """The routing description (serving.routing.Variant) of a served model from its MagiConfig."""
    from magi_server.models.config import model_limits
    from magi_server.serving.routing import Variant, size_class

    return Variant(name, size_class(config.dit.hidden_size), bool(config.dit.distill), model_limits(config))


def load_prompt_enhancer(settings: ServerSettings, device: str = "cpu"):
    """The configured prompt enhancer (runtime.prompt_enhancer), or None; ValueError with one line for a folder
    that holds no causal language model."""
    if not settings.prompt_enhancer:
        return None
    from magi_server.runtime.prompt_enhancer import PromptEnhancer

    return PromptEnhancer.from_pretrained(settings.prompt_enhancer, device=device)


def load_safety_checker(settings: ServerSettings, device: str = "cpu"):
    """The configured safety checker (runtime.safety_checker), or None; ValueError with one line for a folder that
    holds no image classifier, or one without an NSFW-type label."""
    if not settings.safety_checker:
        return None
    from magi_server.runtime.loading import hide_progress_bars
    from magi_server.runtime.safety_checker import DEFAULT_NSFW_LABELS, SafetyChecker

    hide_progress_bars()  # a server's log is lines (JSON ones under --log-format json), not tqdm bars
    checker = SafetyChecker.from_pretrained(settings.safety_checker, settings.safety_labels or DEFAULT_NSFW_LABELS,
                                            device=device)
    log.info("safety checker: %s", checker.describe())
    return checker


def make_router(settings: ServerSettings, variants):
    from magi_server.serving.routing import Router

    return Router(variants, dict(settings.route_map))


def build_context(settings: ServerSettings, *, pipeline=None, store: JobStore | None = None,
                  pipelines: dict | None = None) -> ServerContext:
    """Load the models, open the job store (unless given), recover what a dead process left, start the engines:
    one per served variant (``--model``, repeatable), each with its own runner and queue bound. ``pipeline``: the
    one model, already loaded (tests); ``pipelines``: variant name -> loaded pipeline, for several."""
    from magi_server.engine.group import EngineGroup
    from magi_server.engine.loop import Engine
    from magi_server.runtime.model_runner import leave_a_core_for_serving
    from magi_server.runtime.pipeline import MagiPipeline
    from magi_server.serving.common import ServerContext
    from magi_server.serving.events import on_engine_event
    from magi_server.serving.janitor import Janitor, disk_bytes
    from magi_server.serving.metrics import GaugeReaders, Metrics

    leave_a_core_for_serving(settings.device)  # before any model thread starts: the HTTP side keeps a core
    specs = model_specs(settings)
    if pipelines is None:
        pipelines = {specs[0][0]: pipeline} if pipeline is not None else {}
    for name, location in specs:
        if name not in pipelines:
            from magi_server.runtime.loading import hide_progress_bars

            hide_progress_bars()
            pipelines[name] = MagiPipeline.from_pretrained(
                location, device=settings.device, cache_dir=settings.cache_dir, compile=settings.compile,
                cp=settings.cp,
            )
    notice = ""
    if any(str(location).lower() == "tiny" for _, location in specs):
        from magi_server.runtime.tiny import TINY_NOTICE

        notice = TINY_NOTICE
    # each variant's own model; the engines' requests (one outputs folder: job ids are unique); one safety checker
    # for all of them
    checker = load_safety_checker(settings, settings.device)
    executors = {name: pipelines[name].runner.with_outputs(settings.outputs_dir, safety_checker=checker)
                 for name, _ in specs}
    router = make_router(settings, [variant_for(name, pipelines[name].config) for name, _ in specs])
    store = store if store is not None else open_job_store(settings.db_path)
    holder: dict[str, ServerContext] = {}
    publish = _output_publisher(settings)  # outputs in an object store: each file is stored before its event
    engine = EngineGroup({name: Engine(
        executor, on_event=lambda event: on_engine_event(holder["ctx"], publish(event) if publish else event),
        max_queue=settings.max_queue, memory_budget_bytes=settings.memory_budget_bytes,
        max_batch_size=settings.max_batch_size, job_timeout_s=settings.job_timeout_s,
    ) for name, executor in executors.items()})
    first = next(iter(executors.values()))
    metrics = Metrics(GaugeReaders(
        queue_depth=lambda: engine.queue_depth, engine_alive=engine.alive,
        jobs_by_status=lambda: {status.value: n for status, n in store.count_by_status().items()},
        gpu_memory_bytes=first.device_memory_bytes, outputs_bytes=lambda: disk_bytes(settings.outputs_dir),
    ))
    ctx = ServerContext(settings=settings, store=store, engine=engine, executor=first,
                        model_name=", ".join(router.served), notice=notice, metrics=metrics,
                        model_limits=first.model_limits(), router=router,
                        output_store=None if publish is None else publish.output_store,
                        prompt_enhancer=load_prompt_enhancer(settings, settings.device),
                        safety_checker="none" if checker is None else "configured")
    if settings.keep_jobs_s:
        ctx.janitor = Janitor(store, settings.outputs_dir, settings.keep_jobs_s, output_store=ctx.output_store)
    holder["ctx"] = ctx

    requeued, failed = store.recover_after_restart(settings.max_attempts)
    if requeued or failed:
        log.warning("recovered after restart: %d job(s) re-queued, %d failed as interrupted", len(requeued), len(failed))
    _remove_partial_files(Path(settings.outputs_dir))
    for job in store.queued_in_order():
        try:
            member = engine.member(job.variant)
        except KeyError:  # stored by a server that ran another model list
            store.fail(job.id, f"this server no longer runs the model variant {job.variant!r} the job needs; it "
                               f"runs {', '.join(router.served)}", "invalid_input", "model")
            continue
        member.submit(job.id, job.params, reserved=False)
    engine.start()
    if ctx.janitor is not None:
        ctx.janitor.start()
    # this process owns the store: a webhook the last one held (sending, or waiting out a backoff) is due now
    store.release_webhook_claims()
    ctx.webhooks = start_webhooks(ctx)
    return ctx


def build_api_context(settings: ServerSettings, *, store, variants) -> ServerContext:
    """An API replica (``magi-server api``): the HTTP layer over a shared PostgreSQL store, with no model and no
    engine. ``variants``: the model variants the workers serve (:func:`variant_for` of each ``--model``'s config,
    read without loading it): routes are resolved and submits validated against them here, before any worker
    sees them."""
    from magi_server.serving.cluster import LeaseSweeper, SharedQueue, StoreEventBridge
    from magi_server.serving.common import ServerContext
    from magi_server.serving.janitor import Janitor, disk_bytes
    from magi_server.serving.metrics import GaugeReaders, Metrics

    _require_shared_store(store, "api")
    queue = SharedQueue(store)
    metrics = Metrics(GaugeReaders(
        queue_depth=lambda: queue.queue_depth, engine_alive=queue.alive,
        jobs_by_status=lambda: {status.value: n for status, n in store.count_by_status().items()},
        gpu_memory_bytes=lambda: None, outputs_bytes=lambda: disk_bytes(settings.outputs_dir),
    ))
    output_store = None
    if settings.output_store:
        from magi_server.serving.outputs import open_output_store

        output_store = open_output_store(settings.output_store)
    router = make_router(settings, variants)
    ctx = ServerContext(settings=settings, store=store, engine=queue, executor=None,
                        model_name=", ".join(router.served), metrics=metrics, model_limits=variants[0].limits,
                        store_queue_bound=settings.max_queue, runs_jobs=False, output_store=output_store,
                        router=router, prompt_enhancer=load_prompt_enhancer(settings), safety_checker="per-worker")
    bridge = StoreEventBridge(store, ctx.hub)
    sweeper = LeaseSweeper(store, max_attempts=settings.max_attempts, every_s=settings.lease_s / 2)

    def tick() -> None:
        bridge.on_tick()
        sweeper.maybe_sweep()

    ctx.listener = store.listener(bridge.on_message, on_tick=tick, name="magi-api-listener").start()
    if settings.keep_jobs_s:
        ctx.janitor = Janitor(store, settings.outputs_dir, settings.keep_jobs_s, output_store=output_store)
        ctx.janitor.start()
    # every replica sends due webhooks; the store's claims keep two from sending one (a dead replica's lapse)
    ctx.webhooks = start_webhooks(ctx)
    return ctx


def start_webhooks(ctx):
    """The webhook dispatcher of this process (serving/webhooks.py), started: WaveSpeed's and fal's formats."""
    from magi_server.serving.adapters import fal, wavespeed
    from magi_server.serving.webhooks import WebhookDispatcher, WebhookFormat, WebhookKeys, webhook_policy

    s = ctx.settings
    formats = {"wavespeed": WebhookFormat(wavespeed.webhook_body, WebhookKeys.wavespeed_headers),
               "fal": WebhookFormat(fal.webhook_body, WebhookKeys.fal_headers)}
    return WebhookDispatcher(ctx, formats, policy=webhook_policy(s.allow_private_urls, s.webhook_timeout_s),
                             max_attempts=s.webhook_attempts, backoff_initial_s=s.webhook_backoff_s,
                             backoff_max_s=s.webhook_backoff_max_s).start()


def _output_publisher(settings: ServerSettings):
    """The OutputPublisher for ``settings.output_store`` (an object store), or None when outputs stay in the folder.
    Raises OutputStoreError (one line) when the store cannot be reached."""
    if not settings.output_store:
        return None
    from magi_server.serving.outputs import open_output_store
    from magi_server.serving.worker import OutputPublisher

    return OutputPublisher(open_output_store(settings.output_store), settings.outputs_dir)


def _require_shared_store(store, command: str) -> None:
    from magi_server.serving.jobs import JobStoreUnusable

    if not hasattr(store, "claim"):
        location = getattr(store, "path", store)
        store.close()
        raise JobStoreUnusable(f"`magi-server {command}` shares its queue through a PostgreSQL job store: pass "
                               f"--db postgresql://... (got {location}); `magi-server serve` runs on SQLite alone")


def run_worker(settings: ServerSettings, *, pipeline=None, stop=None) -> int:
    """A GPU worker (``magi-server worker``) until SIGTERM/SIGINT (or ``stop``, a threading.Event, is set): load the
    model, then claim jobs from the shared store for a local engine (serving/worker.py). On the first signal it
    claims no more and gives its running jobs ``drain_timeout_s`` to finish; a second signal cuts that short; what
    still runs then goes back to the queue with its attempt refunded. Returns the exit code: 0, or 1 when the engine
    died of a device error (its jobs are reported failed; a supervisor should start a fresh worker)."""
    import os
    import secrets
    import signal
    import socket
    import threading

    from magi_server.engine.loop import Engine
    from magi_server.runtime.pipeline import MagiPipeline
    from magi_server.serving.cluster import LeaseSweeper
    from magi_server.serving.common import ServerContext
    from magi_server.serving.events import on_engine_event
    from magi_server.serving.worker import FencedStore, ForwardingHub, WorkerLink

    stop = stop if stop is not None else threading.Event()
    hurry = threading.Event()

    def on_signal(signum, frame) -> None:
        if stop.is_set():
            hurry.set()
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
    started = time.monotonic()
    store = open_job_store(settings.db_path)
    _require_shared_store(store, "worker")
    worker_id = settings.worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    (variant, location), *more = model_specs(settings)
    if more:
        store.close()
        raise ValueError("a worker runs one model: give --model once (start a worker per variant)")
    try:
        if pipeline is None:
            from magi_server.runtime.loading import hide_progress_bars

            hide_progress_bars()
            pipeline = MagiPipeline.from_pretrained(location, device=settings.device, cache_dir=settings.cache_dir,
                                                    compile=settings.compile, cp=settings.cp)
        executor = pipeline.runner.with_outputs(settings.outputs_dir,
                                                safety_checker=load_safety_checker(settings, settings.device))
        holder: dict = {}

        publish = _output_publisher(settings)

        def on_event(event) -> None:
            if publish is not None:
                event = publish(event)  # the object first, then the row that points at it
            on_engine_event(holder["ctx"], event)  # the row first: a freed place is claimed after the end is written
            holder["link"].on_engine_event(event)

        engine = Engine(executor, on_event=on_event, max_queue=max(64, settings.max_batch_size),
                        memory_budget_bytes=settings.memory_budget_bytes, max_batch_size=settings.max_batch_size,
                        job_timeout_s=settings.job_timeout_s)
        holder["ctx"] = ServerContext(settings=settings, store=FencedStore(store, worker_id), engine=engine,
                                      executor=executor, model_name=str(settings.model), hub=ForwardingHub(store),
                                      model_limits=executor.model_limits(),
                                      output_store=None if publish is None else publish.output_store)
        link = holder["link"] = WorkerLink(store, engine, worker_id=worker_id, capacity=settings.max_batch_size,
                                           lease_s=settings.lease_s, outputs_dir=settings.outputs_dir,
                                           output_store=holder["ctx"].output_store, variants=[variant])
        sweeper = LeaseSweeper(store, max_attempts=settings.max_attempts, every_s=settings.lease_s / 2)

        def tick() -> None:
            link.on_tick()
            sweeper.maybe_sweep()

        listener = store.listener(link.on_message, on_tick=tick, name="magi-worker-listener")
        engine.start()
        listener.start()
        link.start()
        log.info("worker %s ready in %.1f s: model variant %s, up to %d job(s) at a time", worker_id,
                 time.monotonic() - started, variant, settings.max_batch_size)
        while not stop.wait(0.5):
            if engine.dead_reason is not None:
                log.critical("worker %s stops: %s", worker_id, engine.dead_reason)
                break
        link.stop_claiming()
        engine.drain()
        deadline = time.monotonic() + settings.drain_timeout_s
        while link.held and time.monotonic() < deadline and not hurry.is_set() and engine.dead_reason is None:
            time.sleep(0.1)
        engine.stop()
        returned = link.give_back()
        if returned:
            log.info("worker %s: %d job(s) went back to the queue", worker_id, len(returned))
        link.stop()
        listener.stop()
        return 1 if engine.dead_reason is not None else 0
    finally:
        store.close()


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
        for key in ("job_id", "event", "error_code", "http"):
            value = getattr(record, key, None)
            if value is not None:
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=True)


def log_uncaught_exceptions() -> None:
    """Route the tracebacks Python would print itself (the main thread's, another thread's, an unraisable one)
    through logging, so that under ``--log-format json`` they are JSON lines like the rest."""
    import sys
    import threading

    crash_log = logging.getLogger("magi_server.crash")

    def main_hook(kind, value, tb):
        crash_log.critical("uncaught %s", kind.__name__, exc_info=(kind, value, tb))

    def thread_hook(args):
        if args.exc_type is SystemExit:
            return
        crash_log.error("uncaught %s in thread %s", args.exc_type.__name__,
                        getattr(args.thread, "name", "?"), exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    def unraisable_hook(unraisable):
        crash_log.warning("%s: %r", unraisable.err_msg or "exception ignored", unraisable.object,
                          exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))

    sys.excepthook = main_hook
    threading.excepthook = thread_hook
    sys.unraisablehook = unraisable_hook


# The kernel's accept queue, and also how many sockets asyncio accepts in one go before any of them reaches the
# guard. A burst of connections beyond it loses SYNs and waits out TCP's 1 s retransmit (CI saw 100 simultaneous
# submits at 64: a tenth of them took 1.06 s); it is kept this small because the reserve below grows with it.
ACCEPT_BACKLOG = 128


def connection_cap(configured: int, reserve: int = 128 + 2 * ACCEPT_BACKLOG) -> int:
    """How many connections may be open at once: ``configured``, but always ``reserve`` file descriptors below the
    process's open-file limit (raised to its hard limit first), so the job store, the encoder and the model files
    can still be opened while every connection slot is taken. The reserve also covers one accept burst
    (:data:`ACCEPT_BACKLOG` sockets taken before the guard sees them) and the sockets it closes to make room for
    them (closed one loop turn later): without it, accept() itself fails with EMFILE and stops accepting for a
    second."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(16, min(configured, soft - reserve))


def serve(settings: ServerSettings, *, log_ready: bool = True, build=None) -> None:
    """Run every listener until SIGTERM/SIGINT.

    The listeners bind first and answer at once (liveness 200, readiness 503 "loading", other routes 503) while the
    model loads on a thread of its own; then the real apps take over. On the first signal the server drains:
    readiness turns 503 "draining", submits get 503 + Retry-After, the running jobs have ``drain_timeout_s`` to
    finish while polls and downloads are still answered; then the listeners close and whatever still runs goes back
    to the queue for the next process. A second signal cuts the drain short. Raises what opening the job store or
    loading the model raised (the CLI turns it into one line). ``build(settings, store) -> ServerContext`` makes
    the context (default :func:`build_context`, which loads the model; an API replica passes one that does not).
    """
    import contextlib
    import signal
    import threading

    import uvicorn

    from magi_server.serving.listeners import ConnectionGuard, StartingApp

    class _Server(uvicorn.Server):
        # uvicorn re-raises SIGTERM/SIGINT after its own shutdown, which would kill the process before the job
        # store is drained; the signals are handled once for every listener below instead
        def capture_signals(self):
            return contextlib.nullcontext()

    if not settings.api_keys and settings.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to listen on {settings.host} without --api-key (anyone could use the GPU)")
    listeners = [("main", settings.port)] + [(role, port) for role, port in (
        ("fal_queue", settings.fal_queue_port), ("fal_run", settings.fal_run_port)) if port]
    if len(listeners) > 1 and not (settings.tls_certfile and settings.tls_keyfile):
        raise SystemExit("fal listeners need --tls-cert and --tls-key (fal-client only speaks https)")
    started = time.monotonic()
    store = open_job_store(settings.db_path)  # before anything listens: a corrupt store is one line from the CLI
    guard = ConnectionGuard(max_connections=connection_cap(settings.max_connections),
                            header_timeout_s=settings.header_timeout_s,
                            body_min_bytes_per_s=settings.body_min_bytes_per_s)
    protocol = guard.protocol_class()
    fronts = {role: StartingApp(str(settings.model)) for role, _ in listeners}
    servers = []
    for role, port in listeners:
        tls = {} if role == "main" else {"ssl_certfile": settings.tls_certfile, "ssl_keyfile": settings.tls_keyfile}
        servers.append(_Server(uvicorn.Config(
            fronts[role], host=settings.host, port=port, http=protocol, ws="none", lifespan="off", log_config=None,
            access_log=False,  # CountRequests writes it, without query strings or tokens
            timeout_keep_alive=5, timeout_graceful_shutdown=5, backlog=ACCEPT_BACKLOG, **tls,
        )))

    async def run_all() -> ServerContext | None:
        loop = asyncio.get_running_loop()
        stopping, hurry = asyncio.Event(), asyncio.Event()

        def on_signal(signame: str) -> None:
            if stopping.is_set():
                log.warning("%s again: stopping now (the running jobs go back to the queue)", signame)
                hurry.set()
                return
            log.info("%s: draining (no new jobs; the running ones have %.0f s to finish, then go back to the "
                     "queue)", signame, settings.drain_timeout_s)
            stopping.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
        serving = asyncio.ensure_future(asyncio.gather(*(server.serve() for server in servers)))
        while not all(server.started for server in servers) and not serving.done():
            await asyncio.sleep(0.01)
        loaded: asyncio.Future = loop.create_future()

        def load() -> None:  # a daemon thread: a signal during a long load must not wait for it
            try:
                result = build(settings, store) if build is not None else build_context(settings, store=store)
                outcome = lambda: loaded.done() or loaded.set_result(result)  # noqa: E731
            except BaseException as exc:  # noqa: BLE001 - handed to the loop, which raises it
                outcome = lambda error=exc: loaded.done() or loaded.set_exception(error)  # noqa: E731
            try:
                loop.call_soon_threadsafe(outcome)
            except RuntimeError:  # the loop is closed: stopped while loading, nobody waits for the model now
                pass

        if not serving.done():
            threading.Thread(target=load, name="magi-load", daemon=True).start()
        stop_wait = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({loaded, stop_wait, serving}, return_when=asyncio.FIRST_COMPLETED)
        ctx = loaded.result() if loaded.done() and loaded.exception() is None else None
        if ctx is not None and not stopping.is_set() and not serving.done():
            from magi_server.serving.app import create_app

            for role, front in fronts.items():
                front.app = create_app(ctx, role)
            if log_ready:
                log.info("%s %s %s in %.1f s; serving on %s", "model" if ctx.runs_jobs else "API replica for",
                         ctx.model_name, "loaded" if ctx.runs_jobs else "ready", time.monotonic() - started,
                         settings.base_url())
            await asyncio.wait({stop_wait, serving}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.is_set():
                await _drain(ctx, settings.drain_timeout_s, hurry)
        for server in servers:
            server.should_exit = True
        stop_wait.cancel()
        await serving
        if loaded.done() and loaded.exception() is not None:
            raise loaded.exception()
        return ctx

    ctx = None
    try:
        ctx = asyncio.run(run_all())
    finally:
        if ctx is not None:
            from magi_server.serving.app import shutdown

            shutdown(ctx)
        else:
            store.close()


async def _drain(ctx: ServerContext, timeout_s: float, hurry: asyncio.Event) -> None:
    """Let the running jobs finish (nothing new starts, submits are refused) for at most ``timeout_s``."""
    ctx.engine.drain()
    deadline = time.monotonic() + timeout_s
    while ctx.engine.running_count and time.monotonic() < deadline and not hurry.is_set():
        await asyncio.sleep(0.1)
    left = ctx.engine.running_count
    if left:
        log.info("drain over with %d job(s) still running: they go back to the queue", left)
    else:
        log.info("drained: no job running")
