"""Import is free (no CUDA, no data files) and the four layers import one way only."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

from tests.golden_utils import REPO_ROOT

PACKAGE = REPO_ROOT / "magi_server"

_PROBE = textwrap.dedent(
    r"""
    import importlib, os, pkgutil, sys
    import torch
    # third-party frameworks read their own package metadata on first import (pydantic looks up plugin entry
    # points); import them before the audit starts: the test is about what the project's modules do
    import fastapi, httpx, numpy, pydantic, safetensors, starlette
    import magi_server

    def forbidden_cuda(*args, **kwargs):
        raise RuntimeError("CUDA touched at import time")
    torch.cuda._lazy_init = forbidden_cuda
    torch.cuda.init = forbidden_cuda
    torch.cuda.is_available = forbidden_cuda
    torch.cuda.device_count = forbidden_cuda

    opened = []
    CODE_SUFFIXES = (".py", ".pyc", ".so", ".pth", ".typed")
    def audit(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            if not path.endswith(CODE_SUFFIXES) and "__pycache__" not in path and not os.path.isdir(path):
                opened.append(path)
    sys.addaudithook(audit)

    names = [m.name for m in pkgutil.walk_packages(magi_server.__path__, "magi_server.")]
    names = [n for n in names if n != "magi_server.__main__"]
    for name in names:
        importlib.import_module(name)
    print("IMPORTED", len(names))
    print("OPENED", opened)
    """
)


def test_every_module_imports_without_cuda_or_disk():
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "HOME": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert int(lines["IMPORTED"]) >= 5
    assert lines["OPENED"] == "[]", f"data files opened at import: {lines['OPENED']}"


# The package tree is the architecture. Each package may import only the packages listed for it (and itself);
# anything else is an upward or sideways import. tools and the composition root wire everything together.
ALLOWED = {
    "params": set(),
    "models": {"params"},
    "media": {"params"},
    "runtime": {"params", "models", "media"},
    "engine": {"params"},
    "serving": {"params", "engine", "media"},
    "composition": {"params", "models", "media", "runtime", "engine", "serving"},
    "__init__": {"runtime"},
    "tools": {"params", "models", "media", "runtime", "engine", "serving", "composition", "tools"},
    "__main__": {"tools"},
}
# Packages (or modules) that must not import torch: the scheduler and the HTTP edge run without it.
NO_TORCH = ("params", "engine", "serving", "media", "runtime/chunking", "runtime/memory_model")


def _project_imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):  # every import, also the ones inside functions
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            if node.module == "magi_server":
                for alias in node.names:
                    yield f"magi_server.{alias.name}"


def test_layers_import_downward_only():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        top = rel.parts[0]
        assert top in ALLOWED, f"{rel}: not assigned to a layer in tests/test_imports.py"
        for name in _project_imports(path):
            parts = name.split(".")
            if parts[0] == "torch" and str(rel).startswith(NO_TORCH):
                problems.append(f"{rel} imports torch but must stay torch-free")
            if parts[0] != "magi_server" or len(parts) < 2 or parts[1] == top:
                continue
            if parts[1] not in ALLOWED[top]:
                problems.append(f"{rel} ({top}) imports {name}")
    assert not problems, "\n".join(problems)


def test_scheduler_store_and_chunking_load_without_torch():
    probe = ("import sys; import magi_server.engine.loop, magi_server.engine.scheduler, magi_server.runtime.chunking, "
             "magi_server.runtime.memory_model, magi_server.serving.jobs, magi_server.serving.app, magi_server.params; "
             "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"


def test_magi_pipeline_is_importable_from_the_package():
    probe = "import sys, magi_server; assert 'torch' not in sys.modules; from magi_server import MagiPipeline; print(MagiPipeline.__module__)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "magi_server.runtime.pipeline"
