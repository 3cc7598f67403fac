"""Video and image I/O: request inputs in, MP4 files out, all through the ffmpeg binary that imageio-ffmpeg bundles.

Owns:

* reading a user-supplied image or video from a path, raw bytes, a ``data:`` URI or an http(s) URL, with the size,
  pixel, time and network limits that keep a hostile input from costing more than a bounded amount of work
  (``load_image``, ``load_video``, :class:`SourcePolicy`);
* the reference's preprocessing (spec §6.9, §9): i2v = ffmpeg ``scale=W:H`` stretch (bicubic), v2v = ffmpeg
  ``fps=fps,scale=W:H`` and the first 32 frames (``resize_image``, ``load_image(width=, height=)``, ``load_video``);
* writing the generated frames as an H.264 MP4 chunk by chunk, deterministically and atomically (:class:`Mp4Writer`);
* counting the frames of a finished MP4 (``probe_video``) and the VAE-layout conversion (``to_uint8_frames``).

Every problem with what a caller handed in raises :class:`InputError`, whose message starts with the parameter name
("image: ...") so that the HTTP layer can answer 422 with it unchanged. Failures of the encoder itself (disk full,
ffmpeg killed) raise :class:`VideoWriteError`, which is a server fault, not the user's.

Why ffmpeg for everything: the reference decodes and scales with ffmpeg, and the exact pixels of a resized input
depend on swscale (spec §9), so using the same filter chain is the only way to feed the VAE the same numbers. It
also keeps Pillow out of the dependency list. Demuxers are always named explicitly (``png_pipe``, ``mp4``, ...) and
the protocol whitelist is pinned, so ffmpeg never sniffs a user file into a playlist format that could open other
files or URLs.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import math
import os
import re
import secrets
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from magi_server.params import ParamError

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]

# Defaults sized for the hosted-API use case: a phone photo (48 MP) still fits, a decompression bomb does not.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 50_000_000
MAX_VIDEO_BYTES = 200 * 1024 * 1024
MAX_VIDEO_PIXELS = 4096 * 4096
MAX_OUTPUT_SIDE = 16384

_IMAGE_DECODE_TIMEOUT_S = 30.0
_VIDEO_DECODE_TIMEOUT_S = 120.0
_ENCODER_CLOSE_TIMEOUT_S = 600.0

_X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")

# ISO-BMFF files normally open with "ftyp"; old QuickTime files may open with any of the other top-level boxes.
_MP4_FIRST_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")


class InputError(ParamError):
    """Bad media input. ``str(err)`` starts with the parameter name, e.g. ``"image: not a PNG, JPEG or WebP image"``."""

    def __init__(self, param: str, message: str):
        super().__init__(param, message, "media_error")


class VideoWriteError(RuntimeError):
    """The MP4 encoder failed (ffmpeg exited with an error, the disk is full, ...): a server fault, not bad input."""


@dataclass(frozen=True)
class SourcePolicy:
    """Where ``load_image`` / ``load_video`` may read from.

    The defaults suit trusted callers (CLI, tests): local paths are read, URLs must point at public addresses on
    ports 80/443. The HTTP layer should pass ``allow_paths=False`` so that a request can never name a server file.
    ``allow_private_hosts`` exists for tests against a loopback server; never enable it for user-supplied URLs
    (spec reliability.md §4.1: SSRF to loopback / metadata addresses).
    """

    allow_paths: bool = True
    allow_private_hosts: bool = False
    allowed_ports: tuple[int, ...] | None = (80, 443)
    timeout_s: float = 15.0

    def __post_init__(self) -> None:
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError("SourcePolicy.timeout_s must be a positive number of seconds")


@dataclass(frozen=True)
class VideoInfo:
    """What ``probe_video`` measured by decoding every frame."""

    frames: int
    width: int
    height: int
    fps: float

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps if self.fps else 0.0


# --------------------------------------------------------------------------------------------------------------------
# ffmpeg plumbing
# --------------------------------------------------------------------------------------------------------------------


def _ffmpeg_exe() -> str:
    # Imported here, not at module level: locating the bundled binary touches the disk.
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


_LOG_PREFIX = re.compile(r"^(\[[^\]]*@ 0x[0-9a-f]+\]\s*)+")


def _ffmpeg_reason(stderr: bytes, hide: tuple[str, ...] = ()) -> str:
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


def _run_ffmpeg(args: list[str], *, stdin: bytes | None, timeout_s: float, param: str, what: str,
                max_pixels: int, hide: tuple[str, ...] = ()) -> bytes:
    cmd = [_ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", *args]
    try:
        proc = subprocess.run(cmd, input=stdin if stdin is not None else b"", capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise InputError(param, f"decoding the {what} took longer than {timeout_s:g} s") from None
    if proc.returncode != 0:
        err = proc.stderr
        if b"exceeds specified max pixel count" in err:
            raise InputError(param, f"the {what} has more than {max_pixels} pixels per frame")
        raise InputError(param, f"could not decode the {what} ({_ffmpeg_reason(err, hide)})")
    return proc.stdout


def _format_fps(fps: float) -> str:
    return str(int(fps)) if float(fps).is_integer() else repr(float(fps))


def _check_size(width: Any, height: Any) -> tuple[int, int]:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_OUTPUT_SIDE:
            raise InputError(name, f"must be an integer from 1 to {MAX_OUTPUT_SIDE}, got {value!r}")
    return int(width), int(height)


def _check_positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(name, f"must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_fps(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or not 0 < value <= 1000:
        raise InputError("fps", f"must be a number in (0, 1000], got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------------------------------
# Sources: path, bytes, data: URI, http(s) URL
# --------------------------------------------------------------------------------------------------------------------


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    # Addresses that tunnel to an IPv4 host must be judged by that host, or ::ffff:127.0.0.1 walks past the check.
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in ipaddress.IPv6Network("64:ff9b::/96"):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            return _is_public(inner)
    return ip.is_global and not ip.is_multicast


def _resolve(host: str, port: int, param: str, policy: SourcePolicy) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise InputError(param, f"could not resolve host {host!r} ({exc})") from None
    addresses: list[str] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        text = str(sockaddr[0]).split("%", 1)[0]
        if not policy.allow_private_hosts and not _is_public(ipaddress.ip_address(text)):
            # One private answer among public ones is refused too: the attacker controls which one we would use.
            raise InputError(param, f"host {host!r} resolves to a non-public address; only public hosts are allowed")
        if text not in addresses:
            addresses.append(text)
    if not addresses:
        raise InputError(param, f"host {host!r} has no IPv4 or IPv6 address")
    return addresses


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address we validated, so a second DNS answer (rebinding) cannot redirect the request."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a validated address while the certificate is still checked against the host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float, context: Any):
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _fetch_url(url: str, *, param: str, max_bytes: int, policy: SourcePolicy) -> bytes:
    """GET one URL with no redirects, a total deadline and a byte cap enforced while streaming.

    urllib is not used directly: it follows redirects and resolves the name again at connect time, both of which
    defeat the address check. The lower layer it is built on (http.client) lets us connect to the checked address.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InputError(param, f"malformed URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InputError(param, "only http:// and https:// URLs are allowed")
    if parts.username is not None or parts.password is not None:
        raise InputError(param, "URLs with user credentials are not allowed")
    host = parts.hostname
    if not host:
        raise InputError(param, "the URL has no host")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise InputError(param, f"invalid host name {parts.hostname!r}") from None
    port = port or (443 if scheme == "https" else 80)
    if policy.allowed_ports is not None and port not in policy.allowed_ports:
        allowed = ", ".join(str(p) for p in policy.allowed_ports)
        raise InputError(param, f"port {port} is not allowed (allowed: {allowed})")

    deadline = time.monotonic() + policy.timeout_s
    addresses = _resolve(host, port, param, policy)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    context = None
    if scheme == "https":
        import ssl

        context = ssl.create_default_context()

    last_error: Exception | None = None
    for address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if scheme == "https":
            conn: http.client.HTTPConnection = _PinnedHTTPSConnection(host, port, address, remaining, context)
        else:
            conn = _PinnedHTTPConnection(host, port, address, remaining)
        try:
            conn.connect()
        except OSError as exc:
            last_error = exc
            conn.close()
            continue
        # Socket timeouts apply per read, so a server trickling header bytes could outlast them; a watchdog that
        # shuts the socket at the deadline makes the limit total.
        watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), _shutdown_socket, args=(conn.sock,))
        watchdog.daemon = True
        watchdog.start()
        try:
            return _read_response(conn, target, param=param, max_bytes=max_bytes, deadline=deadline,
                                  timeout_s=policy.timeout_s)
        finally:
            watchdog.cancel()
            conn.close()
    if last_error is None:
        raise InputError(param, f"download did not finish within {policy.timeout_s:g} s")
    raise InputError(param, f"could not connect to {host!r} ({last_error})")


