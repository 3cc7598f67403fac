"""Running the ffmpeg binary that imageio-ffmpeg bundles: the command prefix, a one-shot run with a timeout whose
failure becomes an :class:`InputError`, the telling line of its error output, and checks on the numbers that go
into its command lines (a float or a string there would change the filter chain).

Why ffmpeg for everything: the reference decodes and scales with ffmpeg, and the exact pixels of a resized input
depend on swscale (spec §9), so using the same filter chain is the only way to feed the VAE the same numbers. It
also keeps Pillow out of the dependency list. Callers always name the demuxer (``png_pipe``, ``mp4``, ...) and pin
the protocol whitelist, so ffmpeg never sniffs a user file into a playlist format that could open other files or
URLs.
"""
from __future__ import annotations

import math
import re
import subprocess
from typing import Any

import numpy as np

from magi_server.media import InputError

MAX_OUTPUT_SIDE = 16384


def ffmpeg_command(*args: str) -> list[str]:
    """The ffmpeg command line for ``args``: quiet, never reading the terminal, only errors logged."""
    # Imported here, not at module level: locating the bundled binary touches the disk.
    import imageio_ffmpeg

    return [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", *args]


_LOG_PREFIX = re.compile(r"^(\[[^\]]*@ 0x[0-9a-f]+\]\s*)+")


def ffmpeg_reason(stderr: bytes, hide: tuple[str, ...] = ()) -> str:
    """The most telling line of ffmpeg's error output, without object addresses or our own temporary paths."""
    lines = [_LOG_PREFIX.sub("", ln).strip() for ln in stderr.decode("utf-8", "replace").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        return "ffmpeg gave no reason"
    # ffmpeg ends with generic "Task finished" / "Nothing was written" lines; the first line names the real problem.
    reason = lines[0]
    for secret in hide:
        if secret:
            reason = reason.replace(secret, "<input>")
    return reason[:300]


def run_ffmpeg(args: list[str], *, stdin: bytes | None, timeout_s: float, param: str, what: str,
               max_pixels: int, hide: tuple[str, ...] = ()) -> bytes:
    """ffmpeg's stdout; a timeout, an oversized frame or a decode failure raises InputError naming ``param``."""
    try:
        proc = subprocess.run(ffmpeg_command(*args), input=stdin if stdin is not None else b"", capture_output=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise InputError(param, f"decoding the {what} took longer than {timeout_s:g} s") from None
    if proc.returncode != 0:
        err = proc.stderr
        if b"exceeds specified max pixel count" in err:
            raise InputError(param, f"the {what} has more than {max_pixels} pixels per frame")
        raise InputError(param, f"could not decode the {what} ({ffmpeg_reason(err, hide)})")
    return proc.stdout


def format_fps(fps: float) -> str:
    return str(int(fps)) if float(fps).is_integer() else repr(float(fps))


def check_size(width: Any, height: Any) -> tuple[int, int]:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_OUTPUT_SIDE:
            raise InputError(name, f"must be an integer from 1 to {MAX_OUTPUT_SIDE}, got {value!r}")
    return int(width), int(height)


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(name, f"must be an integer >= 1, got {value!r}")
    return int(value)


def check_fps(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or not 0 < value <= 1000:
        raise InputError("fps", f"must be a number in (0, 1000], got {value!r}")
    return float(value)
