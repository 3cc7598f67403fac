"""MAGI-1's transformer VAE ("ViTVAE", spec §5): encoder, decoder, tiled encode/decode and the pipeline helpers.

This file owns the one VAE network and everything that turns pixels into latents and back:

* :class:`ViTVAE` with the reference state-dict names (``encoder.*`` / ``decoder.*``, spec §5.4). It can be
  built on the meta device and filled with ``load_state_dict(..., assign=True)``.
* :meth:`ViTVAE.encode` (posterior mean, the encode the reference pipeline installs) and :meth:`ViTVAE.decode`
  (with the one-latent-frame quirk).
* :func:`tiled_encode` / :func:`tiled_decode` with the reference TileProcessor geometry (spec §5.5), driven by a
  :class:`TileConfig`.
* :func:`encode_video_uint8`, :func:`decode_to_frames`, :func:`frames_to_uint8`: the reference ``VaeHelper``
  encode/decode (uint8 <-> [-1, 1], tiling, (N*T, 3, H, W) frame layout).

Attention goes through :func:`magi_server.models.attention.range_attention` with one range covering all tokens.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from magi_server.models.config import VAEConfig
from magi_server.models.attention import BACKENDS, range_attention

LAYERNORM_EPS = 1e-5
QKV_NORM_EPS = 1e-5


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes in pixels (spec §5.5). The pipeline uses 256 px spatial tiles and fps // 2 frames in time."""

    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_min_length: int = 12
    spatial_tile_overlap_factor: float = 0.25
    temporal_tile_overlap_factor: float = 0.0

    def __post_init__(self) -> None:
        if min(self.tile_sample_min_height, self.tile_sample_min_width, self.tile_sample_min_length) <= 0:
            raise ValueError("tile sizes must be positive")
        if not (0.0 <= self.spatial_tile_overlap_factor < 1.0 and 0.0 <= self.temporal_tile_overlap_factor < 1.0):
            raise ValueError("tile overlap factors must lie in [0, 1)")


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


def resize_pos_embed(pos_embed: torch.Tensor, native_grid: tuple[int, int, int], grid: tuple[int, int, int]):
    """pos_embed (1, 1 + T0*H0*W0, E) for a (T, H, W) token grid: the cls entry as is, the grid part trilinear.

    As in the reference, the grid part is resampled only when the grid differs from the native one.
    """
    if tuple(grid) == tuple(native_grid):
        return pos_embed
    body = pos_embed[:, 1:, :].reshape(1, *native_grid, -1).permute(0, 4, 1, 2, 3)
    body = F.interpolate(body, size=tuple(grid), mode="trilinear", align_corners=False)
    body = body.permute(0, 2, 3, 4, 1).reshape(1, math.prod(grid), -1)
    return torch.cat((pos_embed[:, 0:1, :], body), dim=1)


def unpatchify(
    tokens: torch.Tensor, grid: tuple[int, int, int], patch_length: int, patch_size: int, channels: int
) -> torch.Tensor:
    """(B, T*H*W, pT*pH*pW*C) tokens in (t, h, w) order -> (B, C, T*pT, H*pH, W*pW).

    Within a token the values are ordered (pT, pH, pW, C) with C fastest (spec §5.3 step 4).
    """
    b = tokens.shape[0]
    t, h, w = grid
    x = tokens.reshape(b, t, h, w, patch_length, patch_size, patch_size, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, t * patch_length, h * patch_size, w * patch_size)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Attention(nn.Module):
    """Self-attention with the parameter-free per-head norm of q, k and v (``ln_in_attn``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        # One-call biased std (not sqrt of a hand-built variance) and eps on the std: both change the last bit,
        # which the bf16 cast below turns into visible error (spec §5.2 step 3).
        mean = qkv.mean(dim=-1, keepdim=True)
        std = qkv.std(dim=-1, keepdim=True, correction=0)
        qkv = ((qkv - mean) / (std + QKV_NORM_EPS)).to(torch.bfloat16)  # flash-attn input dtype, whatever x is
        q, k, v = qkv.unbind(dim=2)
        out = torch.stack([self._attend(q[i], k[i], v[i], n) for i in range(b)])
        # flash-attn returns bf16; the model then continues in its own dtype
        return self.proj(out.reshape(b, n, c).to(x.dtype))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
        ranges = [(0, n)]
        scale = self.head_dim**-0.5
        if self.backend == "sdpa" and q.device.type == "cpu":
            # The golden fixtures stand in for flash-attn with SDPA on the bf16-rounded q/k/v widened to fp32.
            # An ambient autocast (the bf16 decode) is left on on purpose: it turns that SDPA call back into
            # bf16, exactly as it did when the fixtures were made, and that is what makes the decode bit-exact.
            q, k, v = q.float(), k.float(), v.float()
        return range_attention(q, k, v, ranges, ranges, scale=scale, backend=self.backend).to(torch.bfloat16)


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        # ln_in_attn: no norm1, the attention normalises q, k, v itself
        self.attn = _Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        kernel = (cfg.patch_length, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=kernel, stride=kernel)


def _native_grid(cfg: VAEConfig) -> tuple[int, int, int]:
    side = cfg.video_size // cfg.patch_size
    return (cfg.video_length // cfg.patch_length, side, side)


class _Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.native_grid = _native_grid(cfg)
        e = cfg.embed_dim
        self.patch_embed = _PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, e))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(self.native_grid), e))
        self.blocks = nn.ModuleList(
            [_Block(e, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.depth)]
        )
        self.norm = nn.LayerNorm(e, eps=LAYERNORM_EPS)
        # The reference forces a Linear here whatever conv_last_layer says (spec §5.1).
        self.last_layer = nn.Linear(e, 2 * cfg.z_chans)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> moments (B, 2*z, T/pT, H/p, W/p): mean channels, then log-variance."""
        b = video.shape[0]
        x = self.patch_embed.proj(video)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = x + resize_pos_embed(self.pos_embed, self.native_grid, grid)
        for block in self.blocks:
            x = block(x)
        x = self.last_layer(self.norm(x))[:, 1:]
        return x.reshape(b, *grid, -1).permute(0, 4, 1, 2, 3)