def _shutdown_socket(sock: socket.socket | None) -> None:
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _read_response(conn: http.client.HTTPConnection, target: str, *, param: str, max_bytes: int, deadline: float,
                   timeout_s: float) -> bytes:
    too_slow = InputError(param, f"download did not finish within {timeout_s:g} s")
    # Kept here: http.client drops conn.sock once a response that closes the connection has been opened.
    sock = conn.sock
    response = None
    try:
        conn.request("GET", target, headers={"User-Agent": "magi-server", "Accept": "*/*",
                                             "Accept-Encoding": "identity"})
        response = conn.getresponse()
        if 300 <= response.status < 400:
            raise InputError(param, f"the URL redirects (HTTP {response.status}); redirects are not followed, "
                                    "give the final URL")
        if response.status != 200:
            raise InputError(param, f"the URL answered HTTP {response.status}")
        declared = response.getheader("Content-Length")
        expected = int(declared) if declared and declared.strip().isdigit() else None
        if expected is not None and expected > max_bytes:
            raise InputError(param, f"the download is larger than {max_bytes} bytes")
        blocks: list[bytes] = []
        total = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise too_slow
            # The per-read timeout shrinks with the deadline, so a server trickling a byte at a time cannot stretch
            # the download; read1 returns after one socket read instead of waiting for a full buffer.
            sock.settimeout(remaining)
            block = response.read1(65536)
            if not block:
                break
            total += len(block)
            if total > max_bytes:
                raise InputError(param, f"the download is larger than {max_bytes} bytes")
            blocks.append(block)
        if time.monotonic() >= deadline:
            raise too_slow
        if expected is not None and total != expected:
            raise InputError(param, f"the download was cut short ({total} of {expected} bytes)")
        return b"".join(blocks)
    except (OSError, http.client.HTTPException) as exc:
        if isinstance(exc, socket.timeout) or time.monotonic() >= deadline:
            raise too_slow from None
        raise InputError(param, f"download failed ({type(exc).__name__}: {exc})") from None
    finally:
        if response is not None:
            response.close()
        if sock is not None:
            sock.close()


