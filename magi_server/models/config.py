"""Frozen configuration records: the DiT and VAE architectures, sampling defaults, and the reference JSON loader.

A reference MAGI-1 config file (``model_config`` / ``runtime_config`` / ``engine_config``, as in
SandAI-org/MAGI-1 ``example/*/*.json``) loads as-is with :meth:`MagiConfig.from_json`; relative paths inside
it resolve against the JSON file's folder. Nothing here imports torch: dtypes are names ("bfloat16") that the
model layer resolves.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def normalize_dtype_name(value: str) -> str:
    """Accept "torch.bfloat16", "bfloat16", "bf16", ... and return the plain torch attribute name."""
    name = str(value).strip()
    if name.startswith("torch."):
        name = name[len("torch."):]
    name = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "half": "float16", "float": "float32"}.get(name, name)
    if name not in DTYPE_NAMES:
        raise ValueError(f"params_dtype {value!r} is not supported; use one of {', '.join(DTYPE_NAMES)}")
    return name


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of the MAGI-1 DiT ("videodit_ardf"); field names follow the reference model_config."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    in_channels: int = 16
    out_channels: int = 16
    x_rescale_factor: float = 1.0
    half_channel_vae: bool = False
    gated_linear_unit: bool = False
    layernorm_epsilon: float = 1e-6
    apply_layernorm_1p: bool = True
    params_dtype: str = "bfloat16"
    patch_size: int = 2
    t_patch_size: int = 1
    cond_hidden_ratio: float = 0.25
    caption_channels: int = 4096
    caption_max_length: int = 800
    xattn_cond_hidden_ratio: float = 1.0
    cond_gating_ratio: float = 1.0
    # engine_config fields that change the network itself
    distill: bool = False
    fp8_quant: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "params_dtype", normalize_dtype_name(self.params_dtype))
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append("hidden_size must be divisible by num_attention_heads")
        elif self.hidden_size // self.num_attention_heads != self.kv_channels:
            problems.append("hidden_size / num_attention_heads must equal kv_channels (RoPE is sized from it)")
        if self.num_attention_heads % self.num_query_groups:
            problems.append("num_attention_heads must be divisible by num_query_groups")
        if self.kv_channels % 8:
            problems.append("kv_channels must be divisible by 8 (3 RoPE axes of kv_channels/8 bands)")
        if (self.num_attention_heads * self.kv_channels) % 8:
            problems.append("num_attention_heads * kv_channels must be divisible by 8 (fixed 8-way output interleave)")
        if self.half_channel_vae and self.in_channels % 2:
            problems.append("half_channel_vae needs an even in_channels")
        if self.cond_gating_ratio != 1.0:
            problems.append("cond_gating_ratio must be 1.0 (the gates are as wide as the residual stream)")
        if problems:
            raise ValueError("invalid DiT config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def cond_dim(self) -> int:
        return int(self.hidden_size * self.cond_hidden_ratio)

    @property
    def xattn_dim(self) -> int:
        return int(self.hidden_size * self.xattn_cond_hidden_ratio)

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latent the DiT is fed (half of in_channels when the 24B duplicates them)."""
        return self.in_channels // 2 if self.half_channel_vae else self.in_channels


