"""Text conditioning for MAGI-1: the T5 encoder wrapper, the special caption tokens and the per-chunk caption tensors.

Owns (spec §4):

* ``T5TextEncoder``: T5 v1.1 XXL encoder + tokenizer loaded from a folder, prompts cleaned first, each run only over
  its valid tokens and returned padded to 800 tokens; fp32 on the CPU, bf16 on a GPU (optionally with the weights
  kept in host memory between encodes, so they hold no device memory while the DiT runs);
* ``SpecialTokens``: the learned extra caption tokens of ``special_tokens.npz`` (rounded to float16 like the
  reference), loaded by an explicit ``SpecialTokens.load(path)``;
* ``CaptionTokenOptions``: which special tokens a request prepends (the reference's PAD_* / NEG_PROMPT environment
  variables, here an explicit per-request record);
* ``pad_special_tokens`` / ``build_chunk_captions``: one caption per chunk, conditional and null rows, as the sampler
  slices them.

Importing this module loads nothing and touches no device; every file is read by an explicit call.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

# The reference cuts padded captions to a literal 800 tokens and marks a literal 50 null-caption tokens as valid,
# whatever caption_max_length says; both are part of what the model saw in training.
PADDED_CAPTION_TOKENS = 800
NULL_CAPTION_VALID_TOKENS = 50
NUM_DURATION_TOKENS = 8
T5_SUBFOLDER = "t5-v1_1-xxl"


def _download_hint(target: Path) -> str:
    return (
        f"download the DeepFloyd/t5-v1_1-xxl encoder (config.json, the model weights, spiece.model, "
        f"tokenizer_config.json, special_tokens_map.json) into {target}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Special tokens
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecialTokens:
    """The special caption tokens, float16, each (1, D).

    Rows of ``other``: TRANS 0, HQ 1, STATIC_FIRST_FRAMES 2, DYNAMIC_FIRST_FRAMES 3, BORDERNESS 4, DURATION_1..8 at
    7..14 (DURATION_k: k - 1 more chunks follow), THREE_D_MODEL 15, TWO_D_ANIME 16; the rest are unused.
    """

    caption: torch.Tensor
    logo: torch.Tensor
    other: torch.Tensor

    def __post_init__(self) -> None:
        width = self.caption.shape[-1]
        if self.caption.shape != (1, width) or self.logo.shape != (1, width):
            raise ValueError("caption_token and logo_token must both have shape (1, D)")
        if self.other.ndim != 2 or self.other.shape[0] < 17 or self.other.shape[1] != width:
            raise ValueError(f"other_tokens must have shape (>=17, {width}), got {tuple(self.other.shape)}")

    @classmethod
    def load(cls, path: str | Path) -> "SpecialTokens":
        """Read the reference ``special_tokens.npz`` (float64) or a safetensors file with the same three keys.

        Values are rounded to float16 on load, as the reference does (float64 -> float16 directly, by numpy).
        """
        import numpy as np

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"special tokens file not found: {path} (it is example/assets/special_tokens.npz in SandAI-org/MAGI-1)"
            )
        keys = ("caption_token", "logo_token", "other_tokens")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
            missing = [k for k in keys if k not in raw]
            # via float64 so that every source dtype (bf16 has no numpy form) is rounded once, by numpy, to fp16
            arrays = {k: raw[k].to(torch.float64).numpy() for k in keys if k in raw}
        else:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in keys if k not in data.files]
                arrays = {k: np.asarray(data[k]) for k in keys if k in data.files}
        if missing:
            raise ValueError(f"{path} lacks {missing}; a special tokens file holds {list(keys)}")
        half = {k: torch.from_numpy(np.ascontiguousarray(v.astype(np.float16))) for k, v in arrays.items()}
        return cls(caption=half["caption_token"], logo=half["logo_token"], other=half["other_tokens"])

    @property
    def width(self) -> int:
        return self.caption.shape[-1]

    def _row(self, i: int) -> torch.Tensor:
        return self.other[i : i + 1]

    @property
    def trans(self) -> torch.Tensor:
        return self._row(0)

    @property
    def hq(self) -> torch.Tensor:
        return self._row(1)

    @property
    def static_first_frames(self) -> torch.Tensor:
        return self._row(2)

    @property
    def dynamic_first_frames(self) -> torch.Tensor:
        return self._row(3)

    @property
    def borderness(self) -> torch.Tensor:
        return self._row(4)

    @property
    def duration(self) -> tuple[torch.Tensor, ...]:
        """DURATION_1..DURATION_8; index k means k more chunks follow this one (7 = seven or more)."""
        return tuple(self._row(7 + k) for k in range(NUM_DURATION_TOKENS))

    @property
    def three_d_model(self) -> torch.Tensor:
        return self._row(15)

    @property
    def two_d_anime(self) -> torch.Tensor:
        return self._row(16)


@dataclass(frozen=True)
class CaptionTokenOptions:
    """Which special tokens a request prepends to its captions (reference PAD_* and NEG_PROMPT switches).

    Defaults are the shipped launchers: PAD_HQ=1, PAD_DURATION=1. ``negative_special_tokens`` prepends CAPTION,
    LOGO, TRANS and BORDERNESS to the null caption (NEG_PROMPT).
    """

    hq: bool = True
    duration: bool = True
    static: bool = False
    dynamic: bool = False
    borderness: bool = False
    three_d_model: bool = False
    two_d_anime: bool = False
    negative_special_tokens: bool = False

    def fixed_tokens(self, tokens: SpecialTokens) -> list[torch.Tensor]:
        """The per-caption tokens in the order they are prepended (the final order is the reverse)."""
        chosen = [
            (self.static, tokens.static_first_frames),
            (self.dynamic, tokens.dynamic_first_frames),
            (self.borderness, tokens.borderness),
            (self.hq, tokens.hq),
            (self.three_d_model, tokens.three_d_model),
            (self.two_d_anime, tokens.two_d_anime),
        ]
        return [token for flag, token in chosen if flag]

    @staticmethod
    def negative_tokens(tokens: SpecialTokens) -> list[torch.Tensor]:
        return [tokens.caption, tokens.logo, tokens.trans, tokens.borderness]


def _prepend_token(
    token: torch.Tensor, embs: torch.Tensor, mask: torch.Tensor | None, max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prepend one (1, D) token to every caption of embs (N, C, L, D) and a 1 to the masks, then keep max_tokens."""
    n, c, _, d = embs.shape
    if token.shape[-1] != d:
        raise ValueError(f"special token width {token.shape[-1]} does not match caption width {d}")
    lead = token.to(device=embs.device, dtype=embs.dtype).reshape(1, 1, 1, d).expand(n, c, 1, d)
    embs = torch.cat([lead, embs], dim=2)[:, :, :max_tokens]
    if mask is not None:
        # The leading one carries the caption dtype, so a padded integer mask becomes a float mask (reference).
        ones = torch.ones(n, c, 1, dtype=embs.dtype, device=mask.device)
        mask = torch.cat([ones, mask.to(embs.dtype)], dim=-1)[:, :, :max_tokens]
    return embs, mask


