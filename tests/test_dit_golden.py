"""Golden parity of the DiT (plain call, KV-cache calls) and of the guided-velocity dispatcher, models A and B.

Every fixture runs under each way the DiT can execute: eagerly on the CPU kernels; with the GEMM paths taken on
CUDA (bf16-operand GEMMs with fp32 output for linear_proj, the embedders and the final linear, the patch embedding
as a GEMM; emulated on the CPU with the same products); with tiny token pieces (the memory-bounding split of the
token-wise layer parts); and through torch.compile.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from magi_server.models.config import DEFAULT_MAX_PIECE_TOKENS, MagiConfig
from magi_server.runtime.loading import load_dit
from magi_server.models.dit import KVCache, VideoDiT
from magi_server.runtime.timesteps import distill_dt
from tests.golden_utils import guided_velocity
from tests.golden_utils import assert_close_fp32, load_golden


def load_golden_dit(golden: Path, variant: str) -> VideoDiT:
    """The tiny golden DiT through the project's loader, from the official on-disk layout (ckpt_dit_{A,B}/)."""
    config = MagiConfig.from_json(golden / f"config_{variant}.json")
    return load_dit(config.load, config.dit)


@pytest.fixture(scope="module")
def manifest(golden: Path) -> dict:
    return json.loads((golden / "manifest.json").read_text())


@pytest.fixture(scope="module", params=["A", "B"])
def variant(request, golden: Path) -> tuple[str, VideoDiT, MagiConfig]:
    name = request.param
    return name, load_golden_dit(golden, name), MagiConfig.from_json(golden / f"config_{name}.json")


EXECUTIONS = ["eager", "tensor_core_gemms", "small_pieces", pytest.param("compiled", marks=pytest.mark.slow)]


@pytest.fixture(params=EXECUTIONS)
def execution(request, variant, monkeypatch):
    """Configure the module-scoped model for one execution mode and restore it afterwards."""
    _, model, _ = variant
    mode = request.param
    if mode == "tensor_core_gemms":
        from magi_server.models import dit as dit_module

        monkeypatch.setattr(dit_module, "fp32_out_gemm_available", lambda device: True)
    if mode == "small_pieces":
        model.max_piece_tokens = 25  # 72-token chunks -> pieces of 24 tokens
    model.set_compiled(mode == "compiled")
    yield mode
    model.max_piece_tokens = DEFAULT_MAX_PIECE_TOKENS
    model.set_compiled(False)


def _dt(model: VideoDiT, kwargs: dict) -> float | None:
    return distill_dt(kwargs["num_steps"], kwargs["distill_interval"]) if model.config.distill else None


def test_fp32_policy_matches_manifest(golden: Path, manifest: dict) -> None:
    for name in ("A", "B"):
        model = load_golden_dit(golden, name)
        listed = manifest["dit_params_kept_fp32_by_high_precision_promoter_when_checkpoint_is_bf16"][name]
        expected = {entry.split(":")[0] for entry in listed}
        got = {key for key in model.state_dict() if VideoDiT.is_fp32_param(key)}
        assert got == expected


def test_forward_plain(variant, execution, manifest: dict) -> None:
    name, model, _ = variant
    data = load_golden(f"dit_{name}_forward_plain.safetensors")
    kwargs = manifest["files"][f"dit_{name}_forward_plain.safetensors"]["kwargs"]
    inter: dict = {}
    out = model(
        data["x"], data["t"], data["y"].squeeze(1), data["xattn_mask"].squeeze(1), data["kv_range"],
        data["caption_dropout_mask"], slice_point=kwargs["slice_point"], chunk_width=kwargs["chunk_width"],
        dt=_dt(model, kwargs), intermediates=inter,
    )
    assert out.dtype == torch.float32
    assert_close_fp32(out, data["out"], f"{name}.out")
    inter_keys = [k for k in data if k.startswith("inter.")]
    assert inter_keys
    for key in inter_keys:
        assert key[len("inter."):] in inter, f"missing intermediate {key}"
        assert_close_fp32(inter[key[len("inter."):]], data[key], f"{name}.{key}")


def test_forward_kvcache(variant, execution, manifest: dict) -> None:
    name, model, _ = variant
    data = load_golden(f"dit_{name}_forward_kvcache.safetensors")
    calls = manifest["files"][f"dit_{name}_forward_kvcache.safetensors"]["kwargs"]
    cache = KVCache(model.config.num_layers, torch.float32, "cpu")
    for i in (1, 2, 3):
        kw = calls[f"call{i}"]
        out = model(
            data[f"call{i}.x"], data[f"call{i}.t"], data[f"call{i}.y"].squeeze(1),
            data[f"call{i}.xattn_mask"].squeeze(1), data[f"call{i}.kv_range"], data["caption_dropout_mask"],
            slice_point=kw["slice_point"], chunk_width=kw["chunk_width"], dt=_dt(model, kw), kv_cache=cache,
            write_cache=kw["update_kv_cache"],
        )
        assert_close_fp32(out, data[f"call{i}.out"], f"{name}.call{i}.out")
        if i in (1, 3):
            for layer in range(model.config.num_layers):
                ref = data[f"cache_after_call{i}.layer{layer}"]
                rows = cache.rows(layer, 0)
                assert_close_fp32(rows, ref, f"{name}.cache_after_call{i}.layer{layer}")
    assert cache.chunks() == [0, 1, 2, 3]


def test_forward_dispatcher(variant, execution, manifest: dict) -> None:
    name, model, magi = variant
    data = load_golden(f"dit_{name}_forward_dispatcher.safetensors")
    kw = manifest["files"][f"dit_{name}_forward_dispatcher.safetensors"]["kwargs"]
    s = magi.sampling
    out = guided_velocity(
        model, data["x"], data["timestep"], data["y"].squeeze(1), data["mask"].squeeze(1), data["kv_range"],
        cfg_number=s.cfg_number, slice_point=kw["slice_point"], chunk_width=kw["chunk_width"],
        extra_clean_chunk=kw["fwd_extra_1st_chunk"], nearly_clean=kw["distill_nearly_clean_chunk"],
        dt=_dt(model, kw), kv_cache=KVCache(model.config.num_layers, torch.float32, "cpu"),
        cfg_t_range=s.cfg_t_range, prev_chunk_scales=s.prev_chunk_scales, text_scales=s.text_scales,
        prev_chunks_scale=s.prev_chunks_scale,
    )
    assert_close_fp32(out, data["out"], f"{name}.dispatcher.out")
    assert torch.equal(out[0], out[1])
