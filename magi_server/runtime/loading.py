"""Checkpoint loading: the official on-disk layouts, built on the meta device and loaded by assignment.

Layouts (spec §3, §4.1, §5.1):
* DiT: ``<load>/inference_weight[.fp8][.distill]/`` holding ``model.safetensors.index.json`` + shards, or a
  single ``model.safetensors``. Keys are the reference attribute paths, no prefix.
* VAE: ``<dir>/config.json`` (``_class_name`` "ViTVAE", ``ddconfig``) + ``diffusion_pytorch_model.safetensors``.
* T5: ``<t5_pretrained>/t5-v1_1-xxl/`` as transformers saves it (or that folder itself).
* The Hugging Face repo ``sand-ai/MAGI-1`` (spec §3): ``ckpt/magi/<variant>/<DiT folder>``, ``ckpt/vae``,
  ``ckpt/t5/t5-v1_1-xxl``; ``magi-server download`` adds ``ckpt/special_tokens.npz``. :func:`find_downloaded_model`
  finds a preset's folder in the Hugging Face cache, so ``--model 4.5B-distill`` works once it is downloaded.

Every load is strict: a missing key, an unexpected key, a wrong shape, or an fp8 weight without its scales
stops with a one-line error that names the key and the file. Each tensor is read once, cast to the dtype the
model's precision policy gives it, moved to the target device and assigned, so no second copy of the weights
is ever allocated.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from magi_server.models.config import (
    DiTConfig,
    MagiConfig,
    VAEConfig,
    canonical_preset_name,
    preset,
    weight_subfolder,
)
from magi_server.models.fp8 import FP8_DTYPE, install_fp8_linears, is_fp8_scale_name

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
VAE_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
T5_SUBFOLDER = "t5-v1_1-xxl"


class CheckpointError(ValueError):
    """A checkpoint on disk does not match the model it is loaded into. The message is one line."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


_SAFETENSORS_DTYPES = MappingProxyType({
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
})


def _read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of one safetensors file, from its JSON header only (no tensor data read)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 100_000_000:
                raise CheckpointError(f"{path} is not a safetensors file (bad header size)")
            header = json.loads(f.read(size))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from None
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"key '{name}' in {path} has unsupported dtype {entry.get('dtype')}")
        infos[name] = TensorInfo(path, tuple(entry["shape"]), dtype)
    return infos


