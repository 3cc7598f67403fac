"""The six real presets build on the meta device with exactly the parameter counts of the spec's key tables."""
from __future__ import annotations

from collections.abc import Iterable

import pytest
from torch import nn

from magi_server.models.config import PRESET_NAMES, REAL_PRESETS, MagiConfig, canonical_preset_name, preset
from magi_server.runtime.loading import build_dit

# Spec §1.1: 24B = 39,082,512 outside the blocks + 48 x 497,087,488; 4.5B = 20,196,624 + 34 x 130,579,456.
BASE_24B = 23_899_281_936
BASE_4_5B = 4_459_898_128
# fp8 checkpoints add scales in layers 1..L-2 (spec §2.11 fp8 table): per-tensor q/qx/k/v/fc1 each
# weight_scale (1) + input_scale (hidden); linear_proj weight_scale + input_scale (1 each) + smooth_scale (2*hidden);
# fc2 the same with smooth_scale (ffn).
FP8_EXTRA_24B = 46 * (5 * (1 + 6144) + (2 + 12288) + (2 + 16384))  # 2,732,446
FP8_EXTRA_4_5B = 32 * (5 * (1 + 3072) + (2 + 6144) + (2 + 12288))  # 1,081,632

EXPECTED = {
    "24B-base": BASE_24B,
    "24B-distill": BASE_24B,
    "24B-distill-quant": BASE_24B + FP8_EXTRA_24B,
    "4.5B-base": BASE_4_5B,
    "4.5B-distill": BASE_4_5B,
    "4.5B-distill-quant": BASE_4_5B + FP8_EXTRA_4_5B,
}


def state_dict_numel(model: nn.Module, names: Iterable[str] | None = None) -> int:
    """Number of elements in the model's state dict (works on meta models): the checkpoint's size in values."""
    state = model.state_dict()
    keys = state.keys() if names is None else names
    return sum(state[k].numel() for k in keys)



def test_fp8_extra_counts_spelled_out():
    assert FP8_EXTRA_24B == 2_732_446
    assert FP8_EXTRA_4_5B == 1_081_632


@pytest.mark.parametrize("name", REAL_PRESETS)
def test_real_preset_parameter_count(name):
    config = preset(name).dit
    model = build_dit(config)
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    assert state_dict_numel(model) == EXPECTED[name]


@pytest.mark.parametrize("name", ["24B-base", "4.5B-base"])
def test_block_and_outer_split(name):
    model = build_dit(preset(name).dit)
    state = model.state_dict()
    block0 = [k for k in state if k.startswith("videodit_blocks.layers.0.")]
    outer = [k for k in state if not k.startswith("videodit_blocks.layers.")]
    per_block, outside = (497_087_488, 39_082_512) if name.startswith("24B") else (130_579_456, 20_196_624)
    assert state_dict_numel(model, block0) == per_block
    assert state_dict_numel(model, outer) == outside
    # 26 names per layer and 14 at the top level (spec §3)
    assert len(block0) == 26 and len(outer) == 14


def test_fp8_preset_layout():
    import torch

    model = build_dit(preset("4.5B-distill-quant").dit)
    state = model.state_dict()
    assert state["videodit_blocks.layers.0.self_attention.linear_qkv.q.weight"].dtype != torch.float8_e4m3fn
    assert state["videodit_blocks.layers.33.mlp.linear_fc1.weight"].dim() == 2
    assert state["videodit_blocks.layers.1.self_attention.linear_qkv.q.weight"].shape == (1, 3072, 3072)
    assert state["videodit_blocks.layers.1.self_attention.linear_qkv.q.input_scale"].shape == (3072,)
    assert state["videodit_blocks.layers.1.self_attention.linear_proj.smooth_scale"].shape == (1, 6144)
    assert state["videodit_blocks.layers.32.mlp.linear_fc2.input_scale"].shape == (1,)
    # not quantized anywhere (spec §2.11)
    assert state["videodit_blocks.layers.5.self_attention.linear_kv_xattn.weight"].dim() == 2


def test_preset_names_and_aliases():
    assert canonical_preset_name("24b_distill_quant") == "24B-distill-quant"
    assert canonical_preset_name("4.5B_base") == "4.5B-base"
    assert canonical_preset_name("nope") is None
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        preset("nope")
    assert set(PRESET_NAMES) == set(REAL_PRESETS) | {"tiny"}


def test_shipped_sampling_defaults():
    assert preset("24B-base").sampling.num_steps == 32
    assert preset("24B-distill").sampling.num_steps == 16
    assert preset("4.5B-distill").sampling.num_steps == 64
    assert (preset("24B-base").sampling.video_size_h, preset("24B-base").sampling.video_size_w) == (720, 1280)
    assert preset("24B-base").sampling.cfg_number == 3 and preset("24B-distill-quant").sampling.cfg_number == 1


def test_reference_config_json_loads_as_is(golden):
    config = MagiConfig.from_json(golden / "config_B.json")
    assert config.dit.distill and config.dit.half_channel_vae and config.dit.params_dtype == "float32"
    assert config.sampling.cfg_number == 1 and config.sampling.num_steps == 12
    # relative paths resolve against the JSON's folder
    assert config.load == str(golden / "ckpt_dit_B")
    assert config.vae_pretrained == str(golden / "vae")


def test_config_json_errors(tmp_path):
    import json

    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"model_config": {}, "runtime_config": {}}))
    with pytest.raises(ValueError, match="engine_config"):
        MagiConfig.from_json(bad)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        MagiConfig.from_json(tmp_path / "missing.json")
