"""``magi-server download`` stores into the Hugging Face cache and ``--model <preset>`` finds it there.

No test reaches the network. The caches are built here from the tiny weights (written by the project's own writer)
in the real cache layout, and the "online" downloads go to :class:`FakeHub`, a protocol-compatible stand-in for
huggingface.co that answers the three requests ``snapshot_download`` makes (revision info, file tree, file
resolve). Every command runs in a subprocess with the ``HF_*`` variables set, because huggingface_hub reads them
once at import.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
import pytest

from magi_server.models.config import REAL_PRESETS, preset
from magi_server.runtime.loading import HUB_REPO, hub_patterns, resolve_model_folder
from magi_server.runtime.tiny import write_tiny_weights
from tests.golden_utils import REPO_ROOT
from tests.procs import ServerProcess

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CACHE_REPO_FOLDER = "models--sand-ai--MAGI-1"
MODEL_FOLDER = "ckpt/magi/4.5B_distill"


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                          env=env)


def _hf_env(hf_home: Path, **extra: str) -> dict[str, str]:
    """The caller's environment with every HF_* variable replaced: the cache under ``hf_home`` and nothing else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost", **extra)
    return env


def _official_layout(root: Path) -> Path:
    """The tiny weights arranged as the sand-ai/MAGI-1 repo lays out 4.5B-distill; returns ``root``.

    ``magi_config.json`` beside the DiT folder (no such file is on the Hub) says the architecture is the tiny one,
    so loading "4.5B-distill" builds a tiny model instead of a 4.5B one. The special tokens are where
    ``magi-server download`` keeps them.
    """
    staging = root.parent / f"{root.name}.staging"
    tiny_model = write_tiny_weights(staging)
    (root / MODEL_FOLDER).parent.mkdir(parents=True)
    shutil.move(tiny_model, root / MODEL_FOLDER)
    shutil.move(staging / "vae", root / "ckpt" / "vae")
    shutil.move(staging / "t5", root / "ckpt" / "t5")
    shutil.move(staging / "special_tokens.npz", root / "ckpt" / "special_tokens.npz")
    shutil.rmtree(staging)
    return root