def read_checkpoint_index(folder: str | Path) -> dict[str, TensorInfo]:
    """Map every tensor name of a safetensors checkpoint folder (index + shards, or one file) to its file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"{index_path} is not a safetensors index (no weight_map)") from None
        infos: dict[str, TensorInfo] = {}
        shard_names = sorted(set(weight_map.values()))
        for shard_name in shard_names:
            shard = folder / shard_name
            if not shard.is_file():
                hint = f"; decompress it first: zstd -d {shard}.zst" if Path(f"{shard}.zst").is_file() else ""
                raise CheckpointError(f"shard {shard_name} listed in {index_path} is missing{hint}")
            for name, info in _read_safetensors_header(shard).items():
                if weight_map.get(name) != shard_name:
                    raise CheckpointError(f"key '{name}' in {shard} is not listed for that shard in {index_path}")
                infos[name] = info
        for name, shard_name in weight_map.items():
            if name not in infos:
                raise CheckpointError(f"key '{name}' listed in {index_path} is not in {folder / shard_name}")
        return infos
    single = folder / SINGLE_NAME
    if single.is_file():
        return _read_safetensors_header(single)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return _read_safetensors_header(files[0])
    raise CheckpointError(f"no {INDEX_NAME} or {SINGLE_NAME} in {folder}")


def assign_checkpoint(
    model: nn.Module,
    infos: dict[str, TensorInfo],
    *,
    target_dtype: Callable[[str, torch.dtype], torch.dtype],
    device: torch.device | str,
    where: str,
) -> None:
    """Strictly check ``infos`` against ``model`` (built on meta), then read, cast, move and assign each tensor.

    ``target_dtype(name, stored_dtype)`` is the model's precision policy for that tensor.
    """
    expected = model.state_dict(keep_vars=True)
    for name in sorted(expected):
        if name not in infos:
            raise CheckpointError(f"missing key '{name}' in checkpoint {where}")
    for name in sorted(infos):
        if name not in expected:
            raise CheckpointError(f"unexpected key '{name}' in {infos[name].file}")
    for name in sorted(infos):
        want = tuple(expected[name].shape)
        if infos[name].shape != want:
            raise CheckpointError(
                f"key '{name}' in {infos[name].file} has shape {infos[name].shape}, the model expects {want}"
            )

    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, info in infos.items():
        by_file.setdefault(info.file, []).append(name)
    loaded: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in names:
                tensor = handle.get_tensor(name)
                dtype = target_dtype(name, tensor.dtype)
                loaded[name] = tensor.to(device=device, dtype=dtype)
                del tensor
    model.load_state_dict(loaded, strict=True, assign=True)


# ---------------------------------------------------------------------------------------------------------- DiT


def find_dit_weights(path: str | Path, config: DiTConfig) -> Path:
    """The DiT weight folder for ``config``: ``path/inference_weight[.fp8][.distill]`` or ``path`` itself."""
    path = Path(path)
    sub = weight_subfolder(config)
    candidate = path / sub
    if candidate.is_dir() and any(candidate.iterdir()):
        return candidate
    if path.is_dir() and ((path / INDEX_NAME).is_file() or (path / SINGLE_NAME).is_file()):
        return path
    others = sorted(p.name for p in path.glob("inference_weight*") if p.is_dir()) if path.is_dir() else []
    hint = f" (found {', '.join(others)}: is the config's distill / fp8_quant right?)" if others else ""
    raise CheckpointError(f"DiT weights not found: expected folder {candidate}{hint}")


def _check_fp8_tensors(infos: dict[str, TensorInfo], config: DiTConfig, folder: Path) -> None:
    fp8_weights = [n for n, i in infos.items() if i.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]
    if fp8_weights and not config.fp8_quant:
        name = sorted(fp8_weights)[0]
        raise CheckpointError(
            f"key '{name}' in {infos[name].file} is fp8 but the config is not fp8_quant (use a *-distill-quant preset)"
        )
    for name in sorted(fp8_weights):
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        for scale in ("weight_scale", "input_scale"):
            if f"{module}.{scale}" not in infos:
                raise CheckpointError(f"fp8 weight '{name}' in {infos[name].file} has no '{module}.{scale}' in {folder}")


def dit_param_dtype(model: nn.Module, compute_dtype: torch.dtype) -> Callable[[str, torch.dtype], torch.dtype]:
    """Precision policy of spec §2.10: the promoter set in fp32, fp8 tensors kept, scales fp32, the rest params_dtype."""

    def policy(name: str, stored: torch.dtype) -> torch.dtype:
        if stored == FP8_DTYPE:
            return stored
        if is_fp8_scale_name(name) or model.is_fp32_param(name):
            return torch.float32
        return compute_dtype

    return policy


def build_dit(config: DiTConfig, *, attention_backend: str = "sdpa") -> nn.Module:
    """The DiT skeleton on the meta device (no memory), with fp8 linears installed when the config says so."""
    from magi_server.models.dit import VideoDiT

    with torch.device("meta"):
        model = VideoDiT(config, attention_backend=attention_backend)
        if config.fp8_quant:
            install_fp8_linears(model, config.num_layers)
    return model


def load_dit(
    path: str | Path,
    config: DiTConfig,
    *,
    device: torch.device | str = "cpu",
    attention_backend: str = "sdpa",
) -> nn.Module:
    """Load a DiT from a ``load`` folder (or the weight subfolder itself) in the official layout."""
    folder = find_dit_weights(path, config)
    infos = read_checkpoint_index(folder)
    _check_fp8_tensors(infos, config, folder)
    model = build_dit(config, attention_backend=attention_backend)
    compute_dtype = getattr(torch, config.params_dtype)
    assign_checkpoint(model, infos, target_dtype=dit_param_dtype(model, compute_dtype), device=device, where=str(folder))
    model.note_bf16_exact_weights()
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------- VAE


def read_vae_config(folder: str | Path) -> VAEConfig:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"VAE config not found: {config_path}")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from None
    if data.get("_class_name") != "ViTVAE" or "ddconfig" not in data:
        raise CheckpointError(f"{config_path} is not a MAGI-1 ViTVAE config (_class_name ViTVAE with a ddconfig)")
    try:
        return VAEConfig.from_ddconfig(data["ddconfig"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None


def load_vae(path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Load the VAE from a diffusers-style folder; it runs in bf16 like the reference unless told otherwise."""
    from magi_server.models.vae import ViTVAE

    folder = Path(path)
    config = read_vae_config(folder)
    weights = folder / VAE_WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"VAE weights not found: {weights}")
    infos = _read_safetensors_header(weights)
    with torch.device("meta"):
        model = ViTVAE(config)
    assign_checkpoint(model, infos, target_dtype=lambda name, stored: dtype, device=device, where=str(weights))
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------- T5


def find_t5_folder(path: str | Path) -> Path:
    """``<t5_pretrained>/t5-v1_1-xxl`` (the reference's layout) or the T5 folder itself."""
    path = Path(path)
    for candidate in (path / T5_SUBFOLDER, path):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(
        f"T5 encoder not found in {path}: expected {path / T5_SUBFOLDER}/config.json "
        f"(download ckpt/t5/{T5_SUBFOLDER} of sand-ai/MAGI-1)"
    )


def load_text_encoder(path: str | Path, *, device: torch.device | str = "cpu"):
    from magi_server.models.text_encoder import T5TextEncoder

    return T5TextEncoder.from_pretrained(find_t5_folder(path), device=device)


# ----------------------------------------------------------------------------------------------- model folders

MODEL_CONFIG_NAME = "magi_config.json"
SPECIAL_TOKENS_NAME = "special_tokens.npz"


