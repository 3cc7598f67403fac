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


# Layers, top to bottom. A module may import its own layer or any layer below, never one above.
LAYERS = {
    "http": {"server", "schemas", "jobs", "api", "metrics", "playground"},
    "engine": {"engine", "scheduler", "memory_model"},
    "runner": {"runner", "accounting", "pipeline", "sampling", "chunking", "video", "loading", "velocity", "tiny", "executor", "batch"},
    "models": {"models"},
}
ORDER = ["http", "engine", "runner", "models"]
# Composition root and shared leaf modules sit outside the stack.
OUTSIDE = {"cli", "__main__", "__init__", "config", "params", "download", "bench", "tls", "planner"}
NO_TORCH = {"scheduler", "chunking", "jobs", "config", "params", "memory_model"}


def _layer_of(top: str) -> str | None:
    for layer, names in LAYERS.items():
        if top in names:
            return layer
    return None


def _project_imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_layers_import_downward_only():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        top = rel.parts[0]
        if top in OUTSIDE:
            continue
        layer = _layer_of(top)
        assert layer is not None, f"{rel}: module not assigned to a layer in tests/test_imports.py"
        for name in _project_imports(path):
            parts = name.split(".")
            if parts[0] == "torch" and top in NO_TORCH:
                problems.append(f"{rel} imports torch but must stay torch-free")
            if parts[0] != "magi_server" or len(parts) < 2:
                continue
            target = parts[1]
            if target in OUTSIDE - {"config", "params"}:
                problems.append(f"{rel} imports magi_server.{target} (composition root / tool)")
                continue
            target_layer = _layer_of(target)
            if target_layer is not None and ORDER.index(target_layer) < ORDER.index(layer):
                problems.append(f"{rel} ({layer}) imports {name} ({target_layer}): upward import")
    assert not problems, "\n".join(problems)
