"""The weight manifest of the six MAGI-1 variants and ``magi-server download`` (through huggingface_hub).

Layout written under ``--dir`` (default ``weights/``), which ``--model DIR`` and ``MagiPipeline`` read:

    weights/
      4.5B_distill/inference_weight.distill/   model.safetensors.index.json + shards   (one folder per variant)
      vae/                                      config.json + diffusion_pytorch_model.safetensors (shared)
      t5/t5-v1_1-xxl/                           T5-XXL encoder + tokenizer (shared)
      special_tokens.npz                        caption special tokens (shared)

``weights/manifest.json`` in the repository is this module's :func:`manifest` written out (a test keeps the two
equal). Nothing here runs at import; the network is touched only by :func:`download`.
"""
from __future__ import annotations

import hashlib
import shutil
import socket
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

HF_REPO = "sand-ai/MAGI-1"
HF_ENDPOINT = "https://huggingface.co"
REFERENCE_COMMIT = "6ff822e74ded50611e81e1d0e115146b5c4dd2a5"
SPECIAL_TOKENS_URL = (
    f"https://raw.githubusercontent.com/SandAI-org/MAGI-1/{REFERENCE_COMMIT}/example/assets/special_tokens.npz"
)
SPECIAL_TOKENS_SHA256 = "b54bc664d5f4a722dfd8bb22201c025df61f22acddc07c0a2529d7b5cd6be5a7"

_VARIANTS = MappingProxyType({
    # preset name: (subfolder in the repo and under --dir, DiT weight folder, approx. download size in GB)
    "24B-base": ("24B_base", "inference_weight", 48),
    "24B-distill": ("24B_distill", "inference_weight.distill", 48),
    "24B-distill-quant": ("24B_distill_quant", "inference_weight.fp8.distill", 26),
    "4.5B-base": ("4.5B_base", "inference_weight", 9),
    "4.5B-distill": ("4.5B_distill", "inference_weight.distill", 9),
    "4.5B-distill-quant": ("4.5B_distill_quant", "inference_weight.fp8.distill", 5),
})


def manifest() -> dict:
    """Where every part of every variant lives in the Hugging Face repo and under the local weights folder."""
    variants = {}
    for name, (folder, sub, size_gb) in _VARIANTS.items():
        variants[name] = {
            "hf_repo": HF_REPO,
            "hf_dit_folder": f"ckpt/magi/{folder}/{sub}",
            "local_dir": folder,
            "dit_weights": f"{folder}/{sub}",
            "expected_files": [f"{folder}/{sub}/model.safetensors.index.json", f"{folder}/{sub}/model-*-of-*.safetensors"],
            "approx_size_gb": size_gb,
            "serve": f"magi-server serve --model weights/{folder}",
        }
    return {
        "hf_repo": HF_REPO,
        "variants": variants,
        "shared": {
            "vae": {
                "hf_folder": "ckpt/vae",
                "local_dir": "vae",
                "expected_files": ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"],
                "approx_size_gb": 1.2,
            },
            "t5": {
                "hf_folder": "ckpt/t5/t5-v1_1-xxl",
                "local_dir": "t5/t5-v1_1-xxl",
                "expected_files": [
                    "t5/t5-v1_1-xxl/config.json",
                    "t5/t5-v1_1-xxl/spiece.model",
                    "t5/t5-v1_1-xxl/tokenizer_config.json",
                    "t5/t5-v1_1-xxl/special_tokens_map.json",
                    "t5/t5-v1_1-xxl/pytorch_model.bin.index.json",
                    "t5/t5-v1_1-xxl/pytorch_model-*-of-*.bin",
                ],
                "approx_size_gb": 19,
            },
            "special_tokens": {
                "url": SPECIAL_TOKENS_URL,
                "local_file": "special_tokens.npz",
                "sha256": SPECIAL_TOKENS_SHA256,
            },
        },
    }


def variant_names() -> list[str]:
    return list(_VARIANTS)


