"""Video input: decode a video the way the reference's v2v prefix does (spec §6.9, §9: ffmpeg ``fps=fps,scale=W:H``
and the first 32 frames, ``load_video``), with the bundled ffmpeg (see :mod:`magi_server.media.ffmpeg` for why).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from magi_server.media import InputError
from magi_server.media.fetch import Source, SourcePolicy, open_source
from magi_server.media.ffmpeg import check_fps, check_positive_int, check_size, format_fps, run_ffmpeg

MAX_VIDEO_BYTES = 200 * 1024 * 1024
MAX_VIDEO_PIXELS = 4096 * 4096

_VIDEO_DECODE_TIMEOUT_S = 120.0

# ISO-BMFF files normally open with "ftyp"; old QuickTime files may open with any of the other top-level boxes.
_MP4_FIRST_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")


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
    width, height = check_size(width, height)
    fps = check_fps(fps)
    max_frames = check_positive_int("max_frames", max_frames)
    max_bytes = check_positive_int("max_bytes", max_bytes)
    max_pixels = check_positive_int("max_pixels", max_pixels)

    opened = open_source(source, param=param, max_bytes=max_bytes, policy=policy)
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
                "-vf", f"fps=fps={format_fps(fps)},scale={width}:{height}:flags=bicubic",
                "-frames:v", str(max_frames), "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
        out = run_ffmpeg(args, stdin=None, timeout_s=_VIDEO_DECODE_TIMEOUT_S, param=param, what="video",
                         max_pixels=max_pixels, hide=(f"file:{path}", str(path)))
    count = len(out) // frame_bytes
    if count == 0:
        raise InputError(param, "no video frames could be decoded")
    return np.frombuffer(out, dtype=np.uint8)[: count * frame_bytes].reshape(count, height, width, 3).copy()
