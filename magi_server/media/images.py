"""Image inputs and the stored copy of one: read an image's bytes (``read_image_bytes``) and its size from its header
without decoding it (``image_size``), decode a PNG, JPEG or WebP (``load_image``), stretch it to the model's size
the way the reference's i2v preprocessing does (spec §6.9, §9: ffmpeg ``scale=W:H``, bicubic), turn an encoded image
straight into the stored working-size PNG (``fit_image``), and encode a PNG (``encode_png``), all with the bundled
ffmpeg (see :mod:`magi_server.media.ffmpeg` for why).
"""
from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from magi_server.media import InputError
from magi_server.media.fetch import Source, SourcePolicy, open_source, read_path
from magi_server.media.ffmpeg import check_positive_int, check_size, run_ffmpeg

# Defaults for trusted callers (the CLI, MagiPipeline): a phone photo (48 MP) still fits, a decompression bomb does
# not. The HTTP intake refuses far smaller images from their header (serving.common.MAX_INPUT_IMAGE_PIXELS).
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 50_000_000

_IMAGE_DECODE_TIMEOUT_S = 30.0


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


def read_image_bytes(source: Source, *, param: str = "image", max_bytes: int = MAX_IMAGE_BYTES,
                     policy: SourcePolicy | None = None) -> bytes:
    """The encoded bytes of a PNG, JPEG or WebP from any source :func:`load_image` takes, checked by magic bytes
    only (nothing is decoded). An http(s) URL is fetched here."""
    max_bytes = check_positive_int("max_bytes", max_bytes)
    opened = open_source(source, param=param, max_bytes=max_bytes, policy=policy or SourcePolicy())
    data = read_path(opened, param=param, max_bytes=max_bytes) if isinstance(opened, Path) else opened
    if not data:
        raise InputError(param, "the data is empty")
    if _image_demuxer(data) is None:
        raise InputError(param, "not a PNG, JPEG or WebP image")
    return data


# JPEG markers that carry a frame header (SOF0-15 without DHT, JPG and DAC): its height and width follow
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# markers that stand alone, without a length: TEM, RST0-7, SOI
_JPEG_STANDALONE = frozenset((0x01, *range(0xD0, 0xD9)))


def image_size(data: bytes, *, param: str = "image") -> tuple[int, int]:
    """(width, height) of a PNG, JPEG or WebP read from its header (PNG IHDR, JPEG SOF, WebP VP8/VP8L/VP8X),
    without decoding any pixel: what lets a server refuse a huge image before it costs memory or CPU. The decoder
    is still told the same pixel cap (``-max_pixels``), so a header that lies gains nothing."""
    try:
        size = _header_size(data)
    except (struct.error, IndexError):
        size = None
    if size is None or size[0] < 1 or size[1] < 1:
        raise InputError(param, "could not read the image's size from its header (truncated or unsupported file)")
    return size


def _header_size(data: bytes) -> tuple[int, int] | None:
    demuxer = _image_demuxer(data)
    if demuxer == "png_pipe":
        if data[12:16] != b"IHDR":  # the PNG spec puts IHDR first
            return None
        return struct.unpack(">II", data[16:24])
    if demuxer == "jpeg_pipe":
        return _jpeg_size(data)
    if demuxer == "webp_pipe":
        chunk = data[12:16]
        if chunk == b"VP8 ":  # lossy: a key frame's start code, then 14-bit width and height
            if data[23:26] != b"\x9d\x01\x2a":
                return None
            width, height = struct.unpack("<HH", data[26:30])
            return width & 0x3FFF, height & 0x3FFF
        if chunk == b"VP8L":  # lossless: signature byte, then (width - 1) and (height - 1) in 14 bits each
            if data[20] != 0x2F:
                return None
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X":  # extended: the canvas, (width - 1) and (height - 1) in 24 bits each
            return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos = 2  # after SOI
    while pos < len(data):
        if data[pos] != 0xFF:
            return None  # not at a marker: the file is not what it claims
        while pos < len(data) and data[pos] == 0xFF:  # fill bytes may pad any marker
            pos += 1
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        (length,) = struct.unpack(">H", data[pos:pos + 2])
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[pos + 3:pos + 7])
            return width, height
        if length < 2:
            return None
        pos += length
    return None


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
    max_pixels = check_positive_int("max_pixels", max_pixels)
    if (width is None) != (height is None):
        raise InputError("width" if width is None else "height", "give both width and height, or neither")
    size = check_size(width, height) if width is not None else None
    data = read_image_bytes(source, param=param, max_bytes=max_bytes, policy=policy)
    demuxer = _image_demuxer(data)

    args = ["-protocol_whitelist", "pipe", "-noautorotate", "-max_pixels", str(max_pixels),
            "-f", demuxer, "-i", "pipe:0", "-an", "-frames:v", "1"]
    if size is not None:
        args += ["-vf", f"scale={size[0]}:{size[1]}:flags=bicubic"]
    # PPM carries its own width and height, so one decode gives both the pixels and the size.
    args += ["-f", "image2pipe", "-c:v", "ppm", "-pix_fmt", "rgb24", "pipe:1"]
    out = run_ffmpeg(args, stdin=data, timeout_s=_IMAGE_DECODE_TIMEOUT_S, param=param, what="image",
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
    width, height = check_size(width, height)
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image.copy()
    args = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-video_size", f"{w}x{h}", "-i", "pipe:0",
            "-vf", f"scale={width}:{height}:flags=bicubic", "-frames:v", "1",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    out = run_ffmpeg(args, stdin=np.ascontiguousarray(image).tobytes(), timeout_s=_IMAGE_DECODE_TIMEOUT_S,
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
    return run_ffmpeg(args, stdin=np.ascontiguousarray(image).tobytes(), timeout_s=_IMAGE_DECODE_TIMEOUT_S,
                      param=param, what="image", max_pixels=w * h)


def fit_image(data: bytes, width: int, height: int, *, param: str = "image",
              max_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
    """PNG bytes of an encoded image (from :func:`read_image_bytes`) center-cropped to width:height's aspect ratio
    and scaled to exactly ``width`` x ``height``, in one ffmpeg pass: the full-size pixels exist only inside the
    ffmpeg subprocess, never in this process. The scale is the reference's i2v preprocessing (``scale=W:H``,
    bicubic, in the decoder's own pixel format), preceded by the crop, so a stored input that already has the
    working size is what the model runner reads back unchanged."""
    width, height = check_size(width, height)
    max_pixels = check_positive_int("max_pixels", max_pixels)
    demuxer = _image_demuxer(data)
    if demuxer is None:
        raise InputError(param, "not a PNG, JPEG or WebP image")
    # the crop's size is computed from the decoded frame (iw, ih), so it holds even when a header lied;
    # its default position centers it
    crop = (f"crop=w='min(iw,round(ih*{width}/{height}))':h='min(ih,round(iw*{height}/{width}))'")
    args = ["-protocol_whitelist", "pipe", "-noautorotate", "-max_pixels", str(max_pixels),
            "-f", demuxer, "-i", "pipe:0", "-an", "-frames:v", "1",
            "-vf", f"{crop},scale={width}:{height}:flags=bicubic,setsar=1",
            "-c:v", "png", "-pix_fmt", "rgb24", "-f", "image2pipe", "pipe:1"]
    out = run_ffmpeg(args, stdin=data, timeout_s=_IMAGE_DECODE_TIMEOUT_S, param=param, what="image",
                     max_pixels=max_pixels)
    if not out.startswith(b"\x89PNG\r\n\x1a\n"):
        raise InputError(param, "could not decode the image (no frame decoded)")
    return out
