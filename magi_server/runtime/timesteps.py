"""MAGI-1 sampling numerics as pure tensor functions: timestep schedules, shortcut intervals, the distill dt, the
CFG scale lookup, the nearly-clean test and the Euler update.

Everything that must match the reference bit for bit is computed in float32 in the reference's operation order
(spec §6.3, §6.6-6.8); nothing here holds state, reads the environment or touches a device other than the
arguments'. t = 0 is pure noise and t = 1 is clean.
"""
from __future__ import annotations

from typing import Sequence

import torch

SHORTCUT_MODES = ("8,16,16", "16,16,8")
SCHEDULES = ("sd3", "square", "piecewise", "identity")


def _check_shortcut_mode(shortcut_mode: str) -> None:
    if shortcut_mode not in SHORTCUT_MODES:
        raise ValueError(f"shortcut_mode must be one of {SHORTCUT_MODES}, got {shortcut_mode!r}")


def _grid(num_steps: int, shortcut_mode: str, device: torch.device | str | None) -> torch.Tensor:
    """The u grid in [0, 1] (num_steps + 1 points, float32)."""
    if num_steps != 12:
        return torch.linspace(0, 1, num_steps + 1, device=device, dtype=torch.float32)
    # 12 steps is the shortcut model's special grid: per quarter, one 1/8 step and two 1/16 steps ("8,16,16") or
    # two 1/16 steps then one 1/8 step ("16,16,8").
    sixteenths = torch.linspace(0, 1, 5, device=device, dtype=torch.float32) / 4
    quarters = torch.linspace(0, 1, 5, device=device, dtype=torch.float32)
    if shortcut_mode == "16,16,8":
        within = sixteenths[:3]
    else:
        within = torch.cat([sixteenths[:1], sixteenths[2:4]])
    return torch.cat([within + q for q in quarters])[: num_steps + 1]


