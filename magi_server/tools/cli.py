"""Command-line entry point and composition root: ``magi-server download`` and ``magi-server generate`` (more
commands join as they land).

This is the one place that reads environment variables; everything below it takes explicit arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from magi_server.params import FPS, MAX_FRAMES


def _cmd_download(args: argparse.Namespace) -> int:
    from magi_server.tools.download import DownloadError, download

    try:
        download(args.variant, args.dir, include_t5=not args.skip_t5)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


GENERATE_EPILOG = """\
output size (width x height; every side a multiple of 16, the DiT's patch):
  --resolution  --aspect-ratio   16:9        9:16        1:1
  480p                           832x480     480x832     624x624
  720p                           1280x720    720x1280    960x960
  --aspect-ratio auto (the default) picks the nearest of the three to the --image's shape, else 16:9.
  --width W --height H instead of --resolution sets any size; with neither, the model config's default size
  is used (the tiny preset: 128x128, so a laptop CPU finishes in seconds).

batch (--batch FILE.jsonl --out-dir DIR): one JSON object per line with
  prompt (string or list of strings, required), image, video, frames (or num_frames), resolution,
  aspect_ratio, width, height, steps (or num_inference_steps), seed, output (a file name in DIR, default
  <line number as 4 digits>.mp4, e.g. 0007.mp4).
  Relative image/video paths are read from the JSONL file's folder. --frames, --steps, --resolution,
  --aspect-ratio, --width/--height given on the command line are defaults for lines that do not set them.
  Lines whose output file exists are skipped (finished files are renamed into place, so they are complete):
  rerun the same command to resume. A bad line is reported and the rest go on; DIR/batch_report.json lists
  every line (done / skipped / failed, seed, error). Exit code 0 when no line failed, 1 otherwise.

exit codes: 0 done, 1 generation failed (or a batch line failed), 2 bad input (before any model work where
possible; stderr says "error: <parameter>: <message>").
"""

# The flags that describe one video; their argparse names are the field names a JSONL batch line uses.
# named as the request contract names them (params.GenerationParams), so an error names the same parameter as the
# HTTP APIs and MagiPipeline do; --frames and --steps are kept as short spellings
_JOB_FLAGS = ("num_frames", "resolution", "aspect_ratio", "width", "height", "num_inference_steps")


def _cache_dir(flag: str | None) -> Path:
    if flag:
        return Path(flag).expanduser()
    env = os.environ.get("MAGI_SERVER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "magi-server"


def _device(flag: str | None) -> str:
    from magi_server.media import InputError

    if flag == "cpu" or (flag is None and not Path("/dev/nvidiactl").exists()):
        return "cpu"  # without importing torch (seconds): serve binds its port sooner
    import torch

    if flag is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", flag):
        raise InputError("device", f"must be cpu, cuda or cuda:N, got {flag!r}")
    if flag.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device", "CUDA is not available here; use --device cpu")
    return flag


def _load_pipeline(args: argparse.Namespace, config, device: str):
    from magi_server.runtime.pipeline import MagiPipeline

    # config is the MagiConfig already read (and checked) from --config: passed as an object, not re-read
    return MagiPipeline.from_pretrained(
        args.model, config=config if args.config else None, device=device, cache_dir=_cache_dir(args.cache_dir),
        compile=args.compile,
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    from magi_server.params import ParamError
    from magi_server.tools.generate import model_config, parse_job

    # The library logs through `logging` (the tiny-preset notice is a warning); show it as a plain line.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    flags = {name: getattr(args, name) for name in _JOB_FLAGS if getattr(args, name) is not None}
    progress = not args.no_progress
    job = None
    try:
        if args.batch is not None:
            for flag, value in (("prompt", args.prompt), ("image", args.image), ("video", args.video),
                                ("seed", args.seed), ("output", args.output)):
                if value is not None:
                    raise ParamError(flag, "not with --batch: put it in the JSONL lines")
            if args.out_dir is None:
                raise ParamError("out_dir", "required with --batch")
            if not Path(args.batch).is_file():
                raise ParamError("batch", f"file not found: {args.batch!r}")
        else:
            if args.out_dir is not None:
                raise ParamError("out_dir", "only with --batch; use -o for one video")
            fields = dict(flags, prompt=args.prompt, image=args.image, video=args.video, seed=args.seed)
            fields = {k: v for k, v in fields.items() if v is not None}
            if args.output is not None and (Path(args.output).is_dir() or not args.output.strip()):
                raise ParamError("output", f"must be a file path, got {args.output!r}")
        config = model_config(args.model, args.config)
        if args.batch is not None:
            # the batch-wide defaults are checked once here rather than failing every line the same way
            parse_job(dict(flags, prompt="defaults check"), config)
        else:
            job = parse_job(fields, config)
        device = _device(args.device)
    except ParamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def load():
        return _load_pipeline(args, config, device)

    try:
        return _generate(args, config, flags, job, load, progress)
    except KeyboardInterrupt:
        # the MP4 writer has already removed its temporary file; a batch has written its report
        print("interrupted", file=sys.stderr)
        return 130


def _generate(args: argparse.Namespace, config, flags: dict, job, load, progress: bool) -> int:
    """The part after the cheap checks: load the model once, then one video (``job``) or the batch."""
    from magi_server.params import ParamError
    from magi_server.tools.generate import run_batch, run_job

    if args.batch is not None:
        try:
            summary = run_batch(Path(args.batch), Path(args.out_dir), config, load, defaults=flags,
                                model=args.model, progress=progress)
        except ParamError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: model: {exc}", file=sys.stderr)
            return 2
        return summary.exit_code

    output = Path(args.output) if args.output is not None else Path(f"magi-{job.seed}.mp4")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        pipe = load()
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: model: {exc}", file=sys.stderr)
        return 2
    try:
        result = run_job(pipe, job, output, progress=progress)
    except ParamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line instead of a traceback; the cause is in the message
        print(f"error: generation failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {result.path}: {result.num_frames} frames, {job.width}x{job.height}, {result.fps} fps, "
          f"seed {result.seed}")
    return 0


def _setup_logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler()
    if args.log_format == "json":
        from magi_server.composition import JsonLogFormatter, log_uncaught_exceptions

        handler.setFormatter(JsonLogFormatter())
        log_uncaught_exceptions()  # a thread's or the interpreter's traceback is a JSON line too
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.captureWarnings(True)


def _server_settings(args: argparse.Namespace, *, runs_model: bool, answers_http: bool):
    """ServerSettings from the flags of serve, api or worker (and the environment: API keys, the URL secret);
    raises ValueError with one line for a bad device or model. Flags a command lacks keep their defaults."""
    from magi_server.serving.settings import ServerSettings
    from magi_server.tools.generate import model_config

    from magi_server.serving.outputs import is_s3_url

    in_object_store = is_s3_url(args.outputs)
    models = args.model or ["tiny"]
    fields = dict(model=models[0], more_models=tuple(models[1:]), db_path=args.db,
                  outputs_dir=args.scratch if in_object_store else args.outputs,
                  output_store=args.outputs if in_object_store else None,
                  cache_dir=str(_cache_dir(args.cache_dir)), drain_timeout_s=args.drain_timeout)
    if answers_http:
        keys = list(args.api_key or [])
        env_keys = os.environ.get("MAGI_SERVER_API_KEYS", "")
        keys += [k.strip() for k in env_keys.split(",") if k.strip()]
        tiny = all(str(_model_location(model)).lower() == "tiny" for model in models)
        fields.update(
            host=args.host, port=args.port, public_base_url=args.public_url, api_keys=tuple(keys),
            max_queue=args.max_queue, max_queue_per_key=args.max_queue_per_key, sync_timeout_s=args.sync_timeout,
            resolution_scale=args.resolution_scale if args.resolution_scale is not None else (0.125 if tiny else 1.0),
            fal_queue_port=args.fal_queue_port, fal_run_port=args.fal_run_port, tls_certfile=args.tls_cert,
            tls_keyfile=args.tls_key, max_body_bytes=args.max_body_mb * 1024 * 1024,
            keep_jobs_s=args.keep_jobs_hours * 3600.0 or None, max_connections=args.max_connections,
            header_timeout_s=args.header_timeout, file_url_ttl_s=args.file_url_ttl_hours * 3600.0,
            file_url_secret=os.environ.get("MAGI_SERVER_URL_SECRET") or None,
            route_map=tuple(_route_map(args.route_map).items()),
            allow_private_urls=_private_allowlist(args.allow_private_urls),
            prompt_enhancer=args.prompt_enhancer, webhook_attempts=args.webhook_attempts,
            webhook_backoff_s=args.webhook_backoff, max_num_frames=args.max_frames)
        if not FPS <= args.max_frames <= MAX_FRAMES:
            raise ValueError(f"--max-frames must be between {FPS} and {MAX_FRAMES}")
        if args.webhook_attempts < 1 or not args.webhook_backoff > 0:
            raise ValueError("--webhook-attempts must be at least 1 and --webhook-backoff positive")
        if args.prompt_enhancer:
            _check_prompt_enhancer(args.prompt_enhancer)
    if runs_model:
        device = _device(args.device)
        budget = _serving_memory_budget(_model_location(models[0]), device, args.device_memory)
        if args.cp < 1:
            raise ValueError("--cp must be at least 1")
        fields.update(device=device, max_batch_size=args.max_batch, job_timeout_s=args.job_timeout or None,
                      compile=args.compile, cp=args.cp, **({} if budget is None else {"memory_budget_bytes": budget}))
        if args.safety_labels is not None and not args.safety_checker:
            raise ValueError("--safety-labels names labels of the --safety-checker model: give --safety-checker DIR")
        if args.safety_checker:
            fields.update(safety_checker=args.safety_checker,
                          safety_labels=_check_safety_checker(args.safety_checker, args.safety_labels))
        for model in models:  # e.g. a preset not downloaded yet: one line naming the command, before any loading
            model_config(_model_location(model))
    if getattr(args, "lease_seconds", None) is not None:
        if args.lease_seconds <= 0:
            raise ValueError("--lease-seconds must be positive")
        fields["lease_s"] = args.lease_seconds
    if getattr(args, "worker_id", None):
        fields["worker_id"] = args.worker_id
    settings = ServerSettings(**fields)
    _check_route_map(settings)
    return settings


def _check_route_map(settings) -> None:
    """ValueError with one line for a --route-map naming an unknown route or a variant not served (before any
    model loads)."""
    from magi_server.composition import model_specs
    from magi_server.serving.routing import ROUTE_PROMISES, RouteMapError

    names = [name for name, _ in model_specs(settings)]
    if len(set(names)) != len(names):
        raise ValueError(f"model: two --model values have the same variant name ({', '.join(names)}); name them "
                         f"with NAME=DIR")
    for route, name in settings.route_map:
        if route not in ROUTE_PROMISES:
            raise RouteMapError(f"--route-map: unknown route {route!r}; routes: {', '.join(ROUTE_PROMISES)}")
        if name not in names:
            raise RouteMapError(f"--route-map: {route} -> {name!r}, which is not served; served: {', '.join(names)}")


def _check_store(location: str, *, shared: bool = False) -> int:
    """0, or 2 after one line when the job store cannot be opened (found before the model loads: minutes for 24B).
    ``shared``: api and worker processes share their queue, which takes a PostgreSQL store."""
    from magi_server.serving.jobs import JobStoreUnusable
    from magi_server.serving.stores import is_postgres_url, open_job_store

    if shared and not is_postgres_url(location):
        print(f"magi-server: api replicas and workers share their queue through a PostgreSQL job store: pass "
              f"--db postgresql://user@host/db (got {location!r}); `magi-server serve` runs on SQLite alone",
              file=sys.stderr)
        return 2
    try:
        open_job_store(location).close()
    except JobStoreUnusable as exc:
        print(f"magi-server: {exc}", file=sys.stderr)
        return 2
    return 0


def _check_output_store(settings) -> int:
    """0, or 2 after one line when the object store named by --outputs cannot be reached (before anything loads)."""
    if not settings.output_store:
        return 0
    from magi_server.serving.outputs import OutputStoreError, open_output_store

    try:
        open_output_store(settings.output_store).close()
    except OutputStoreError as exc:
        print(f"magi-server: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    return _run_server(args, runs_model=True)


def _cmd_api(args: argparse.Namespace) -> int:
    return _run_server(args, runs_model=False)


def _run_server(args: argparse.Namespace, *, runs_model: bool) -> int:
    from magi_server.composition import serve
    from magi_server.serving.jobs import JobStoreUnusable

    if _check_store(args.db, shared=not runs_model):
        return 2
    _setup_logging(args)
    try:
        settings = _server_settings(args, runs_model=runs_model, answers_http=True)
    except ValueError as exc:  # InputError is one
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if _check_output_store(settings):
        return 2
    build = None
    if not runs_model:
        from functools import partial

        from magi_server.composition import build_api_context

        try:
            variants = _served_variants(settings)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        build = partial(_build_api, build_api_context, variants=variants)
    try:
        serve(settings, build=build)
    except JobStoreUnusable as exc:  # opened again by serve(): the store may have changed since the check above
        print(f"magi-server: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a model or prompt enhancer that did not load: its one line
        print(f"magi-server: {exc}", file=sys.stderr)
        return 2
    return 0


def _build_api(build_api_context, settings, store, *, variants):
    return build_api_context(settings, store=store, variants=variants)


def _model_location(spec: str) -> str:
    """The preset or folder of a --model value (``NAME=DIR`` names a folder)."""
    name, sep, path = str(spec).partition("=")
    return path.strip() if sep and name.strip() and path.strip() else spec


def _check_prompt_enhancer(path: str) -> None:
    """ValueError with one line unless ``path`` is a folder holding a transformers model config (the weights load
    with the server; this catches a wrong path before anything loads)."""
    if not Path(path).is_dir():
        raise ValueError(f"--prompt-enhancer: {path!r} is not a folder")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"--prompt-enhancer: {path} holds no model config: {first}") from None


def _check_safety_checker(path: str, labels: str | None) -> tuple[str, ...]:
    """The --safety-labels names (empty: the checker's defaults), after checking that ``path`` is a folder whose
    model config has at least one of them among its labels and one other (ValueError with one line, before any
    model loads; the classifier itself loads with the server)."""
    from magi_server.runtime.safety_checker import DEFAULT_NSFW_LABELS, parse_labels

    wanted = parse_labels(labels) if labels is not None else ()
    if labels is not None and not wanted:
        raise ValueError("--safety-labels: give at least one label name (comma-separated)")
    if not Path(path).is_dir():
        raise ValueError(f"--safety-checker: {path!r} is not a folder")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"--safety-checker: {path} holds no model config: {first}") from None
    names = [str(name) for _, name in sorted((int(i), n) for i, n in (config.id2label or {}).items())]
    flagging = [name for name in names if name.strip().lower() in set(wanted or DEFAULT_NSFW_LABELS)]
    if not flagging:
        raise ValueError(f"--safety-checker: {path} has none of the labels {', '.join(wanted or DEFAULT_NSFW_LABELS)} "
                         f"(its labels: {', '.join(names) or 'none'}); name its NSFW labels with --safety-labels")
    if len(flagging) == len(names):
        raise ValueError(f"--safety-checker: every label of {path} ({', '.join(names)}) is an NSFW label: every "
                         f"frame would be flagged; name only its NSFW labels with --safety-labels")
    return wanted


def _private_allowlist(items: list[str]) -> tuple[str, ...]:
    """--allow-private-urls, checked (ValueError with one line for an entry that is no network or host name)."""
    from magi_server.media.fetch import SourcePolicy

    try:
        SourcePolicy(private_allowlist=tuple(items))
    except ValueError as exc:
        raise ValueError(f"--allow-private-urls: {exc}") from None
    return tuple(items)


def _route_map(items: list[str]) -> dict[str, str]:
    from magi_server.serving.routing import parse_route_map

    return parse_route_map(items)


def _served_variants(settings) -> list:
    """What an API replica routes to: each --model's variant, from its config alone (no weights are needed here:
    a preset's config is known, a folder's is read). ValueError with one line for a model it cannot describe."""
    from magi_server.composition import make_router, model_specs, variant_for
    from magi_server.models.config import canonical_preset_name, preset
    from magi_server.tools.generate import model_config

    variants = []
    for name, location in model_specs(settings):
        canonical = canonical_preset_name(location)
        config = preset(canonical) if canonical is not None else model_config(location)
        variants.append(variant_for(name, config))
    make_router(settings, variants)  # a --route-map naming an unknown route or variant is one line, now
    return variants


def _cmd_worker(args: argparse.Namespace) -> int:
    from magi_server.composition import run_worker
    from magi_server.serving.jobs import JobStoreUnusable

    if len(args.model or []) > 1:
        print("magi-server: a worker runs one model: give --model once (start a worker per variant)", file=sys.stderr)
        return 2
    if _check_store(args.db, shared=True):
        return 2
    _setup_logging(args)
    try:
        settings = _server_settings(args, runs_model=True, answers_http=False)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if _check_output_store(settings):
        return 2
    try:
        return run_worker(settings)
    except (JobStoreUnusable, ValueError) as exc:  # e.g. two --model values, or weights that do not load
        print(f"magi-server: {exc}", file=sys.stderr)
        return 2


def _serving_memory_budget(model: str, device: str, device_memory: str | None) -> int | None:
    """Device memory left for requests once the model is loaded (the admission budget), from the planner's
    accounting; raises ValueError with one line when the model plus the smallest request cannot fit. None on a
    CPU without ``--device-memory`` (admission then counts jobs)."""
    if device_memory is None and not device.startswith("cuda"):
        return None
    from magi_server.tools import plan as planner

    if device_memory is not None:
        total = planner.parse_bytes(device_memory)
    else:
        import torch

        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    name, config = planner.model_config(model)
    problem = planner.startup_problem(config, total, name=name)
    if problem:
        raise ValueError(problem)
    width, height = planner.RESOLUTIONS["720p"]  # the largest size served: its decode workspace is reserved
    return total - planner.model_memory(config, width=width, height=height)["static_bytes"]


def _cmd_bench(args: argparse.Namespace) -> int:
    import httpx

    from magi_server.tools import bench

    try:
        workload = bench.Workload.load(args.workload)
    except (OSError, ValueError) as exc:
        print(f"error: workload: {exc}", file=sys.stderr)
        return 2
    key = args.api_key or os.environ.get("WAVESPEED_API_KEY")
    with httpx.Client(base_url=args.endpoint.rstrip("/"), timeout=httpx.Timeout(60.0, connect=10.0)) as client:
        report = bench.run(client, workload, api_key=key, gpu_dollars_per_hour=args.gpu_dollars_per_hour,
                           poll_s=args.poll, timeout_s=args.timeout, stream=not args.no_stream)
    report["endpoint"] = args.endpoint
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = bench.markdown(report)
    Path(args.markdown or out.with_suffix(".md")).write_text(table)
    print(table)
    return 0 if report["failed"] == 0 else 1


def _cmd_plan(args: argparse.Namespace) -> int:
    from magi_server.tools import plan as planner

    if args.write_fixture:
        planner.write_memory_fixture(Path(args.write_fixture), progress=lambda line: print(line, file=sys.stderr))
        return 0
    if not args.model:
        print("error: --model: required (a preset name or a weights folder)", file=sys.stderr)
        return 2
    try:
        width, height = planner.parse_resolution(args.resolution)
        memory = planner.parse_bytes(args.device_memory) if args.device_memory else None
        inputs = planner.PlanInputs(
            model=args.model, width=width, height=height, frames=args.frames, steps=args.steps, window=args.window,
            caption_tokens=args.caption_tokens, t5_device=args.t5, cp=args.cp,
            kv_offload=None if args.kv_cache is None else args.kv_cache == "host",
        )
        result = planner.plan(inputs, gpu=args.gpu, device_memory=memory, layers=args.layers,
                              suggest=not args.no_suggest)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict(), indent=2) if args.json else planner.format_plan(result))
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from magi_server.serving.jobs import JobStoreUnusable
    from magi_server.serving.jobs_postgres import redact_dsn
    from magi_server.serving.stores import migrate_job_store

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        found, now = migrate_job_store(args.db)
    except JobStoreUnusable as exc:
        print(f"magi-server: {exc}", file=sys.stderr)
        return 2
    where = redact_dsn(args.db)
    print(f"job store {where}: schema version {found} -> {now}" if found != now
          else f"job store {where}: schema version {now}, nothing to do")
    return 0


def _store_flags(p: argparse.ArgumentParser, *, db_help: str, db_required: bool = False) -> None:
    """Flags of every process that serves jobs (serve, api, worker)."""
    p.add_argument("--model", action="append", metavar="PRESET|DIR|NAME=DIR",
                   help="a preset that magi-server download fetched (e.g. 4.5B-distill, found in the Hugging Face "
                        "cache), a weights folder (NAME=DIR names it), or 'tiny' (default: tiny, random weights). "
                        "serve and api take it repeated: every variant named is served, each hosted route by the "
                        "variant it promises (a 24B route by a 24B model, ...); a worker runs one")
    if db_required:
        p.add_argument("--db", required=True, help=db_help)
    else:
        p.add_argument("--db", default="magi-server.db", help=db_help)
    p.add_argument("--outputs", default="outputs",
                   help="where finished MP4s go: a folder (default: outputs; API replicas and workers share it) or "
                        "s3://bucket/prefix, an S3-compatible store reached with the standard AWS environment "
                        "variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL)")
    p.add_argument("--scratch", default="outputs-scratch", metavar="DIR",
                   help="with --outputs s3://...: the local folder for uploads and videos being written "
                        "(default: outputs-scratch)")
    p.add_argument("--cache-dir", default=None, help="where the tiny preset keeps its generated weights")
    p.add_argument("--drain-timeout", type=float, default=60.0, metavar="S",
                   help="on SIGTERM, seconds the running jobs may take to finish before going back to the queue")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: one object per line with the job id as a field")


def _http_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the processes that answer HTTP (serve, api)."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--public-url", default=None, help="base URL clients use to reach this server")
    p.add_argument("--api-key", action="append", help="accepted API key (repeatable; also $MAGI_SERVER_API_KEYS)")
    p.add_argument("--max-queue", type=int, default=64, help="jobs waiting before submits get 429")
    p.add_argument("--max-queue-per-key", type=int, default=None, metavar="N",
                   help="jobs one API key may have waiting or running (default: half of --max-queue when there "
                        "are several keys, else no per-key limit)")
    p.add_argument("--sync-timeout", type=float, default=600.0, help="seconds a sync-mode request may wait")
    p.add_argument("--max-body-mb", type=int, default=25, help="largest request body accepted")
    p.add_argument("--max-frames", type=int, default=1440, metavar="N",
                   help="the longest video a request may ask for, in frames at 24 fps (default 1440: one minute; "
                        f"at most {MAX_FRAMES})")
    p.add_argument("--keep-jobs-hours", type=float, default=168.0,
                   help="finished jobs, their videos and inputs are deleted this long after they end (0 = never)")
    p.add_argument("--resolution-scale", type=float, default=None,
                   help="render every size smaller (default: 1/8 for the tiny preset, 1 otherwise)")
    p.add_argument("--file-url-ttl-hours", type=float, default=24.0, metavar="H",
                   help="how long the signed output URLs the APIs hand out keep working (the signing secret: "
                        "$MAGI_SERVER_URL_SECRET, else one kept in the outputs folder)")
    p.add_argument("--max-connections", type=int, default=1000, metavar="N",
                   help="open connections at once (kept below the open-file limit; the longest-idle one is "
                        "closed for a new one, else 503)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a client has to send a request's headers (slow or silent sockets are closed)")
    p.add_argument("--allow-private-urls", nargs="+", action="extend", default=[], metavar="CIDR|HOST",
                   help="networks (10.0.0.0/8, 127.0.0.1) and host names a request's image/video URLs and webhooks "
                        "may point at although private, on any port (off by default: only public hosts on ports "
                        "80/443)")
    p.add_argument("--webhook-attempts", type=int, default=10, metavar="N",
                   help="tries per webhook before it is logged as failed (a non-2xx answer or none is retried)")
    p.add_argument("--webhook-backoff", type=float, default=2.0, metavar="S",
                   help="first pause between webhook tries; it doubles (with jitter) up to 15 minutes")
    p.add_argument("--prompt-enhancer", default=None, metavar="DIR",
                   help="a local instruction-tuned causal language model (a transformers checkpoint folder) that "
                        "rewrites prompts when a request sets enable_prompt_expansion (default: none; such requests "
                        "are then refused)")
    p.add_argument("--route-map", action="append", default=[], metavar="ROUTE=VARIANT",
                   help="run a hosted route (e.g. wavespeed-ai/magi-1-24b, fal-ai/magi, magichour) by this served "
                        "variant whatever it promises; responses then name the variant that ran (repeatable)")
    p.add_argument("--fal-queue-port", type=int, default=None, help="TLS port for fal-client's queue calls")
    p.add_argument("--fal-run-port", type=int, default=None, help="TLS port for fal-client's sync calls")
    p.add_argument("--tls-cert", default=None, help="certificate (PEM) for the fal listeners")
    p.add_argument("--tls-key", default=None, help="private key (PEM) for the fal listeners")


def _model_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the processes that run the model (serve, worker)."""
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--max-batch", type=int, default=4, help="requests sharing one batched model call")
    p.add_argument("--job-timeout", type=float, default=3600.0, help="seconds a job may run (0 = no limit)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the DiT layers (default: on for CUDA, off on the CPU)")
    p.add_argument("--cp", type=int, default=1, metavar="N",
                   help="context parallelism: split each video's model calls over N ranks (GPUs; processes on a "
                        "CPU), Ulysses-style; N must divide the model's attention heads and KV groups (default: 1)")
    p.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="device memory to plan admission against, e.g. 80GB (default: the GPU's total; "
                        "`magi-server plan` shows what a request needs)")
    p.add_argument("--safety-checker", default=None, metavar="DIR",
                   help="a local image classifier (a transformers image-classification checkpoint folder) run on "
                        "sampled frames of every chunk: WaveSpeed reports has_nsfw_contents, fal and Magic Hour "
                        "fail a flagged job (default: none; outputs are then not checked)")
    p.add_argument("--safety-labels", default=None, metavar="LABELS",
                   help="comma-separated labels of the --safety-checker model that flag a frame (their "
                        "probabilities are summed; default: nsfw,porn,hentai,sexy)")


