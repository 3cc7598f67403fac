"""The playground page in headless Chromium (issue #12, acceptance 7), against a real server with an API key.

- The form end to end: an uploaded first frame, progress chunk by chunk, a playable MP4 behind a signed URL (the
  page's <video> elements cannot send the key).
- A job run from the page with a random seed and scene prompts shows in the key's history (the server's) with the
  seed it ran with; its request copied as curl (run by the real `curl`; where none is installed, parsed with shlex
  and sent with httpx) and as a Python SDK snippet (run with the official ``wavespeed`` SDK) reproduces the same MP4
  bytes; "Extend by one chunk" continues it (``continue_from``) with 24 new frames at its size.
- The enhance button: off, saying why, on a server without a prompt enhancer; rewriting the prompt on one with a
  tiny language model written by tests/test_prompt_enhancer.py.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from magi_server.media.images import encode_png
from magi_server.serving.jobs import JobStore
from tests.media_utils import probe_video
from tests.procs import ServerProcess
from tests.test_prompt_enhancer import WORDS, tiny_lm

PROMPT_ENHANCER_FIXTURES = (tiny_lm,)  # a fixture, taken by name below

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CURL = shutil.which("curl")
KEY = "playground-key-0123"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
JOB_TIMEOUT_S = 120.0


@pytest.fixture
def server(tmp_path):
    proc = ServerProcess(db=tmp_path / "jobs.db", outputs=tmp_path / "outputs", cache=tmp_path / "cache",
                         log=tmp_path / "server.log", extra_args=("--api-key", KEY))
    proc.start()
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _finished_output(server: ServerProcess, submitted: dict) -> tuple[str, bytes]:
    """Poll a submitted prediction (its answer's ``data``) to completion, as a script would: (id, MP4 bytes)."""
    job_id = submitted["id"]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        data = httpx.get(f"{server.url}/api/v3/predictions/{job_id}/result", timeout=10,
                         headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
        if data["status"] in ("completed", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, data
        time.sleep(0.2)
    assert data["status"] == "completed", data
    return job_id, httpx.get(data["outputs"][0], timeout=30).content


def _replay_curl_with_httpx(command: str, env: dict) -> dict:
    """The request a ``curl -X POST URL -H ... --data-raw BODY`` command sends, sent with httpx (only where no
    curl is installed); ``$VARS`` in double-quoted words are expanded from ``env`` as the shell would."""
    words = shlex.split(command.replace("\\\n", " "), posix=True)
    assert words[:4] == ["curl", "-sS", "-X", "POST"], words
    url, headers, body = words[4], {}, None
    rest = iter(words[5:])
    for word in rest:
        if word == "-H":
            name, value = next(rest).split(":", 1)
            headers[name] = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), ""), value.strip())
        elif word == "--data-raw":
            body = next(rest)
        else:
            raise AssertionError(f"unexpected curl argument {word!r}")
    return httpx.post(url, headers=headers, content=body, timeout=30).json()["data"]


def test_playground_runs_a_job_end_to_end(server, browser, tmp_path):
    image = tmp_path / "first.png"
    pixels = np.zeros((64, 112, 3), dtype=np.uint8)
    pixels[:, :56] = (220, 40, 40)
    pixels[:, 56:] = (40, 40, 220)
    image.write_bytes(encode_png(pixels))

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

    assert httpx.get(server.url + urlsplit(src).path, timeout=30).status_code == 404  # unsigned, no key
    data = httpx.get(src, timeout=30).content
    out = tmp_path / "downloaded.mp4"
    out.write_bytes(data)
    info = probe_video(out)
    # 480p, auto aspect from a 112x64 image -> 16:9 -> 832x480 at the tiny preset's 1/8 scale -> 96x64
    assert (info.frames, info.width, info.height) == (72, 96, 64)