def load_local_transformers(path: str | Path, *, flag: str, kind: str, model_class, companion_class,
                            device: torch.device | str = "cpu"):
    """(model, tokenizer or processor) of a local `transformers` checkpoint folder given with ``flag`` (no download:
    ``local_files_only``): the prompt enhancer's causal LM, the safety checker's image classifier. ValueError with
    one line, naming the flag, when the folder is missing or does not hold a ``kind`` checkpoint."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{flag}: {str(path)!r} is not a folder")
    try:
        companion = companion_class.from_pretrained(folder, local_files_only=True)
        model = model_class.from_pretrained(folder, local_files_only=True).to(device)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{flag}: {folder} is not {kind} checkpoint: {first}") from None
    return model, companion


def hide_progress_bars() -> None:
    """No tqdm bars from transformers / huggingface_hub (saving and loading the T5): a server's log is lines, and
    under ``--log-format json`` every one of them must be JSON."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()


def _first_existing(*candidates: Path) -> Path | None:
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return None


def resolve_model_folder(path: str | Path, config: str | Path | MagiConfig | None = None) -> MagiConfig:
    """The MagiConfig of a weights folder, with every path filled in.

    ``path`` is a model folder as the Hugging Face repo lays it out (``ckpt/magi/4.5B_distill``), the older
    ``weights/4.5B_distill``, or any folder that holds ``inference_weight[.fp8][.distill]/``. The architecture
    comes from ``config`` (a reference-style JSON or a MagiConfig), else from ``<path>/magi_config.json``, else
    from the preset the folder is named after (``4.5B_distill`` -> 4.5B-distill). The VAE, T5 and special tokens
    are taken from the config when it names them, else from the folder, its parent or its grandparent (``vae/``,
    ``t5/``, ``special_tokens.npz``).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model folder not found: {path}")
    if isinstance(config, MagiConfig):
        resolved = config
    elif config is not None:
        resolved = MagiConfig.from_json(config)
    elif (path / MODEL_CONFIG_NAME).is_file():
        resolved = MagiConfig.from_json(path / MODEL_CONFIG_NAME)
    else:
        name = canonical_preset_name(path.name)
        if name is None or name == "tiny":
            raise CheckpointError(
                f"cannot tell which MAGI-1 variant {path} holds: name the folder after a preset "
                f"(e.g. 4.5B_distill) or put a reference-style {MODEL_CONFIG_NAME} in it"
            )
        resolved = preset(name)

    def pick(configured: str | None, *names: str) -> str | None:
        if configured and Path(configured).exists():
            return configured
        # the folder, then upward: weights/4.5B_distill has them in its parent, the repo's ckpt/magi/4.5B_distill
        # in its grandparent (ckpt/vae, ckpt/t5)
        found = _first_existing(*[base / n for n in names for base in (path, path.parent, path.parent.parent)])
        return str(found) if found is not None else configured

    return resolved.replace(
        load=str(path),
        vae_pretrained=pick(resolved.vae_pretrained, "vae"),
        t5_pretrained=pick(resolved.t5_pretrained, "t5"),
        special_tokens=pick(resolved.special_tokens, SPECIAL_TOKENS_NAME),
    )


# ------------------------------------------------------------------------------------- the Hugging Face repo

HUB_REPO = "sand-ai/MAGI-1"
HUB_SHARED_FOLDER = "ckpt"  # holds vae/, t5/ and the special tokens, the grandparent of every model folder


def hub_model_folder(name: str) -> str:
    """Where a real preset's model (``load``) folder is in the repo: ``4.5B-distill`` -> ``ckpt/magi/4.5B_distill``."""
    return f"{HUB_SHARED_FOLDER}/magi/{canonical_preset_name(name).replace('-', '_')}"


def hub_patterns(name: str, *, include_t5: bool = True) -> list[str]:
    """The repo files one preset needs (``allow_patterns``): its DiT weight folder first, then the VAE and the T5."""
    patterns = [
        f"{hub_model_folder(name)}/{weight_subfolder(preset(name).dit)}/*",
        f"{HUB_SHARED_FOLDER}/vae/*",
    ]
    if include_t5:
        patterns.append(f"{HUB_SHARED_FOLDER}/t5/{T5_SUBFOLDER}/*")
    return patterns


def find_downloaded_model(name: str) -> Path:
    """The model folder of real preset ``name`` in the Hugging Face cache, looked up without any network access.

    huggingface_hub decides where its cache is (``HF_HOME`` / ``HF_HUB_CACHE``). A FileNotFoundError names the
    command that downloads the weights.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    dit_pattern = hub_patterns(name)[0]
    try:
        # only the DiT pattern: the VAE and the T5 may have been skipped, from_pretrained says so if they are missing
        root = Path(snapshot_download(HUB_REPO, allow_patterns=[dit_pattern], local_files_only=True))
    except LocalEntryNotFoundError:
        root = None
    if root is None or not any(root.glob(dit_pattern)):
        raise FileNotFoundError(
            f"weights for {name} are not downloaded: run `magi-server download {name}` (or pass a weights folder)"
        )
    return root / hub_model_folder(name)
