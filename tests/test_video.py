"""magi_server.media: image/video loading (paths, bytes, data URIs, loopback HTTP), resizing, MP4 writing, probing.

Every fixture is made here with the bundled ffmpeg from raw rgb24, so the tests need no data files. The only
network use is an http.server on 127.0.0.1.
"""
from __future__ import annotations

import base64
import hashlib
import http.server
import subprocess
import threading
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from magi_server.media import InputError
from magi_server.media.fetch import SourcePolicy
from magi_server.media.images import load_image, resize_image
from magi_server.media.mp4 import Mp4Writer, VideoWriteError, to_uint8_frames
from magi_server.media.video import load_video
from tests.media_utils import VideoInfo, probe_video

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
LOOPBACK = SourcePolicy(allow_private_hosts=True, allowed_ports=None, timeout_s=5.0)


def ffmpeg(args: list[str], stdin: bytes = b"") -> bytes:
    proc = subprocess.run([FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", *args], input=stdin,
                          capture_output=True, check=True)
    return proc.stdout


def encode_image(pixels: np.ndarray, codec: str, pix_fmt_in: str = "rgb24", pix_fmt_out: str | None = None) -> bytes:
    h, w = pixels.shape[:2]
    args = ["-f", "rawvideo", "-pix_fmt", pix_fmt_in, "-video_size", f"{w}x{h}", "-i", "pipe:0", "-frames:v", "1"]
    if pix_fmt_out:
        args += ["-pix_fmt", pix_fmt_out]
    args += ["-c:v", codec, "-f", "image2pipe", "pipe:1"]
    return ffmpeg(args, np.ascontiguousarray(pixels).tobytes())


def gradient(h: int = 48, w: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1).astype(np.uint8)


def random_frames(n: int, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    # Smooth frames with a moving ramp, so lossy H.264 keeps them recognisable frame by frame.
    base = gradient(h, w).astype(np.int32)
    frames = [(base + 7 * i + np.random.default_rng(seed + i).integers(0, 8, base.shape)) % 256 for i in range(n)]
    return np.stack(frames).astype(np.uint8)


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    rgb = gradient()
    gray = rgb[..., 0].copy()
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 128, np.uint8)], -1)
    return {
        "png": encode_image(rgb, "png"),
        "jpeg": encode_image(rgb, "mjpeg", pix_fmt_out="yuvj444p"),
        "webp": encode_image(rgb, "libwebp"),
        "gray_png": encode_image(gray, "png", pix_fmt_in="gray"),
        "rgba_png": encode_image(rgba, "png", pix_fmt_in="rgba"),
    }


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self.hits.append(self.path)
        if self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.05)
            return
        status, headers, body = self.routes.get(self.path, (404, {}, b"not found"))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if self.path != "/big":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server(images):
    handler = type("Handler", (_Handler,), {"routes": {}, "hits": []})
    handler.routes.update({
        "/img.png": (200, {"Content-Type": "image/png"}, images["png"]),
        "/redirect": (302, {"Location": "/img.png"}, b""),
        # Sent without Content-Length: the size cap must hold while streaming, not only from the header.
        "/big": (200, {}, b"\x89PNG\r\n\x1a\n" + b"\0" * 5000),
    })
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


def assert_input_error(name: str, fn, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    assert str(info.value).startswith(f"{name}: "), str(info.value)
    return info.value


# --------------------------------------------------------------------------------------------------------------------
# load_image
# --------------------------------------------------------------------------------------------------------------------


def test_load_png_from_path_bytes_and_data_uri(tmp_path, images):
    expected = gradient()
    path = tmp_path / "a.png"
    path.write_bytes(images["png"])
    uri = "data:image/png;base64," + base64.b64encode(images["png"]).decode()
    for source in (path, str(path), images["png"], bytearray(images["png"]), uri):
        image = load_image(source)
        assert image.dtype == np.uint8 and image.shape == (48, 64, 3)
        np.testing.assert_array_equal(image, expected)  # PNG is lossless


def test_load_jpeg_and_webp_are_close_to_the_source(images):
    expected = gradient().astype(np.int16)
    for key in ("jpeg", "webp"):
        image = load_image(images[key])
        assert image.shape == (48, 64, 3) and image.dtype == np.uint8
        assert np.abs(image.astype(np.int16) - expected).mean() < 6, key


def test_grayscale_and_rgba_become_rgb(images):
    rgb = gradient()
    gray = load_image(images["gray_png"])
    assert gray.shape == (48, 64, 3)
    for c in range(3):
        np.testing.assert_array_equal(gray[..., c], rgb[..., 0])
    np.testing.assert_array_equal(load_image(images["rgba_png"]), rgb)  # alpha dropped, colour untouched


def test_load_image_over_loopback_http(server):
    base, handler = server
    np.testing.assert_array_equal(load_image(f"{base}/img.png", policy=LOOPBACK), gradient())
    assert handler.hits == ["/img.png"]


def test_url_policy_refuses_private_hosts_before_connecting(server):
    base, handler = server
    assert_input_error("image", load_image, f"{base}/img.png")  # default policy: 127.0.0.1 and odd port refused
    port = base.rsplit(":", 1)[1]
    for url in (f"http://[::ffff:127.0.0.1]:{port}/img.png", f"http://2130706433:{port}/img.png",
                f"http://localhost:{port}/img.png"):
        err = assert_input_error("image", load_image, url, policy=SourcePolicy(allowed_ports=None))
        assert "non-public" in str(err)
    assert handler.hits == []  # nothing reached the server


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/", "http://",
                                 "http://user:pw@example.com/a.png", "http://example.com:22/a.png"])