def _lease_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lease-seconds", type=float, default=30.0, metavar="S",
                   help="a worker's claim on a job lapses this long after its last renewal (it renews every third "
                        "of it); the job then goes back to the queue (default: 30; the same on every process)")


def build_parser() -> argparse.ArgumentParser:
    from magi_server.models.config import REAL_PRESETS

    parser = argparse.ArgumentParser(prog="magi-server", description="Self-hosted MAGI-1 video generation server.")
    sub = parser.add_subparsers(dest="command", required=True)

    dl = sub.add_parser("download", help="download one MAGI-1 variant (plus the shared VAE, T5 and special tokens)")
    dl.add_argument("variant", help=f"one of: {', '.join(REAL_PRESETS)}")
    dl.add_argument("--dir", default=None, metavar="PATH",
                    help="a plain folder to download into (default: the Hugging Face cache, $HF_HOME or $HF_HUB_CACHE; "
                         "$HF_TOKEN, $HF_ENDPOINT and $HF_HUB_OFFLINE apply too)")
    dl.add_argument("--skip-t5", action="store_true", help="do not download the 19 GB T5-XXL encoder")
    dl.set_defaults(func=_cmd_download)

    gen = sub.add_parser(
        "generate", help="generate a video (or a JSONL batch of them) offline, without the server",
        description="Generate one video from flags, or many from a JSONL file (--batch), and write MP4s.",
        epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    one = gen.add_argument_group("one video")
    one.add_argument("--prompt", action="append", metavar="TEXT",
                     help="the prompt; repeat it for chunk-wise prompts: prompt i from chunk i on, the last one for "
                          "the rest (a chunk is 24 frames, 1 s)")
    one.add_argument("--image", metavar="PATH|URL", help="first frame: image-to-video (PNG, JPEG or WebP)")
    one.add_argument("--video", metavar="PATH|URL", help="prefix video: video-to-video (its first 32 frames)")
    one.add_argument("--seed", type=int, metavar="N", help="random seed (default: random; printed at the end)")
    one.add_argument("-o", "--output", metavar="PATH", help="MP4 to write (default: magi-<seed>.mp4)")
    opts = gen.add_argument_group("video options (with --batch: defaults for lines that do not set them)")
    opts.add_argument("--num-frames", "--frames", dest="num_frames", type=int, metavar="N",
                      help="frames at 24 fps (default: the model config's)")
    opts.add_argument("--resolution", metavar="{480p,720p}", help="output size preset (see the table below)")
    opts.add_argument("--aspect-ratio", metavar="{16:9,9:16,1:1,auto}", help="with --resolution (default: auto)")
    opts.add_argument("--width", type=int, metavar="W", help="output width, a multiple of 16 (with --height)")
    opts.add_argument("--height", type=int, metavar="H", help="output height, a multiple of 16 (with --width)")
    opts.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int, metavar="N",
                      help="sampling steps (default: the model config's)")
    bat = gen.add_argument_group("batch")
    bat.add_argument("--batch", metavar="FILE.jsonl", help="generate every line of a JSONL file (see below)")
    bat.add_argument("--out-dir", metavar="DIR", help="where --batch writes its MP4s and batch_report.json")
    mod = gen.add_argument_group("model")
    mod.add_argument("--model", default="tiny", metavar="PRESET|DIR",
                     help="a preset that magi-server download fetched (e.g. 4.5B-distill, found in the Hugging Face "
                          "cache), a weights folder, or 'tiny' (default: tiny, random weights)")
    mod.add_argument("--config", metavar="JSON", help="reference-style MAGI-1 config overriding the folder's")
    mod.add_argument("--device", metavar="{cpu,cuda}",
                     help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    mod.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="torch.compile the DiT layers (default: on for CUDA, off on the CPU)")
    mod.add_argument("--cache-dir", metavar="DIR",
                     help="where the tiny preset's weights are kept "
                          "(default: $MAGI_SERVER_CACHE or ~/.cache/magi-server)")
    gen.add_argument("--no-progress", action="store_true", help="no progress bars")
    gen.set_defaults(func=_cmd_generate)

    srv = sub.add_parser("serve", help="serve the WaveSpeed, fal and Magic Hour APIs over the loaded model")
    _store_flags(srv, db_help="job store: a SQLite file, or a postgresql:// URL several processes share "
                              "(default: magi-server.db)")
    _http_flags(srv)
    _model_flags(srv)
    srv.set_defaults(func=_cmd_serve)

    api = sub.add_parser("api", help="an API replica: the HTTP APIs over a PostgreSQL job store shared with "
                                     "workers (no model here; run any number behind a load balancer)")
    _store_flags(api, db_help="the shared job store: a postgresql:// URL (required)", db_required=True)
    _http_flags(api)
    _lease_flag(api)
    api.set_defaults(func=_cmd_api)

    wrk = sub.add_parser("worker", help="a GPU worker: loads the model and runs jobs it claims from the PostgreSQL "
                                        "job store the API replicas share (one per GPU or GPU group)")
    _store_flags(wrk, db_help="the shared job store: a postgresql:// URL (required)", db_required=True)
    _model_flags(wrk)
    _lease_flag(wrk)
    wrk.add_argument("--worker-id", default=None, metavar="NAME",
                     help="this worker's name in the job store's leases (default: host:pid:random)")
    wrk.set_defaults(func=_cmd_worker)

    mg = sub.add_parser("migrate", help="create or upgrade the job store's schema (before starting replicas)")
    mg.add_argument("--db", default="magi-server.db", help="SQLite file or postgresql:// URL (as serve --db)")
    mg.set_defaults(func=_cmd_migrate)

    bn = sub.add_parser("bench", help="benchmark a WaveSpeed-compatible endpoint (this server or the hosted one)")
    bn.add_argument("--endpoint", default="http://127.0.0.1:8000",
                    help="base URL (e.g. https://api.wavespeed.ai for the hosted API)")
    bn.add_argument("--workload", required=True, help="workload JSON (see benchmarks/workloads/)")
    bn.add_argument("--api-key", default=None, help="Bearer key (default: $WAVESPEED_API_KEY)")
    bn.add_argument("--gpu-dollars-per-hour", type=float, default=None, help="your GPU's price, for self-hosted cost")
    bn.add_argument("--out", default="bench-result.json", help="JSON result (the Markdown table goes beside it)")
    bn.add_argument("--markdown", default=None, help="Markdown table path (default: --out with .md)")
    bn.add_argument("--poll", type=float, default=0.5, help="seconds between result polls")
    bn.add_argument("--timeout", type=float, default=3600.0, help="seconds one request may take")
    bn.add_argument("--no-stream", action="store_true", help="do not open the event stream (time to first chunk)")
    bn.set_defaults(func=_cmd_bench)

    pl = sub.add_parser(
        "plan", help="what a request needs on a GPU: memory peak, FLOPs, roofline time, and what would fit",
        description="Run the model's own code on the meta device (no GPU, no weights) for one request and report "
                    "per model call and per request: FLOPs by kind, bytes moved, kernels, the device-memory peak "
                    "and a roofline time; whether it fits, and if not, what would.",
    )
    pl.add_argument("--model", metavar="PRESET|DIR", help="preset (24B-distill, 4.5B-distill-quant, ...), weights "
                    "folder or config JSON")
    pl.add_argument("--resolution", default="720p", metavar="480p|720p|WxH", help="output size (default 720p)")
    pl.add_argument("--frames", type=int, default=96, metavar="N", help="frames at 24 fps (default 96)")
    pl.add_argument("--steps", type=int, metavar="S", help="sampling steps (default: the model config's)")
    pl.add_argument("--window", type=int, metavar="W", help="chunks denoised together (default: the config's, 4)")
    pl.add_argument("--device-memory", metavar="SIZE", help="device memory, e.g. 80GB or 80GiB (default: the GPU's)")
    pl.add_argument("--gpu", default="H100", choices=("H100", "H200"), help="GPU profile for the roofline")
    pl.add_argument("--cp", type=int, default=1, metavar="N", help="context-parallel GPUs (an estimate)")
    pl.add_argument("--t5", choices=("device", "cpu"), help="where the T5 encoder lives (default: the config's)")
    pl.add_argument("--kv-cache", choices=("host", "device"),
                    help="where the KV cache lives between calls (default: the config's kv_offload: host)")
    pl.add_argument("--caption-tokens", type=int, default=100, metavar="N",
                    help="valid caption tokens of a text pass (default 100, as spec section 11)")
    pl.add_argument("--layers", choices=("extrapolate", "all"), default="extrapolate",
                    help="run a 3-layer stand-in and count its middle layer L-2 times (default), or all layers")
    pl.add_argument("--no-suggest", action="store_true", help="do not plan alternatives when it does not fit")
    pl.add_argument("--json", action="store_true", help="JSON instead of the table")
    pl.add_argument("--write-fixture", metavar="PATH",
                    help="(maintainers) recompute the accounted per-request peaks of tests/data/plan_peaks.json")
    pl.set_defaults(func=_cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
