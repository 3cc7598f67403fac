"""The ``tiny`` model preset's weights: a seeded random MAGI-1 written in the official on-disk layout.

Real checkpoints are tens of GB, so the embedded default is a tiny random model (``config.preset("tiny")``) that
runs the whole flow (submit, poll, download an MP4) on a laptop CPU. Its video is noise-like; that is expected.
This module owns:

* :func:`write_tiny_weights`: write a complete weights folder in a layout the loader reads (the model folder with
  ``vae/``, ``t5/`` and the special tokens beside it; ``dit=TINY_CP_DIT`` writes the variant whose heads and KV
  groups divide by 2 and 4, for context parallelism),
  so the loaders in :mod:`magi_server.runtime.loading` serve the tiny and the real model through one code path::

      root/tiny/inference_weight.distill/   model.safetensors.index.json + 2 shards (the DiT)
      root/tiny/magi_config.json            reference-schema config (load ".", vae "../vae", t5 "../t5")
      root/vae/                             config.json + diffusion_pytorch_model.safetensors
      root/t5/t5-v1_1-xxl/                  a 2-layer, 32-wide T5 encoder + a small-vocabulary tokenizer
      root/special_tokens.npz               caption special tokens, 32 wide

  The bytes written are a function of ``seed`` alone (for a given torch / transformers install).
* :func:`ensure_tiny_weights`: write that folder once into a cache folder the caller chooses, atomically, and
  reuse it afterwards.
* :data:`TINY_NOTICE`: the line to show whenever the tiny preset is in use.

Importing this module reads no file and touches no device.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import time
import uuid
import zipfile
from pathlib import Path

import torch

from magi_server.models.config import TINY_DIT, TINY_VAE, DiTConfig, SamplingConfig, VAEConfig, preset, weight_subfolder
from magi_server.runtime.loading import INDEX_NAME, T5_SUBFOLDER, VAE_WEIGHTS_NAME, build_dit

TINY_NOTICE = (
    "tiny preset: random weights, the video is noise-like until real weights are given "
    "(magi-server download 4.5B-distill, then serve --model 4.5B-distill)"
)

MODEL_FOLDER = "tiny"
# The tiny DiT with 4 heads and 4 KV groups (head size 16): context parallelism over 2 or 4 ranks needs both to
# divide by the rank count, and the preset's DiT has a single KV group.
TINY_CP_DIT = dataclasses.replace(TINY_DIT, num_attention_heads=4, num_query_groups=4, kv_channels=16)
CONFIG_NAME = "magi_config.json"
SPECIAL_TOKENS_NAME = "special_tokens.npz"
# Written last, only by ensure_tiny_weights: its presence (and matching files) is what "complete" means.
MANIFEST_NAME = "tiny-manifest.json"
# Bump when the layout or the generator changes so that older caches get rewritten instead of reused.
FORMAT_VERSION = 1
DIT_SHARDS = 2
_TOP_LEVEL = frozenset({MODEL_FOLDER, "vae", "t5", SPECIAL_TOKENS_NAME, MANIFEST_NAME})
_PARTIAL_TAG = ".partial-"
# a writer takes about a second; a temp folder this old belongs to nobody even if its pid was reused
_STALE_PARTIAL_S = 24 * 3600

# Reference config sections (SandAI-org/MAGI-1 inference/common/config.py): the reference loader requires every
# field, so all of them are written, in this order, even those this project ignores.
_RUNTIME_FIELDS = (
    "cfg_number", "cfg_t_range", "prev_chunk_scales", "text_scales", "noise2clean_kvrange", "clean_chunk_kvrange",
    "clean_t", "seed", "num_frames", "video_size_h", "video_size_w", "num_steps", "window_size", "fps",
    "chunk_width", "load", "t5_pretrained", "t5_device", "vae_pretrained", "scale_factor",
    "temporal_downsample_factor",
)
_ENGINE_FIELDS = (
    "distributed_backend", "distributed_timeout_minutes", "pp_size", "cp_size", "cp_strategy",
    "ulysses_overlap_degree", "fp8_quant", "distill_nearly_clean_chunk_threshold", "shortcut_mode", "distill",
    "kv_offload", "enable_cuda_graph",
)

# The tiny tokenizer's vocabulary: whole words that video prompts often use, then single characters so that any
# ASCII prompt tokenizes without <unk> (unknown words fall back to letters, as SentencePiece does).
_WORDS = tuple(
    "a an the and or of in on at to with from by for into over under near through across along up down out "
    "is are was be being its it this that his her their while as very slowly quickly gently softly "
    "man woman person people child children boy girl baby family friends couple crowd dancer "
    "cat dog horse bird birds fish cow sheep lion tiger bear elephant butterfly "
    "walking walks running runs dancing dances flying flies swimming jumping sitting standing playing smiling "
    "looking holding riding driving eating talking laughing waving moving falling rolling turning "
    "street road city town village house room kitchen window door car train boat ship bicycle plane "
    "beach sea ocean water river lake waves rain snow wind fire smoke sky clouds cloud sun sunset sunrise "
    "moon stars night day morning evening light shadow forest tree trees flowers flower grass field mountain "
    "mountains hill desert garden park bridge "
    "red blue green yellow white black orange purple pink brown golden bright dark colorful "
    "small big large tall little old young beautiful happy calm "
    "camera shot view close wide aerial slow motion scene video background foreground "
    "realistic cinematic style high quality detailed 4k hd".split()
)
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-_()[]/&%$#@*+=<>~`|\\^{}"


# ------------------------------------------------------------------------------------------------ random values


def _generator(seed: int, stream: str) -> torch.Generator:
    """An independent generator per part, so adding a part never shifts the values of the others."""
    digest = hashlib.sha256(f"magi-tiny:{seed}:{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _normal(shape, gen: torch.Generator, std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * std).to(dtype).contiguous()


def tiny_dit_state(config: DiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Spec §12.2 random DiT: N(0, .02) weights and biases, N(0, .05) LN1p weights, jittered rope bands,
    N(0, 1) null caption; the LN1p weights are non-zero so a model that forgets the "+1" is visibly different."""
    from magi_server.models.dit import ZeroCenteredLayerNorm

    if config.fp8_quant:
        raise ValueError("the tiny weights are written for a non-fp8 DiT")
    model = build_dit(config)
    one_plus = {
        f"{name}.weight" for name, module in model.named_modules()
        if isinstance(module, ZeroCenteredLayerNorm) and module.one_plus
    }
    gen = _generator(seed, "dit")
    state = {}
    # sorted: the values depend on the key set only, not on the order modules are declared in
    for name, meta in sorted(model.state_dict().items()):
        if name == "rope.bands":
            n = meta.numel()
            default = 1.0 / 10000 ** (torch.arange(n, dtype=torch.float64) / n)
            values = (default * (1 + 0.1 * _normal((n,), gen, 1.0, torch.float64))).float()
        elif name == "y_embedder.null_caption_embedding":
            values = _normal(meta.shape, gen, 1.0)
        elif name in one_plus:
            values = _normal(meta.shape, gen, 0.05)
        else:
            values = _normal(meta.shape, gen, 0.02)
        state[name] = values.to(meta.dtype).contiguous()
    return state