def test_url_forms_that_are_refused_without_any_fetch(url):
    assert_input_error("image", load_image, url)


def test_url_errors_redirect_404_oversize_slow(server):
    base, handler = server
    err = assert_input_error("image", load_image, f"{base}/redirect", policy=LOOPBACK)
    assert "redirect" in str(err)
    assert handler.hits == ["/redirect"]  # the Location was not followed
    assert "404" in str(assert_input_error("image", load_image, f"{base}/missing", policy=LOOPBACK))
    err = assert_input_error("image", load_image, f"{base}/big", policy=LOOPBACK, max_bytes=1000)
    assert "larger than 1000 bytes" in str(err)
    started = time.monotonic()
    slow = SourcePolicy(allow_private_hosts=True, allowed_ports=None, timeout_s=0.5)
    err = assert_input_error("image", load_image, f"{base}/slow", policy=slow)
    assert "0.5 s" in str(err) and time.monotonic() - started < 3


def test_bad_images_raise_input_error_naming_the_parameter(tmp_path, images):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    truncated = images["png"][: len(images["png"]) // 2]
    cases = [b"\x00\x01garbage" * 10, b"", empty, text, tmp_path / "missing.png", str(tmp_path), truncated,
             b"\x89PNG\r\n\x1a\n" + b"\xff" * 64, "data:image/png;base64,@@@", "data:image/png,rawtext", "   ", 42, "bad\0name.png"]
    for source in cases:
        assert_input_error("image", load_image, source)
    assert_input_error("first_frame", load_image, b"nope", param="first_frame")
    assert_input_error("image", load_image, images["png"], max_bytes=100)
    err = assert_input_error("image", load_image, images["png"], max_pixels=1000)
    assert "pixels" in str(err)
    assert_input_error("image", load_image, str(tmp_path / "a.png"), policy=SourcePolicy(allow_paths=False))


# --------------------------------------------------------------------------------------------------------------------
# resize_image
# --------------------------------------------------------------------------------------------------------------------


def test_resize_shape_and_identity():
    image = gradient()
    small = resize_image(image, 40, 30)
    assert small.shape == (30, 40, 3) and small.dtype == np.uint8
    assert abs(int(small[0, 0, 0]) - int(image[0, 0, 0])) < 8 and abs(int(small[-1, -1, 1]) - 255) < 8
    same = resize_image(image, 64, 48)
    np.testing.assert_array_equal(same, image)
    assert same is not image and not np.shares_memory(same, image)
    assert resize_image(image, 80, 20).shape == (20, 80, 3)  # stretched, no aspect preservation
    assert_input_error("image", resize_image, image.astype(np.float32), 40, 30)
    assert_input_error("width", resize_image, image, 0, 30)


def test_single_pass_resize_matches_the_reference_ffmpeg_chain(images):
    # Reference i2v: ffmpeg -f image2pipe -i pipe:0 -vf scale=W:H -f rawvideo -pix_fmt rgb24 -vframes 1 pipe:
    for key in ("png", "jpeg"):
        ref = ffmpeg(["-f", "image2pipe", "-i", "pipe:0", "-vf", "scale=40:30", "-f", "rawvideo",
                      "-pix_fmt", "rgb24", "-frames:v", "1", "pipe:1"], images[key])
        np.testing.assert_array_equal(load_image(images[key], width=40, height=30),
                                      np.frombuffer(ref, np.uint8).reshape(30, 40, 3))
    # For an RGB source, resizing the decoded array is the same chain.
    np.testing.assert_array_equal(resize_image(load_image(images["png"]), 40, 30),
                                  load_image(images["png"], width=40, height=30))
    assert_input_error("height", load_image, images["png"], width=40)


# --------------------------------------------------------------------------------------------------------------------
# Mp4Writer, probe_video, to_uint8_frames
# --------------------------------------------------------------------------------------------------------------------


def write_mp4(path: Path, frames: np.ndarray, fps: float = 24, splits: tuple[int, ...] = ()) -> Path:
    with Mp4Writer(path, frames.shape[2], frames.shape[1], fps=fps) as writer:
        start = 0
        for stop in (*splits, len(frames)):
            writer.append(frames[start:stop])
            start = stop
    return path


def test_mp4_writer_chunks_probe_and_read_back(tmp_path):
    import imageio.v2 as iio

    frames = random_frames(61)
    path = write_mp4(tmp_path / "out.mp4", frames, splits=(24, 48))
    assert probe_video(path) == VideoInfo(frames=61, width=64, height=48, fps=24.0)
    reader = iio.get_reader(path, format="ffmpeg")
    decoded = np.stack([frame for frame in reader.iter_data()])
    reader.close()
    assert decoded.shape == (61, 48, 64, 3)
    err = np.abs(decoded.astype(np.int16) - frames.astype(np.int16)).mean(axis=(1, 2, 3))
    assert err.max() < 12  # lossy, but every frame is the right one in the right place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temp file left
    assert path.stat().st_mode & 0o044  # normal (umask) permissions, not mkstemp's 0600


def test_mp4_writer_is_deterministic(tmp_path):
    frames = random_frames(30)
    a = write_mp4(tmp_path / "a.mp4", frames, splits=(10,)).read_bytes()
    b = write_mp4(tmp_path / "b.mp4", frames, splits=(17, 20)).read_bytes()
    assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()
    other = frames.copy()
    other[5] = 255 - other[5]
    c = write_mp4(tmp_path / "c.mp4", other).read_bytes()
    assert c != a


def test_mp4_writer_accepts_vae_layout_tensors(tmp_path):
    frames = random_frames(8)
    tensor = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W), as the VAE helper returns
    np.testing.assert_array_equal(to_uint8_frames(tensor), frames)
    np.testing.assert_array_equal(to_uint8_frames(frames[0]), frames[:1])
    a = write_mp4(tmp_path / "a.mp4", frames).read_bytes()
    with Mp4Writer(tmp_path / "b.mp4", 64, 48) as writer:
        writer.append(tensor[:3])
        writer.append(tensor[3:])
    assert (tmp_path / "b.mp4").read_bytes() == a
    assert_input_error("frames", to_uint8_frames, tensor.float())
    assert_input_error("frames", to_uint8_frames, frames[..., :2])
    assert_input_error("frames", to_uint8_frames, [1, 2, 3])


