"""``magi-server download``: one MAGI-1 variant from ``sand-ai/MAGI-1`` into the shared Hugging Face cache.

The repo's layout (spec §3) and the files each preset needs are :mod:`magi_server.runtime.loading`'s
(``hub_patterns``), so the loader finds what this command stores: ``--model 4.5B-distill`` looks in the same cache.
A user who already has ``sand-ai/MAGI-1`` cached downloads nothing again. huggingface_hub itself reads ``HF_HOME`` /
``HF_HUB_CACHE`` (where the cache is), ``HF_TOKEN``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``. With ``--dir`` the same
files go to a plain folder instead (``<dir>/ckpt/magi/4.5B_distill``, ``<dir>/ckpt/vae``, ``<dir>/ckpt/t5``).

The caption special tokens are not on the Hub: they come from the reference's GitHub repo (sha256 checked) and are
stored as ``ckpt/special_tokens.npz`` beside ``vae/`` and ``t5/``, where the loader looks for them.
"""
from __future__ import annotations

import hashlib
import urllib.request
from collections.abc import Callable
from pathlib import Path

from magi_server.models.config import REAL_PRESETS, canonical_preset_name
from magi_server.runtime.loading import (
    HUB_REPO,
    HUB_SHARED_FOLDER,
    SPECIAL_TOKENS_NAME,
    hub_model_folder,
    hub_patterns,
)

REFERENCE_COMMIT = "6ff822e74ded50611e81e1d0e115146b5c4dd2a5"
SPECIAL_TOKENS_URL = (
    f"https://raw.githubusercontent.com/SandAI-org/MAGI-1/{REFERENCE_COMMIT}/example/assets/special_tokens.npz"
)
SPECIAL_TOKENS_SHA256 = "b54bc664d5f4a722dfd8bb22201c025df61f22acddc07c0a2529d7b5cd6be5a7"
_APPROX_DIT_GB = {"24B-base": 48, "24B-distill": 48, "24B-distill-quant": 26, "4.5B-base": 9, "4.5B-distill": 9,
                  "4.5B-distill-quant": 5}  # the shared VAE adds about 1.2 GB, the T5 about 19 GB


class DownloadError(RuntimeError):
    """The download could not run; the message says what to fetch by hand and where to put it."""


def manual_instructions(name: str, target: Path | None, include_t5: bool = True) -> str:
    root = target if target is not None else Path("DIR")
    lines = [f"Fetch these from https://huggingface.co/{HUB_REPO} on a machine that is online and copy them here:"]
    lines += [f"  {pattern[:-1]}  ->  {root / pattern[:-2]}/" for pattern in hub_patterns(name, include_t5=include_t5)]
    lines.append(f"  {SPECIAL_TOKENS_URL}  ->  {root / HUB_SHARED_FOLDER / SPECIAL_TOKENS_NAME}")
    lines.append(f"(or copy a Hugging Face cache that holds them), then run: "
                 f"magi-server serve --model {root / hub_model_folder(name)}")
    return "\n".join(lines)


def download(
    variant: str,
    target: str | Path | None = None,
    *,
    include_t5: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Fetch one variant (its DiT folder, the shared VAE and T5, the special tokens) into the Hugging Face cache,
    or into the plain folder ``target``; returns the model folder. Files already there are not fetched again."""
    from huggingface_hub import constants, snapshot_download

    name = canonical_preset_name(variant)
    if name not in REAL_PRESETS:
        raise DownloadError(f"unknown variant {variant!r}; choose one of {', '.join(REAL_PRESETS)}")
    target = Path(target) if target is not None else None
    patterns = hub_patterns(name, include_t5=include_t5)
    log(f"{name}: {HUB_REPO} {' '.join(patterns)} (about {_APPROX_DIT_GB[name]} GB + shared parts) into "
        f"{target or 'the Hugging Face cache'}")
    try:
        root = Path(snapshot_download(HUB_REPO, allow_patterns=patterns, local_dir=target))
    except Exception as exc:  # the hub client raises many types; all mean the same to the user
        raise DownloadError(f"download of {name} failed: {exc}\n" + manual_instructions(name, target, include_t5)) \
            from exc
    # offline, huggingface_hub returns a cached snapshot without checking that it holds these patterns
    missing = [p[:-2] for p in patterns if not any(root.glob(p))]
    if missing:
        raise DownloadError(f"{root} lacks {', '.join(missing)} and the Hub cannot be asked (offline?)\n"
                            + manual_instructions(name, target, include_t5))

    tokens = root / HUB_SHARED_FOLDER / SPECIAL_TOKENS_NAME
    if not tokens.is_file():
        if constants.HF_HUB_OFFLINE:
            raise DownloadError(f"HF_HUB_OFFLINE is set and {tokens} is missing: copy {SPECIAL_TOKENS_URL} there")
        log(f"downloading {SPECIAL_TOKENS_NAME} from {SPECIAL_TOKENS_URL}")
        fetch_special_tokens(SPECIAL_TOKENS_URL, tokens)
    model = root / hub_model_folder(name)
    log(f"{name} is in {model}\nrun: magi-server serve --model {model if target is not None else name}")
    return model


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
