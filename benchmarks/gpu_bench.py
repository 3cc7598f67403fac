#!/usr/bin/env python3
"""magi-server GPU benchmark: one script, at most ~9 minutes on one H100, every section failing soft.

Run from the repository root (it imports the project's own modules):

    python benchmarks/gpu_bench.py                  # on the GPU machine; writes $OUT (or ./bench-out)
    python benchmarks/gpu_bench.py --dry-run        # every section on the CPU with the tiny preset (seconds)
    python benchmarks/gpu_bench.py --only dit --presets 24B-distill --layers-24b 48

Sections (in run order; each is timed out and recorded on failure, and the next one runs):
  env      torch / CUDA / cuDNN versions, the GPU, which SDPA kernel the attention dispatcher gets for the DiT shapes
  matmul   8192^3 GEMM peaks in the same run: bf16 and fp8 (torch._scaled_mm, sm >= 8.9)
  dit      one DiT call per preset at 480p (832x480) and 720p (1280x720): the steady-state window of the project's
           sampler planner (4 chunks, kv ranges of 2-5 chunks, one clean chunk read from the KV cache), random
           weights; seconds, TFLOP/s by spec section 11's FLOP count, share of the measured bf16 peak, peak memory.
           The 24B presets run with --layers-24b layers (default 8) and the 48-layer time is extrapolated.
  e2e      4.5B-distill 480p, 96 frames, 16 steps end to end through MagiPipeline (random weights; random caption
           embeddings unless --t5 DIR), MP4 output included
  compile  the 4.5B-distill 480p DiT call eager, then with the DiT's torch.compile path: speed ratio, compile time,
           graphs built and recompiles

Outputs: <out>/gpu_bench.json (every row of every section, with status/error/seconds) and <out>/gpu_bench.md (one
Markdown table per section), rewritten after each section so a killed run still leaves what it measured.
Random weights have the checkpoints' shapes and dtypes, so speed and memory are real; the video is noise.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import importlib.util
import json
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path
from types import MappingProxyType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's magi_server, wherever we run from

from magi_server.runtime.chunking import chunk_layout, plan_sampler_calls, tokens_per_chunk  # noqa: E402
from magi_server.models.config import TINY_VAE, DiTConfig, VAEConfig, preset  # noqa: E402
from magi_server.runtime.loading import build_dit  # noqa: E402
from magi_server.models import attention  # noqa: E402
from magi_server.models.dit import KVCache  # noqa: E402
from magi_server.runtime.timesteps import distill_dt, init_t  # noqa: E402

SIZES = {"480p": (832, 480), "720p": (1280, 720)}  # (width, height)
DRY_SIZES = {"480p": (64, 64), "720p": (96, 64)}
DIT_PRESETS = ("24B-distill", "4.5B-distill", "24B-distill-quant", "4.5B-distill-quant")
TEXT_TOKENS = 100  # valid caption tokens per chunk, as spec section 11 assumes for text passes
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


# ------------------------------------------------------------------------------------------------ FLOPs (spec §11)
def spec_flops(cfg: DiTConfig, tpc: int, kv_ranges, text_tokens: int = TEXT_TOKENS) -> dict:
    """FLOPs of one DiT call counted as spec section 11 does (multiply-add = 2; elementwise work and the <0.5 %
    caption projection left out): linear per token per layer f_lin = 2h(2Q + 2KVd) + 2(2Q)h + 2hF(2 if SwiGLU) +
    2Fh; self-attention 4Q per (query, key) pair per layer; cross-attention 4Q per (token, caption token)."""
    h, f, layers = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    q = cfg.num_attention_heads * cfg.kv_channels
    kvd = cfg.num_query_groups * cfg.kv_channels
    f_lin = 2 * h * (2 * q + 2 * kvd) + 2 * (2 * q) * h + 2 * h * f * (2 if cfg.gated_linear_unit else 1) + 2 * f * h
    tokens = len(kv_ranges) * tpc
    linear = tokens * f_lin * layers
    self_attn = sum(tpc * (end - start) for start, end in kv_ranges) * 4 * q * layers
    cross_attn = tokens * text_tokens * 4 * q * layers
    return {"linear": linear, "self_attn": self_attn, "cross_attn": cross_attn,
            "total": linear + self_attn + cross_attn}


def window_call(cfg: DiTConfig, width: int, height: int, steps: int = 16):
    """The planner's steady-state call: 4 window chunks, no extra clean chunk, one clean chunk in the KV cache."""
    tpc = tokens_per_chunk(height // 8, width // 8, 6, cfg.patch_size, cfg.t_patch_size)
    plan = plan_sampler_calls(chunk_layout(240), num_steps=steps, window_size=4, tokens_per_chunk=tpc)
    call = next(c for c in plan.calls if c.num_window_chunks == 4 and not c.extra_clean_chunk and c.slice_point >= 1)
    return call, tpc


# ------------------------------------------------------------------------------------------------ plumbing
class Report:
    """Rows per section, written as JSON and Markdown after every section."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.meta, self.sections = out, meta, {}

    def row(self, section: str, **fields) -> dict:
        self.sections.setdefault(section, {"status": "running", "rows": []})["rows"].append(fields)
        print(json.dumps({"section": section, **fields}, default=str), flush=True)
        return fields

    def close(self, section: str, status: str, seconds: float, error: str | None = None) -> None:
        entry = self.sections.setdefault(section, {"rows": []})
        entry.update(status=status, seconds=round(seconds, 1))
        if error:
            entry["error"] = error
        self.write()

    def write(self) -> None:
        data = {"meta": self.meta, "sections": self.sections}
        (self.out / "gpu_bench.json").write_text(json.dumps(data, indent=1, default=str))
        (self.out / "gpu_bench.md").write_text(self.markdown())

    def markdown(self) -> str:
        m = self.meta
        lines = [f"# magi-server GPU benchmark: {m.get('gpu') or m['device']}", "",
                 f"{m['date']}, torch {m['torch']}, `{m['command']}`", ""]
        for name, entry in self.sections.items():
            lines += [f"## {name}: {entry['status']} ({entry.get('seconds', '?')} s)", ""]
            if entry.get("error"):
                lines += [f"error: `{entry['error'].splitlines()[0][:300]}`", ""]
            previous = None
            for row in entry["rows"]:  # one table per run of rows with the same fields
                keys = [k for k in row if k != "per_call_s"]
                if keys != previous:
                    lines += ([""] if previous else []) + ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                    previous = keys
                lines.append("| " + " | ".join(_cell(row[k]) for k in keys) + " |")
            lines.append("")
        return "\n".join(lines)


def sig(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (CPU dry runs give tiny numbers)."""
    return float(f"{value:.{digits}g}")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/").replace("\n", " ")[:120]


class SectionTimeout(BaseException):
    """Not an Exception: the per-preset ``except Exception`` inside a section must not swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """SectionTimeout in the main thread after ``seconds`` (raised when Python code next runs)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        raise SectionTimeout(f"section ran past its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, iters: int = 1, warmup: int = 1) -> float:
    """Median seconds of fn() over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------------------------------------ random models
def dit_config(name: str, dry_run: bool, layers: int | None = None) -> DiTConfig:
    """The preset's DiT config; in a dry run the tiny one (with fp8 linears, 3 layers, for a quant preset)."""
    if dry_run:
        cfg = preset("tiny").dit
        if preset(name).dit.fp8_quant:
            cfg = dataclasses.replace(cfg, fp8_quant=True, num_layers=3)
        return cfg
    cfg = preset(name).dit
    return dataclasses.replace(cfg, num_layers=layers) if layers else cfg


def random_dit(cfg: DiTConfig, device: torch.device):
    """The project's DiT built on meta (``loading.build_dit``) and materialized on ``device`` with random values
    shaped like a checkpoint: fp32-kept weights hold bf16 values (what a bf16 checkpoint gives after promotion)."""
    model = build_dit(cfg).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    bands = type(model.rope)(cfg.hidden_size // cfg.num_attention_heads).bands
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.dtype in FP8:
                for row in t.view(-1, t.shape[-1]).split(4096):  # bounded fp32 temporaries
                    row.copy_((torch.randn(row.shape, device=device, generator=gen) * 32).clamp(-448, 448))
            elif name.endswith("weight_scale"):
                t.fill_(0.02 / 32)
            elif name.endswith(("input_scale", "smooth_scale")):
                t.fill_(1.0)
            elif name.endswith("rope.bands"):
                t.copy_(bands)
            elif t.is_floating_point():
                t.normal_(0.0, 0.02, generator=gen)
                if t.dtype == torch.float32:
                    t.copy_(t.to(torch.bfloat16))
    if hasattr(model, "note_bf16_exact_weights"):
        model.note_bf16_exact_weights()
    return model.eval().requires_grad_(False)


def random_vae(device: torch.device, dry_run: bool):
    from magi_server.models.vae import ViTVAE

    with torch.device("meta"):
        vae = ViTVAE(TINY_VAE if dry_run else VAEConfig())
    vae = vae.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for t in vae.parameters():
            t.normal_(0.0, 0.02, generator=gen)
    return vae.to(torch.bfloat16).eval().requires_grad_(False)


class DitCall:
    """Inputs of one steady-state DiT call, with the clean chunk the window reads already in the KV cache."""

    def __init__(self, model, width: int, height: int, device: torch.device, steps: int = 16):
        cfg = model.config
        self.call, self.tpc = window_call(cfg, width, height, steps)
        chunks = self.call.range_num - self.call.slice_point
        gen = torch.Generator(device=device).manual_seed(2)
        self.x = torch.randn(1, cfg.latent_channels, 6 * chunks, height // 8, width // 8, device=device,
                             generator=gen)
        self.t = init_t(steps, device=device)[list(self.call.step_indices)][None]
        self.captions = torch.randn(chunks, cfg.caption_max_length, cfg.caption_channels, device=device,
                                    generator=gen) * 0.1
        self.mask = torch.zeros(chunks, cfg.caption_max_length, dtype=torch.int64, device=device)
        self.mask[:, :TEXT_TOKENS] = 1
        self.kv_ranges = [list(r) for r in self.call.kv_ranges]
        self.dt = distill_dt(steps) if cfg.distill else None
        self.cache = KVCache(cfg.num_layers, dtype=model.compute_dtype, device=device, tokens_per_chunk=self.tpc)
        first = min(start for start, _ in self.call.kv_ranges) // self.tpc
        rows = torch.randn(self.tpc, cfg.num_query_groups, 2 * cfg.kv_channels, device=device, generator=gen)
        rows = rows.to(model.compute_dtype)
        for layer in range(cfg.num_layers):
            for chunk in range(first, self.call.slice_point):
                self.cache.write(layer, chunk, rows)
        self.flops = spec_flops(cfg, self.tpc, self.call.kv_ranges)

    def __call__(self, model):
        return model(self.x, self.t, self.captions, self.mask, self.kv_ranges, [False],
                     slice_point=self.call.slice_point, dt=self.dt, kv_cache=self.cache, write_cache=False)


# ------------------------------------------------------------------------------------------------ sections
def sec_env(args, report: Report) -> None:
    dev = args.device
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(dev),
            "sdpa_enable_gqa": getattr(attention, "SDPA_ENABLE_GQA", "n/a"),
            "sdpa_set_priority": getattr(attention, "SDPA_SET_PRIORITY", "n/a")}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gb=round(p.total_memory / 1e9, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    info["triton"] = getattr(_optional("triton"), "__version__", "unavailable")
    info["imageio_ffmpeg"] = importlib.util.find_spec("imageio_ffmpeg") is not None
    info["backends_bf16"] = attention.available_backends(dev, torch.bfloat16)
    info["auto_backend"] = attention.select_backend(dev, torch.bfloat16)
    report.row("env", **info)
    choice = getattr(attention, "sdpa_choice", None)
    if dev.type != "cuda" or choice is None:
        report.row("env", sdpa_kernel="n/a (CPU, or this tree's attention has no sdpa_choice)")
        return
    # the fused kernel SDPA picks, as the dispatcher calls it, for one 720p query chunk against its keys
    for label, hq, hk, d, keys in (("24B self-attn, 5 key chunks (GQA 48/8)", 48, 8, 128, 5 * 21600),
                                   ("4.5B self-attn, 5 key chunks (GQA 24/8)", 24, 8, 128, 5 * 21600),
                                   ("24B, k/v expanded (48/48)", 48, 48, 128, 5 * 21600),
                                   ("cross-attn, 100 caption tokens (48/8)", 48, 8, 128, 100),
                                   ("VAE tile (16/16, head dim 64)", 16, 16, 64, 3073)):
        q = torch.randn(21600 if keys != 3073 else 3073, hq, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(keys, hk, d, device=dev, dtype=torch.bfloat16)
        report.row("env", shape=label, sdpa_kernel=choice(q, k, k))
        del q, k


def _optional(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - absent or broken: the same for a report
        return None


def sec_matmul(args, report: Report) -> None:
    dev = args.device
    n = 512 if args.dry_run else 8192
    iters = 2 if args.dry_run else 20
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    seconds = timed(lambda: a @ b, dev, iters=iters, warmup=3)
    args.bf16_peak = 2 * n**3 / seconds / 1e12
    report.row("matmul", dtype="bf16", n=n, tflops=sig(args.bf16_peak))
    if dev.type != "cuda" or torch.cuda.get_device_capability(dev) < (8, 9):
        report.row("matmul", dtype="fp8 e4m3", n=n, skipped="needs a CUDA GPU with sm >= 8.9")
        return
    a8 = a.to(torch.float8_e4m3fn)
    b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()  # column-major, as _scaled_mm wants
    one = torch.ones((), device=dev)
    seconds = timed(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), dev,
                    iters=iters, warmup=3)
    args.fp8_peak = 2 * n**3 / seconds / 1e12
    report.row("matmul", dtype="fp8 e4m3 (_scaled_mm)", n=n, tflops=sig(args.fp8_peak))


def sec_dit(args, report: Report) -> None:
    dev = args.device
    for name in args.presets:
        full = preset(name).dit.num_layers
        layers = args.layers_24b if name.startswith("24B") and args.layers_24b < full else None
        try:
            model = random_dit(dit_config(name, args.dry_run, layers), dev)
        except Exception as exc:  # noqa: BLE001 - one preset failing (OOM) must not stop the others
            report.row("dit", preset=name, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            free_memory()
            continue
        weights_gb = round(torch.cuda.memory_allocated(dev) / 1e9, 2) if dev.type == "cuda" else None
        for res in ("720p", "480p"):
            width, height = (DRY_SIZES if args.dry_run else SIZES)[res]
            try:
                call = DitCall(model, width, height, dev)
                reset_peak(dev)
                seconds = timed(lambda: call(model), dev, iters=1, warmup=1)
                flops = call.flops["total"]
                tflops = flops / seconds / 1e12
                scale = 1 if args.dry_run else full / model.config.num_layers
                fp8_peak = args.fp8_peak if model.config.fp8_quant else None
                report.row("dit", preset=name + (" (tiny stand-in)" if args.dry_run else ""), res=f"{width}x{height}",
                           layers=model.config.num_layers, tokens=len(call.kv_ranges) * call.tpc,
                           kv_chunks="/".join(str((e - s) // call.tpc) for s, e in call.kv_ranges),
                           seconds=sig(seconds), full_model_s=sig(seconds * scale),
                           spec_pflop_full=sig(flops * scale / 1e15), tflops=sig(tflops),
                           bf16_peak_share=sig(tflops / args.bf16_peak, 3) if args.bf16_peak else None,
                           fp8_peak_share=sig(tflops / fp8_peak, 3) if fp8_peak else None,
                           attn_share=round((call.flops["self_attn"] + call.flops["cross_attn"]) / flops, 3),
                           weights_gb=weights_gb, peak_gb=peak_gb(dev))
                del call
            except Exception as exc:  # noqa: BLE001
                report.row("dit", preset=name, res=f"{width}x{height}", error=f"{type(exc).__name__}: {str(exc)[:300]}")
            free_memory()
        del model
        free_memory()


def sec_e2e(args, report: Report) -> None:
    from magi_server.models.text_encoder import SpecialTokens
    from magi_server.runtime.model_runner import ModelRunner
    from magi_server.runtime.pipeline import MagiPipeline

    dev = args.device
    cfg = preset("tiny" if args.dry_run else "4.5B-distill")
    dit = random_dit(cfg.dit, dev)
    vae = random_vae(dev, args.dry_run)
    width_c = cfg.dit.caption_channels
    gen = torch.Generator().manual_seed(3)
    tokens = SpecialTokens(caption=torch.randn(1, width_c, generator=gen).half(),
                           logo=torch.randn(1, width_c, generator=gen).half(),
                           other=torch.randn(20, width_c, generator=gen).half())
    text_encoder = None
    if args.t5:
        from magi_server.runtime.loading import load_text_encoder

        text_encoder = load_text_encoder(args.t5, device="cpu")
    pipe = MagiPipeline(ModelRunner(dit, vae, text_encoder, tokens, cfg, device=dev))
    width, height = (64, 64) if args.dry_run else SIZES["480p"]
    frames, steps = (48, 8) if args.dry_run else (96, 16)
    # the MP4 writer runs the ffmpeg binary that imageio-ffmpeg ships; without it the frames are decoded, not encoded
    mp4 = importlib.util.find_spec("imageio_ffmpeg") is not None
    kwargs = dict(num_frames=frames, height=height, width=width, num_inference_steps=steps, seed=0,
                  output_type="mp4" if mp4 else "np")
    if mp4:
        kwargs["output_path"] = str(args.out / "e2e.mp4")
    if text_encoder is not None:
        kwargs["prompt"] = "a red fox running through fresh snow at sunrise, cinematic"
    else:
        length = cfg.dit.caption_max_length
        mask = torch.zeros(length, dtype=torch.int64)
        mask[:TEXT_TOKENS] = 1
        kwargs.update(prompt_embeds=torch.randn(length, width_c, generator=gen) * 0.1, prompt_attention_mask=mask)

    calls = []

    def on_step(done, total):
        sync(dev)
        calls.append(time.perf_counter())

    smooth = mp4 and args.smooth_mp4
    if smooth:  # random weights decode to noise, which x264 encodes several times slower than real footage
        decode = pipe.runner.decode_chunk
        pipe.runner.decode_chunk = lambda chunk: _smooth_like(decode(chunk), chunk.index)
    reset_peak(dev)
    sync(dev)
    start = time.perf_counter()
    out = pipe(**kwargs, callback_on_step=on_step)
    sync(dev)
    total = time.perf_counter() - start
    gaps = [round(b - a, 3) for a, b in zip([start, *calls], calls)]
    report.row("e2e", model=("tiny stand-in" if args.dry_run else "4.5B-distill"), res=f"{width}x{height}",
               frames=out.num_frames, steps=steps, total_s=round(total, 2), dit_calls=len(calls),
               slowest_call_s=max(gaps) if gaps else None, after_last_call_s=round(start + total - calls[-1], 2)
               if calls else None, peak_gb=peak_gb(dev), captions="T5" if text_encoder else "random embeddings",
               mp4=("smooth stand-in frames" if smooth else "decoded frames") if mp4
               else "not encoded (imageio-ffmpeg missing)", per_call_s=gaps)


def _smooth_like(frames, index: int):
    """A moving smooth pattern with the shape and dtype of ``frames`` (T, H, W, 3) uint8."""
    import numpy as np

    n, h, w, _ = frames.shape
    yy, xx = np.mgrid[0:h, 0:w]
    out = [(np.sin(xx / 37 + (index * n + i) / 5) + np.cos(yy / 23)) * 60 + 128 for i in range(n)]
    return np.repeat(np.clip(np.stack(out), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def sec_compile(args, report: Report) -> None:
    from torch._dynamo.utils import counters

    dev = args.device
    model = random_dit(dit_config("4.5B-distill", args.dry_run), dev)
    enable = getattr(model, "set_compiled", None)
    if enable is None:
        report.row("compile", skipped="the DiT has no set_compiled(): no compile path to compare")
        return
    width, height = (DRY_SIZES if args.dry_run else SIZES)["480p"]
    call = DitCall(model, width, height, dev)
    eager = timed(lambda: call(model), dev, iters=1 if args.dry_run else 2, warmup=1)
    torch._dynamo.reset()
    counters.clear()
    enable(True)
    try:
        sync(dev)
        start = time.perf_counter()
        call(model)  # compiles
        sync(dev)
        first = time.perf_counter() - start
        graphs = int(counters["stats"]["unique_graphs"])
        compiled = timed(lambda: call(model), dev, iters=1 if args.dry_run else 2, warmup=0)
        recompiles = int(counters["stats"]["unique_graphs"]) - graphs
    finally:
        enable(False)
    report.row("compile", preset="4.5B-distill" + (" (tiny stand-in)" if args.dry_run else ""),
               res=f"{width}x{height}", eager_s=sig(eager), compiled_s=sig(compiled),
               speedup=sig(eager / compiled, 3), first_compiled_call_s=sig(first, 3), graphs=graphs,
               graphs_built_after_first_call=recompiles, tflops_eager=sig(call.flops["total"] / eager / 1e12),
               tflops_compiled=sig(call.flops["total"] / compiled / 1e12))


SECTIONS = MappingProxyType({  # name -> (function, time limit in seconds on the GPU), in run order
    "env": (sec_env, 60),
    "matmul": (sec_matmul, 60),
    "dit": (sec_dit, 240),
    "e2e": (sec_e2e, 180),
    "compile": (sec_compile, 200),
})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every section on the CPU with the tiny preset")
    ap.add_argument("--only", default="", help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    ap.add_argument("--presets", default=",".join(DIT_PRESETS), help="dit section: presets to run")
    ap.add_argument("--layers-24b", type=int, default=8,
                    help="layers of the 24B DiTs in the dit section; the 48-layer time is extrapolated (48 = full)")
    ap.add_argument("--budget-s", type=float, default=510.0, help="no section starts after this many seconds")
    ap.add_argument("--t5", default=None, help="e2e: T5 folder for real caption embeddings (default random ones)")
    ap.add_argument("--noise-mp4", dest="smooth_mp4", action="store_false",
                    help="e2e: encode the decoded noise rather than a smooth stand-in of the same size")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else ./bench-out)")
    args = ap.parse_args(argv)

    args.out = Path(args.out or os.environ.get("OUT") or "bench-out")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: running the dry run instead", file=sys.stderr)
        args.dry_run = True
    args.device = torch.device("cpu" if args.dry_run else "cuda")
    args.presets = [p for p in args.presets.split(",") if p]
    args.bf16_peak = args.fp8_peak = None
    chosen = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/gpu_bench.py", *(sys.argv[1:] if argv is None else argv)]),
            "torch": torch.__version__, "device": str(args.device), "dry_run": args.dry_run,
            "gpu": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None}
    report = Report(args.out, meta)
    deadline = time.monotonic() + args.budget_s
    for name in chosen:
        fn, limit = SECTIONS[name]
        left = deadline - time.monotonic()
        if left < 15:
            report.close(name, "skipped", 0.0, error=f"time budget spent ({left:.0f} s left)")
            continue
        start = time.monotonic()
        try:
            with time_limit(min(limit, left) if not args.dry_run else max(left, 300)):
                fn(args, report)
            report.close(name, "done", time.monotonic() - start)
        except (Exception, SectionTimeout) as exc:  # noqa: BLE001 - fail soft: record and go on
            error = f"{type(exc).__name__}: {str(exc)[:400]}\n{traceback.format_exc(limit=-3)[-1500:]}"
            report.close(name, "failed", time.monotonic() - start, error=error)
        free_memory()
    failed = [n for n, s in report.sections.items() if s["status"] != "done"]
    print(f"wrote {args.out / 'gpu_bench.json'} and {args.out / 'gpu_bench.md'}; not done: {failed or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