def _decode_data_uri(uri: str, *, param: str, max_bytes: int) -> bytes:
    header, sep, payload = uri[len("data:"):].partition(",")
    if not sep:
        raise InputError(param, "malformed data: URI (no comma)")
    if "base64" not in [p.strip().lower() for p in header.split(";")]:
        raise InputError(param, "data: URIs must be base64-encoded (data:<type>;base64,...)")
    payload = "".join(payload.split())
    # Reject by the encoded length first so an oversized URI is never decoded into memory.
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise InputError(param, f"the data is larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(param, "the data: URI is not valid base64") from None
    if len(data) > max_bytes:
        raise InputError(param, f"the data is larger than {max_bytes} bytes")
    return data


def _check_path(source: str | os.PathLike, *, param: str, max_bytes: int, policy: SourcePolicy) -> Path:
    if not policy.allow_paths:
        raise InputError(param, "must be an http(s) URL or a data: URI")
    path = Path(source)
    try:
        if not path.exists():
            raise InputError(param, f"file not found: {str(path)!r}")
        if not path.is_file():
            raise InputError(param, f"not a regular file: {str(path)!r}")
        size = path.stat().st_size
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise InputError(param, f"cannot read {str(path)!r} ({getattr(exc, 'strerror', None) or exc})") from None
    if size == 0:
        raise InputError(param, "the file is empty")
    if size > max_bytes:
        raise InputError(param, f"the file is larger than {max_bytes} bytes")
    return path


def _read_path(path: Path, *, param: str, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(param, f"cannot read {str(path)!r} ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise InputError(param, f"the file is larger than {max_bytes} bytes")
    return data


def _open_source(source: Any, *, param: str, max_bytes: int, policy: SourcePolicy) -> bytes | Path:
    """Bytes for in-memory sources and downloads, a checked ``Path`` for local files (so videos are not copied)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise InputError(param, f"the data is larger than {max_bytes} bytes")
        return data
    if isinstance(source, os.PathLike):
        return _check_path(source, param=param, max_bytes=max_bytes, policy=policy)
    if not isinstance(source, str):
        raise InputError(param, f"expected a URL, a data: URI, a path or bytes, got {type(source).__name__}")
    if not source.strip():
        raise InputError(param, "the value is empty")
    lowered = source.lstrip().lower()
    if lowered.startswith("data:"):
        return _decode_data_uri(source.strip(), param=param, max_bytes=max_bytes)
    if lowered.startswith(("http://", "https://")):
        return _fetch_url(source.strip(), param=param, max_bytes=max_bytes, policy=policy)
    if re.match(r"^[a-z][a-z0-9+.-]*://", lowered):
        raise InputError(param, "only http://, https:// and data: URIs are allowed")
    return _check_path(source, param=param, max_bytes=max_bytes, policy=policy)


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------


def _image_demuxer(data: bytes) -> str | None:
    # Chosen by magic bytes, never by extension or Content-Type: only these three decoders ever see user bytes.
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png_pipe"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg_pipe"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp_pipe"
    return None


_PPM_HEADER = re.compile(rb"^P6\s(\d+)\s(\d+)\s255\s")


def load_image(source: Source, *, param: str = "image", max_bytes: int = MAX_IMAGE_BYTES,
               max_pixels: int = MAX_IMAGE_PIXELS, width: int | None = None, height: int | None = None,
               policy: SourcePolicy | None = None) -> np.ndarray:
    """Decode a PNG, JPEG or WebP into an (H, W, 3) uint8 RGB array.

    ``source``: a path (str or ``Path``), raw bytes, a ``data:...;base64,`` URI or an http(s) URL (see
    :class:`SourcePolicy`). Grayscale is replicated to three channels, alpha is dropped (what ffmpeg's conversion
    to rgb24 does, and what the reference feeds the VAE). Only the first frame of an animated file is used. EXIF
    orientation is ignored, as in the reference.

    With ``width`` and ``height``, the image is decoded and stretched to exactly that size in one ffmpeg pass —
    the reference's i2v preprocessing, bit for bit (§9): for a JPEG this scales the decoder's YUV output, which is
    not the same as ``resize_image(load_image(...))`` on RGB. Without them the native size is returned.
    """
    policy = policy or SourcePolicy()
    max_bytes = _check_positive_int("max_bytes", max_bytes)
    max_pixels = _check_positive_int("max_pixels", max_pixels)
    if (width is None) != (height is None):
        raise InputError("width" if width is None else "height", "give both width and height, or neither")
    size = _check_size(width, height) if width is not None else None

    opened = _open_source(source, param=param, max_bytes=max_bytes, policy=policy)
    data = _read_path(opened, param=param, max_bytes=max_bytes) if isinstance(opened, Path) else opened
    if not data:
        raise InputError(param, "the data is empty")
    demuxer = _image_demuxer(data)
    if demuxer is None:
        raise InputError(param, "not a PNG, JPEG or WebP image")

    args = ["-protocol_whitelist", "pipe", "-noautorotate", "-max_pixels", str(max_pixels),
            "-f", demuxer, "-i", "pipe:0", "-an", "-frames:v", "1"]
    if size is not None:
        args += ["-vf", f"scale={size[0]}:{size[1]}:flags=bicubic"]
    # PPM carries its own width and height, so one decode gives both the pixels and the size.
    args += ["-f", "image2pipe", "-c:v", "ppm", "-pix_fmt", "rgb24", "pipe:1"]
    out = _run_ffmpeg(args, stdin=data, timeout_s=_IMAGE_DECODE_TIMEOUT_S, param=param, what="image",
                      max_pixels=max_pixels)
    match = _PPM_HEADER.match(out[:64])
    if match is None:
        raise InputError(param, "could not decode the image (no frame decoded)")
    w, h = int(match.group(1)), int(match.group(2))
    pixels = out[match.end():match.end() + w * h * 3]
    if w < 1 or h < 1 or len(pixels) != w * h * 3:
        raise InputError(param, "could not decode the image (truncated output)")
    return np.frombuffer(pixels, dtype=np.uint8).reshape(h, w, 3).copy()


def _check_image_array(image: Any, param: str) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 \
            or image.shape[0] < 1 or image.shape[1] < 1:
        desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(param, f"expected a uint8 array of shape (H, W, 3), got {desc}")
    return image


def resize_image(image: np.ndarray, width: int, height: int, *, param: str = "image") -> np.ndarray:
    """Stretch an (H, W, 3) uint8 RGB image to (height, width, 3) with ffmpeg ``scale=W:H:flags=bicubic``.

    No aspect preservation, crop or padding (the reference's "fit" policy, §9). Returns a copy when the size
    already matches. For bit parity with the reference on a JPEG, prefer ``load_image(..., width=, height=)``.
    """
    image = _check_image_array(image, param)
    width, height = _check_size(width, height)
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image.copy()
    args = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-video_size", f"{w}x{h}", "-i", "pipe:0",
            "-vf", f"scale={width}:{height}:flags=bicubic", "-frames:v", "1",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    out = _run_ffmpeg(args, stdin=np.ascontiguousarray(image).tobytes(), timeout_s=_IMAGE_DECODE_TIMEOUT_S,
                      param=param, what="image", max_pixels=w * h)
    if len(out) != width * height * 3:
        raise InputError(param, "resizing produced no image")
    return np.frombuffer(out, dtype=np.uint8).reshape(height, width, 3).copy()


def encode_png(image: np.ndarray, *, param: str = "image") -> bytes:
    """PNG bytes of an (H, W, 3) uint8 RGB image (lossless: a stored input decodes to the same pixels)."""
    image = _check_image_array(image, param)
    h, w = image.shape[:2]
    args = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-video_size", f"{w}x{h}", "-i", "pipe:0", "-frames:v", "1",
            "-c:v", "png", "-pix_fmt", "rgb24", "-f", "image2pipe", "pipe:1"]
    return _run_ffmpeg(args, stdin=np.ascontiguousarray(image).tobytes(), timeout_s=_IMAGE_DECODE_TIMEOUT_S,
                       param=param, what="image", max_pixels=w * h)


# --------------------------------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------------------------------


def _video_demuxer(head: bytes) -> str | None:
    if len(head) >= 8 and head[4:8] in _MP4_FIRST_BOXES:
        return "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    return None


def load_video(source: Source, *, width: int, height: int, fps: float = 24, max_frames: int = 32,
               param: str = "video", max_bytes: int = MAX_VIDEO_BYTES, max_pixels: int = MAX_VIDEO_PIXELS,
               policy: SourcePolicy | None = None) -> np.ndarray:
    """Decode a video the way the reference's v2v prefix does: ffmpeg ``fps=fps,scale=W:H``, first frames only.

    Returns (T, height, width, 3) uint8 RGB with T = min(max_frames, frames after resampling). ``source`` is as
    for :func:`load_image`; MP4/MOV and WebM/Matroska are accepted (the reference reads MP4 only). ffmpeg stops
    after ``max_frames`` output frames, so a long input costs no more than its first seconds.
    """
    policy = policy or SourcePolicy()
    width, height = _check_size(width, height)
    fps = _check_fps(fps)
    max_frames = _check_positive_int("max_frames", max_frames)
    max_bytes = _check_positive_int("max_bytes", max_bytes)
    max_pixels = _check_positive_int("max_pixels", max_pixels)

    opened = _open_source(source, param=param, max_bytes=max_bytes, policy=policy)
    with tempfile.TemporaryDirectory(prefix="magi-video-") as tmp:
        if isinstance(opened, Path):
            path = opened.resolve()
            try:
                with open(path, "rb") as f:
                    head = f.read(16)
            except OSError as exc:
                raise InputError(param, f"cannot read {str(path)!r} ({exc.strerror or exc})") from None
        else:
            if not opened:
                raise InputError(param, "the data is empty")
            # MP4 needs a seekable input (the index is often at the end), so in-memory data goes to a file first.
            path = Path(tmp) / "input"
            path.write_bytes(opened)
            head = opened[:16]
        demuxer = _video_demuxer(head)
        if demuxer is None:
            raise InputError(param, "not an MP4/MOV or WebM/Matroska video")
        frame_bytes = width * height * 3
        args = ["-protocol_whitelist", "file", "-max_pixels", str(max_pixels),
                # "-ss 0" as the reference passes it: it also drops frames that an edit list places before 0.
                "-ss", "0", "-f", demuxer, "-i", f"file:{path}",
                "-an", "-sn", "-dn",
                "-vf", f"fps=fps={_format_fps(fps)},scale={width}:{height}:flags=bicubic",
                "-frames:v", str(max_frames), "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
        out = _run_ffmpeg(args, stdin=None, timeout_s=_VIDEO_DECODE_TIMEOUT_S, param=param, what="video",
                          max_pixels=max_pixels, hide=(f"file:{path}", str(path)))
    count = len(out) // frame_bytes
    if count == 0:
        raise InputError(param, "no video frames could be decoded")
    return np.frombuffer(out, dtype=np.uint8)[: count * frame_bytes].reshape(count, height, width, 3).copy()


def probe_video(path: str | os.PathLike, *, param: str = "video") -> VideoInfo:
    """Frame count (by decoding every frame, not from the header), size and nominal fps of a video file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(param, f"file not found: {str(p)!r}")
    import imageio_ffmpeg

    # Gray output: a third of the pipe traffic of rgb24, and the pixels are not needed, only their count.
    frames = imageio_ffmpeg.read_frames(str(p), pix_fmt="gray", bits_per_pixel=8)
    try:
        meta = next(frames)
        count = sum(1 for _ in frames)
    except (OSError, RuntimeError, StopIteration) as exc:
        raise InputError(param, f"could not decode the video ({str(exc).splitlines()[0] if str(exc) else exc!r})") \
            from None
    finally:
        frames.close()
    w, h = meta["size"]
    return VideoInfo(frames=count, width=int(w), height=int(h), fps=float(meta.get("fps") or 0.0))


def to_uint8_frames(frames: Any, *, param: str = "frames") -> np.ndarray:
    """(T, H, W, 3) uint8 numpy frames from the VAE helper's (T, 3, H, W) uint8 tensor or an RGB array.

    Torch tensors are read channel-first (the VAE layout) and numpy arrays channel-last unless their shape only
    fits the other layout. A single frame (3-D) becomes T = 1. Floats are refused rather than guessed at: the VAE
    helper already maps [-1, 1] to uint8 (x·127.5 + 127.5, clamp, truncate).
    """
    is_tensor = hasattr(frames, "detach") and hasattr(frames, "permute")
    if is_tensor:
        if str(frames.dtype) != "torch.uint8":
            raise InputError(param, f"expected uint8 frames, got {frames.dtype}")
        tensor = frames.detach().cpu()
        if tensor.ndim == 3:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim == 4 and tensor.shape[1] == 3:
            tensor = tensor.permute(0, 2, 3, 1)
        elif not (tensor.ndim == 4 and tensor.shape[-1] == 3):
            raise InputError(param, f"expected a (T, 3, H, W) tensor, got shape {tuple(frames.shape)}")
        array = tensor.contiguous().numpy()
    elif isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise InputError(param, f"expected uint8 frames, got {frames.dtype}")
        array = frames[None] if frames.ndim == 3 else frames
        if array.ndim == 4 and array.shape[-1] != 3 and array.shape[1] == 3:
            array = array.transpose(0, 2, 3, 1)
        elif not (array.ndim == 4 and array.shape[-1] == 3):
            raise InputError(param, f"expected a (T, H, W, 3) array, got shape {frames.shape}")
    else:
        raise InputError(param, f"expected a numpy array or a torch tensor, got {type(frames).__name__}")
    return np.ascontiguousarray(array)


# --------------------------------------------------------------------------------------------------------------------
# MP4 output
# --------------------------------------------------------------------------------------------------------------------


class Mp4Writer:
    """Streams frames into an H.264 (libx264, yuv420p) MP4 as they are decoded.

    One ffmpeg process per file reads raw rgb24 from a pipe. Output goes to a hidden temporary file in the target
    folder and is renamed onto ``path`` only by a successful :meth:`close`, so a crash never leaves a half MP4
    under the final name. Identical frames give identical bytes: bit-exact flags, no metadata, and a fixed x264
    thread count (x264 output depends on the thread count, not on the machine, so "auto" would differ between
    hosts). libx264 settings default to what the reference gets from ffmpeg's defaults (crf 23, preset medium).

    Not thread-safe: one producer per writer. The one exception is :meth:`abort`, which another thread may call
    while the producer is inside :meth:`append` or :meth:`close`: it kills the encoder, so the producer's call fails
    at once with VideoWriteError (the server's engine drops a cancelled job's output this way). Use as a context
    manager; leaving the block on an exception aborts.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: float = 24, *, crf: int = 23,
                 preset: str = "medium", threads: int = 1):
        width, height = _check_size(width, height)
        if width % 2 or height % 2:
            raise InputError("width" if width % 2 else "height",
                             f"must be even for yuv420p H.264, got {width}x{height}")
        fps = _check_fps(fps)
        if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
            raise InputError("crf", f"must be an integer from 0 to 51, got {crf!r}")
        if preset not in _X264_PRESETS:
            raise InputError("preset", f"must be one of {', '.join(_X264_PRESETS)}, got {preset!r}")
        threads = _check_positive_int("threads", threads)
        self.path = Path(path)
        if self.path.is_dir():
            raise InputError("path", f"{str(self.path)!r} is a folder")
        self.width, self.height, self.fps = width, height, fps
        self._frames = 0
        if not self.path.parent.is_dir():
            raise InputError("path", f"folder {str(self.path.parent)!r} does not exist")
        self._tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(8)}.part")
        cmd = [_ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-video_size", f"{width}x{height}",
               "-framerate", _format_fps(fps), "-i", "pipe:0",
               "-an", "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
               "-threads", str(threads),
               "-flags:v", "+bitexact", "-fflags", "+bitexact", "-map_metadata", "-1",
               # The moov index goes up front so a browser can start playing before the download ends.
               "-movflags", "+faststart",
               # "file:" so that a name with a colon is never read as an ffmpeg protocol.
               "-f", "mp4", f"file:{self._tmp}"]
        # Not mkstemp: its 0600 mode would survive the rename and hide the video from a web server running as
        # another user. O_EXCL with 0666 reserves the name with the usual umask-based mode instead.
        os.close(os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        self._stderr = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr)
        except BaseException:
            self._stderr.close()
            self._tmp.unlink(missing_ok=True)
            raise
        self._state = "open"

    @property
    def frames_so_far(self) -> int:
        return self._frames

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            return _ffmpeg_reason(self._stderr.read()[-4000:])
        except (OSError, ValueError):
            return "no ffmpeg output"

    def append(self, frames: Any) -> None:
        """Add frames: uint8 (T, H, W, 3) numpy or the VAE helper's (T, 3, H, W) uint8 tensor."""
        if self._state != "open":
            raise VideoWriteError(f"cannot append to a writer that is {self._state}")
        array = to_uint8_frames(frames)
        if array.shape[1:3] != (self.height, self.width):
            raise InputError("frames", f"expected {self.width}x{self.height} frames, got "
                                       f"{array.shape[2]}x{array.shape[1]}")
        if array.shape[0] == 0:
            return
        try:
            self._proc.stdin.write(memoryview(array).cast("B"))
        except OSError as exc:
            # ffmpeg closed its input, so it has failed; stop it before reading why, so its log is complete.
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            reason = self._stderr_tail()
            self.abort()
            raise VideoWriteError(f"ffmpeg stopped accepting frames ({reason})") from exc
        self._frames += array.shape[0]

    def close(self) -> Path:
        """Finish the file and move it to ``path``. Returns ``path``; calling it again returns it again."""
        if self._state == "closed":
            return self.path
        if self._state == "aborted":
            raise VideoWriteError("the writer was aborted")
        if self._frames == 0:
            self.abort()
            raise VideoWriteError("no frames were appended")
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            rc = self._proc.wait(timeout=_ENCODER_CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.abort()
            raise VideoWriteError(f"ffmpeg did not finish within {_ENCODER_CLOSE_TIMEOUT_S:g} s") from None
        if rc != 0:
            reason = self._stderr_tail()
            self.abort()
            raise VideoWriteError(f"ffmpeg failed with exit code {rc} ({reason})")
        try:
            # Flush to disk before the rename, or a power cut could leave an empty file under the final name.
            with open(self._tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self.abort()
            raise VideoWriteError(f"could not move the MP4 into place ({exc})") from exc
        self._stderr.close()
        self._state = "closed"
        return self.path

    def abort(self) -> None:
        """Stop the encoder and delete the temporary file. Does nothing after a successful close."""
        if self._state != "open":
            return
        self._state = "aborted"
        proc = self._proc
        if proc.poll() is None:
            proc.kill()
        try:
            proc.stdin.close()
        except OSError:
            pass
        proc.wait()
        self._tmp.unlink(missing_ok=True)
        self._stderr.close()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def __del__(self) -> None:
        # A writer dropped without close() must not leave ffmpeg running or a .part file behind.
        if getattr(self, "_state", None) == "open":
            try:
                self.abort()
            except Exception:
                pass