def test_history_copy_as_curl_and_python_reproduce_the_job_and_extend_adds_a_chunk(server, browser, tmp_path):
    context = browser.new_context()
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(server.url + "/", timeout=30_000)

    # no key yet: the history asks for one; this server has no prompt enhancer: the button says why it is off
    page.wait_for_selector("#history-list li.hint", timeout=10_000)
    assert "API key" in page.locator("#history-list").inner_text()
    page.wait_for_function("() => !document.getElementById('enhance-note').textContent.startsWith('checking')")
    assert page.locator("#enhance").is_disabled()
    assert "no prompt enhancer" in page.locator("#enhance-note").inner_text()

    # markup in a prompt is shown as text, never parsed (history entries are built from job data)
    prompt = 'a lighthouse <img src=x onerror="window.pwned=1"> at dusk'
    scenes = ["a lighthouse at dusk", "the lamp turns on"]
    page.fill("#apikey", KEY)
    page.fill("#prompt", prompt)
    page.fill("#scenes", "\n".join(scenes) + "\n")
    page.fill("#seed", "-1")  # random: only the resolved seed can reproduce the video
    page.fill("#frames", "48")
    page.select_option("#resolution", "480p")
    page.select_option("#steps", "8")
    page.dispatch_event("#apikey", "change")

    # the form's request, as curl: what Run would send
    page.click("#copy-curl")
    page.wait_for_function("() => document.getElementById('copy-status').textContent.startsWith('copied')")
    form_curl = page.evaluate("navigator.clipboard.readText()")
    assert form_curl == page.locator("#request-code").inner_text()
    assert form_curl.startswith(f"curl -sS -X POST '{server.url}/api/v3/wavespeed-ai/magi-1-24b'")
    assert json.loads(form_curl.split("--data-raw ", 1)[1].strip("'")) == {
        "prompt": prompt, "prompts": scenes, "seed": -1, "num_frames": 48, "resolution": "480p",
        "aspect_ratio": "auto", "num_inference_steps": 8}

    page.click("#run")
    page.wait_for_selector("#final-video", timeout=120_000)
    assert page.locator("#status").inner_text() == "completed"
    job_id = page.locator("#result-id").inner_text()
    seed = int(page.locator("#result-seed").inner_text().removeprefix("seed "))
    original = httpx.get(page.get_attribute("#final-video", "src"), timeout=30).content
    assert original[4:8] == b"ftyp"
    job = JobStore(tmp_path / "jobs.db").get(job_id)  # one prompt per chunk reached the job
    assert job.params.prompts == tuple(scenes) and job.params.seed == seed

    # the history (the server's, for this key) shows it with its seed, timings and a playable video
    entry = page.locator(f'#history-list li.history-item[data-id="{job_id}"]')
    entry.locator(".h-video").wait_for(timeout=30_000)
    assert entry.locator(".h-status").inner_text() == "completed"
    assert entry.locator(".h-seed").inner_text() == f"seed {seed}"
    assert entry.locator(".h-inference").inner_text().endswith(" s")
    assert entry.locator(".h-prompt").inner_text() == prompt
    assert page.locator("#history-list img").count() == 0 and page.evaluate("window.pwned") is None
    page.wait_for_function(
        f"() => {{ const v = document.querySelector('li[data-id=\"{job_id}\"] .h-video');"
        " return v && v.readyState >= 1 && v.duration > 0; }", timeout=30_000)

    # copy as curl from the history entry: the job's request with its resolved seed; the real curl reproduces it
    entry.locator(".copy-curl").click()
    page.wait_for_function("() => document.getElementById('request-kind').textContent.includes('with its seed')")
    curl_command = page.evaluate("navigator.clipboard.readText()")
    assert f'"seed":{seed}' in curl_command and '"prompts":' in curl_command
    env = dict(os.environ, WAVESPEED_API_KEY=KEY)
    if CURL is not None:
        run = subprocess.run(["bash", "-c", curl_command], env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        submitted = json.loads(run.stdout)["data"]
    else:  # no curl binary here: the copied command parsed as a shell would (shlex) and sent with httpx instead
        submitted = _replay_curl_with_httpx(curl_command, env)
    replay_id, replayed = _finished_output(server, submitted)
    assert replay_id != job_id and replayed == original  # the same bytes

    # copy as Python SDK, run by this venv's Python with the official SDK: the same bytes again
    entry.locator(".copy-python").click()
    page.wait_for_function("() => document.getElementById('request-kind').textContent.startsWith('Python SDK')")
    snippet = page.evaluate("navigator.clipboard.readText()")
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert httpx.get(run.stdout.strip(), timeout=30).content == original

    # the replays are in the history too, each with the seed it ran with
    page.click("#history-refresh")
    page.wait_for_function("() => document.querySelectorAll('#history-list li.history-item').length === 3")
    assert page.locator("#history-list .h-seed").all_inner_texts() == [f"seed {seed}"] * 3

    # extend the first job by one chunk: a continue_from job whose video is one chunk longer
    page.fill("#scenes", "")
    page.fill("#prompt", "the lighthouse beam sweeps the sea")
    entry.locator(".extend").click()
    page.wait_for_function(f"() => {{ const id = document.getElementById('result-id');"
                           f" return id && id.textContent !== '{job_id}'; }}", timeout=120_000)
    assert page.locator("#status").inner_text() == "completed"
    extension_id = page.locator("#result-id").inner_text()
    extension = JobStore(tmp_path / "jobs.db").get(extension_id)
    assert extension.params.task == "v2v" and extension.params.prefix_latents_path is not None  # continue_from
    assert extension.params.prompts == ("the lighthouse beam sweeps the sea",)
    assert page.locator("#result-continues").inner_text().startswith(f"continues {job_id}")
    out = tmp_path / "extension.mp4"
    out.write_bytes(httpx.get(page.get_attribute("#final-video", "src"), timeout=30).content)
    first = tmp_path / "first.mp4"
    first.write_bytes(original)
    new_frames, source = probe_video(out), probe_video(first)
    # one chunk of new frames, at the source's size (480p, not the server's 720p default)
    assert (new_frames.frames, new_frames.width, new_frames.height) == (24, source.width, source.height)
    extended = page.locator(f'#history-list li.history-item[data-id="{extension_id}"]')
    extended.locator(".h-video").wait_for(timeout=30_000)
    assert extended.locator(".h-continues").inner_text() == f"continues {job_id}"
    # the page loads nothing from elsewhere (no CDN, fonts or scripts): every request went to this server
    assert requested and all(url.startswith(server.url + "/") for url in requested), requested
    context.close()


def test_enhance_button_rewrites_the_prompt_when_the_server_has_an_enhancer(tmp_path, browser, tiny_lm):
    proc = ServerProcess(db=tmp_path / "jobs.db", outputs=tmp_path / "outputs", cache=tmp_path / "cache",
                         log=tmp_path / "server.log", extra_args=("--api-key", KEY, "--prompt-enhancer", str(tiny_lm)))
    proc.start()
    try:
        page = browser.new_page()
        page.goto(proc.url + "/", timeout=30_000)
        page.fill("#apikey", KEY)
        page.fill("#prompt", "a fox in snow")
        page.wait_for_function("() => !document.getElementById('enhance').disabled", timeout=10_000)
        page.click("#enhance")
        page.wait_for_function("() => document.getElementById('enhance-note').textContent.startsWith('enhanced')",
                               timeout=60_000)
        enhanced = page.input_value("#prompt")
        assert enhanced and enhanced != "a fox in snow" and set(enhanced.split()) <= set(WORDS) | {":", "."}
        assert page.locator("#enhance-note").inner_text() == "enhanced; the original was: a fox in snow"
    finally:
        proc.close()