def tiny_vae_state(config: VAEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ViTVAE whose activations keep unit scale (fan-in init), so the decoded video is visible noise
    rather than a flat grey frame."""
    from torch import nn

    from magi_server.models.vae import ViTVAE

    with torch.device("meta"):
        model = ViTVAE(config)
    kinds: dict[str, tuple[str, int]] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            kinds[f"{prefix}.weight"] = ("norm_weight", 0)
            kinds[f"{prefix}.bias"] = ("bias", 0)
        elif isinstance(module, (nn.Linear, nn.Conv3d)):
            fan_in = module.weight[0].numel()
            kinds[f"{prefix}.weight"] = ("matrix", fan_in)
            kinds[f"{prefix}.bias"] = ("bias", 0)
    gen = _generator(seed, "vae")
    state = {}
    for name, meta in sorted(model.state_dict().items()):
        kind, fan_in = kinds.get(name, ("embedding", 0))
        if kind == "norm_weight":
            values = 1 + _normal(meta.shape, gen, 0.02)
        elif kind == "matrix":
            # the decoder's last conv at half gain keeps most pixels inside [-1, 1] instead of clipping
            gain = 0.5 if name == "decoder.last_layer.weight" else 1.0
            values = _normal(meta.shape, gen, gain / fan_in**0.5)
        else:
            values = _normal(meta.shape, gen, 0.02)
        state[name] = values.contiguous()
    return state


def tiny_special_tokens(width: int, seed: int = 0):
    """float64 arrays with the reference keys and shapes; every row has L2 norm close to 8 like the real file."""
    gen = _generator(seed, "special_tokens")
    arrays = {}
    for key, rows in (("caption_token", 1), ("logo_token", 1), ("other_tokens", 100)):
        raw = torch.randn(rows, width, generator=gen, dtype=torch.float64)
        norms = 8.0 * (1 + 0.02 * torch.randn(rows, 1, generator=gen, dtype=torch.float64))
        arrays[key] = (raw / raw.norm(dim=1, keepdim=True) * norms).numpy()
    return arrays


# ------------------------------------------------------------------------------------------------------ writers


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_dit(folder: Path, config: DiTConfig, seed: int) -> None:
    """Index + shards named like the published checkpoints, so the sharded loader path is exercised."""
    state = tiny_dit_state(config, seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    weight_map = {}
    for i in range(DIT_SHARDS):
        shard = f"model-{i + 1:05d}-of-{DIT_SHARDS:05d}.safetensors"
        part = names[i::DIT_SHARDS]
        _save_safetensors({n: state[n] for n in part}, folder / shard)
        weight_map.update({n: shard for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def _reference_config(sampling: SamplingConfig, dit: DiTConfig) -> dict:
    """The three-section reference config of ``preset("tiny")``, every field present."""
    model = {"model_name": "videodit_ardf"}
    for f in dataclasses.fields(DiTConfig):
        if f.name in ("distill", "fp8_quant"):
            continue  # engine_config fields in the reference schema
        value = getattr(dit, f.name)
        model[f.name] = f"torch.{value}" if f.name == "params_dtype" else value
    values = {f.name: getattr(sampling, f.name) for f in dataclasses.fields(SamplingConfig)}
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    values.update(
        load=".", t5_pretrained="../t5", vae_pretrained="../vae", t5_device="cpu",
        # a CPU model: the process-group fields are never used by this project but the reference schema has them
        distributed_backend="gloo", distributed_timeout_minutes=15, pp_size=1, cp_size=1, cp_strategy="cp_ulysses",
        ulysses_overlap_degree=1, fp8_quant=dit.fp8_quant, distill=dit.distill, kv_offload=True,
        enable_cuda_graph=False,
    )
    return {
        "model_config": model,
        "runtime_config": {k: values[k] for k in _RUNTIME_FIELDS},
        "engine_config": {k: values[k] for k in _ENGINE_FIELDS},
    }


def _write_vae(folder: Path, config: VAEConfig, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ddconfig = dataclasses.asdict(config)
    # the training-only keys a diffusers ViTVAE config carries; the loader accepts and ignores them
    ddconfig.update(qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)
    _write_json(folder / "config.json",
                {"_class_name": "ViTVAE", "_diffusers_version": "0.29.2", "ddconfig": ddconfig, "model_type": "vit"})
    _save_safetensors(tiny_vae_state(config, seed), folder / VAE_WEIGHTS_NAME)


def _vocabulary() -> list[tuple[str, float]]:
    """Unigram pieces and log-probabilities: specials first (pad 0, eos 1, unk 2 as in T5), then "▁word"s scored
    so that a known word beats spelling it out, then bare characters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -4.0)]
    seen = set()
    for i, word in enumerate(_WORDS):
        if word not in seen:
            seen.add(word)
            pieces.append((f"\u2581{word}", -5.0 - 0.001 * i))
    pieces += [(c, -8.0 - 0.001 * i) for i, c in enumerate(_CHARS)]
    return pieces


