"""The planner (`magi-server plan`): FLOPs against spec §11, memory against the acceptance thresholds, the
extrapolation over layers, the CLI, and the scheduler's arithmetic estimate against the accounted peaks."""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest

from magi_server.tools import cli
from magi_server.tools import plan as planner
from magi_server.models.config import preset
from magi_server.runtime.memory_model import GB, request_memory_estimate

FIXTURE = Path(__file__).parent / "data" / "plan_peaks.json"


# ------------------------------------------------------------------------------------------------- small pieces


def test_parse_resolution_and_bytes():
    assert planner.parse_resolution("480p") == (832, 480)
    assert planner.parse_resolution("720p") == (1280, 720)
    assert planner.parse_resolution("624x624") == (624, 624)
    with pytest.raises(ValueError):
        planner.parse_resolution("1000x700")  # not multiples of 16
    assert planner.parse_bytes("80GB") == 80 * 10**9
    assert planner.parse_bytes("80 GiB") == 80 * 2**30
    assert planner.parse_bytes("72G") == 72 * 10**9
    assert planner.parse_bytes("1e9") == 10**9


def test_t5_param_count_is_the_xxl_encoder():
    assert planner.T5_XXL_PARAMS == 4_762_310_656


# ------------------------------------------------------------------------------------------- FLOPs (spec §11)


@pytest.mark.parametrize(
    "model, width, height, linear, attention, total",
    [
        # spec §11.2: steady state, 4 chunks with kv ranges 2/3/4/5 chunks (14 chunk-pairs), text pass
        ("24B-distill", 1280, 720, 3.862e15, 7.705e15, 11.58e15),
        ("4.5B-distill", 832, 480, 0.304e15, 0.512e15, 0.82e15),
    ],
)
def test_dit_call_flops_match_spec_11_2(model, width, height, linear, attention, total):
    call = planner.account_forward(model, width, height, kv_chunks=(2, 3, 4, 5), caption_tokens=100)
    assert call["chunk_forwards"] == 4 and call["chunk_pairs"] == 14
    flops = call["flops"]
    assert flops["attention"] == pytest.approx(attention, rel=0.01)
    assert flops["gemm_bf16"] + flops["gemm_fp32"] + flops["gemm_fp8"] == pytest.approx(linear, rel=0.01)
    assert call["total_flops"] == pytest.approx(total, rel=0.01)


def test_24b_720p_dit_call_has_no_fp32_gemm():
    """Acceptance 3: every GEMM of a 24B-distill 720p call runs on bf16 (or fp8) operands."""
    call = planner.account_forward("24B-distill", 1280, 720)
    assert call["flops"]["gemm_fp32"] == 0
    assert call["flops"]["gemm_bf16"] > 0


@functools.cache
def _planned_96_frames(model: str, width: int, height: int):
    """One accounted plan per real-shape request for the whole run (the FLOP and memory tests share them)."""
    return planner.plan(planner.PlanInputs(model, width, height, 96, 16), suggest=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, width, height, total",
    [
        ("4.5B-distill", 832, 480, 12.3e15),  # spec §11.3: 83 chunk-forwards, 163 chunk-pairs
        ("24B-distill", 1280, 720, 170.1e15),
    ],
)
def test_request_flops_match_spec_11_3(model, width, height, total):
    result = _planned_96_frames(model, width, height)
    assert result.num_calls == 28
    assert result.totals["total_flops"] == pytest.approx(total, rel=0.01)


# ------------------------------------------------------------------------------- memory (acceptance 2, slow)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, width, height, limit_gb",
    [
        ("24B-distill", 1280, 720, 72),
        ("24B-distill-quant", 1280, 720, 52),
        ("4.5B-distill", 1280, 720, 22),
        ("4.5B-distill-quant", 832, 480, 14),
    ],
)
def test_request_peak_fits_the_acceptance_thresholds(model, width, height, limit_gb):
    result = _planned_96_frames(model, width, height)
    peak = result.memory["total_peak_bytes"]
    parts = {k: round(v / GB, 2) for k, v in result.memory.items() if k.endswith("bytes")}
    assert peak <= limit_gb * GB, f"{model} {width}x{height}: {peak / GB:.2f} GB > {limit_gb} GB ({parts})"