class _Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.native_grid = _native_grid(cfg)
        self.patch_size = cfg.patch_size
        self.patch_length = cfg.patch_length
        self.unpatch_channels = cfg.unpatch_channels
        e = cfg.embed_dim
        self.proj_in = nn.Linear(cfg.z_chans, e)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, e))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(self.native_grid), e))
        self.blocks = nn.ModuleList(
            [_Block(e, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.depth)]
        )
        self.norm = nn.LayerNorm(e, eps=LAYERNORM_EPS)
        self.last_layer = nn.Conv3d(self.unpatch_channels, cfg.in_chans, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z, T, H, W) latent -> (B, 3, T*pT, H*p, W*p) pixels in about [-1, 1]."""
        b, c = z.shape[:2]
        grid = tuple(z.shape[2:])
        # Keep the permute + reshape: for a contiguous latent this is a transposed view, for a spatial tile a
        # copy, and on CPU a bf16 Linear gives different last bits for the two (golden README, VAE).
        x = self.proj_in(z.permute(0, 2, 3, 4, 1).reshape(b, -1, c))
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = x + resize_pos_embed(self.pos_embed, self.native_grid, grid)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)[:, 1:]
        x = unpatchify(x, grid, self.patch_length, self.patch_size, self.unpatch_channels)
        return self.last_layer(x)


# ---------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------


class ViTVAE(nn.Module):
    """MAGI-1's transformer VAE. 8x spatial / 4x temporal compression (patch sizes from the config)."""

    def __init__(self, config: VAEConfig, attn_backend: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.encoder = _Encoder(config)
        self.decoder = _Decoder(config)
        self.set_attention_backend(attn_backend)

    @property
    def spatial_downsample_factor(self) -> int:
        return self.config.patch_size

    @property
    def temporal_downsample_factor(self) -> int:
        return self.config.patch_length

    def set_attention_backend(self, backend: str) -> None:
        """Kernel used by every attention block: a name accepted by ``attention.range_attention``."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        for module in self.modules():
            if isinstance(module, _Attention):
                module.backend = backend

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, H, W) in [-1, 1] -> posterior mean (N, z, T', H', W') in the model's output dtype.

        A single frame is repeated to one temporal patch and only latent frame 0 is kept (the reference's
        patched encode; deterministic, no sampling).
        """
        if video.dim() != 5:
            raise ValueError(f"expected (N, C, T, H, W), got shape {tuple(video.shape)}")
        single = video.shape[2] == 1
        if single:
            video = video.expand(-1, -1, self.config.patch_length, -1, -1)
        moments = self.encoder(video)
        mean = moments[:, : self.config.z_chans]
        return mean[:, :, :1] if single else mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, z, T', H', W') -> (N, 3, T'*pT, H'*p, W'*p); one latent frame decodes to ONE pixel frame."""
        if z.dim() != 5:
            raise ValueError(f"expected (N, C, T, H, W), got shape {tuple(z.shape)}")
        video = self.decoder(z)
        return video[:, :, :1] if z.shape[2] == 1 else video


# ---------------------------------------------------------------------------------------------------------------
# Tiling (reference TileProcessor, spec §5.5)
# ---------------------------------------------------------------------------------------------------------------


def _tile_count(size: int, stride: int) -> int:
    return (size + stride - 1) // stride


def _tile_grid(shape: tuple[int, int, int], strides: tuple[int, int, int]) -> Iterator[tuple[int, int, int]]:
    """Tile indices (f, i, j) in the reference order: time slowest, width fastest."""
    counts = [_tile_count(s, st) for s, st in zip(shape, strides)]
    for f in range(counts[0]):
        for i in range(counts[1]):
            for j in range(counts[2]):
                yield f, i, j


def _ramp(extent: int, dim: int, ndim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 weights (1 - y/E, y/E), each computed in double and rounded once, as a python scalar would be."""
    shape = [1] * ndim
    shape[dim] = extent
    up = [y / extent for y in range(extent)]
    w_b = torch.tensor(up, dtype=torch.float64).to(torch.float32)
    w_a = torch.tensor([1 - u for u in up], dtype=torch.float64).to(torch.float32)
    return w_a.view(shape).to(device), w_b.view(shape).to(device)


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int, *, single_rounding: bool) -> torch.Tensor:
    """Overwrite the first E' slices of ``b`` along ``dim`` with a ramp from ``a``'s last E' slices; returns b.

    E' = min(extent, a's size, b's size), and a's LAST E' slices are used even when they are not the ones that
    overlap b (a small edge tile): this is the reference's behaviour, kept for parity.
    ``single_rounding``: fp32 math, one rounding to b's dtype (the reference's torch.compile'd decode blend).
    Otherwise each product and the sum are rounded to b's dtype (the reference's eager encode blend).
    """
    extent = min(extent, a.shape[dim], b.shape[dim])
    if extent <= 0:
        return b
    a_tail = a.narrow(dim, a.shape[dim] - extent, extent).float()
    b_head = b.narrow(dim, 0, extent)
    w_a, w_b = _ramp(extent, dim, b.dim(), b.device)
    if single_rounding:
        mixed = a_tail * w_a + b_head.float() * w_b
    else:
        mixed = (a_tail * w_a).to(b.dtype).float() + (b_head.float() * w_b).to(b.dtype).float()
    b_head.copy_(mixed.to(b.dtype))
    return b


