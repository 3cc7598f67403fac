"""Checkpoint loading on tiny checkpoints that the tests write in the official layouts."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from magi_server.models.config import DiTConfig, weight_subfolder
from magi_server.runtime.loading import CheckpointError, build_dit, load_dit, load_vae, read_checkpoint_index
from magi_server.models.fp8 import FP8_DTYPE, Fp8PerTensorLinear, Fp8SmoothedLinear

TINY = DiTConfig(
    num_layers=3, hidden_size=64, ffn_hidden_size=96, num_attention_heads=2, num_query_groups=1, kv_channels=32,
    caption_channels=32, params_dtype="float32",
)


def random_dit_state(config: DiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Spec §12.2 initialisation: N(0, .02) weights and biases, N(0, .05) LN1p weights, jittered rope bands."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, meta in build_dit(config).state_dict().items():
        if meta.dtype == FP8_DTYPE:
            values = (torch.randn(meta.shape, generator=gen) * 8).clamp(-448, 448).to(FP8_DTYPE)
        elif name.endswith(("weight_scale", "input_scale", "smooth_scale")):
            values = torch.rand(meta.shape, generator=gen) * 0.02 + 0.01
        elif name == "rope.bands":
            n = meta.numel()
            default = 1.0 / 10000 ** (torch.arange(n, dtype=torch.float32) / n)
            values = default * (1 + 0.1 * torch.randn(n, generator=gen))
        elif name == "y_embedder.null_caption_embedding":
            values = torch.randn(meta.shape, generator=gen)
        elif re.search(r"(layernorm|post_norm|final_layernorm)[^.]*\.weight$", name):
            values = torch.randn(meta.shape, generator=gen) * 0.05
        else:
            values = torch.randn(meta.shape, generator=gen) * 0.02
        state[name] = values.contiguous()
    return state


def write_dit_checkpoint(root: Path, config: DiTConfig, state: dict[str, torch.Tensor], *, shards: int = 2) -> Path:
    folder = root / weight_subfolder(config)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    if shards == 1:
        save_file({n: state[n] for n in names}, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: state[n] for n in part}, str(folder / shard))
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_sharded_checkpoint_loads_by_assignment(tmp_path):
    state = random_dit_state(TINY)
    write_dit_checkpoint(tmp_path, TINY, state)
    model = load_dit(tmp_path, TINY)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name
    assert all(t.device.type == "cpu" for t in loaded.values())


def test_single_file_layout_and_subfolder_path(tmp_path):
    state = random_dit_state(TINY)
    folder = write_dit_checkpoint(tmp_path, TINY, state, shards=1)
    for path in (tmp_path, folder):
        model = load_dit(path, TINY)
        assert torch.equal(model.state_dict()["rope.bands"], state["rope.bands"])


def test_precision_policy_on_bf16_params(tmp_path):
    config = DiTConfig(**{**TINY.__dict__, "params_dtype": "bfloat16"})
    state = {k: v.to(torch.bfloat16) for k, v in random_dit_state(config).items()}
    write_dit_checkpoint(tmp_path, config, state)
    loaded = load_dit(tmp_path, config).state_dict()
    assert loaded["rope.bands"].dtype == torch.float32
    assert loaded["t_embedder.mlp.0.weight"].dtype == torch.float32
    assert loaded["videodit_blocks.layers.0.self_attention.q_layernorm.weight"].dtype == torch.float32
    assert loaded["videodit_blocks.layers.0.self_attention.q_layernorm_xattn.weight"].dtype == torch.bfloat16
    assert loaded["videodit_blocks.layers.0.self_attention.linear_qkv.q.weight"].dtype == torch.bfloat16
    assert loaded["videodit_blocks.layers.0.mlp_post_norm.weight"].dtype == torch.float32


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message, f"error message is not one line: {message!r}"
    return message


def test_missing_key_names_key_and_folder(tmp_path):
    state = random_dit_state(TINY)
    del state["videodit_blocks.layers.1.mlp.linear_fc2.weight"]
    folder = write_dit_checkpoint(tmp_path, TINY, state)
    with pytest.raises(CheckpointError) as info:
        load_dit(tmp_path, TINY)
    message = _one_line(info.value)
    assert "missing key 'videodit_blocks.layers.1.mlp.linear_fc2.weight'" in message
    assert str(folder) in message


def test_unexpected_key_names_key_and_file(tmp_path):
    state = random_dit_state(TINY)
    state["x_embedder.bias"] = torch.zeros(64)
    folder = write_dit_checkpoint(tmp_path, TINY, state)
    with pytest.raises(CheckpointError) as info:
        load_dit(tmp_path, TINY)
    message = _one_line(info.value)
    assert "unexpected key 'x_embedder.bias'" in message
    assert re.search(re.escape(str(folder)) + r"/model-0000\d-of-00002\.safetensors", message)


def test_wrong_shape_names_key_file_and_shapes(tmp_path):
    state = random_dit_state(TINY)
    state["final_linear.linear.weight"] = torch.zeros(64, 65)
    write_dit_checkpoint(tmp_path, TINY, state)
    with pytest.raises(CheckpointError) as info:
        load_dit(tmp_path, TINY)
    message = _one_line(info.value)
    assert "key 'final_linear.linear.weight'" in message and ".safetensors" in message
    assert "(64, 65)" in message and "(64, 64)" in message


FP8_TINY = DiTConfig(**{**TINY.__dict__, "params_dtype": "bfloat16", "distill": True, "fp8_quant": True})


def test_fp8_checkpoint_without_scales(tmp_path):
    state = random_dit_state(FP8_TINY)
    del state["videodit_blocks.layers.1.self_attention.linear_qkv.k.weight_scale"]
    folder = write_dit_checkpoint(tmp_path, FP8_TINY, state)
    assert folder.name == "inference_weight.fp8.distill"
    with pytest.raises(CheckpointError) as info:
        load_dit(tmp_path, FP8_TINY)
    message = _one_line(info.value)
    assert "fp8 weight 'videodit_blocks.layers.1.self_attention.linear_qkv.k.weight'" in message
    assert "weight_scale" in message and ".safetensors" in message


def test_fp8_weights_into_non_fp8_config_is_refused(tmp_path):
    state = random_dit_state(FP8_TINY)
    write_dit_checkpoint(tmp_path / "x", FP8_TINY, state)
    plain = DiTConfig(**{**FP8_TINY.__dict__, "fp8_quant": False})
    folder = tmp_path / "x" / "inference_weight.fp8.distill"
    with pytest.raises(CheckpointError, match="is fp8 but the config is not fp8_quant"):
        load_dit(folder, plain)


def test_missing_weight_folder_says_which(tmp_path):
    (tmp_path / "inference_weight").mkdir()
    (tmp_path / "inference_weight" / "x.txt").write_text("")
    distilled = DiTConfig(**{**TINY.__dict__, "distill": True})
    with pytest.raises(CheckpointError, match=r"inference_weight\.distill.*found inference_weight"):
        load_dit(tmp_path, distilled)


def test_index_pointing_at_missing_shard(tmp_path):
    folder = write_dit_checkpoint(tmp_path, TINY, random_dit_state(TINY))
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors listed in .* is missing"):
        read_checkpoint_index(folder)


def test_fp8_linears_follow_the_literal_formula():
    torch.manual_seed(0)
    per_tensor = Fp8PerTensorLinear(32, 16)
    per_tensor.weight = (torch.randn(1, 16, 32) * 10).to(FP8_DTYPE)
    per_tensor.weight_scale = torch.tensor([0.01])
    per_tensor.input_scale = torch.rand(32) * 0.1 + 0.02  # not constant: only element 0 scales the output
    x = torch.randn(5, 3, 32, dtype=torch.bfloat16)
    a = torch.clamp(x.float() / per_tensor.input_scale, -448, 448).to(torch.bfloat16).to(FP8_DTYPE).float()
    expected = (a @ per_tensor.weight[0].float().t()) * per_tensor.input_scale[0] * 0.01
    out = per_tensor(x)
    assert out.dtype == torch.bfloat16 and out.shape == (5, 3, 16)
    assert torch.equal(out, expected.to(torch.bfloat16))

    smoothed = Fp8SmoothedLinear(32, 16)
    smoothed.weight = per_tensor.weight
    smoothed.weight_scale = torch.tensor([0.02])
    smoothed.input_scale = torch.tensor([0.5])
    smoothed.smooth_scale = torch.rand(1, 32) + 0.5
    a = torch.clamp(x.float() / smoothed.smooth_scale, -448, 448).to(torch.bfloat16).to(FP8_DTYPE).float()
    expected = (a @ smoothed.weight[0].float().t()) * 0.5 * 0.02
    assert torch.equal(smoothed(x), expected.to(torch.bfloat16))


def test_fp8_dit_loads_and_runs_close_to_dequantized(tmp_path):
    """A 3-layer fp8 DiT (layer 1 quantized) loads and its forward tracks the same model with dequantized weights."""
    state = random_dit_state(FP8_TINY, seed=3)
    # realistic scales: weight ~ N(0, .02) stored as e4m3 of w / weight_scale, activations ~ N(0, 1)
    for name in list(state):
        if state[name].dtype == FP8_DTYPE:
            module = name[: -len(".weight")]
            w = torch.randn(state[name].shape) * 0.02
            state[f"{module}.weight_scale"] = torch.tensor([0.02 / 16])
            state[name] = (w / (0.02 / 16)).clamp(-448, 448).to(FP8_DTYPE)
            if f"{module}.smooth_scale" in state:
                state[f"{module}.smooth_scale"] = torch.full_like(state[f"{module}.smooth_scale"], 1 / 64)
                state[f"{module}.input_scale"] = torch.full_like(state[f"{module}.input_scale"], 1 / 64)
            else:
                state[f"{module}.input_scale"] = torch.full_like(state[f"{module}.input_scale"], 1 / 64)
    write_dit_checkpoint(tmp_path / "q", FP8_TINY, state)
    quantized = load_dit(tmp_path / "q", FP8_TINY)
    assert isinstance(
        quantized.get_submodule("videodit_blocks.layers.1.self_attention.linear_qkv.q"), Fp8PerTensorLinear
    )

    # The same network without fp8: dequantized weights W = e4m3 * weight_scale (smoothing folded in).
    plain_config = DiTConfig(**{**FP8_TINY.__dict__, "fp8_quant": False})
    plain_state = {}
    for name, value in state.items():
        if name.endswith(("weight_scale", "input_scale", "smooth_scale")):
            continue
        if value.dtype == FP8_DTYPE:
            module = name[: -len(".weight")]
            value = value.float()[0] * state[f"{module}.weight_scale"]
            if f"{module}.smooth_scale" in state:
                # y = (x / smooth) W^T * s_in * s_w  ==  x (W * s_in / smooth)^T * s_w
                value = value * state[f"{module}.input_scale"] / state[f"{module}.smooth_scale"]
            else:
                value = value * state[f"{module}.input_scale"][0] / state[f"{module}.input_scale"]
        plain_state[name] = value
    write_dit_checkpoint(tmp_path / "p", plain_config, plain_state)
    plain = load_dit(tmp_path / "p", plain_config)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 6, 4, 4, generator=gen)
    t = torch.tensor([[0.4]])
    captions = torch.randn(1, 16, 32, generator=gen)
    mask = torch.zeros(1, 16)
    mask[0, :5] = 1
    kwargs = dict(kv_range=torch.tensor([[0, 24]]), caption_dropout=torch.tensor([False]), dt=8.0)
    out_q = quantized(x, t, captions, mask, **kwargs)
    out_p = plain(x, t, captions, mask, **kwargs)
    assert out_q.shape == (1, 16, 6, 4, 4) and out_q.dtype == torch.float32
    assert torch.isfinite(out_q).all()
    rel = (out_q - out_p).norm() / out_p.norm()
    assert rel < 0.1, f"fp8 forward drifts {rel:.3f} from the dequantized model"


# ------------------------------------------------------------------------------------------------------- golden


def test_golden_dit_checkpoints_load_through_the_project_loader(golden):
    from safetensors.torch import load_file

    from magi_server.models.config import MagiConfig

    for variant in "AB":
        config = MagiConfig.from_json(golden / f"config_{variant}.json")
        model = load_dit(config.load, config.dit)
        flat = load_file(str(golden / f"dit_{variant}_weights.safetensors"))
        loaded = model.state_dict()
        assert set(loaded) == set(flat)
        for name, value in flat.items():
            assert loaded[name].dtype == torch.float32
            assert torch.equal(loaded[name], value.float()), name


def test_golden_vae_loads_through_the_project_loader(golden):
    from safetensors.torch import load_file

    model = load_vae(golden / "vae", dtype=torch.float32)
    flat = load_file(str(golden / "vae" / "diffusion_pytorch_model.safetensors"))
    loaded = model.state_dict()
    assert set(loaded) == set(flat)
    assert all(torch.equal(loaded[k], v.float()) for k, v in flat.items())


def test_vae_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="VAE config not found"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(CheckpointError, match="not a MAGI-1 ViTVAE config"):
        load_vae(tmp_path)
