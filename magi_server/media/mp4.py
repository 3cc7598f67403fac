"""The MP4 output: generated frames written as an H.264 MP4 chunk by chunk, deterministically and atomically
(:class:`Mp4Writer`), and the VAE-layout conversion it accepts (``to_uint8_frames``). Failures of the encoder itself
raise :class:`VideoWriteError`: a server fault, not the user's.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from magi_server.media import InputError
from magi_server.media.ffmpeg import check_fps, check_size, ffmpeg_command, ffmpeg_reason, format_fps

_ENCODER_CLOSE_TIMEOUT_S = 600.0


class VideoWriteError(RuntimeError):
    """The MP4 encoder failed (ffmpeg exited with an error, the disk is full, ...): a server fault, not bad input."""


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


class Mp4Writer:
    """Streams frames into an H.264 (libx264, yuv420p) MP4 as they are decoded.

    One ffmpeg process per file reads raw rgb24 from a pipe. Output goes to a hidden temporary file in the target
    folder and is renamed onto ``path`` only by a successful :meth:`close`, so a crash never leaves a half MP4
    under the final name. Identical frames give identical bytes: bit-exact flags, no metadata, and a fixed x264
    thread count (x264 output depends on the thread count, not on the machine, so "auto" would differ between
    hosts). crf 23 and preset medium are what the reference gets from ffmpeg's defaults.

    Not thread-safe: one producer per writer. The one exception is :meth:`abort`, which another thread may call
    while the producer is inside :meth:`append` or :meth:`close`: it kills the encoder, so the producer's call fails
    at once with VideoWriteError (the server's engine drops a cancelled job's output this way). Use as a context
    manager; leaving the block on an exception aborts.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: float = 24):
        width, height = check_size(width, height)
        if width % 2 or height % 2:
            raise InputError("width" if width % 2 else "height",
                             f"must be even for yuv420p H.264, got {width}x{height}")
        fps = check_fps(fps)
        self.path = Path(path)
        if self.path.is_dir():
            raise InputError("path", f"{str(self.path)!r} is a folder")
        self.width, self.height, self.fps = width, height, fps
        self._frames = 0
        if not self.path.parent.is_dir():
            raise InputError("path", f"folder {str(self.path.parent)!r} does not exist")
        self._tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(8)}.part")
        cmd = ffmpeg_command("-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-video_size", f"{width}x{height}",
                             "-framerate", format_fps(fps), "-i", "pipe:0",
                             "-an", "-c:v", "libx264", "-preset", "medium", "-crf", "23", "-pix_fmt", "yuv420p",
                             "-threads", "1", "-flags:v", "+bitexact", "-fflags", "+bitexact", "-map_metadata", "-1",
                             # The moov index goes up front so a browser can start playing before the download ends.
                             "-movflags", "+faststart",
                             # "file:" so that a name with a colon is never read as an ffmpeg protocol.
                             "-f", "mp4", f"file:{self._tmp}")
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

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            return ffmpeg_reason(self._stderr.read()[-4000:])
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
