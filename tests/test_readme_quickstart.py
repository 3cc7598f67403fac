"""The README's serve command, run exactly as written in a fresh clone, serves a working API.

The command is parsed from the README, so the two cannot drift: it must set up everything itself (virtual
environment, install) and, with no weights, serve the tiny preset on http://127.0.0.1:8000.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time

import httpx
import pytest

from tests.media_utils import probe_video
from tests.golden_utils import REPO_ROOT

BASE = "http://127.0.0.1:8000"


def readme_commands() -> dict[str, str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = {}
    for line in block.splitlines():
        command = line.split("#", 1)[0].strip()
        if command:
            commands[command.split()[1] if command.startswith("make ") else command] = command
    return commands


def test_readme_names_the_ci_test_command():
    commands = readme_commands()
    assert set(commands) == {"serve", "test"}
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert f"\n{commands['test']}\n" in ci  # CI runs exactly the README's test command


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_readme_serve_command_from_a_fresh_clone(tmp_path):
    if not _port_free(8000):
        pytest.skip("port 8000 is taken on this machine; the README's command serves there")
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                            capture_output=True, text=True).stdout
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True, timeout=120)
    if status.strip():
        # local runs with uncommitted edits: test the working tree's tracked files, as CI tests its commit
        subprocess.run(f"git -C {shlex.quote(str(REPO_ROOT))} diff HEAD | git -C {shlex.quote(str(clone))} apply",
                       shell=True, check=True, timeout=60)
    env = dict(os.environ, HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "MAGI_SERVER_API_KEYS", "MAGI_SERVER_CACHE"):
        env.pop(name, None)
    (tmp_path / "home").mkdir()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(shlex.split(readme_commands()["serve"]), cwd=clone, env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 900  # a cold install of every dependency into the clone's own .venv
        while True:
            assert proc.poll() is None, f"serve exited early:\n{_tail(tmp_path / 'serve.log')}"
            try:
                ready = httpx.get(f"{BASE}/health/ready", timeout=5)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"no /health/ready:\n{_tail(tmp_path / 'serve.log')}"
            time.sleep(1)
        assert "noise-like" in ready.json()["notice"]
        first_lines = (tmp_path / "serve.log").read_text(errors="replace")
        assert "tiny preset" in first_lines  # the log says plainly what it is serving

        job = httpx.post(f"{BASE}/api/v3/wavespeed-ai/magi-1-24b", timeout=30,
                         json={"prompt": "a red fox", "num_frames": 48, "resolution": "480p",
                               "num_inference_steps": 8}).json()["data"]
        deadline = time.monotonic() + 300
        while True:
            data = httpx.get(job["urls"]["get"], timeout=10).json()["data"]
            if data["status"] in ("completed", "failed"):
                break
            assert time.monotonic() < deadline, data
            time.sleep(0.5)
        assert data["status"] == "completed", data
        video = httpx.get(data["outputs"][0], timeout=30)
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        out = tmp_path / "out.mp4"
        out.write_bytes(video.content)
        info = probe_video(out)
        assert (info.frames, info.width, info.height) == (48, 96, 64)
    finally:
        try:  # the group is gone when the command died early: the failure above is the one to report
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def _tail(path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:]
