"""The tiny preset's weights: the folder write_tiny_weights produces loads through the project's own loaders (the
same path as real weights), runs, is a pure function of the seed, and ensure_tiny_weights caches it atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from magi_server.runtime import tiny
from magi_server.models.config import TINY_DIT, MagiConfig, preset
from magi_server.runtime.loading import load_dit, load_text_encoder, load_vae, read_checkpoint_index
from magi_server.models.text_encoder import SpecialTokens
from magi_server.runtime.timesteps import distill_dt

EXPECTED_FILES = {
    "tiny/magi_config.json",
    "tiny/inference_weight.distill/model.safetensors.index.json",
    "tiny/inference_weight.distill/model-00001-of-00002.safetensors",
    "tiny/inference_weight.distill/model-00002-of-00002.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "t5/t5-v1_1-xxl/config.json",
    "t5/t5-v1_1-xxl/model.safetensors",
    "t5/t5-v1_1-xxl/tokenizer.json",
    "t5/t5-v1_1-xxl/tokenizer_config.json",
    "special_tokens.npz",
}


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "weights"
    assert tiny.write_tiny_weights(root) == root / "tiny"
    return root


@pytest.fixture(scope="module")
def config(root) -> MagiConfig:
    return MagiConfig.from_json(root / "tiny" / "magi_config.json")


def test_layout_is_the_official_one(root):
    assert EXPECTED_FILES <= set(_tree(root))
    infos = read_checkpoint_index(root / "tiny" / "inference_weight.distill")
    assert {info.file.name for info in infos.values()} == {
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    }


def test_config_is_the_tiny_preset_in_reference_schema(root, config):
    data = json.loads((root / "tiny" / "magi_config.json").read_text())
    assert set(data) == {"model_config", "runtime_config", "engine_config"}
    assert data["model_config"]["params_dtype"] == "torch.float32"
    assert data["runtime_config"]["cfg_number"] == 1 and data["engine_config"]["distill"] is True
    assert Path(config.load).resolve() == (root / "tiny").resolve()
    assert Path(config.vae_pretrained).resolve() == (root / "vae").resolve()
    assert Path(config.t5_pretrained).resolve() == (root / "t5").resolve()
    assert config.replace(load=None, vae_pretrained=None, t5_pretrained=None) == preset("tiny")


def test_dit_loads_with_spec_init(config):
    model = load_dit(config.load, config.dit)
    state = model.state_dict()
    assert all(v.dtype == torch.float32 for v in state.values())
    ln1p = state["videodit_blocks.layers.0.self_attention.q_layernorm.weight"]
    assert 0.03 < ln1p.std() < 0.07
    assert 0.015 < state["videodit_blocks.layers.0.self_attention.linear_proj.weight"].std() < 0.025
    null = state["y_embedder.null_caption_embedding"]
    assert null.shape == (800, TINY_DIT.caption_channels) and 0.9 < null.std() < 1.1
    bands = state["rope.bands"]
    default = 1.0 / 10000 ** (torch.arange(bands.numel(), dtype=torch.float32) / bands.numel())
    assert not torch.allclose(bands, default) and torch.allclose(bands, default, rtol=0.5)


def test_dit_forward_on_a_small_latent(config):
    model = load_dit(config.load, config.dit)
    gen = torch.Generator().manual_seed(0)
    chunks, cw, h, w = 2, 2, 4, 4
    tokens_per_chunk = cw * (h // 2) * (w // 2)
    x = torch.randn(1, 16, chunks * cw, h, w, generator=gen)
    captions = torch.randn(chunks, 10, TINY_DIT.caption_channels, generator=gen)
    mask = torch.ones(chunks, 10)
    ranges = [[0, tokens_per_chunk], [0, 2 * tokens_per_chunk]]
    out = model(x, torch.tensor([[0.3, 0.7]]), captions, mask, ranges, [False], chunk_width=cw,
                dt=distill_dt(config.sampling.num_steps))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_vae_loads_and_decodes_visible_noise(root):
    vae = load_vae(root / "vae", dtype=torch.float32)
    latent = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0)) / 0.18215
    video = vae.decode(latent)
    assert video.shape == (1, 3, 8, 32, 32) and torch.isfinite(video).all()
    assert 0.1 < video.std() < 1.0  # neither a flat grey frame nor saturated


def test_text_encoder_encodes_any_prompt(root):
    encoder = load_text_encoder(root / "t5")
    embeds, mask = encoder.encode(["A cat walks on the beach at sunset, cinematic."])
    assert embeds.shape == (1, 800, 32) and embeds.dtype == torch.float32
    assert mask.shape == (1, 800) and 3 < mask.sum() < 800 and torch.isfinite(embeds).all()
    ids, _ = encoder.tokenize(["a cat walks on the beach"])
    assert ids[0, :7].tolist()[-1] == 1 and ids[0, 7:].eq(0).all()  # six words + EOS, then pad 0
    assert 2 not in ids[0].tolist()  # no <unk>: the words are in the vocabulary
    ids, attention = encoder.tokenize(["zyxwv quokka café 日本"])
    assert 2 < attention.sum() < 800 and ids[0, attention.sum() - 1] == 1  # unknown words spell out; EOS last


def test_special_tokens(root):
    tokens = SpecialTokens.load(root / "special_tokens.npz")
    assert tokens.width == 32 and tokens.other.shape == (100, 32) and tokens.caption.dtype == torch.float16
    with np.load(root / "special_tokens.npz") as data:
        assert {k: data[k].dtype for k in data.files} == dict.fromkeys(
            ["caption_token", "logo_token", "other_tokens"], np.dtype(np.float64)
        )
        norms = np.linalg.norm(data["other_tokens"], axis=1)
    assert np.all(np.abs(norms - 8) < 1)


def test_same_seed_same_bytes_other_seed_differs(root, tmp_path):
    again = _tree(tiny.write_tiny_weights(tmp_path / "again").parent)
    assert again == _tree(root)
    other = _tree(tiny.write_tiny_weights(tmp_path / "other", seed=1).parent)
    assert set(other) == set(again)
    for name in ("tiny/inference_weight.distill/model-00001-of-00002.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "t5/t5-v1_1-xxl/model.safetensors", "special_tokens.npz"):
        assert other[name] != again[name], name
    assert other["tiny/magi_config.json"] == again["tiny/magi_config.json"]


# ------------------------------------------------------------------------------------------------------ cache


def _partials(cache: Path) -> list[Path]:
    return sorted(p for p in cache.parent.iterdir() if p.name.startswith(f".{cache.name}.partial-"))


def test_ensure_writes_once_then_reuses(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "tiny"
    model = tiny.ensure_tiny_weights(cache)
    assert model == cache / "tiny" and tiny.is_complete(cache)
    assert EXPECTED_FILES <= set(_tree(cache)) and not _partials(cache)
    before = _tree(cache)

    def must_not_write(*args, **kwargs):
        raise AssertionError("a complete cache was rewritten")

    monkeypatch.setattr(tiny, "write_tiny_weights", must_not_write)
    assert tiny.ensure_tiny_weights(cache) == model
    assert _tree(cache) == before


def test_ensure_recovers_from_half_written_folders(tmp_path):
    cache = tmp_path / "tiny"
    # a writer that died mid-way (its pid is gone) left a temp sibling, and the cache itself is a torn copy
    dead = tmp_path / ".tiny.partial-999999999-deadbeef"
    (dead / "vae").mkdir(parents=True)
    (dead / "vae" / "config.json").write_text("{")
    (cache / "vae").mkdir(parents=True)
    (cache / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 10)
    # a live writer's temp (this process's pid, fresh) is not touched
    live = tmp_path / f".tiny.partial-{os.getpid()}-cafe0000"
    live.mkdir()
    model = tiny.ensure_tiny_weights(cache)
    assert tiny.is_complete(cache) and _partials(cache) == [live]
    assert load_vae(cache / "vae", dtype=torch.float32) is not None

    # a damaged file makes the cache incomplete and the next call rewrites it
    shard = model / "inference_weight.distill" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    assert not tiny.is_complete(cache)
    tiny.ensure_tiny_weights(cache)
    assert tiny.is_complete(cache)
    load_dit(model, TINY_DIT)


def test_ensure_crash_leaves_nothing_behind(tmp_path, monkeypatch):
    cache = tmp_path / "tiny"
    real_write = tiny.write_tiny_weights

    def crash(root, seed=0):
        real_write(root, seed)
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "write_tiny_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        tiny.ensure_tiny_weights(cache)
    assert not cache.exists() and not _partials(cache)


def test_ensure_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        tiny.ensure_tiny_weights(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_notice_is_one_line():
    assert "\n" not in tiny.TINY_NOTICE and tiny.TINY_NOTICE.startswith("tiny preset: random weights")
    assert "magi-server download" in tiny.TINY_NOTICE