def _build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.Unigram(_vocabulary(), unk_id=2, byte_fallback=False))
    # accents are stripped so that "café" spells out as letters instead of becoming <unk>
    core.normalizer = normalizers.Sequence(
        [normalizers.NFKD(), normalizers.StripAccents(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    # T5 appends EOS to every sequence (spec §4.3)
    core.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=800,
        padding_side="right",
    )


def _write_t5(folder: Path, width: int, seed: int) -> None:
    from transformers import T5Config, T5EncoderModel

    tokenizer = _build_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer), d_model=width, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
    )
    # transformers initialises from the global RNG: fork it so writing weights never shifts a caller's random
    # stream, then overwrite every value from our own generator so the bytes do not depend on its init scheme.
    with torch.random.fork_rng(devices=[]):
        model = T5EncoderModel(config)
    gen = _generator(seed, "t5")
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "layer_norm" in name:
                values = 1 + _normal(param.shape, gen, 0.05)
            elif name == "shared.weight":
                values = _normal(param.shape, gen, 1.0)
            elif "relative_attention_bias" in name:
                values = _normal(param.shape, gen, 0.1)
            else:
                values = _normal(param.shape, gen, param.shape[-1] ** -0.5)
            param.copy_(values)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    # transformers 5 records its own backend class name, which 4.x cannot resolve; PreTrainedTokenizerFast is
    # the name both read tokenizer.json with
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config.pop("backend", None)
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(config_path, tokenizer_config)


def _write_npz(path: Path, arrays: dict) -> None:
    """np.savez stamps the current time into the zip; a fixed timestamp keeps the file a function of the seed."""
    import numpy as np

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue())