class DownloadError(RuntimeError):
    """The download could not run; the message says what to fetch by hand and where to put it."""


def manual_instructions(variant: str, target: Path) -> str:
    info = manifest()["variants"][variant]
    shared = manifest()["shared"]
    return (
        f"Download these from https://huggingface.co/{HF_REPO} on a machine that is online and copy them here:\n"
        f"  {info['hf_dit_folder']}/  ->  {target / info['dit_weights']}/\n"
        f"  {shared['vae']['hf_folder']}/  ->  {target / 'vae'}/\n"
        f"  {shared['t5']['hf_folder']}/  ->  {target / 't5' / 't5-v1_1-xxl'}/\n"
        f"  {SPECIAL_TOKENS_URL}  ->  {target / 'special_tokens.npz'}\n"
        f"Then run: magi-server serve --model {target / info['local_dir']}"
    )


def _reachable(url: str, timeout: float) -> bool:
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def download(
    variant: str,
    target: str | Path = "weights",
    *,
    endpoint: str = HF_ENDPOINT,
    special_tokens_url: str = SPECIAL_TOKENS_URL,
    include_t5: bool = True,
    probe_timeout: float = 5.0,
    log: Callable[[str], None] = print,
) -> Path:
    """Fetch one variant (plus the shared VAE, T5 and special tokens) into ``target``; returns the model folder.

    Fails within ``probe_timeout`` seconds when the hub cannot be reached, with instructions for a manual copy.
    """
    from magi_server.models.config import canonical_preset_name

    name = canonical_preset_name(variant)
    if name not in _VARIANTS:
        raise DownloadError(f"unknown variant {variant!r}; choose one of {', '.join(_VARIANTS)}")
    target = Path(target)
    info = manifest()["variants"][name]
    if not _reachable(endpoint, probe_timeout):
        raise DownloadError(f"cannot reach {endpoint} (offline?).\n" + manual_instructions(name, target))

    from huggingface_hub import snapshot_download

    staging = target / ".hf-staging"
    patterns = [f"{info['hf_dit_folder']}/*", "ckpt/vae/*"]
    if include_t5:
        patterns.append("ckpt/t5/t5-v1_1-xxl/*")
    log(f"downloading {name} from {endpoint}/{HF_REPO} into {target} (about {info['approx_size_gb']} GB + shared parts)")
    try:
        snapshot_download(repo_id=HF_REPO, allow_patterns=patterns, local_dir=str(staging), endpoint=endpoint)
    except Exception as exc:  # the hub client raises many types; all mean the same to the user
        raise DownloadError(f"download from {endpoint} failed: {exc}\n" + manual_instructions(name, target)) from exc

    moves = [(staging / info["hf_dit_folder"], target / info["dit_weights"]), (staging / "ckpt/vae", target / "vae")]
    if include_t5:
        moves.append((staging / "ckpt/t5/t5-v1_1-xxl", target / "t5" / "t5-v1_1-xxl"))
    for source, dest in moves:
        if source.is_dir():
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            shutil.move(str(source), str(dest))
    shutil.rmtree(staging, ignore_errors=True)

    tokens = target / "special_tokens.npz"
    if not tokens.is_file():
        log(f"downloading special_tokens.npz from {special_tokens_url}")
        fetch_special_tokens(special_tokens_url, tokens)
    log(f"done: magi-server serve --model {target / info['local_dir']}")
    return target / info["local_dir"]


def fetch_special_tokens(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Download the reference's special_tokens.npz and check its sha256 before putting it in place."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except OSError as exc:
        raise DownloadError(f"cannot fetch {url}: {exc}; put the file at {dest} by hand") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != SPECIAL_TOKENS_SHA256:
        raise DownloadError(f"{url} has sha256 {digest}, expected {SPECIAL_TOKENS_SHA256}; not saved")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".npz.part")
    tmp.write_bytes(data)
    tmp.replace(dest)
