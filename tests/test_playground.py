"""The playground page in headless Chromium: fill the form, upload an image, watch progress, get a playable MP4.

The server runs with an API key, so the page's <video> elements (which cannot send the key) prove that the signed
URLs the API hands out play on their own."""
from __future__ import annotations

import shutil
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from magi_server.media.images import encode_png
from tests.media_utils import probe_video
from tests.procs import ServerProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "playground-key-0123"


@pytest.fixture
def server(tmp_path):
    proc = ServerProcess(db=tmp_path / "jobs.db", outputs=tmp_path / "outputs", cache=tmp_path / "cache",
                         log=tmp_path / "server.log", extra_args=("--api-key", KEY))
    proc.start()
    try:
        yield proc
    finally:
        proc.close()


def test_playground_runs_a_job_end_to_end(server, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed")

    image = tmp_path / "first.png"
    pixels = np.zeros((64, 112, 3), dtype=np.uint8)
    pixels[:, :56] = (220, 40, 40)
    pixels[:, 56:] = (40, 40, 220)
    image.write_bytes(encode_png(pixels))

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"],
        )
        try:
            page = browser.new_page()
            page.goto(server.url + "/", timeout=30_000)
            assert "noise-like" in page.locator("#notice").inner_text(timeout=10_000)
            page.fill("#prompt", "a red and blue flag waving")
            page.fill("#apikey", KEY)
            page.set_input_files("#image", str(image))
            page.fill("#seed", "7")
            page.fill("#frames", "72")
            page.select_option("#resolution", "480p")
            page.select_option("#aspect", "auto")
            page.select_option("#steps", "8")
            # record every progress value the page shows
            page.evaluate("""() => { window.progressSeen = [];
                new MutationObserver(() => window.progressSeen.push(document.getElementById('progress').value))
                  .observe(document.getElementById('progress'), {attributes: true}); }""")
            page.click("#run")
            page.wait_for_selector("#final-video", timeout=120_000)
            assert page.locator("#status").inner_text() == "completed"
            seen = page.evaluate("window.progressSeen")
            assert max(seen) == 3 and len(set(seen)) >= 3, seen  # the bar advanced chunk by chunk to 3/3
            assert page.locator("video.chunk-preview").count() == 3
            # the browser can play it: metadata loads and it has a duration
            page.wait_for_function(
                "() => { const v = document.getElementById('final-video'); return v.readyState >= 1 && v.duration > 0; }",
                timeout=30_000,
            )
            src = page.get_attribute("#final-video", "src")
            href = page.get_attribute("#download", "href")
            assert src == href and urlsplit(src).path.endswith(".mp4") and "sig=" in urlsplit(src).query
            # the saved file is named <id>.mp4, without the signature
            assert page.get_attribute("#download", "download") == urlsplit(src).path.split("/")[-1]
        finally:
            browser.close()

    assert httpx.get(server.url + urlsplit(src).path, timeout=30).status_code == 404  # unsigned, no key
    data = httpx.get(src, timeout=30).content
    out = tmp_path / "downloaded.mp4"
    out.write_bytes(data)
    info = probe_video(out)
    # 480p, auto aspect from a 112x64 image -> 16:9 -> 832x480 at the tiny preset's 1/8 scale -> 96x64
    assert (info.frames, info.width, info.height) == (72, 96, 64)