def init_t(
    num_steps: int,
    shortcut_mode: str = "8,16,16",
    schedule: str = "sd3",
    shift: float = 3.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Timestep schedule t[0..num_steps] in float32 (reference ``init_t``).

    "sd3": t = (a·x) / (1 + b·x) with x = u·u, a = fl32(1/shift), b = fl32(1/shift - 1), each constant rounded once
    from double; with shift 3 the schedule ends at 1.0000001, and that value is what the last Euler step uses.
    "square": u·u. "piecewise": linear to 0.5 at u = 0.875, then linear to 1. "identity": u.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    _check_shortcut_mode(shortcut_mode)
    u = _grid(num_steps, shortcut_mode, device)
    if schedule == "sd3":
        if shift < 1.0:
            raise ValueError(f"shift must be >= 1, got {shift}")
        a = torch.tensor(1.0 / shift, dtype=torch.float32, device=u.device)
        b = torch.tensor(1.0 / shift - 1.0, dtype=torch.float32, device=u.device)
        x = u * u
        return (a * x) / (1 + b * x)
    if schedule == "square":
        return u * u
    if schedule == "piecewise":
        low = u < 0.875
        slope_low = torch.tensor(0.5 / 0.875, dtype=torch.float32, device=u.device)
        return torch.where(low, u * slope_low, 0.5 + (u - 0.875) * 4.0)
    if schedule == "identity":
        return u
    raise ValueError(f"unknown timestep schedule {schedule!r}; use one of {SCHEDULES}")


def init_interval(
    num_steps: int, shortcut_mode: str = "8,16,16", device: torch.device | str | None = None
) -> torch.Tensor:
    """Shortcut step sizes per call inside a stage (reference ``init_intervel``), indexed by the call's d.

    float32 ones in general; when num_steps is divisible by 3 the int64 pattern [2, 1, 1] ("8,16,16") or [1, 1, 2]
    ("16,16,8") repeated. Only the 12-step dt formula reads the value; the dtype is kept for parity.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    _check_shortcut_mode(shortcut_mode)
    if num_steps % 3:
        return torch.ones(num_steps, dtype=torch.float32, device=device)
    pattern = [1, 1, 2] if shortcut_mode == "16,16,8" else [2, 1, 1]
    return torch.tensor(pattern * (num_steps // 3), dtype=torch.int64, device=device)


def distill_dt(num_steps: int, distill_interval: float | int | torch.Tensor = 1.0) -> float:
    """The constant step-size value the distilled model embeds next to t (spec §2.4).

    2 · num_steps / 4 in general; 2 · 4 / distill_interval for the 12-step shortcut grid.
    """
    if num_steps == 12:
        interval = float(distill_interval)
        if interval <= 0:
            raise ValueError(f"distill_interval must be > 0, got {interval}")
        return 4 / interval * 2
    return num_steps / 4 * 2


def cfg_scales(
    t: float | torch.Tensor,
    cfg_t_range: Sequence[float],
    prev_chunk_scales: Sequence[float],
    text_scales: Sequence[float],
) -> tuple[float, float] | tuple[torch.Tensor, torch.Tensor]:
    """(s_prev, s_text) for a chunk at time t (reference ``get_cfg_scale``).

    idx = searchsorted(fl32(cfg_t_range) - 1e-7, t) - 1 in float32: the number of bucket edges (each lowered by
    1e-7) strictly below t, minus one. A float t gives floats; a tensor t gives float32 tensors of its shape.
    """
    if not (len(cfg_t_range) == len(prev_chunk_scales) == len(text_scales)) or not cfg_t_range:
        raise ValueError("cfg_t_range, prev_chunk_scales and text_scales must be non-empty and of equal length")
    as_tensor = isinstance(t, torch.Tensor)
    device = t.device if as_tensor else None
    edges = torch.tensor(list(cfg_t_range), dtype=torch.float32, device=device) - 1e-7
    t_value = t.to(torch.float32) if as_tensor else torch.tensor(float(t), dtype=torch.float32)
    idx = torch.searchsorted(edges, t_value.reshape(-1).contiguous()) - 1
    if idx.min().item() < 0 or idx.max().item() >= len(cfg_t_range):
        raise ValueError(f"t={t} falls outside cfg_t_range {list(cfg_t_range)}")
    prev = torch.tensor(list(prev_chunk_scales), dtype=torch.float32, device=device)[idx]
    text = torch.tensor(list(text_scales), dtype=torch.float32, device=device)[idx]
    if as_tensor:
        return prev.reshape(t.shape), text.reshape(t.shape)
    return prev.item(), text.item()


def nearly_clean(t_first_denoising: float | torch.Tensor, threshold: float = 0.3) -> bool:
    """The distill nearly-clean flag: the first denoising chunk's t, as a Python float, above ``threshold``.

    The comparison is in double against the float32 t, so t = fl32(0.3) = 0.30000001 sets the flag.
    """
    return float(t_first_denoising) > threshold


def chunk_timesteps(
    schedule: torch.Tensor, step_indices: Sequence[int], clean_t: float | None = None
) -> torch.Tensor:
    """Per-chunk t of a call, oldest first: schedule[step] for the window chunks, with fl32(clean_t) prepended for
    the extra clean chunk when ``clean_t`` is given (reference ``get_timestep``)."""
    t = schedule[list(step_indices)]
    if clean_t is not None:
        t = torch.cat([torch.full((1,), clean_t, dtype=schedule.dtype, device=schedule.device), t])
    return t


def euler_step(
    x: torch.Tensor,
    v: torch.Tensor,
    t_now: float | torch.Tensor,
    t_next: float | torch.Tensor,
) -> torch.Tensor:
    """x + v · (t_next - t_now), chunk-wise (reference ``integrate``).

    ``x``, ``v``: (N, C, T, H, W). ``t_now``/``t_next``: scalars, or one float32 value per chunk (shape (k,)), in
    which case T is split into k equal chunks, each advanced by its own Δt. Δt is formed in float32 from the two
    schedule values, never as a difference taken in double.
    """
    t_now = torch.as_tensor(t_now, dtype=torch.float32, device=x.device)
    t_next = torch.as_tensor(t_next, dtype=torch.float32, device=x.device)
    dt = t_next - t_now
    if dt.numel() == 1:
        return x + v * dt.reshape(())
    n, c, frames, h, w = x.shape
    k = dt.numel()
    if frames % k:
        raise ValueError(f"{frames} latent frames cannot be split into {k} chunks")
    out = x.reshape(n, c, k, frames // k, h, w) + v.reshape(n, c, k, frames // k, h, w) * dt.reshape(1, 1, k, 1, 1, 1)
    return out.reshape(n, c, frames, h, w)