def _concat_tiles(tiles: dict[tuple[int, int, int], torch.Tensor]) -> torch.Tensor:
    counts = [max(key[d] for key in tiles) + 1 for d in range(3)]
    slabs = []
    for f in range(counts[0]):
        rows = [torch.cat([tiles[f, i, j] for j in range(counts[2])], dim=4) for i in range(counts[1])]
        slabs.append(torch.cat(rows, dim=3))
    return torch.cat(slabs, dim=2)


@torch.no_grad()
def tiled_encode(vae: ViTVAE, video: torch.Tensor, tiles: TileConfig) -> torch.Tensor:
    """Posterior mean of ``video`` (N, 3, T, H, W), encoded tile by tile and blended in latent space.

    Tiles blend in place, so a tile's neighbours are already blended when it reads them; the blend arithmetic
    is eager in the tile dtype (three roundings), vertical before horizontal.
    """
    sd, td = vae.spatial_downsample_factor, vae.temporal_downsample_factor
    latent_h = tiles.tile_sample_min_height // sd
    latent_w = tiles.tile_sample_min_width // sd
    latent_t = tiles.tile_sample_min_length // td
    strides = (
        int(tiles.tile_sample_min_length * (1 - tiles.temporal_tile_overlap_factor)),
        int(tiles.tile_sample_min_height * (1 - tiles.spatial_tile_overlap_factor)),
        int(tiles.tile_sample_min_width * (1 - tiles.spatial_tile_overlap_factor)),
    )
    extents = (
        int(latent_t * tiles.temporal_tile_overlap_factor),
        int(latent_h * tiles.spatial_tile_overlap_factor),
        int(latent_w * tiles.spatial_tile_overlap_factor),
    )
    limits = (latent_t - extents[0], latent_h - extents[1], latent_w - extents[2])
    sizes = (tiles.tile_sample_min_length, tiles.tile_sample_min_height, tiles.tile_sample_min_width)

    encoded: dict[tuple[int, int, int], torch.Tensor] = {}
    for key in _tile_grid(tuple(video.shape[2:]), strides):
        f, i, j = (k * s for k, s in zip(key, strides))
        encoded[key] = vae.encode(video[:, :, f : f + sizes[0], i : i + sizes[1], j : j + sizes[2]])

    cropped = {}
    for key, tile in encoded.items():
        for axis in range(3):
            if key[axis] > 0:
                prev = list(key)
                prev[axis] -= 1
                _blend(encoded[tuple(prev)], tile, extents[axis], axis + 2, single_rounding=False)
        cropped[key] = tile[:, :, : limits[0], : limits[1], : limits[2]]
    return _concat_tiles(cropped)


