"""What tests measure videos with: the frame count by decoding every frame (not from the header), the size and the
nominal fps of an MP4 the server or the library wrote."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    width: int
    height: int
    fps: float


def probe_video(path: str | os.PathLike) -> VideoInfo:
    if not Path(path).is_file():
        raise FileNotFoundError(path)
    # gray output: a third of the pipe traffic of rgb24, and only the frames' count is needed
    frames = imageio_ffmpeg.read_frames(str(path), pix_fmt="gray", bits_per_pixel=8)
    try:
        meta = next(frames)
        count = sum(1 for _ in frames)
    finally:
        frames.close()
    w, h = meta["size"]
    return VideoInfo(frames=count, width=int(w), height=int(h), fps=float(meta.get("fps") or 0.0))
