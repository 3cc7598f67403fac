"""Image intake under load (#10 acceptance 2): admission (queue, per-key quota) before any fetch or decode, a pixel
cap read from the image's header, one decode straight to the job's working size on a pool of its own.

The big images are one colour, so a 7000x7000 PNG (49 MP, above the cap) is ~160 KB and a 4096x4096 one (at the
cap) ~55 KB: cheap to send, expensive only to whoever decodes them. Memory is the server subprocess's VmRSS (the
ffmpeg decoders are processes of their own and do not count: that is the point). Latencies are judged by medians
of several tries, since other work shares this machine's cores.
"""
from __future__ import annotations

import base64
import functools
import http.server
import statistics
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from magi_server.media import InputError
from magi_server.media.fetch import SourcePolicy
from magi_server.media.images import encode_png, fit_image, image_size, load_image
from magi_server.params import RESOLUTION_SIZES
from magi_server.runtime.pipeline import MagiPipeline
from magi_server.serving import common
from magi_server.serving.common import MAX_INPUT_IMAGE_PIXELS
from tests.procs import ServerProcess
from tests.server_utils import running_server, tiny_settings, wait_status

MODEL = "/api/v3/wavespeed-ai/magi-1-24b"
LONG = {"prompt": "a long shot", "num_frames": 960, "num_inference_steps": 8}
SHORT = {"prompt": "an ordinary submit", "num_frames": 24, "num_inference_steps": 8}
RSS_GROWTH_LIMIT = 300 * 1024 * 1024


def solid_png(width: int, height: int, rgb=(90, 140, 200)) -> bytes:
    """A one-colour RGB PNG written by hand (zlib, row by row), so even 49 MP never exists raw in this process."""
    row = b"\x00" + bytes(rgb) * width  # filter type 0, then the row's pixels
    deflate = zlib.compressobj(9)
    data = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    png = solid_png(7000, 7000)  # 49 MP: just under the old 50 MP cap, ~3x the new one
    assert len(png) < 200_000
    return png


@pytest.fixture(scope="module")
def cap_png() -> bytes:
    png = solid_png(4096, 4096)
    assert 4096 * 4096 == MAX_INPUT_IMAGE_PIXELS  # exactly at the cap: accepted
    # the cap relates to the largest output: any phone photo fits, and it is still ~18x what 720p can show
    largest_output = max(w * h for w, h in RESOLUTION_SIZES.values())
    assert 4032 * 3024 < MAX_INPUT_IMAGE_PIXELS and 16 * largest_output < MAX_INPUT_IMAGE_PIXELS < 20 * largest_output
    return png


# ------------------------------------------------------------------------------------------ header and decode


def _ffmpeg_encoded(pixels: np.ndarray, codec: str, *extra: str) -> bytes:
    from magi_server.media.ffmpeg import run_ffmpeg

    h, w = pixels.shape[:2]
    return run_ffmpeg(["-f", "rawvideo", "-pix_fmt", "rgb24", "-video_size", f"{w}x{h}", "-i", "pipe:0",
                       "-frames:v", "1", *extra, "-c:v", codec, "-f", "image2pipe", "pipe:1"],
                      stdin=pixels.tobytes(), timeout_s=30, param="image", what="image", max_pixels=w * h)


def test_image_size_reads_every_format_from_its_header(huge_png):
    pixels = np.random.default_rng(0).integers(0, 255, (211, 333, 3), dtype=np.uint8)
    encoded = {
        "png": encode_png(pixels),
        "jpeg": _ffmpeg_encoded(pixels, "mjpeg", "-pix_fmt", "yuvj420p"),
        "webp lossy (VP8)": _ffmpeg_encoded(pixels, "libwebp"),
        "webp lossless (VP8L)": _ffmpeg_encoded(pixels, "libwebp", "-lossless", "1"),
    }
    for kind, data in encoded.items():
        assert image_size(data) == (333, 211), kind
        assert load_image(data).shape == (211, 333, 3), kind  # the decoder agrees
    # WebP's extended format: the canvas size in 24 bits each (as written by tools that add alpha or metadata)
    vp8x = b"RIFF" + struct.pack("<I", 30) + b"WEBP" + b"VP8X" + struct.pack("<I", 10) + b"\x10\0\0\0" \
        + (5999).to_bytes(3, "little") + (3999).to_bytes(3, "little")
    assert image_size(vp8x) == (6000, 4000)
    assert image_size(huge_png) == (7000, 7000)
    # a JPEG with fill bytes and an APP segment before its frame header
    jpeg = encoded["jpeg"]
    padded = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", 6) + b"Exif" + b"\xff\xff" + jpeg[2:]
    assert image_size(padded) == (333, 211)
    for bad in (huge_png[:20], jpeg[:4], b"\x89PNG\r\n\x1a\n" + b"\0" * 30, b"RIFF\0\0\0\0WEBPVP8 "):
        with pytest.raises(InputError) as info:
            image_size(bad, param="image_url")
        assert info.value.param == "image_url"