def write_tiny_weights(root: Path, seed: int = 0, *, dit: DiTConfig | None = None) -> Path:
    """Write the tiny preset's complete weights folder under ``root`` (layout in the module docstring); ``dit``
    replaces the preset's DiT config (e.g. :data:`TINY_CP_DIT`, or a base model: ``distill=False``, which is then
    sampled with classifier-free guidance, three passes per step, as the real base models are).

    Returns ``root/"tiny"``, the model folder (``--model`` / ``runtime_config.load``). Existing files of the same
    names are overwritten.
    """
    root = Path(root)
    magi = preset("tiny")
    dit = magi.dit if dit is None else dit
    model_folder = root / MODEL_FOLDER
    _write_dit(model_folder / weight_subfolder(dit), dit, seed)
    sampling = magi.sampling if dit.distill or dit.fp8_quant else dataclasses.replace(magi.sampling, cfg_number=3)
    _write_json(model_folder / CONFIG_NAME, _reference_config(sampling, dit))
    _write_vae(root / "vae", TINY_VAE, seed)
    _write_t5(root / "t5" / T5_SUBFOLDER, dit.caption_channels, seed)
    _write_npz(root / SPECIAL_TOKENS_NAME, tiny_special_tokens(dit.caption_channels, seed))
    return model_folder


# ------------------------------------------------------------------------------------------------------- cache


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def _write_manifest(root: Path, seed: int) -> None:
    files = {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(root)}
    _write_json(root / MANIFEST_NAME, {"format_version": FORMAT_VERSION, "seed": seed, "files": files})


def is_complete(root: Path) -> bool:
    """True when ``root`` holds a finished tiny weights folder: its manifest is current and every file matches."""
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
        if manifest.get("format_version") != FORMAT_VERSION or not manifest.get("files"):
            return False
        for rel, entry in manifest["files"].items():
            path = root / rel
            if not path.is_file() or path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # on Windows os.kill(pid, 0) terminates the process instead of probing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _remove_stale_partials(cache_dir: Path) -> None:
    """Drop temp siblings left by a writer that died (its pid is gone, or the temp is a day old); a live
    writer's temp is left alone."""
    prefix = f".{cache_dir.name}{_PARTIAL_TAG}"
    if not cache_dir.parent.is_dir():
        return
    for candidate in cache_dir.parent.iterdir():
        if not candidate.name.startswith(prefix):
            continue
        pid_text = candidate.name[len(prefix):].split("-", 1)[0]
        try:
            age_s = time.time() - candidate.stat().st_mtime
        except OSError:
            continue
        if pid_text.isdigit() and _pid_alive(int(pid_text)) and age_s < _STALE_PARTIAL_S:
            continue
        shutil.rmtree(candidate, ignore_errors=True)


def ensure_tiny_weights(cache_dir: Path) -> Path:
    """The tiny model folder inside ``cache_dir``, writing the weights there first if they are not complete.

    The weights are written into a temporary sibling of ``cache_dir`` and renamed into place, so a crash never
    leaves a half-written ``cache_dir`` behind and concurrent callers agree on one copy. An incomplete
    ``cache_dir`` that holds only tiny-weights entries is replaced; one holding anything else is refused.
    """
    cache_dir = Path(cache_dir).expanduser()
    if is_complete(cache_dir):
        return cache_dir / MODEL_FOLDER
    if cache_dir.exists():
        if cache_dir.is_dir():
            foreign = sorted(p.name for p in cache_dir.iterdir() if p.name not in _TOP_LEVEL)
        else:
            foreign = [cache_dir.name]
        if foreign:
            raise FileExistsError(
                f"{cache_dir} exists but is not a complete tiny weights folder and holds other files "
                f"({', '.join(foreign[:5])}); pick another cache folder or remove it"
            )
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(cache_dir)
    temp = cache_dir.parent / f".{cache_dir.name}{_PARTIAL_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write_tiny_weights(temp)
        _write_manifest(temp, seed=0)
        if is_complete(cache_dir):
            # another process finished first while this one was writing
            return cache_dir / MODEL_FOLDER
        if cache_dir.exists():
            # an incomplete earlier copy of ours: move it aside first, a rename cannot replace a non-empty folder
            stale = cache_dir.parent / f".{cache_dir.name}{_PARTIAL_TAG}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(cache_dir, stale)
            except FileNotFoundError:
                pass
            else:
                shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(temp, cache_dir)
        except OSError:
            # another process renamed its copy in first: use that one
            if not is_complete(cache_dir):
                raise
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return cache_dir / MODEL_FOLDER
