"""benchmarks/gpu_bench.py: its --dry-run runs every section on the CPU (so the GPU run has no untried code path),
its FLOP count is spec section 11's, and a failing or late section is recorded without stopping the run."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from magi_server.models.config import preset
from tests.golden_utils import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_bench.py"
SECTIONS = ["env", "matmul", "dit", "e2e", "compile"]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_runs_every_section_without_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)  # not the checkout: any cwd works
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert data["meta"]["dry_run"] is True
    sections = data["sections"]
    assert list(sections) == SECTIONS
    for name, entry in sections.items():
        assert entry["status"] == "done", (name, entry.get("error"))
        assert entry["rows"], name
        assert not any("error" in row for row in entry["rows"]), (name, entry["rows"])
    dit = sections["dit"]["rows"]
    assert len(dit) == 8  # four presets x 480p and 720p
    assert all(row["tflops"] > 0 and row["kv_chunks"] == "2/3/4/5" for row in dit)
    assert [r["dtype"] for r in sections["matmul"]["rows"]][0] == "bf16"
    e2e = sections["e2e"]["rows"][0]
    assert e2e["frames"] > 0 and e2e["dit_calls"] > 0 and (tmp_path / "e2e.mp4").stat().st_size > 0
    compile_row = sections["compile"]["rows"][0]
    assert "skipped" in compile_row or compile_row["graphs_built_after_first_call"] == 0
    markdown = (tmp_path / "gpu_bench.md").read_text()
    for name in SECTIONS:
        assert f"## {name}: done" in markdown
    assert "| preset | res |" in markdown


@pytest.mark.parametrize("name, res, pflop", [
    ("24B-distill", "720p", 11.58), ("24B-distill", "480p", 3.12),
    ("4.5B-distill", "720p", 3.43), ("4.5B-distill", "480p", 0.82),
])
def test_dit_call_flops_are_spec_section_11(name, res, pflop):
    """The steady-state window from the planner (kv ranges 2-5 chunks) costs what spec §11.2's table says."""
    bench = _module()
    cfg = preset(name).dit
    call, tpc = bench.window_call(cfg, *bench.SIZES[res])
    assert [(end - start) // tpc for start, end in call.kv_ranges] == [2, 3, 4, 5]
    assert call.slice_point >= 1 and min(start for start, _ in call.kv_ranges) == (call.slice_point - 1) * tpc
    total = bench.spec_flops(cfg, tpc, call.kv_ranges)["total"]
    assert abs(total / (pflop * 1e15) - 1) < 0.01


def test_failing_and_late_sections_are_recorded(tmp_path, monkeypatch):
    bench = _module()

    def broken(args, report):
        report.row("matmul", dtype="bf16", n=1)
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bench, "SECTIONS", {**bench.SECTIONS, "matmul": (broken, 60)})
    assert bench.main(["--dry-run", "--only", "matmul,env", "--out", str(tmp_path / "a")]) == 0
    sections = json.loads((tmp_path / "a" / "gpu_bench.json").read_text())["sections"]
    assert sections["matmul"]["status"] == "failed" and "out of memory" in sections["matmul"]["error"]
    assert sections["matmul"]["rows"] == [{"dtype": "bf16", "n": 1}]
    assert sections["env"]["status"] == "done"  # the next section still ran

    assert bench.main(["--dry-run", "--budget-s", "0", "--out", str(tmp_path / "b")]) == 0
    sections = json.loads((tmp_path / "b" / "gpu_bench.json").read_text())["sections"]
    assert list(sections) == SECTIONS and {s["status"] for s in sections.values()} == {"skipped"}
    assert "## dit: skipped" in (tmp_path / "b" / "gpu_bench.md").read_text()


@pytest.mark.slow
def test_e2e_without_imageio_ffmpeg_decodes_instead_of_encoding(tmp_path, monkeypatch):
    """The lent GPU machines have no imageio-ffmpeg: the e2e section still runs the whole generation."""
    bench = _module()
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name, *a: None if name == "imageio_ffmpeg" else real(name, *a))
    assert bench.main(["--dry-run", "--only", "e2e", "--out", str(tmp_path)]) == 0
    entry = json.loads((tmp_path / "gpu_bench.json").read_text())["sections"]["e2e"]
    assert entry["status"] == "done", entry.get("error")
    assert entry["rows"][0]["mp4"].startswith("not encoded") and entry["rows"][0]["frames"] > 0
    assert not (tmp_path / "e2e.mp4").exists()