@pytest.fixture(scope="module")
def prefilled_hf_home(tmp_path_factory) -> Path:
    """An HF_HOME whose hub cache holds sand-ai/MAGI-1 at COMMIT, as huggingface_hub accepts it: refs/main naming
    the commit and the files under snapshots/<commit>/ (real caches link them to blobs/; plain files are read
    the same way)."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    repo = hf_home / "hub" / CACHE_REPO_FOLDER
    _official_layout(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return hf_home


# ------------------------------------------------------------------------------------------- the repo's layout


def test_each_preset_needs_its_dit_folder_the_vae_and_the_t5():
    assert len(REAL_PRESETS) == 6
    assert hub_patterns("24B-distill-quant") == [
        "ckpt/magi/24B_distill_quant/inference_weight.fp8.distill/*", "ckpt/vae/*", "ckpt/t5/t5-v1_1-xxl/*",
    ]
    assert hub_patterns("4.5B-base")[0] == "ckpt/magi/4.5B_base/inference_weight/*"
    assert hub_patterns("4.5B-distill", include_t5=False) == [
        "ckpt/magi/4.5B_distill/inference_weight.distill/*", "ckpt/vae/*",
    ]
    assert HUB_REPO == "sand-ai/MAGI-1"


# ------------------------------------------------------------------------------ offline, with a pre-filled cache


@pytest.mark.slow
def test_offline_download_reports_the_cached_snapshot(prefilled_hf_home):
    proc = _run(["-m", "magi_server", "download", "4.5B-distill"], _hf_env(prefilled_hf_home, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr
    snapshot = prefilled_hf_home / "hub" / CACHE_REPO_FOLDER / "snapshots" / COMMIT
    assert f"4.5B-distill is in {snapshot / MODEL_FOLDER}" in proc.stdout
    assert "magi-server serve --model 4.5B-distill" in proc.stdout


@pytest.mark.slow
def test_preset_name_loads_from_the_cache_in_the_library_and_generate(prefilled_hf_home):
    script = (
        "import json; from magi_server import MagiPipeline; from magi_server.tools.generate import model_config\n"
        "pipe = MagiPipeline.from_pretrained('4.5B-distill', device='cpu')\n"
        "config = model_config('4.5B-distill')\n"
        "print(json.dumps({'load': pipe.config.load, 'vae': pipe.config.vae_pretrained, "
        "'t5': pipe.config.t5_pretrained, 'tokens': pipe.config.special_tokens, 'generate_load': config.load, "
        "'layers': pipe.config.dit.num_layers}))"
    )
    proc = _run(["-c", script], _hf_env(prefilled_hf_home, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    snapshot = prefilled_hf_home / "hub" / CACHE_REPO_FOLDER / "snapshots" / COMMIT
    assert found["load"] == found["generate_load"] == str(snapshot / MODEL_FOLDER)
    assert found["vae"] == str(snapshot / "ckpt" / "vae") and found["t5"] == str(snapshot / "ckpt" / "t5")
    assert found["tokens"] == str(snapshot / "ckpt" / "special_tokens.npz")
    assert found["layers"] == preset("tiny").dit.num_layers


@pytest.mark.slow
def test_serve_preset_name_finds_the_cached_weights(prefilled_hf_home, tmp_path, monkeypatch):
    for name in [k for k in os.environ if k.startswith("HF_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", str(prefilled_hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with ServerProcess(db=tmp_path / "jobs.db", outputs=tmp_path / "out", cache=tmp_path / "cache",
                       log=tmp_path / "serve.log", model="4.5B-distill") as server:
        ready = httpx.get(f"{server.url}/health/ready", timeout=5).json()
        assert ready["status"] == "ready"
    assert "model 4.5B-distill loaded" in server.log_tail()


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["download", "4.5B-distill"], ["serve", "--model", "4.5B-distill", "--device", "cpu"],
])
def test_without_the_weights_one_line_names_the_download_command(tmp_path, command):
    start = time.monotonic()
    proc = _run(["-m", "magi_server", *command], _hf_env(tmp_path / "empty_hf_home", HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2 and time.monotonic() - start < 60
    if command[0] == "serve":
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "run `magi-server download 4.5B-distill`" in lines[0], proc.stderr
    else:
        assert "outgoing traffic has been disabled" in proc.stderr
        assert "ckpt/magi/4.5B_distill/inference_weight.distill/" in proc.stderr
    assert not (tmp_path / "empty_hf_home" / "hub" / CACHE_REPO_FOLDER).exists()


@pytest.mark.slow
def test_unreachable_hub_fails_in_seconds_with_instructions(tmp_path):
    # Port 9 on loopback refuses connections: stands in for "no network" without reaching outside.
    start = time.monotonic()
    target = tmp_path / "weights"
    proc = _run(["-m", "magi_server", "download", "4.5B-distill", "--dir", str(target)],
                _hf_env(tmp_path / "hf_home", HF_ENDPOINT="http://127.0.0.1:9"), timeout=60)
    assert proc.returncode == 2
    assert time.monotonic() - start < 15
    assert "ConnectError" in proc.stderr
    assert f"ckpt/magi/4.5B_distill/inference_weight.distill/  ->  {target / MODEL_FOLDER}" in proc.stderr
    assert str(target / "ckpt" / "special_tokens.npz") in proc.stderr
    assert not target.exists()


def test_unknown_variant_is_rejected(tmp_path):
    proc = _run(["-m", "magi_server", "download", "99B", "--dir", str(tmp_path)],
                _hf_env(tmp_path / "hf_home", HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2 and "unknown variant '99B'" in proc.stderr


# ------------------------------------------------------------------------------------------ online, a fake hub


class FakeHub:
    """huggingface.co for one model repo at one commit, over plain HTTP on loopback: ``GET
    /api/models/<repo>/revision/<rev>`` (the commit), ``GET /api/models/<repo>/tree/<commit>`` (the file list) and
    ``HEAD``/``GET /<repo>/resolve/<commit>/<path>`` (a file, with the commit and ETag headers the client checks).
    Every request is recorded so a test can see what was fetched."""

    def __init__(self, repo_root: Path, repo_id: str, commit: str) -> None:
        self.files = {p.relative_to(repo_root).as_posix(): p for p in sorted(repo_root.rglob("*")) if p.is_file()}
        self.fetched: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet: the requests are recorded instead
                pass

            def do_HEAD(self) -> None:
                self._answer(send_body=False)

            def do_GET(self) -> None:
                self._answer(send_body=True)

            def _answer(self, send_body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                api, resolve = f"/api/models/{repo_id}/", f"/{repo_id}/resolve/{commit}/"
                headers = {"Content-Type": "application/json"}
                if path.startswith(api + "revision/"):
                    body = json.dumps({"id": repo_id, "sha": commit,
                                       "siblings": [{"rfilename": name} for name in hub.files]}).encode()
                elif path.startswith(api + f"tree/{commit}"):
                    body = json.dumps([
                        {"type": "file", "path": name, "size": file.stat().st_size,
                         "oid": hashlib.sha1(file.read_bytes()).hexdigest()}
                        for name, file in hub.files.items()
                    ]).encode()
                elif path.startswith(resolve) and path[len(resolve):] in hub.files:
                    name = path[len(resolve):]
                    body = hub.files[name].read_bytes()
                    headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}
                    if send_body:
                        hub.fetched.append(name)
                else:
                    body, headers = b'{"error": "not found"}', {"X-Error-Code": "EntryNotFound"}
                self.send_response(200 if "X-Error-Code" not in headers else 404)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    repo = _official_layout(tmp_path_factory.mktemp("hub_repo") / "MAGI-1")
    # the special tokens are not on the real Hub either, and another variant shows that only one is fetched
    tokens = repo.parent / "special_tokens.npz"
    shutil.move(repo / "ckpt" / "special_tokens.npz", tokens)
    other = repo / "ckpt" / "magi" / "24B_distill" / "inference_weight.distill"
    other.mkdir(parents=True)
    (other / "model.safetensors.index.json").write_text("{}")
    (repo / "README.md").write_text("MAGI-1\n")
    hub = FakeHub(repo, HUB_REPO, COMMIT)
    yield hub, repo, tokens
    hub.close()


def _put_special_tokens(ckpt: Path, tokens: Path) -> None:
    """The special tokens come from GitHub, which no test reaches: put them where download keeps them (it then
    skips that fetch)."""
    ckpt.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokens, ckpt / "special_tokens.npz")


def _same_files(fetched_root: Path, repo: Path, patterns: list[str]) -> list[str]:
    names = sorted(p.relative_to(repo).as_posix() for pattern in patterns for p in repo.glob(pattern))
    assert names
    for name in names:
        assert (fetched_root / name).read_bytes() == (repo / name).read_bytes(), name
    return names


@pytest.mark.slow
def test_download_stores_the_preset_in_the_hf_cache(fake_hub, tmp_path):
    hub, repo, tokens = fake_hub
    hub.fetched.clear()
    hf_home = tmp_path / "hf_home"
    cache_repo = hf_home / "hub" / CACHE_REPO_FOLDER
    _put_special_tokens(cache_repo / "snapshots" / COMMIT / "ckpt", tokens)
    proc = _run(["-m", "magi_server", "download", "4.5B-distill", "--skip-t5"], _hf_env(hf_home, HF_ENDPOINT=hub.url))
    assert proc.returncode == 0, proc.stderr
    snapshot = cache_repo / "snapshots" / COMMIT
    names = _same_files(snapshot, repo, hub_patterns("4.5B-distill", include_t5=False))
    assert sorted(hub.fetched) == names  # not the other variant, the T5 or the README
    assert (cache_repo / "refs" / "main").read_text() == COMMIT and any((cache_repo / "blobs").iterdir())
    assert f"4.5B-distill is in {snapshot / MODEL_FOLDER}" in proc.stdout

    # a second download finds everything in the cache and fetches nothing
    hub.fetched.clear()
    again = _run(["-m", "magi_server", "download", "4.5B-distill", "--skip-t5"], _hf_env(hf_home, HF_ENDPOINT=hub.url))
    assert again.returncode == 0, again.stderr
    assert hub.fetched == []


@pytest.mark.slow
def test_download_dir_writes_a_plain_folder_the_loader_reads(fake_hub, tmp_path):
    hub, repo, tokens = fake_hub
    target = tmp_path / "weights"
    _put_special_tokens(target / "ckpt", tokens)
    hf_home = tmp_path / "hf_home"
    proc = _run(["-m", "magi_server", "download", "4.5B-distill", "--dir", str(target)],
                _hf_env(hf_home, HF_ENDPOINT=hub.url))
    assert proc.returncode == 0, proc.stderr
    _same_files(target, repo, hub_patterns("4.5B-distill"))
    assert not (target / "ckpt" / "magi" / "24B_distill").exists()
    assert not (hf_home / "hub" / CACHE_REPO_FOLDER / "snapshots").exists()
    assert f"magi-server serve --model {target / MODEL_FOLDER}" in proc.stdout
    resolved = resolve_model_folder(target / MODEL_FOLDER, preset("tiny"))
    assert resolved.vae_pretrained == str(target / "ckpt" / "vae")
    assert resolved.t5_pretrained == str(target / "ckpt" / "t5")
    assert resolved.special_tokens == str(target / "ckpt" / "special_tokens.npz")