@dataclass(frozen=True)
class SamplingConfig:
    """Sampler defaults (reference runtime_config + the sampler parts of engine_config)."""

    cfg_number: int = 3
    cfg_t_range: tuple[float, ...] = (0.0, 0.0217, 0.1, 0.3, 0.999)
    prev_chunk_scales: tuple[float, ...] = (1.5, 1.5, 1.5, 1.0, 1.0)
    text_scales: tuple[float, ...] = (7.5, 7.5, 7.5, 0.0, 0.0)
    noise2clean_kvrange: tuple[int, ...] = (5, 4, 3, 2)
    clean_chunk_kvrange: int = 1
    clean_t: float = 0.9999
    seed: int = 1234
    num_frames: int = 96
    video_size_h: int = 720
    video_size_w: int = 720
    num_steps: int = 64
    window_size: int = 4
    fps: int = 24
    chunk_width: int = 6
    scale_factor: float = 0.18215
    temporal_downsample_factor: int = 4
    distill_nearly_clean_chunk_threshold: float = 0.3
    shortcut_mode: str = "8,16,16"
    # the reference reads this from the `prev_chunks_scale` environment variable; here it is a plain knob
    prev_chunks_scale: float = 0.7

    def __post_init__(self) -> None:
        for name in ("cfg_t_range", "prev_chunk_scales", "text_scales", "noise2clean_kvrange"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not (len(self.cfg_t_range) == len(self.prev_chunk_scales) == len(self.text_scales)):
            raise ValueError("cfg_t_range, prev_chunk_scales and text_scales must have the same length")
        if self.cfg_number not in (1, 3):
            raise ValueError(f"cfg_number must be 1 or 3, got {self.cfg_number}")
        if self.shortcut_mode not in ("8,16,16", "16,16,8"):
            raise ValueError(f"shortcut_mode must be '8,16,16' or '16,16,8', got {self.shortcut_mode!r}")


@dataclass(frozen=True)
class VAEConfig:
    """The transformer VAE ("ViTVAE") ddconfig. Defaults are the real checkpoint's inferred values (spec §5.1)."""

    video_size: int = 256
    video_length: int = 16
    patch_size: int = 8
    patch_length: int = 4
    in_chans: int = 3
    z_chans: int = 16
    double_z: bool = True
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    with_cls_token: bool = True
    ln_in_attn: bool = True
    conv_last_layer: bool = True
    use_rope: bool = False
    use_final_proj: bool = False
    norm_code: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.use_rope or self.use_final_proj or self.norm_code:
            problems.append("use_rope, use_final_proj and norm_code are not used by MAGI-1's VAE and must be false")
        if not (self.ln_in_attn and self.with_cls_token and self.conv_last_layer and self.double_z):
            problems.append("ln_in_attn, with_cls_token, conv_last_layer and double_z must be true for MAGI-1's VAE")
        if self.embed_dim % self.num_heads:
            problems.append("embed_dim must be divisible by num_heads")
        if self.embed_dim % (self.patch_size * self.patch_size * self.patch_length):
            problems.append("embed_dim must be divisible by patch_size^2 * patch_length (decoder unpatchify)")
        if problems:
            raise ValueError("invalid VAE config: " + "; ".join(problems))

    @classmethod
    def from_ddconfig(cls, ddconfig: dict[str, Any]) -> "VAEConfig":
        """Build from the ``ddconfig`` dict of the VAE's config.json; training-only keys are ignored."""
        ignored = {"qk_scale", "drop_rate", "attn_drop_rate", "drop_path_rate", "norm_layer"}
        known = {f.name for f in fields(cls)}
        unknown = set(ddconfig) - known - ignored
        if unknown:
            raise ValueError(f"unknown VAE ddconfig keys: {sorted(unknown)}")
        return cls(**{k: v for k, v in ddconfig.items() if k in known})

    @property
    def unpatch_channels(self) -> int:
        return self.embed_dim // (self.patch_size * self.patch_size * self.patch_length)


@dataclass(frozen=True)
class MagiConfig:
    """One reference-style config file: the DiT, sampling defaults and where the weights live."""

    dit: DiTConfig
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    load: str | None = None  # folder that holds inference_weight[.fp8][.distill]/
    t5_pretrained: str | None = None
    vae_pretrained: str | None = None
    t5_device: str = "cpu"
    kv_offload: bool = True
    special_tokens: str | None = None  # special_tokens.npz (not in the reference schema; found beside the weights)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | Path | None = None) -> "MagiConfig":
        """Parse the reference schema; relative paths resolve against ``base_dir``."""
        for section in ("model_config", "runtime_config", "engine_config"):
            if section not in data:
                raise ValueError(f"config is missing the '{section}' section")
        model = dict(data["model_config"])
        runtime = dict(data["runtime_config"])
        engine = dict(data["engine_config"])

        model.pop("model_name", None)
        dit_fields = {f.name for f in fields(DiTConfig)}
        unknown = set(model) - dit_fields
        if unknown:
            raise ValueError(f"unknown model_config keys: {sorted(unknown)}")
        model["distill"] = bool(engine.get("distill", False))
        model["fp8_quant"] = bool(engine.get("fp8_quant", False))
        dit = DiTConfig(**model)

        sampling_fields = {f.name for f in fields(SamplingConfig)}
        sampling_kwargs = {k: v for k, v in runtime.items() if k in sampling_fields}
        sampling_kwargs.update({k: v for k, v in engine.items() if k in sampling_fields})
        cfg_number = sampling_kwargs.get("cfg_number", 3)
        if (dit.distill or dit.fp8_quant) and cfg_number != 1:
            raise ValueError("distilled and fp8 models need runtime_config.cfg_number = 1")
        if not (dit.distill or dit.fp8_quant) and cfg_number != 3:
            raise ValueError("base models need runtime_config.cfg_number = 3")
        sampling = SamplingConfig(**sampling_kwargs)

        def resolve(path: str | None) -> str | None:
            if path in (None, ""):
                return None
            p = Path(path).expanduser()
            if not p.is_absolute() and base_dir is not None:
                p = Path(base_dir) / p
            return str(p)

        return cls(
            dit=dit,
            sampling=sampling,
            load=resolve(runtime.get("load")),
            t5_pretrained=resolve(runtime.get("t5_pretrained")),
            vae_pretrained=resolve(runtime.get("vae_pretrained")),
            t5_device=str(runtime.get("t5_device") or "cpu"),
            kv_offload=bool(engine.get("kv_offload", True)),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "MagiConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data, base_dir=path.parent)

    def replace(self, **changes: Any) -> "MagiConfig":
        return dataclasses.replace(self, **changes)


def weight_subfolder(dit: DiTConfig) -> str:
    """The reference's DiT weight folder name: inference_weight[.fp8][.distill]."""
    name = "inference_weight"
    if dit.fp8_quant:
        name += ".fp8"
    if dit.distill:
        name += ".distill"
    return name



# ------------------------------------------------------------------------------------------------------ presets

# The six shipped configurations (SandAI-org/MAGI-1 example/24B/*.json, example/4.5B/*.json; spec §1.1) and a
# tiny random model that runs the whole flow on a laptop CPU. Names follow the Hugging Face subfolders
# (ckpt/magi/24B_base, ...), with '-' for '_'.
REAL_PRESETS = (
    "24B-base",
    "24B-distill",
    "24B-distill-quant",
    "4.5B-base",
    "4.5B-distill",
    "4.5B-distill-quant",
)
PRESET_NAMES = REAL_PRESETS + ("tiny",)


def canonical_preset_name(name: str) -> str | None:
    """"24b_distill_quant" -> "24B-distill-quant"; None when it names no preset."""
    key = str(name).strip().replace("_", "-").lower()
    for candidate in PRESET_NAMES:
        if candidate.lower() == key:
            return candidate
    return None


def _dit_24b(distill: bool, fp8: bool) -> DiTConfig:
    return DiTConfig(
        num_layers=48, hidden_size=6144, ffn_hidden_size=16384, num_attention_heads=48, num_query_groups=8,
        kv_channels=128, in_channels=32, out_channels=32, x_rescale_factor=0.1, half_channel_vae=True,
        gated_linear_unit=True, distill=distill, fp8_quant=fp8,
    )


def _dit_4_5b(distill: bool, fp8: bool) -> DiTConfig:
    return DiTConfig(
        num_layers=34, hidden_size=3072, ffn_hidden_size=12288, num_attention_heads=24, num_query_groups=8,
        kv_channels=128, in_channels=16, out_channels=16, x_rescale_factor=1.0, half_channel_vae=False,
        gated_linear_unit=False, distill=distill, fp8_quant=fp8,
    )


TINY_DIT = DiTConfig(
    num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=2, num_query_groups=1, kv_channels=32,
    in_channels=16, out_channels=16, caption_channels=32, params_dtype="float32", distill=True,
)
TINY_VAE = VAEConfig(video_size=64, video_length=8, embed_dim=256, depth=2, num_heads=4, mlp_ratio=1.0)


def preset(name: str) -> MagiConfig:
    """The MagiConfig of a named preset (see PRESET_NAMES); paths are left unset."""
    canonical = canonical_preset_name(name)
    if canonical is None:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    if canonical == "tiny":
        return MagiConfig(
            dit=TINY_DIT,
            sampling=SamplingConfig(cfg_number=1, num_steps=8, video_size_h=128, video_size_w=128, window_size=4),
        )
    size, _, variant = canonical.partition("-")
    distill = variant.startswith("distill")
    fp8 = variant.endswith("quant")
    if size == "24B":
        dit = _dit_24b(distill, fp8)
        steps = 16 if distill else 32
        h, w = 720, 1280
    else:
        dit = _dit_4_5b(distill, fp8)
        steps = 64
        h, w = 720, 720
    sampling = SamplingConfig(cfg_number=1 if distill else 3, num_steps=steps, video_size_h=h, video_size_w=w)
    return MagiConfig(dit=dit, sampling=sampling, t5_device="cuda" if size == "24B" else "cpu")


# Largest token piece of the DiT's token-wise layer parts (models/dit.py): a 24B piece's fc1 output is then 0.5 GB
# (bf16), and GEMMs of this many rows still run at full tensor-core speed. memory_model.py charges the same pieces.
DEFAULT_MAX_PIECE_TOKENS = 8192


def model_limits(config: MagiConfig):
    """What a model config adds to the request contract's limits (params.ModelLimits), read without loading any
    weights or importing torch: an API replica validates requests with it, with no model of its own."""
    from magi_server.params import ModelLimits

    s = config.sampling
    return ModelLimits(window_size=s.window_size, kv_quarters=len(s.noise2clean_kvrange),
                       temporal_downsample=s.temporal_downsample_factor)