def test_fit_image_crops_the_center_and_scales_to_the_working_size():
    # 16:9, with red bands left and right that a center crop to 1:1 removes
    wide = np.zeros((180, 320, 3), np.uint8)
    wide[:, :, 2] = 255
    wide[:, :70] = wide[:, -70:] = (255, 0, 0)
    out = load_image(fit_image(encode_png(wide), 32, 32))
    assert out.shape == (32, 32, 3)
    assert out[..., 0].max() < 10 and out[..., 2].min() > 245  # all blue: the bands were cropped away
    # same aspect: only scaled, and at the working size already it is the identity (what offline parity needs)
    gradient = (np.arange(64 * 96 * 3).reshape(64, 96, 3) % 251).astype(np.uint8)
    np.testing.assert_array_equal(load_image(fit_image(encode_png(gradient), 96, 64)), gradient)
    with pytest.raises(InputError) as info:
        fit_image(solid_png(300, 300), 32, 32, param="image", max_pixels=300 * 299)
    assert "pixels" in info.value.message


def _bare_context(tmp_path: Path) -> common.ServerContext:
    from types import SimpleNamespace

    from magi_server.serving.settings import ServerSettings

    return common.ServerContext(ServerSettings(outputs_dir=str(tmp_path)), store=None,
                                engine=SimpleNamespace(retry_after_s=5.0), executor=None, model_name="x")