# ------------------------------------------------------------------------------------ extrapolation over depth


def _small_config(name: str, layers: int):
    """A real preset shrunk in width (same structure, fp8 included) so every layer can be run quickly."""
    config = preset(name)
    dit = dataclasses.replace(config.dit, num_layers=layers, hidden_size=256, ffn_hidden_size=512,
                              num_attention_heads=2, num_query_groups=1, caption_channels=64)
    return config.replace(dit=dit)


@pytest.mark.parametrize("name", ["4.5B-distill-quant", "24B-base"])
def test_layer_extrapolation_equals_running_every_layer(name):
    config = _small_config(name, 5)
    inputs = planner.PlanInputs(name, 160, 96, 48, 4)  # 2 chunks: calls with and without the extra clean chunk
    fast = planner.plan(inputs, suggest=False, layers="extrapolate", config=config)
    full = planner.plan(inputs, suggest=False, layers="all", config=config)
    assert "counted 3 times" in fast.method
    assert fast.totals["flops"] == full.totals["flops"]
    assert fast.totals["bytes"] == full.totals["bytes"]
    assert fast.totals["kernels"] == full.totals["kernels"]
    for a, b in zip(fast.calls, full.calls):
        assert (a.peak_bytes, a.start_bytes, a.end_bytes) == (b.peak_bytes, b.start_bytes, b.end_bytes)
        assert a.count == b.count
    assert fast.memory == full.memory