def pad_special_tokens(
    caption_embs: torch.Tensor,
    emb_masks: torch.Tensor | None,
    tokens: SpecialTokens,
    options: CaptionTokenOptions = CaptionTokenOptions(),
    max_tokens: int = PADDED_CAPTION_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prepend the chosen special tokens to per-chunk captions (reference ``pad_special_token``).

    ``caption_embs`` (N, n, L, D) holds the captions of n consecutive non-prefix chunks, ``emb_masks`` (N, n, L).
    Fixed tokens go first in the order STATIC, DYNAMIC, BORDERNESS, HQ, THREE_D_MODEL, TWO_D_ANIME, then per chunk
    i the DURATION token min(n - 1 - i, 7); each prepend cuts to ``max_tokens``. With any token added the mask
    becomes the caption dtype; with none the inputs come back unchanged.
    """
    embs, mask = caption_embs, emb_masks
    for token in options.fixed_tokens(tokens):
        embs, mask = _prepend_token(token, embs, mask, max_tokens)
    if options.duration:
        n = embs.shape[1]
        per_chunk = [
            _prepend_token(tokens.duration[min(n - 1 - i, NUM_DURATION_TOKENS - 1)], embs[:, i : i + 1],
                           None if mask is None else mask[:, i : i + 1], max_tokens)
            for i in range(n)
        ]
        embs = torch.cat([e for e, _ in per_chunk], dim=1)
        mask = None if mask is None else torch.cat([m for _, m in per_chunk], dim=1)
    return embs, mask


def _as_caption(embs: torch.Tensor) -> torch.Tensor:
    """(L, D), (1, L, D) or (1, 1, L, D) -> (1, 1, L, D)."""
    if embs.ndim == 2:
        return embs[None, None]
    if embs.ndim == 3 and embs.shape[0] == 1:
        return embs[None]
    if embs.ndim == 4 and embs.shape[:2] == (1, 1):
        return embs
    raise ValueError(
        f"expected one caption embedding of shape (L, D), (1, L, D) or (1, 1, L, D); got {tuple(embs.shape)}"
    )


def _as_mask(mask: torch.Tensor) -> torch.Tensor:
    """(L,) or (1, L) or (1, 1, L) -> (1, 1, L)."""
    if mask.ndim == 1:
        return mask[None, None]
    if mask.ndim == 2 and mask.shape[0] == 1:
        return mask[None]
    if mask.ndim == 3 and mask.shape[:2] == (1, 1):
        return mask
    raise ValueError(f"expected one caption mask of shape (L,) or (1, L); got {tuple(mask.shape)}")


def build_null_captions(
    null_caption_embedding: torch.Tensor,
    num_chunks: int,
    mask_like: torch.Tensor,
    tokens: SpecialTokens | None = None,
    options: CaptionTokenOptions = CaptionTokenOptions(),
    max_tokens: int = PADDED_CAPTION_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Null caption of every chunk (reference ``_process_null_embeddings``): (1, n, L, D) and a (1, n, L) mask
    shaped and typed like ``mask_like`` whose first 50 positions are 1."""
    null = _as_caption(null_caption_embedding).repeat(1, num_chunks, 1, 1)
    if options.negative_special_tokens:
        if tokens is None:
            raise ValueError("negative_special_tokens needs the special tokens")
        for token in options.negative_tokens(tokens):
            null, _ = _prepend_token(token, null, None, max_tokens)
    mask = torch.zeros_like(mask_like)
    mask[:, :, :NULL_CAPTION_VALID_TOKENS] = 1
    return null, mask


def build_chunk_captions(
    prompt_embeds: torch.Tensor | Sequence[torch.Tensor],
    prompt_mask: torch.Tensor | Sequence[torch.Tensor],
    null_caption_embedding: torch.Tensor,
    num_chunks: int,
    num_clean_chunks: int,
    tokens: SpecialTokens,
    options: CaptionTokenOptions = CaptionTokenOptions(),
    max_tokens: int = PADDED_CAPTION_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk caption tensors for the sampler (spec §4.6): y (2, n, L', D) and masks (2, n, L').

    Row 0 is conditional, row 1 null. ``prompt_embeds``/``prompt_mask`` are one T5 output (L, D)/(1, L, D)/(1,1,L,D)
    and its raw tokenizer mask, or lists of one per non-prefix chunk (chunk-wise prompts; every embedding must have
    the same L). The conditional row of chunk i among the n_den = n - n_clean non-prefix chunks is its prompt with
    the special tokens of ``options`` (DURATION counting the non-prefix chunks after it); the n_clean prefix chunks
    get the null caption with an all-zero mask. A chunk whose raw mask sums to zero gets the null caption and null
    mask in its conditional row; when every prompt is empty both rows are entirely null, as in the reference.
    """
    num_denoised = num_chunks - num_clean_chunks
    if num_clean_chunks < 0 or num_denoised < 1:
        raise ValueError(f"need 0 <= num_clean_chunks < num_chunks, got {num_clean_chunks} and {num_chunks}")

    if isinstance(prompt_embeds, torch.Tensor):
        embeds_list, masks_list = [_as_caption(prompt_embeds)] * num_denoised, [_as_mask(prompt_mask)] * num_denoised
    else:
        embeds_list = [_as_caption(e) for e in prompt_embeds]
        masks_list = [_as_mask(m) for m in prompt_mask]
        if len(embeds_list) != num_denoised or len(masks_list) != num_denoised:
            raise ValueError(
                f"chunk-wise prompts need one embedding and one mask per generated chunk ({num_denoised}), "
                f"got {len(embeds_list)} and {len(masks_list)}"
            )
        if len({tuple(e.shape) for e in embeds_list}) != 1 or len({tuple(m.shape) for m in masks_list}) != 1:
            raise ValueError("all chunk prompt embeddings (and masks) must have the same shape")

    # 1-3: the non-prefix chunks' captions, special tokens per chunk
    cond, cond_mask = pad_special_tokens(
        torch.cat(embeds_list, dim=1), torch.cat(masks_list, dim=1), tokens, options, max_tokens
    )
    null_caption = _as_caption(null_caption_embedding).to(device=cond.device, dtype=cond.dtype)
    if null_caption.shape[2:] != cond.shape[2:]:
        raise ValueError(
            f"padded captions are {cond.shape[2]} x {cond.shape[3]} but the null caption is "
            f"{null_caption.shape[2]} x {null_caption.shape[3]}; the caption length plus the special tokens must "
            f"equal the null caption length (T5 max_length 800)"
        )

    # 4: the prefix chunks get the null caption with an all-zero mask (never attended to)
    cond = torch.cat([null_caption.repeat(1, num_clean_chunks, 1, 1), cond], dim=1)
    prefix_mask = torch.zeros(1, num_clean_chunks, cond_mask.shape[2], dtype=cond_mask.dtype, device=cond_mask.device)
    cond_mask = torch.cat([prefix_mask, cond_mask], dim=1)
    null, null_mask = build_null_captions(null_caption, num_chunks, cond_mask, tokens, options, max_tokens)

    empty = [bool(m.sum() == 0) for m in masks_list]
    if all(empty):
        return torch.cat([null, null]), torch.cat([null_mask, null_mask])
    for i, is_empty in enumerate(empty):
        if is_empty:
            chunk = num_clean_chunks + i
            cond[:, chunk] = null[:, chunk]
            cond_mask[:, chunk] = null_mask[:, chunk]
    return torch.cat([cond, null]), torch.cat([cond_mask, null_mask])


# --------------------------------------------------------------------------------------------------------------------
# T5 encoder
# --------------------------------------------------------------------------------------------------------------------


def resolve_t5_folder(folder: str | Path) -> Path:
    """The folder holding the T5 files: ``<folder>/t5-v1_1-xxl`` (reference layout) or ``folder`` itself."""
    folder = Path(folder).expanduser()
    nested = folder / T5_SUBFOLDER
    if nested.is_dir():
        return nested
    if folder.is_dir() and (folder / "config.json").is_file():
        return folder
    if not folder.exists():
        raise FileNotFoundError(f"T5 folder not found: {folder}; {_download_hint(nested)}")
    raise FileNotFoundError(
        f"no T5 encoder in {folder}: expected {nested}/ or a config.json in {folder}; {_download_hint(nested)}"
    )


def _check_t5_files(path: Path) -> None:
    problems = []
    if not (path / "config.json").is_file():
        problems.append("config.json")
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")]
    if not weights:
        problems.append("model weights (*.safetensors or pytorch_model*.bin)")
    if not ((path / "tokenizer.json").is_file() or (path / "spiece.model").is_file()):
        problems.append("tokenizer files (spiece.model or tokenizer.json, with tokenizer_config.json)")
    if problems:
        raise FileNotFoundError(f"T5 folder {path} is missing {', '.join(problems)}; {_download_hint(path)}")


def _dtype_kwarg() -> str:
    """transformers renamed from_pretrained's ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


class T5TextEncoder:
    """T5 encoder + tokenizer encoding cleaned prompts to ``max_length`` tokens (spec §4.1-4.3).

    Only a prompt's valid tokens go through the model: T5's attention mask gives them the same values either way
    (padding keys get zero weight; relative position biases depend on distances only; float32 summation order
    aside), and the DiT reads nothing but the valid tokens (it selects them by the mask), so the 800-token padding
    only cost time. The result is padded back to ``max_length`` with zeros, the shape every caller expects.

    Where it runs: ``device`` computes; the weights' dtype is the compute dtype (fp32 on the CPU, as the reference;
    bf16 is allowed on a GPU). ``offload``: the weights stay in (pinned) host memory and are copied onto ``device``
    for each :meth:`encode`, freed when it returns, so the encoder holds no device memory between prompts.
    Thread-safe for concurrent :meth:`encode` calls (nothing is mutated); the server runs it off the engine thread.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device | str = "cpu", max_length: int = 800,
                 *, offload: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_length = max_length
        self.offload = offload
        # one stream for every encode, not one per call: the caching allocator reuses memory per stream, so the
        # (offloaded) weights' device copy of one encode is reused by the next instead of piling up
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        dtype = next(model.parameters()).dtype
        if self.device.type == "cpu" and dtype != torch.float32:
            # CPU bf16 GEMMs are slower than fp32 ones here, and fp32 is what the reference ran
            raise ValueError(f"the T5 encoder runs in float32 on the CPU, got {dtype}")

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: torch.device | str = "cpu", max_length: int = 800, *,
        dtype: torch.dtype | None = None, offload: bool = False,
    ) -> "T5TextEncoder":
        """Load from ``<folder>/t5-v1_1-xxl`` (the reference's ``t5_pretrained`` layout) or from ``folder`` itself.

        ``dtype``: float32 (the default; the only choice on the CPU) or bfloat16 on a GPU. ``offload``: keep the
        weights in host memory and copy them onto ``device`` for each encode (see the class docstring).
        """
        from transformers import AutoTokenizer, T5EncoderModel

        device = torch.device(device)
        dtype = dtype or torch.float32
        if device.type == "cpu" and dtype != torch.float32:
            raise ValueError(f"the T5 encoder runs in float32 on the CPU, got {dtype}")  # before loading 19 GB
        path = resolve_t5_folder(folder)
        _check_t5_files(path)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        home = torch.device("cpu") if offload else device
        kwargs = {_dtype_kwarg(): dtype}
        if home.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
            # the XXL encoder is 19 GB in fp32: place it directly instead of staging a copy in host memory
            kwargs["device_map"] = {"": str(home)}
        model = T5EncoderModel.from_pretrained(str(path), **kwargs)
        model = model.to(device=home, dtype=dtype).eval().requires_grad_(False)
        if offload and device.type == "cuda":
            # pinned pages copy to the GPU at full bus speed, asynchronously on the encoding stream
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.data = tensor.data.pin_memory()
        return cls(model, tokenizer, device=device, max_length=max_length, offload=offload)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (B, max_length) int64: EOS appended, padded with id 0, truncated."""
        out = self.tokenizer(
            list(texts),
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return out["input_ids"], out["attention_mask"]

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str], clean: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, max_length, D) float32 and mask (B, max_length) int64, on the encoder's device.

        Each prompt is cleaned first (``preprocess_prompt``: the training-time caption cleaner, applied twice);
        ``clean=False`` only lower-cases and strips, as the reference does with preprocessing off. Positions where
        the mask is 0 hold zeros (the DiT never reads them).
        """
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts")
        if clean:
            from magi_server.models.caption_cleaning import preprocess_prompt

            texts = [preprocess_prompt(p) for p in prompts]
        else:
            texts = [p.lower().strip() for p in prompts]
        ids, mask = self.tokenize(texts)
        if self.device.type != "cuda":
            return self._encode(ids, mask)
        # On a GPU, a stream of its own: the weight copy and the encode overlap the DiT's calls queued on the
        # default stream by the engine thread, instead of waiting behind them (this runs on a prefill thread).
        stream = self._stream
        with torch.cuda.stream(stream):
            out, mask = self._encode(ids, mask)
        stream.synchronize()  # this thread waits; the callers' stream never does
        caller = torch.cuda.current_stream(self.device)
        for tensor in (out, mask):  # their memory must not be reused while the caller's stream may still read it
            tensor.record_stream(caller)
        return out, mask

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = None
        if self.offload:
            # the device copy lives only in this call: freed when it returns, not when the caller drops `out`
            weights = {name: t.to(self.device, non_blocking=True)
                       for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]}
        out = torch.zeros(*ids.shape, self.model.config.d_model, dtype=torch.float32, device=self.device)
        # One prompt at a time, each up to its own last valid token: a prompt's embedding is then the same numbers
        # whatever else is encoded with it (the other prompts of a request, chunk-wise prompts), as the DiT's
        # results do not depend on the batch either. The tokenizer pads on the right, so the valid tokens come first.
        for row in range(ids.shape[0]):
            length = max(1, int(mask[row].sum())) if self.tokenizer.padding_side == "right" else ids.shape[1]
            row_mask = mask[row : row + 1, :length].to(self.device)
            hidden = self._forward(weights, input_ids=ids[row : row + 1, :length].to(self.device),
                                   attention_mask=row_mask)
            out[row : row + 1, :length] = hidden.float().masked_fill(row_mask[..., None] == 0, 0.0)
        return out, mask.to(self.device)

    def _forward(self, weights: dict[str, torch.Tensor] | None, **inputs) -> torch.Tensor:
        if weights is None:
            return self.model(**inputs)["last_hidden_state"]
        from torch.func import functional_call

        return functional_call(self.model, weights, args=(), kwargs=inputs)["last_hidden_state"]