def test_abort_and_failed_block_leave_nothing(tmp_path):
    writer = Mp4Writer(tmp_path / "x.mp4", 64, 48)
    writer.append(random_frames(5))
    assert not (tmp_path / "x.mp4").exists()  # only the hidden temporary exists while writing
    assert len(list(tmp_path.glob(".x.mp4.*.part"))) == 1
    writer.abort()
    writer.abort()  # idempotent
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(VideoWriteError):
        writer.append(random_frames(1))
    with pytest.raises(RuntimeError, match="boom"):
        with Mp4Writer(tmp_path / "y.mp4", 64, 48) as writer:
            writer.append(random_frames(3))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(VideoWriteError):
        Mp4Writer(tmp_path / "z.mp4", 64, 48).close()  # no frames
    assert list(tmp_path.iterdir()) == []


def test_mp4_writer_rejects_bad_sizes(tmp_path):
    assert_input_error("width", Mp4Writer, tmp_path / "a.mp4", 63, 48)
    assert_input_error("height", Mp4Writer, tmp_path / "a.mp4", 64, 47)
    assert_input_error("fps", Mp4Writer, tmp_path / "a.mp4", 64, 48, fps=0)
    with Mp4Writer(tmp_path / "a.mp4", 64, 48) as writer:
        assert_input_error("frames", writer.append, random_frames(2, h=32))
        writer.append(random_frames(2))
    assert list(tmp_path.iterdir()) == [tmp_path / "a.mp4"]


