"""Offline generation for ``magi-server generate``: one video from command-line flags, or a JSONL batch of them.

Owns:

* the output-size rules (:data:`RESOLUTIONS`, :func:`resolve_size`): ``resolution`` + ``aspect_ratio``, or an
  explicit ``width`` and ``height``, or the model config's default size;
* turning a mapping of user fields into the request contract's :class:`~magi_server.params.GenerationParams`
  (:func:`parse_job`), checked by :func:`magi_server.params.validate` against the model config's limits, the rules
  every entry point shares. The CLI flags and every JSONL line go through this one function, so a batch line
  accepts exactly what the flags accept and fails the same way;
* the checks that need only the model config, done before any model is loaded (a typo must not cost a model
  load): the contract's, plus prompt counts per chunk and that local input files exist;
* running a job with a progress bar (:func:`run_job`) and running a whole batch, resumably, with a report
  (:func:`run_batch`).

Every problem with user input raises or records :class:`~magi_server.params.ParamError`, whose ``param`` is the
field name. Nothing here reads environment variables: the CLI (the composition root) passes everything in.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TextIO

from magi_server import params as contract
from magi_server.params import GenerationParams, ParamError, nearest_aspect
from magi_server.media import InputError

# (width, height) per resolution and aspect ratio: the contract's one size table (the server's too), by tier
RESOLUTIONS: Mapping[str, Mapping[str, tuple[int, int]]] = MappingProxyType({
    tier: MappingProxyType({aspect: contract.RESOLUTION_SIZES[(tier, aspect)] for aspect in contract.ASPECT_RATIOS})
    for tier in contract.RESOLUTIONS
})
ASPECT_RATIOS = (*contract.ASPECT_RATIOS, "auto")
# The fields a JSONL line (or the CLI, under the same names) may carry. Unknown fields are refused: a misspelt
# "frame" silently ignored would produce a video of the wrong length without a word.
FIELDS = (
    "prompt", "image", "video", "frames", "num_frames", "resolution", "aspect_ratio", "width", "height", "steps",
    "num_inference_steps", "seed", "output",
)
SIZE_FIELDS = ("resolution", "aspect_ratio", "width", "height")
# A line that sets any field of a group replaces the batch-wide defaults of the whole group (a line giving
# width/height must not be combined with a default --resolution into a conflict the line's author never wrote).
_DEFAULT_GROUPS = (SIZE_FIELDS, ("frames", "num_frames"), ("steps", "num_inference_steps"))

REPORT_NAME = "batch_report.json"


@dataclass
class LineResult:
    """What happened to one batch line (one entry of the report)."""

    line: int
    status: str  # "done", "skipped" or "failed"
    output: str | None = None
    seed: int | None = None
    frames: int | None = None
    width: int | None = None
    height: int | None = None
    seconds: float | None = None
    param: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class BatchSummary:
    done: int
    skipped: int
    failed: int
    report: Path

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


# ------------------------------------------------------------------------------------------------------- models


def model_config(model: str, config: str | os.PathLike | None = None):
    """The MagiConfig ``MagiPipeline.from_pretrained(model, config)`` will use, read without loading any weights.

    Raises InputError("model" / "config", ...) for what from_pretrained would refuse, so that the CLI can stop
    before the slow part.
    """
    from magi_server.models.config import PRESET_NAMES, MagiConfig, canonical_preset_name, preset

    loaded = None
    if config is not None:
        if not Path(config).is_file():
            raise InputError("config", f"file not found: {str(config)!r}")
        try:
            loaded = MagiConfig.from_json(config)
        except (ValueError, TypeError, KeyError, OSError) as exc:
            raise InputError("config", str(exc)) from None
    folder = Path(model)
    if canonical_preset_name(model) == "tiny" and not folder.exists():  # no torch import: serve binds sooner
        return loaded if loaded is not None else preset("tiny")
    from magi_server.runtime.loading import CheckpointError, find_downloaded_model, resolve_model_folder

    if folder.exists():
        try:
            return resolve_model_folder(folder, loaded)
        except (CheckpointError, ValueError, OSError) as exc:
            raise InputError("model", str(exc)) from None
    name = canonical_preset_name(model)
    if name is not None:
        try:
            return resolve_model_folder(find_downloaded_model(name), loaded)
        except (CheckpointError, ValueError, OSError) as exc:
            raise InputError("model", str(exc)) from None
    raise InputError("model", f"{model!r} is neither a weights folder nor a preset ({', '.join(PRESET_NAMES)})")


# ------------------------------------------------------------------------------------------------------- sizes


def resolve_size(
    fields: Mapping[str, Any], default: tuple[int, int], image_size: Callable[[], tuple[int, int]] | None = None
) -> tuple[int, int]:
    """(width, height) from the size fields.

    ``width`` + ``height`` (both; :func:`magi_server.params.validate` checks their values) win; else ``resolution``
    (480p / 720p) with ``aspect_ratio`` (default auto: the image's nearest aspect when ``image_size`` is given, else
    16:9) looks up :data:`RESOLUTIONS`; else ``default`` (the model config's size). ``image_size`` returns the input
    image's (width, height) and is only called for aspect "auto", since it may decode or download the image.
    """
    resolution, aspect = fields.get("resolution"), fields.get("aspect_ratio")
    width, height = fields.get("width"), fields.get("height")
    if width is not None or height is not None:
        if resolution is not None:
            raise ParamError("resolution", "give either resolution (with aspect_ratio) or width and height, not both")
        if aspect is not None:
            raise ParamError("aspect_ratio", "only applies with resolution; width and height already fix the shape")
        if width is None or height is None:
            raise ParamError("height" if height is None else "width", "give both width and height")
        return width, height
    if resolution is None:
        if aspect is not None:
            raise ParamError("aspect_ratio", f"only applies with resolution ({', '.join(RESOLUTIONS)})")
        return default
    key = resolution.lower() if isinstance(resolution, str) else None
    if key not in RESOLUTIONS:
        raise ParamError("resolution", f"must be one of {', '.join(RESOLUTIONS)}, got {resolution!r}")
    aspect = "auto" if aspect is None else aspect
    if aspect not in ASPECT_RATIOS:
        raise ParamError("aspect_ratio", f"must be one of {', '.join(ASPECT_RATIOS)}, got {aspect!r}")
    if aspect == "auto":
        aspect = nearest_aspect(*image_size()) if image_size is not None else "16:9"
    return RESOLUTIONS[key][aspect]


# --------------------------------------------------------------------------------------------------------- jobs


def parse_job(fields: Mapping[str, Any], config, *, base_dir: Path | None = None) -> GenerationParams:
    """Check one request's fields against ``config`` (a MagiConfig) and return the request; raises ParamError.

    The seed is drawn here when the request has none, so that it can be reported even if the run fails. A refusal
    of :func:`magi_server.params.validate` names the field as the request wrote it (``frames`` / ``steps`` are
    accepted for ``num_frames`` / ``num_inference_steps``). ``base_dir``: relative image / video paths are taken
    from there (a batch's own folder) instead of the working directory. URLs and data: URIs are not fetched here,
    only by the pipeline (except for aspect_ratio "auto", which needs the image's size).
    """
    from magi_server.runtime.chunking import chunk_layout
    from magi_server.runtime.model_runner import model_limits
    from magi_server.runtime.pipeline import as_prompts

    unknown = [k for k in fields if k not in FIELDS]
    if unknown:
        raise ParamError(str(unknown[0]), f"unknown field; a request may have {', '.join(FIELDS)}")
    s = config.sampling
    image = _source("image", fields.get("image"), base_dir)
    video = _source("video", fields.get("video"), base_dir)
    frames_key = _alias(fields, "frames", "num_frames")
    steps_key = _alias(fields, "steps", "num_inference_steps")
    width, height = resolve_size(
        fields, (s.video_size_w, s.video_size_h), (lambda: _image_size(image)) if image is not None else None
    )
    prompt = fields.get("prompt")
    params = GenerationParams(
        prompts=() if prompt is None else as_prompts(prompt), width=width, height=height,
        num_frames=fields.get(frames_key, s.num_frames), num_inference_steps=fields.get(steps_key, s.num_steps),
        seed=contract.resolve_seed(fields.get("seed")), image_path=image, video_path=video,
    )
    written = {"num_frames": frames_key, "num_inference_steps": steps_key}
    try:
        contract.validate(params, model_limits(config))
    except ParamError as exc:
        raise ParamError(written.get(exc.param, exc.param), exc.message, exc.kind) from None
    params = replace(params, width=int(width), height=int(height), num_frames=int(params.num_frames),
                     num_inference_steps=int(params.num_inference_steps))  # 48.0 -> 48, now that it passed

    # The pipeline checks this only after encoding the image; for t2v and i2v the chunk count is known now. (For
    # v2v it depends on the decoded video's length, so the pipeline is left to judge.)
    if video is None and len(params.prompts) > 1:
        layout = chunk_layout(params.num_frames, 1 if image is not None else 0, s.chunk_width,
                              s.temporal_downsample_factor)
        if len(params.prompts) > layout.num_denoised_chunks:
            raise ParamError(
                "prompt",
                f"{len(params.prompts)} prompts for a video of {layout.num_denoised_chunks} chunks "
                f"({s.chunk_width * s.temporal_downsample_factor} frames each); give at most one per chunk",
            )
    return params


def run_job(pipe, params: GenerationParams, output: Path, *, progress: bool = True, position: int = 0,
            leave: bool = True, desc: str = "sampling"):
    """Generate ``params`` into ``output`` (an MP4), with a tqdm bar over the sampler's model calls."""
    from tqdm import tqdm

    bar = tqdm(total=None, unit="call", desc=desc, position=position, leave=leave, disable=not progress,
               dynamic_ncols=True)

    def on_step(done: int, total: int) -> None:
        # The call count depends on the chunk plan, which only the pipeline computes; take it from the first call.
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    try:
        return pipe(
            list(params.prompts), image=params.image_path, video=params.video_path, num_frames=params.num_frames,
            height=params.height, width=params.width, num_inference_steps=params.num_inference_steps,
            window_size=params.window_size, seed=params.seed, output_type="mp4", output_path=output,
            callback_on_step=on_step,
        )
    finally:
        bar.close()


# -------------------------------------------------------------------------------------------------------- batch


def run_batch(
    batch_file: Path,
    out_dir: Path,
    config,
    load_pipeline: Callable[[], Any],
    *,
    defaults: Mapping[str, Any] | None = None,
    model: str | None = None,
    progress: bool = True,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> BatchSummary:
    """Run every line of a JSONL file into ``out_dir``; returns the counts (the report is written to out_dir).

    Each non-blank line is a JSON object with the :data:`FIELDS` (``output``: a file name inside ``out_dir``,
    default ``<line number, 4 digits>.mp4``). A line whose output already exists is skipped: the pipeline's writer
    renames a finished file into place, so an existing output is complete and a rerun resumes an interrupted
    batch. A bad line is reported with its number and the run goes on. ``defaults`` (the CLI's size / frames /
    steps flags) apply to lines that do not set that group themselves. ``load_pipeline`` is called once, and
    only if some line needs generating. Raises ParamError for a batch file that cannot be read at all.
    """
    from tqdm import tqdm

    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    defaults = dict(defaults or {})
    lines = _read_batch(batch_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / REPORT_NAME
    previous_seeds = _previous_seeds(report_path)

    results: list[LineResult] = []
    pending: list[tuple[int, GenerationParams, str]] = []
    claimed: dict[str, int] = {}

    def fail(number: int, exc: Exception, output: str | None = None, seed: int | None = None) -> None:
        param = getattr(exc, "param", None)
        message = str(exc) if isinstance(exc, (ParamError, _LineError)) else f"{type(exc).__name__}: {exc}"
        results.append(LineResult(number, "failed", output=output, seed=seed, param=param, error=message))
        tqdm.write(f"line {number}: {message}", file=stderr)

    # Pass 1: parse and check every line, no model needed. A batch that is already complete loads nothing.
    for number, text in lines:
        if isinstance(text, str) and not text.strip():
            continue
        name = None
        try:
            if isinstance(text, UnicodeDecodeError):
                raise _LineError(f"not UTF-8 text ({text.reason} at byte {text.start})")
            try:
                fields = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _LineError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(fields, dict):
                raise _LineError(f"must be a JSON object, got {type(fields).__name__}")
            name = _output_name(fields.get("output"), number)
            if name in claimed:
                raise ParamError("output", f"{name} is also the output of line {claimed[name]}")
            claimed[name] = number
            if (out_dir / name).exists():
                results.append(LineResult(number, "skipped", output=name, seed=previous_seeds.get(name)))
                continue
            request = _with_defaults(defaults, {k: v for k, v in fields.items() if k != "output"})
            pending.append((number, parse_job(request, config, base_dir=batch_file.parent), name))
        except (ParamError, _LineError) as exc:
            fail(number, exc, output=name)

    total = len(results) + len(pending)
    bar = tqdm(total=total, initial=len(results), unit="video", desc="batch", position=0, disable=not progress,
               dynamic_ncols=True)
    try:
        if pending:
            pipe = load_pipeline()
        for number, job, name in pending:
            started = time.monotonic()
            try:
                out = run_job(pipe, job, out_dir / name, progress=progress, position=1, leave=False,
                              desc=f"line {number}")
            except Exception as exc:  # noqa: BLE001 - one line's crash (OOM, encoder failure) must not end the batch
                fail(number, exc, output=name, seed=job.seed)
            else:
                results.append(LineResult(
                    number, "done", output=name, seed=out.seed, frames=out.num_frames, width=job.width,
                    height=job.height, seconds=round(time.monotonic() - started, 3),
                ))
            bar.update(1)
    finally:
        # Also on Ctrl-C: what finished so far is recorded, and a rerun skips it.
        bar.close()
        summary = _write_report(report_path, results, batch_file=batch_file, out_dir=out_dir, model=model)
    print(f"batch: {summary.done} done, {summary.skipped} skipped, {summary.failed} failed; report: {report_path}",
          file=stdout)
    return summary


class _LineError(Exception):
    """A batch line that is not a JSON object at all (no field to blame)."""


def _read_batch(path: Path) -> list[tuple[int, str | UnicodeDecodeError]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ParamError("batch", f"cannot read {str(path)!r} ({exc.strerror or exc})") from None
    lines: list[tuple[int, str | UnicodeDecodeError]] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            # utf-8-sig on line 1: editors on Windows like to start a file with a byte-order mark
            lines.append((number, raw.decode("utf-8-sig" if number == 1 else "utf-8")))
        except UnicodeDecodeError as exc:
            lines.append((number, exc))
    return lines


def _output_name(value: Any, number: int) -> str:
    if value is None:
        return f"{number:04d}.mp4"
    if (
        not isinstance(value, str) or not value.lower().endswith(".mp4") or value.startswith(".")
        or "/" in value or "\\" in value or value.strip() != value or len(value) > 255
    ):
        raise ParamError("output", f"must be a plain file name ending in .mp4 (written inside the out dir), "
                                   f"got {value!r}")
    return value


def _with_defaults(defaults: Mapping[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    merged = dict(defaults)
    for group in _DEFAULT_GROUPS:
        if any(k in fields for k in group):
            for k in group:
                merged.pop(k, None)
    merged.update(fields)
    return merged


def _previous_seeds(report: Path) -> dict[str, int]:
    """Seeds of earlier runs by output name, so that a resumed batch's report still says how each video was made."""
    try:
        entries = json.loads(report.read_text(encoding="utf-8")).get("lines", [])
        return {e["output"]: e["seed"] for e in entries
                if isinstance(e.get("output"), str) and isinstance(e.get("seed"), int)}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _write_report(path: Path, results: list[LineResult], *, batch_file: Path, out_dir: Path,
                  model: str | None) -> BatchSummary:
    results = sorted(results, key=lambda r: r.line)
    counts = {status: sum(r.status == status for r in results) for status in ("done", "skipped", "failed")}
    report = {
        "batch": str(batch_file.resolve()),
        "out_dir": str(out_dir.resolve()),
        "model": model,
        **counts,
        "lines": [r.to_json() for r in results],
    }
    # Same trick as the MP4s: write beside, then rename, so a reader never sees half a report.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return BatchSummary(counts["done"], counts["skipped"], counts["failed"], path)


# ------------------------------------------------------------------------------------------------------ helpers


def _alias(fields: Mapping[str, Any], short: str, long: str) -> str:
    """Which of two names for one field the request used (the short one if neither); both is an error."""
    if short in fields and long in fields:
        raise ParamError(long, f"give either {short} or {long}, not both")
    return long if long in fields else short


def _is_remote(source: str) -> bool:
    return source.lower().startswith(("http://", "https://", "data:"))


def _source(name: str, value: Any, base_dir: Path | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InputError(name, f"must be a file path or URL, got {value!r}")
    if _is_remote(value):
        return value
    path = Path(value).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise InputError(name, f"file not found: {str(path)!r}")
    return str(path)


def _image_size(source: str) -> tuple[int, int]:
    from magi_server.media.images import load_image

    array = load_image(source)
    return array.shape[1], array.shape[0]