def test_plan_reports_calls_roofline_and_fit():
    config = _small_config("4.5B-distill", 3)
    result = planner.plan(planner.PlanInputs("small", 160, 96, 48, 8), suggest=False, config=config,
                          device_memory=10**12)
    assert result.num_calls == 10 and sum(c.count for c in result.calls) == 10
    assert result.fits
    h100 = result.totals["roofline_s"]["H100"]
    h200 = result.totals["roofline_s"]["H200"]
    assert 0 < h200 <= h100  # same compute, more bandwidth
    m = result.memory
    assert m["total_peak_bytes"] >= m["static_bytes"] + m["dit_call_peak_bytes"]
    assert "fits" in planner.format_plan(result)


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_plan_prints_json(capsys):
    code = cli.main(["plan", "--model", "4.5B-distill-quant", "--resolution", "320x192", "--frames", "24",
                     "--steps", "8", "--device-memory", "80GB", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "4.5B-distill-quant" and data["num_calls"] == 8
    assert data["fits"] is True and data["device_memory_bytes"] == 80 * GB
    assert data["totals"]["flops"]["gemm_fp8"] > 0
    assert data["memory"]["dit_weights_bytes"] > 4 * GB
    assert data["t5"]["where"] == "cpu"


def test_cli_plan_table_and_bad_input(capsys):
    assert cli.main(["plan", "--model", "4.5B-distill", "--resolution", "160x96", "--frames", "24", "--steps", "8",
                     "--gpu", "H200"]) == 0
    out = capsys.readouterr().out
    assert "total peak" in out and "H200" in out
    assert cli.main(["plan", "--model", "4.5B-distill", "--resolution", "1000x700"]) == 2
    assert "multiples of 16" in capsys.readouterr().err


@pytest.mark.slow
def test_a_request_that_does_not_fit_gets_suggestions():
    result = planner.plan(planner.PlanInputs("4.5B-distill", 832, 480, 96, 16), device_memory=12 * GB)
    assert not result.fits
    changes = {s["change"]: s for s in result.suggestions}
    assert any(name.startswith("fp8") and s["fits"] for name, s in changes.items())
    assert any(name.startswith("window") for name in changes)


# ------------------------------------------------------------------- the scheduler's estimate (acceptance 4)


def _fixture() -> dict:
    return json.loads(FIXTURE.read_text())


def _estimate(case: dict):
    config = preset(case["model"])
    s = config.sampling
    return request_memory_estimate(
        config.dit, width=case["width"], height=case["height"], num_frames=case["frames"], num_steps=case["steps"],
        window_size=case["window"], cfg_number=s.cfg_number, chunk_width=s.chunk_width,
        noise2clean_kvrange=s.noise2clean_kvrange, clean_chunk_kvrange=s.clean_chunk_kvrange,
        kv_offload=case["kv_offload"],
    )


def test_fixture_covers_the_acceptance_cases():
    cases = _fixture()["cases"]
    keys = {(c["model"], c["width"], c["height"], c["frames"]) for c in cases}
    for name in ("24B-base", "24B-distill", "24B-distill-quant", "4.5B-base", "4.5B-distill", "4.5B-distill-quant"):
        assert (name, 1280, 720, 96) in keys
    assert any(c["height"] == 480 for c in cases) and any(c["frames"] == 240 for c in cases)


@pytest.mark.parametrize("index", range(len(planner.MEMORY_FIXTURE_CASES)))
def test_arithmetic_estimate_bounds_the_accounted_peak(index):
    case = _fixture()["cases"][index]
    accounted = case["dit_call_peak_bytes"]
    estimate = _estimate(case).total_bytes
    label = f"{case['model']} {case['width']}x{case['height']} {case['frames']} frames"
    assert accounted <= estimate <= 1.3 * accounted, (
        f"{label}: estimate {estimate / GB:.2f} GB vs accounted {accounted / GB:.2f} GB "
        f"(ratio {estimate / accounted:.3f})")


def test_fixture_is_current_for_the_cheapest_case():
    """Recompute one fixture case live: a failure here means the models' allocation changed; rewrite the fixture
    with `magi-server plan --write-fixture tests/data/plan_peaks.json` and recheck the estimate."""
    case = next(c for c in _fixture()["cases"] if c["height"] == 480 and c["frames"] == 96)
    inputs = planner.PlanInputs(case["model"], case["width"], case["height"], case["frames"], case["steps"],
                                kv_offload=case["kv_offload"])
    result = planner.plan(inputs, suggest=False, only_calls="largest")
    assert result.memory["dit_call_peak_bytes"] == pytest.approx(case["dit_call_peak_bytes"], rel=1e-3)


def test_estimate_is_torch_free_and_grows_with_the_request():
    import subprocess
    import sys

    probe = "import sys, magi_server.runtime.memory_model; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0
    dit = preset("24B-distill").dit
    small = request_memory_estimate(dit, width=832, height=480, num_frames=96, num_steps=16, window_size=4,
                                    cfg_number=1)
    big = request_memory_estimate(dit, width=1280, height=720, num_frames=96, num_steps=16, window_size=4,
                                  cfg_number=1)
    longer = request_memory_estimate(dit, width=1280, height=720, num_frames=240, num_steps=16, window_size=4,
                                     cfg_number=1)
    assert small.total_bytes < big.total_bytes < longer.total_bytes


def test_startup_refuses_a_device_too_small_for_the_model_and_one_request():
    config = preset("24B-distill")
    line = planner.startup_problem(config, 40 * GB, name="24B-distill")
    assert line is not None and "\n" not in line
    assert "24B-distill does not fit" in line and "47.9 GB" in line  # the DiT's weights
    static = planner.model_memory(config, width=1280, height=720)
    assert planner.startup_problem(config, static["static_bytes"] + 20 * GB) is None


def test_serve_refuses_a_model_that_cannot_fit_with_one_line(capsys):
    from magi_server.tools import cli

    assert cli.main(["serve", "--model", "24B-distill", "--device", "cpu", "--device-memory", "40GB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "24B-distill does not fit this device" in err[0] and "40.0 GB" in err[0]


def test_serving_budget_is_the_device_less_the_model():
    from magi_server.tools import cli
    from magi_server.tools import plan as planner

    budget = cli._serving_memory_budget("24B-distill", "cpu", "80GB")
    static = planner.model_memory(planner.model_config("24B-distill")[1], width=1280, height=720)["static_bytes"]
    assert budget == 80 * 10**9 - static and 10 * 10**9 < budget < 30 * 10**9
    assert cli._serving_memory_budget("tiny", "cpu", None) is None
