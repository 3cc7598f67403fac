"""``magi-server download``: the manifest is the one the package uses, and offline it fails fast and helpfully."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from magi_server.tools.download import manifest, variant_names
from tests.golden_utils import REPO_ROOT


def test_weights_manifest_file_matches_package():
    on_disk = json.loads((REPO_ROOT / "weights" / "manifest.json").read_text())
    assert on_disk == manifest()


def test_manifest_covers_six_variants():
    assert variant_names() == [
        "24B-base", "24B-distill", "24B-distill-quant", "4.5B-base", "4.5B-distill", "4.5B-distill-quant",
    ]
    v = manifest()["variants"]
    assert v["24B-distill-quant"]["hf_dit_folder"] == "ckpt/magi/24B_distill_quant/inference_weight.fp8.distill"
    assert v["4.5B-base"]["dit_weights"] == "4.5B_base/inference_weight"


def test_offline_download_fails_in_seconds_with_instructions(tmp_path):
    # Port 9 on loopback refuses connections: stands in for "no network" without reaching outside.
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "magi_server", "download", "4.5B-distill", "--dir", str(tmp_path),
         "--endpoint", "http://127.0.0.1:9", "--timeout", "3"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2
    assert elapsed < 15
    assert "cannot reach http://127.0.0.1:9" in proc.stderr
    assert "ckpt/magi/4.5B_distill/inference_weight.distill/" in proc.stderr
    assert str(tmp_path / "4.5B_distill" / "inference_weight.distill") in proc.stderr
    assert "special_tokens.npz" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_unknown_variant_is_rejected(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "magi_server", "download", "99B", "--dir", str(tmp_path), "--endpoint", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )
    assert proc.returncode == 2 and "unknown variant '99B'" in proc.stderr