# --------------------------------------------------------------------------------------------------------------------
# load_video
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_12fps(tmp_path_factory) -> Path:
    return write_mp4(tmp_path_factory.mktemp("clip") / "clip.mp4", random_frames(20), fps=12)


def test_load_video_resamples_scales_and_cuts(clip_12fps):
    video = load_video(clip_12fps, width=32, height=16, fps=24, max_frames=1000)
    assert video.shape == (40, 16, 32, 3) and video.dtype == np.uint8  # 12 fps -> 24 fps doubles the frames
    np.testing.assert_array_equal(video[0], video[1])  # each source frame shown twice
    assert load_video(clip_12fps, width=32, height=16, fps=6, max_frames=1000).shape[0] == 10
    first = load_video(clip_12fps, width=32, height=16)  # defaults: fps 24, first 32 frames
    assert first.shape == (32, 16, 32, 3)
    np.testing.assert_array_equal(first, video[:32])
    np.testing.assert_array_equal(load_video(clip_12fps, width=32, height=16, max_frames=7), video[:7])


def test_load_video_matches_the_reference_ffmpeg_chain(clip_12fps):
    # Reference v2v: ffmpeg -ss 0 -f mp4 -i PATH -vf fps=fps=24,scale=W:H -f rawvideo -pix_fmt rgb24 pipe:, [:32]
    ref = ffmpeg(["-ss", "0", "-f", "mp4", "-i", str(clip_12fps), "-vf", "fps=fps=24,scale=32:16",
                  "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"])
    ref = np.frombuffer(ref, np.uint8).reshape(-1, 16, 32, 3)[:32]
    np.testing.assert_array_equal(load_video(clip_12fps, width=32, height=16, fps=24), ref)


def test_load_video_from_bytes_data_uri_and_http(clip_12fps, server):
    base, handler = server
    data = clip_12fps.read_bytes()
    expected = load_video(clip_12fps, width=32, height=16, max_frames=5)
    uri = "data:video/mp4;base64," + base64.b64encode(data).decode()
    handler.routes["/clip.mp4"] = (200, {"Content-Type": "video/mp4"}, data)
    for source in (data, uri):
        np.testing.assert_array_equal(load_video(source, width=32, height=16, max_frames=5), expected)
    np.testing.assert_array_equal(
        load_video(f"{base}/clip.mp4", width=32, height=16, max_frames=5, policy=LOOPBACK), expected)


def test_bad_videos_raise_input_error(tmp_path, clip_12fps, images):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "a.mp4"
    text.write_text("not a video at all\n")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(clip_12fps.read_bytes()[:400])
    for source in (b"", empty, text, broken, tmp_path / "missing.mp4", images["png"], b"\0\0\0\x18ftypisom" + b"\0" * 64):
        assert_input_error("video", load_video, source, width=32, height=16)
    assert_input_error("prefix_video", load_video, text, width=32, height=16, param="prefix_video")
    assert_input_error("video", load_video, clip_12fps, width=32, height=16, max_bytes=1000)
    assert_input_error("max_frames", load_video, clip_12fps, width=32, height=16, max_frames=0)
    assert_input_error("fps", load_video, clip_12fps, width=32, height=16, fps=float("nan"))


def test_the_operators_private_allowlist_opens_only_what_it_names(server):
    """--allow-private-urls: a listed network or host name may be fetched although private, on any port; anything
    else keeps the rules (a private host that is not listed is still refused before connecting)."""
    base, handler = server
    port = base.rsplit(":", 1)[1]
    for allow in (("127.0.0.1",), ("127.0.0.0/8",), ("localhost", "127.0.0.1")):
        policy = SourcePolicy(private_allowlist=allow, timeout_s=5.0)
        url = f"http://{'localhost' if 'localhost' in allow else '127.0.0.1'}:{port}/img.png"
        np.testing.assert_array_equal(load_image(url, policy=policy), gradient())
    hits = len(handler.hits)
    assert_input_error("image", load_image, f"{base}/img.png", policy=SourcePolicy(private_allowlist=("10.0.0.0/8",)))
    err = assert_input_error("image", load_image, f"http://localhost:{port}/img.png",
                             policy=SourcePolicy(private_allowlist=("assets.internal",)))
    assert "non-public" in str(err) or "port" in str(err)
    assert len(handler.hits) == hits  # the refused ones never reached the server
    with pytest.raises(ValueError, match="not a network or host name"):
        SourcePolicy(private_allowlist=("10.0.0.0/33",))