def test_decodes_run_on_a_small_pool_of_their_own(tmp_path, monkeypatch):
    """However many submits decode at once, at most IMAGE_DECODE_WORKERS ffmpeg decodes run, on the context's own
    threads (the default pool, which every other request needs, is not used); a stopped pool answers 503."""
    import asyncio

    ctx = _bare_context(tmp_path)
    running, peak, threads = [0], [0], set()
    lock = threading.Lock()

    def slow_fit(data, width, height, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            threads.add(threading.current_thread().name)
        time.sleep(0.1)
        with lock:
            running[0] -= 1
        return encode_png(np.zeros((height, width, 3), np.uint8))

    monkeypatch.setattr(common, "fit_image", slow_fit)
    image = common.ImageInput(b"", 64, 64, "image")

    async def six_at_once():
        await asyncio.gather(*(common.store_input_image(ctx, image, tmp_path / f"in-{i}.png", 32, 32)
                               for i in range(6)))

    asyncio.run(six_at_once())
    assert peak[0] == common.IMAGE_DECODE_WORKERS == 2
    assert threads and all(name.startswith("image-decode") for name in threads), threads
    assert all(image_size((tmp_path / f"in-{i}.png").read_bytes()) == (32, 32) for i in range(6))
    ctx.image_decoder.shutdown()
    with pytest.raises(common.Unavailable):
        asyncio.run(common.store_input_image(ctx, image, tmp_path / "late.png", 32, 32))


# ------------------------------------------------------------------------------------------- in-process server


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


def test_the_stored_input_is_the_working_size(tmp_path, pipeline):
    wide = np.zeros((360, 640, 3), np.uint8)
    wide[:, :, 1] = 200
    wide[:, :140] = wide[:, -140:] = (250, 0, 0)  # cropped away for a 1:1 output
    body = dict(SHORT, image=data_uri(encode_png(wide)), aspect_ratio="1:1")
    with running_server(tiny_settings(tmp_path, tmp_path / "cache"), pipeline=pipeline) as (ctx, client):
        r = client.post(MODEL, json=body)
        assert r.status_code == 200, r.text
        job = ctx.store.get(r.json()["data"]["id"])
        stored = Path(job.params.image_path)
        assert stored.parent == ctx.uploads_dir
        assert image_size(stored.read_bytes()) == (job.params.width, job.params.height) != (640, 360)
        pixels = load_image(stored)
        assert pixels[..., 0].max() < 10 and pixels[..., 1].min() > 190  # center crop: no red band left
        # "auto" takes the aspect ratio from the header: 640x360 is 16:9
        auto = client.post(MODEL, json=dict(SHORT, image=data_uri(encode_png(wide))))
        auto_job = ctx.store.get(auto.json()["data"]["id"])
        assert auto_job.params.width > auto_job.params.height
        assert image_size(Path(auto_job.params.image_path).read_bytes()) == (auto_job.params.width,
                                                                           auto_job.params.height)
        assert wait_status(client, job.id, timeout=120)["status"] == "completed"


class _CountingImageHost(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []
    body = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        type(self).hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000


def test_a_refused_submit_costs_no_fetch_and_no_decode(tmp_path, pipeline, huge_png, cap_png, monkeypatch):
    """Key a at its quota, then a full queue: a submit carrying the big image (inline or as a URL) is refused 429
    in < 50 ms, and nothing was fetched, sized or decoded for it."""
    _CountingImageHost.hits, _CountingImageHost.body = [], cap_png
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingImageHost)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{host.server_address[1]}/cap.png"
    # the loopback host on its own port: let the intake fetch from it (only the port rule is relaxed here)
    monkeypatch.setattr(common, "SourcePolicy", functools.partial(SourcePolicy, allowed_ports=None))
    calls: list[str] = []

    def counting(name: str, real):
        def counted(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return counted

    for name in ("read_image_bytes", "image_size", "fit_image"):
        monkeypatch.setattr(common, name, counting(name, getattr(common, name)))
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    settings = tiny_settings(tmp_path, tmp_path / "cache", api_keys=("key-a", "key-b"), max_queue=1,
                             max_queue_per_key=1, max_batch_size=1, allow_private_image_hosts=True)
    try:
        with running_server(settings, pipeline=pipeline) as (ctx, client):
            # the URL form is fetched when admitted (so the counting host would see a refused one)
            first = client.post(MODEL, json=dict(LONG, image=url), headers=a)
            assert first.status_code == 200, first.text
            assert _CountingImageHost.hits == ["/cap.png"] and calls == ["read_image_bytes", "image_size",
                                                                         "fit_image"]
            deadline = time.monotonic() + 30
            while ctx.store.get(first.json()["data"]["id"]).status.value != "running":
                assert time.monotonic() < deadline, "the first job did not start"
                time.sleep(0.02)
            _CountingImageHost.hits.clear()
            calls.clear()

            def refused(body: dict, headers: dict, reason: str) -> list[float]:
                times = []
                for _ in range(5):
                    started = time.perf_counter()
                    r = client.post(MODEL, json=body, headers=headers)
                    times.append(time.perf_counter() - started)
                    assert r.status_code == 429 and reason in r.json()["message"], r.text
                    assert int(r.headers["Retry-After"]) >= 1
                return times

            # key a holds its quota of 1 (the running job): refused before its image is looked at
            for image in (data_uri(huge_png), url):
                times = refused(dict(SHORT, image=image), a, "quota")
                assert _median_ms(times) < 50, times
            # key b fills the queue's one slot; then every submit is refused for the full queue
            assert client.post(MODEL, json=LONG, headers=b).status_code == 200
            for image in (data_uri(huge_png), url):
                times = refused(dict(SHORT, image=image), b, "queue is full")
                assert _median_ms(times) < 50, times
            assert calls == [] and _CountingImageHost.hits == []  # no fetch, no header read, no decode
            # and nothing stored for them: the two jobs, and only the first one's input
            assert sum(ctx.store.count_by_status().values()) == 2
            assert len(list(ctx.uploads_dir.glob("input-*.png"))) == 1
            for job in ctx.store.list():  # end quickly
                client.post(f"/api/v3/predictions/{job.id}/cancel", headers=a if job.owner == ctx.owner_of("key-a")
                            else b)
    finally:
        host.shutdown()
        host.server_close()


# ------------------------------------------------------------------------------------------ server subprocess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image-admission")
    with ServerProcess(db=tmp / "jobs.db", outputs=tmp / "outputs", cache=tmp / "cache", log=tmp / "server.log",
                       extra_args=("--max-queue", "64", "--max-batch", "1")) as proc:
        with httpx.Client(base_url=proc.url, timeout=60) as client:
            # warm every path a submit takes (a t2v and an i2v job run to the end) before RSS is measured
            for body in (SHORT, dict(SHORT, image=data_uri(solid_png(320, 180)))):
                r = client.post(MODEL, json=body)
                assert r.status_code == 200, r.text
                assert wait_status(client, r.json()["data"]["id"], timeout=120)["status"] == "completed"
        yield proc


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class _PeakRss:
    """The server's highest VmRSS while the block runs, sampled every 10 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, _rss_bytes(pid), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_bytes(self.pid))

    def __enter__(self) -> "_PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes(self.pid))


def _burst(server: ServerProcess, heavy: list[tuple[str, dict]]) -> tuple[list, list[float], float]:
    """Send the heavy submits at once; while they are in flight, three ordinary submits one after another.
    Returns the heavy responses (with the time each ended), the ordinary latencies and the time they ended."""
    def post(path: str, body: dict):
        with httpx.Client(base_url=server.url, timeout=60) as client:
            r = client.post(path, json=body)
            return r, time.monotonic()

    with ThreadPoolExecutor(len(heavy)) as pool:
        futures = [pool.submit(post, path, body) for path, body in heavy]
        time.sleep(0.05)  # their bodies are on the way
        ordinary = []
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for _ in range(3):
                started = time.perf_counter()
                r = client.post(MODEL, json=SHORT)
                ordinary.append(time.perf_counter() - started)
                assert r.status_code == 200, r.text
        ordinary_done = time.monotonic()
        return [f.result() for f in futures], ordinary, ordinary_done


def test_six_huge_images_are_refused_from_their_header(server, huge_png):
    """Six concurrent 49 MP submits (WaveSpeed, fal-style field names via Magic Hour too): each a 4xx naming the
    field, at once; the server's RSS grows < 300 MB and an ordinary submit meanwhile answers in < 1 s."""
    image = data_uri(huge_png)
    heavy = [(MODEL, dict(SHORT, image=image)) for _ in range(5)]
    heavy.append(("/v1/image-to-video", {"end_seconds": 1, "assets": {"image_file_path": image}}))
    before = _rss_bytes(server.pid)
    started = time.monotonic()
    with _PeakRss(server.pid) as rss:
        answers, ordinary, _ = _burst(server, heavy)
    for r, _ in answers[:5]:
        assert r.status_code == 400 and r.json()["message"].startswith("image: the image is 7000x7000"), r.text
    r, _ = answers[5]
    assert r.status_code == 422 and r.json()["field"] == "assets.image_file_path", r.text
    assert max(done for _, done in answers) - started < 5.0  # refused, not decoded (that took 3-10 s each)
    assert rss.peak - before < RSS_GROWTH_LIMIT, (before, rss.peak)
    assert _median_ms(ordinary) < 1000, ordinary


def test_six_images_at_the_cap_are_accepted_without_starving_others(server, cap_png):
    """Six concurrent 16.7 MP submits (at the cap): all accepted, decoded to the working size on the decode pool;
    the server's RSS grows < 300 MB and ordinary submits, answered while the decodes run, take < 1 s."""
    heavy = [(MODEL, dict(SHORT, image=data_uri(cap_png), seed=i)) for i in range(6)]
    before = _rss_bytes(server.pid)
    with _PeakRss(server.pid) as rss:
        answers, ordinary, ordinary_done = _burst(server, heavy)
    for r, _ in answers:
        assert r.status_code == 200, r.text
    assert ordinary_done < max(done for _, done in answers)  # they were answered while the decodes still ran
    assert rss.peak - before < RSS_GROWTH_LIMIT, (before, rss.peak)
    assert _median_ms(ordinary) < 1000, ordinary
    with httpx.Client(base_url=server.url, timeout=60) as client:  # end the jobs: the module's server stops next
        for r, _ in answers:
            client.post(f"/api/v3/predictions/{r.json()['data']['id']}/cancel")