@torch.no_grad()
def tiled_decode(vae: ViTVAE, z: torch.Tensor, tiles: TileConfig) -> torch.Tensor:
    """Pixels of latent ``z`` (N, z, T, H, W), decoded tile by tile and blended in pixel space.

    Each tile blends with its RAW (un-blended) neighbours, in fp32 with one rounding to the tile dtype,
    vertical before horizontal. A temporal tile holding one latent frame yields one pixel frame.
    """
    sd, td = vae.spatial_downsample_factor, vae.temporal_downsample_factor
    latent_h = tiles.tile_sample_min_height // sd
    latent_w = tiles.tile_sample_min_width // sd
    latent_t = tiles.tile_sample_min_length // td
    strides = (
        int(latent_t * (1 - tiles.temporal_tile_overlap_factor)),
        int(latent_h * (1 - tiles.spatial_tile_overlap_factor)),
        int(latent_w * (1 - tiles.spatial_tile_overlap_factor)),
    )
    pixel_sizes = (latent_t * td, latent_h * sd, latent_w * sd)
    extents = (
        int(pixel_sizes[0] * tiles.temporal_tile_overlap_factor),
        int(pixel_sizes[1] * tiles.spatial_tile_overlap_factor),
        int(pixel_sizes[2] * tiles.spatial_tile_overlap_factor),
    )
    limits = tuple(size - ext for size, ext in zip(pixel_sizes, extents))

    decoded: dict[tuple[int, int, int], torch.Tensor] = {}
    for key in _tile_grid(tuple(z.shape[2:]), strides):
        f, i, j = (k * s for k, s in zip(key, strides))
        decoded[key] = vae.decode(z[:, :, f : f + latent_t, i : i + latent_h, j : j + latent_w])

    cropped = {}
    for key, raw in decoded.items():
        tile = raw.clone()
        for axis in range(3):
            if key[axis] > 0:
                prev = list(key)
                prev[axis] -= 1
                _blend(decoded[tuple(prev)], tile, extents[axis], axis + 2, single_rounding=True)
        cropped[key] = tile[:, :, : limits[0], : limits[1], : limits[2]]
    return _concat_tiles(cropped)


# ---------------------------------------------------------------------------------------------------------------
# Pipeline helpers (reference VaeHelper)
# ---------------------------------------------------------------------------------------------------------------


def _model_dtype_device(vae: ViTVAE) -> tuple[torch.dtype, torch.device]:
    weight = vae.decoder.proj_in.weight
    return weight.dtype, weight.device


@torch.no_grad()
def encode_video_uint8(vae: ViTVAE, video_uint8: torch.Tensor, tiles: TileConfig) -> torch.Tensor:
    """uint8 video (N, 3, T, H, W) -> unscaled posterior-mean latent in the model dtype (tiled).

    The caller multiplies by the scale factor (0.18215) in the returned dtype, as the reference does.
    """
    if video_uint8.dim() != 5:
        raise ValueError(f"expected (N, C, T, H, W), got shape {tuple(video_uint8.shape)}")
    dtype, device = _model_dtype_device(vae)
    # uint8 / 127.5 promotes to float32 first, then one rounding to the model dtype (reference order)
    video = (video_uint8.to(device) / 127.5 - 1.0).to(dtype)
    return tiled_encode(vae, video, tiles)


@torch.no_grad()
def decode_to_frames(
    vae: ViTVAE, latent_unscaled: torch.Tensor, tiles: TileConfig, uint8_output: bool = True
) -> torch.Tensor:
    """Unscaled latent (N, z, T, H, W) -> frames (N*T_pix, 3, H_pix, W_pix), batch-major then time.

    A bf16 VAE decodes under ``torch.autocast(<model device type>, bfloat16)``: the reference wraps decode in
    CUDA autocast (on GPU this also runs LayerNorm in fp32); on CPU, CPU autocast gives the same Linear/Conv
    casts, which is how the golden fixture was made. The latent may stay fp32: autocast rounds it to bf16 at
    ``proj_in``. Any other model dtype decodes without autocast, the latent cast to the model dtype.
    """
    dtype, device = _model_dtype_device(vae)
    latent = latent_unscaled.to(device)
    if dtype == torch.bfloat16:
        context = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    else:
        latent = latent.to(dtype)
        context = contextlib.nullcontext()
    with context:
        video = tiled_decode(vae, latent, tiles)
    n, c, t, h, w = video.shape
    frames = video.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
    return frames_to_uint8(frames) if uint8_output else frames


def frames_to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """[-1, 1] frames -> uint8 levels: x*127.5 + 127.5 in the frames' own dtype, clamped, TRUNCATED (no rounding)."""
    return (frames * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)
