"""Op-by-op accounting of PyTorch code: FLOPs by kind, bytes moved, kernel launches and the peak of live memory.

This file owns :class:`OpAccountant`, a ``TorchDispatchMode`` that watches every aten op a piece of code runs on
one device type (``meta`` by default, so real models run at real shapes with no memory and no GPU), and the small
records it fills in. It knows nothing about any particular model; :mod:`magi_server.tools.plan` drives it.

What is counted, per op that touches a tensor of the watched device type:

* **FLOPs by kind** (multiply-add = 2): ``attention`` for any fused ``_scaled_dot_product_*`` /
  ``_flash_attention_forward`` / ``_efficient_attention_forward`` op (2·B·Hq·Sq·Sk·(D + Dv), i.e. 4·B·Hq·Sq·Sk·D);
  GEMMs (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``mm.dtype``, ``mv``…) by operand dtype as ``gemm_bf16`` (bf16 or
  fp16 operands, whatever the output dtype), ``gemm_fp32``, ``gemm_fp8`` (also every ``_scaled_mm``) or
  ``gemm_other``; ``conv`` for convolutions (2 · output elements · Cin/groups · kernel volume). Element-wise work
  is not counted as FLOPs (it is bandwidth-bound; see bytes).
* **bytes moved**: a simple model, the bytes of every tensor argument read plus every output written, for ops that
  launch a kernel (tensors written in place count once, as writes; broadcast (stride-0) dimensions count once).
* **kernels**: ops that launch a kernel; views, ``empty*`` and other metadata-only ops are excluded.
* **peak live memory**: every output's untyped storage is tracked once (views share it) with a weak reference, so
  its bytes leave the live total when the last tensor using it dies, as with the caching allocator; the baseline is
  what the caller registers with :meth:`OpAccountant.track` (weights, caches) before or while the mode runs.
* **roofline time** (optional): per op, max(FLOPs / rate of its kind and dtype, bytes / bandwidth) for each
  :class:`Roofline` given, summed over ops (ops run one after another on one stream).
* **phases** (``with acc.phase(name)`` or ``push_phase``/``pop_phase``, e.g. from module hooks): the same counts
  and the peak per phase; with ``segments=True`` also the ordered stretches of ops between phase changes, from
  which :func:`repeat_segments` extrapolates a run to a deeper stack of identical layers.
* **host tensors**: :meth:`OpAccountant.mark_host` declares a watched tensor's storage host memory (a stand-in
  for an offloaded copy), so it leaves the device total.

Running code on ``meta`` needs values in a few places (boolean masks, ``.tolist()``, ``.item()``). Small tensors
therefore carry a CPU **shadow** of their values: a meta tensor copied from a CPU tensor (``.to("meta")``) keeps
the CPU values, an op whose meta inputs all have shadows computes its output's shadow on the CPU, and reading
such a tensor back (``.item()``, ``.tolist()``, ``.cpu()``) returns the shadow. Ops with data-dependent output
shapes (``nonzero``, boolean indexing, ``masked_select``) run on the CPU with the shadows and zero stand-ins for
the other inputs, and return meta tensors of the right shape. Tensors created by ``torch.tensor(..., device=
"meta")`` dispatch no op and carry no values: build small value tensors on the CPU and move them.

:class:`MetaFunctions` is the companion ``TorchFunctionMode`` the accountant enters with itself: it keeps the
values of Python index lists, and (``fused_attention``, the default) runs ``F.scaled_dot_product_attention`` on
meta tensors as the fused flash kernel a GPU would run instead of the math decomposition, which would materialise
the whole fp32 score matrix and count its GEMMs as fp32 GEMMs.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten

FLOP_KINDS = ("attention", "gemm_bf16", "gemm_fp32", "gemm_fp8", "gemm_other", "conv")

_SIXTEEN_BIT = (torch.bfloat16, torch.float16)
_FP8 = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)

# Ops that allocate or re-describe memory without launching a kernel (views are found from the schema).
_NO_KERNEL = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::_unsafe_view", "aten::lift_fresh", "aten::detach", "aten::alias", "aten::resize_", "aten::set_",
    "aten::_local_scalar_dense", "aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset",
    "aten::is_same_size", "aten::_reshape_alias", "aten::_has_compatible_shallow_copy_type", "aten::record_stream",
})
_MM = frozenset({"aten::mm", "aten::addmm", "aten::_addmm_activation", "aten::bmm", "aten::baddbmm",
                 "aten::mv", "aten::addmv", "aten::dot", "aten::_scaled_mm"})
_CONV = frozenset({"aten::convolution", "aten::_convolution", "aten::conv2d", "aten::conv3d", "aten::conv1d",
                   "aten::cudnn_convolution", "aten::mkldnn_convolution"})
# (B, S, H, D) layout instead of (B, H, S, D)
_ATTENTION_BSHD = frozenset({"aten::_flash_attention_forward", "aten::_efficient_attention_forward"})
# Tensors of more elements carry no CPU shadow of their values (see the module docstring).
_VALUE_LIMIT = 1 << 16


@dataclass(frozen=True)
class Roofline:
    """A GPU's peak rates (FLOP/s) and memory bandwidth (bytes/s) for the roofline time of each op."""

    name: str
    bf16_flops: float
    fp8_flops: float
    fp32_flops: float
    tf32_flops: float
    bandwidth: float

    def rate(self, kind: str, dtype: torch.dtype | None) -> float:
        """FLOP/s an op of ``kind`` with operands of ``dtype`` can reach (fp32 convolutions run as TF32, the cuDNN
        default; fp32 GEMMs as true fp32, the cuBLAS default)."""
        if kind == "gemm_fp8":
            return self.fp8_flops
        if kind == "gemm_fp32":
            return self.fp32_flops
        if kind == "conv":
            return self.bf16_flops if dtype in _SIXTEEN_BIT else self.tf32_flops
        if kind == "attention":
            return self.fp32_flops if dtype == torch.float32 else self.bf16_flops
        return self.bf16_flops if dtype in _SIXTEEN_BIT or kind == "gemm_bf16" else self.fp32_flops

    def op_seconds(self, kind: str | None, dtype: torch.dtype | None, flops: int, nbytes: int) -> float:
        compute = flops / self.rate(kind, dtype) if flops and kind else 0.0
        return max(compute, nbytes / self.bandwidth)


@dataclass
class OpStats:
    """Totals over a stretch of ops (the whole run or one phase)."""

    flops: dict[str, int] = field(default_factory=lambda: {kind: 0 for kind in FLOP_KINDS})
    bytes: int = 0
    kernels: int = 0
    ops: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # roofline time per Roofline name
    peak_bytes: int = 0  # highest live total seen while this stretch ran
    start_bytes: int = 0  # live total when it began

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    def add(self, other: "OpStats", times: int = 1) -> None:
        """Accumulate ``times`` repetitions of ``other`` (peaks take the max)."""
        for kind, value in other.flops.items():
            self.flops[kind] = self.flops.get(kind, 0) + value * times
        self.bytes += other.bytes * times
        self.kernels += other.kernels * times
        self.ops += other.ops * times
        for name, value in other.seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + value * times
        self.peak_bytes = max(self.peak_bytes, other.peak_bytes)

    def as_dict(self) -> dict:
        return {
            "flops": dict(self.flops), "total_flops": self.total_flops, "bytes": self.bytes, "kernels": self.kernels,
            "ops": self.ops, "roofline_s": dict(self.seconds), "peak_bytes": self.peak_bytes,
            "start_bytes": self.start_bytes,
        }


@dataclass
class Segment:
    """A stretch of ops between two phase changes: the phase path it ran under, live bytes at its start, peak
    and end, and its counts."""

    path: tuple[str, ...]
    start_bytes: int
    peak_bytes: int
    end_bytes: int
    stats: OpStats = field(default_factory=OpStats)


def repeat_segments(segments: Iterable[Segment], extra: Mapping[str, int]) -> tuple[OpStats, int, int]:
    """(counts, peak live bytes, end live bytes) of the run had every segment whose innermost phase is a key of
    ``extra`` run ``extra[name]`` more times in a row (e.g. a layer stack deeper than the one accounted).

    The repeated unit is that segment plus the stretches that follow it up to the next phase change that is not a
    return to its parent (so the caller's freeing of the layer's input, after the layer returned, is part of it).
    A copy starts where the previous one ended, so the live total drifts by the unit's growth per copy (e.g. the
    cache rows it writes), and every later stretch is shifted by the accumulated drift. The peak is the largest
    shifted peak (for a repeated unit, that of its first or its last copy)."""
    segments = list(segments)
    total = OpStats()
    offset, peak, end = 0, 0, 0
    i = 0
    while i < len(segments):
        seg = segments[i]
        n = extra.get(seg.path[-1], 0) if seg.path else 0
        j = i + 1
        if n:
            parent = seg.path[:-1]
            while j < len(segments) and segments[j].path == parent:
                j += 1
        unit = segments[i:j]
        # up to where the next stretch starts: frees between two stretches (no op ran) belong to the unit
        growth = (segments[j].start_bytes if j < len(segments) else unit[-1].end_bytes) - unit[0].start_bytes
        for part in unit:
            peak = max(peak, part.peak_bytes + offset, part.peak_bytes + offset + n * growth)
            total.add(part.stats, 1 + n)
        offset += n * growth
        end = unit[-1].end_bytes + offset
        i = j
    total.peak_bytes = peak
    return total, peak, end


def _dims_bytes(t: torch.Tensor) -> int:
    """Bytes an op reads or writes for ``t``: broadcast (stride-0) dimensions count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, torch.Tensor):
                yield item
            elif isinstance(item, (list, tuple)):
                yield from _tensors(item)


def _gemm_kind(dtype: torch.dtype) -> str:
    if dtype in _SIXTEEN_BIT:
        return "gemm_bf16"
    if dtype == torch.float32:
        return "gemm_fp32"
    if dtype in _FP8:
        return "gemm_fp8"
    return "gemm_other"


def op_flops(name: str, args: tuple, out) -> tuple[str | None, int, torch.dtype | None]:
    """(kind, FLOPs, operand dtype) of one aten op (kind None: not counted)."""
    if name.startswith("aten::_scaled_dot_product") and "backward" not in name:
        q, k, v = args[0], args[1], args[2]
        b = math.prod(q.shape[:-3])
        hq, sq, d = q.shape[-3], q.shape[-2], q.shape[-1]
        return "attention", 2 * b * hq * sq * k.shape[-2] * (d + v.shape[-1]), q.dtype
    if name in _ATTENTION_BSHD:
        q, k, v = args[0], args[1], args[2]
        b, sq, hq, d = q.shape
        return "attention", 2 * b * hq * sq * k.shape[1] * (d + v.shape[-1]), q.dtype
    if name in _MM:
        if name in ("aten::addmm", "aten::_addmm_activation", "aten::baddbmm", "aten::addmv"):
            a, b = args[1], args[2]
        else:
            a, b = args[0], args[1]
        if name == "aten::dot":
            flops = 2 * a.shape[0]
        elif name in ("aten::mv", "aten::addmv"):
            flops = 2 * a.shape[0] * a.shape[1]
        else:
            flops = 2 * math.prod(a.shape) * b.shape[-1]
        kind = "gemm_fp8" if name == "aten::_scaled_mm" else _gemm_kind(a.dtype)
        return kind, flops, a.dtype
    if name in _CONV:
        x, w = args[0], args[1]
        transposed = bool(args[6]) if name in ("aten::convolution", "aten::_convolution") and len(args) > 6 else False
        groups = int(args[8]) if name in ("aten::convolution", "aten::_convolution") and len(args) > 8 else 1
        kernel = math.prod(w.shape[2:])
        if transposed:
            flops = 2 * x.numel() * w.shape[1] * kernel
        else:
            first = out[0] if isinstance(out, (list, tuple)) else out
            flops = 2 * first.numel() * (x.shape[1] // groups) * kernel
        return "conv", flops, x.dtype
    return None, 0, None


class _NoShadow(Exception):
    """A watched tensor without CPU values (internal)."""


class OpAccountant(TorchDispatchMode):
    """Counts FLOPs, bytes, kernels and live memory of the ops run on ``device_type`` while the mode is active.

    Usage::

        acc = OpAccountant(rooflines=[H100])
        acc.track(model.parameters())            # the baseline: what already lives on the device
        with acc:
            with acc.phase("forward"):
                model(x)
        acc.total.flops, acc.peak_bytes, acc.phases["forward"].peak_bytes

    ``track`` may be called at any time for tensors made outside the mode. Storages are counted once each.
    """

    def __init__(
        self, *, device_type: str = "meta", rooflines: Iterable[Roofline] = (), by_op: bool = False,
        fused_attention: bool = True, segments: bool = False,
    ) -> None:
        super().__init__()
        self.device_type = device_type
        self.fused_attention = fused_attention
        self._function_modes: list[MetaFunctions] = []
        self.rooflines = tuple(rooflines)
        self.total = OpStats()
        self.phases: dict[str, OpStats] = {}
        self._phase_stack: list[OpStats] = []
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_op: str | None = None  # the op (and phase) at which the peak was reached
        self.by_op: dict[str, list[int]] | None = {} if by_op else None  # name -> [calls, flops, bytes]
        self._storages: dict[int, tuple[weakref.ref, int]] = {}
        self._func_info: dict = {}
        self._host: dict[int, weakref.ref] = {}  # storages declared host memory (mark_host)
        self._shadows: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._phase_names: list[str] = []
        # the ordered stretches of ops between phase changes, when asked for (see repeat_segments)
        self.segments: list[Segment] | None = [] if segments else None
        self._segment = Segment((), 0, 0, 0)

    def __enter__(self):
        self._segment = Segment(tuple(self._phase_names), self.live_bytes, self.live_bytes, self.live_bytes)
        functions = MetaFunctions(self.device_type, self.fused_attention)
        functions.__enter__()
        self._function_modes.append(functions)
        try:
            return super().__enter__()
        except BaseException:
            self._function_modes.pop().__exit__(None, None, None)
            raise

    def __exit__(self, exc_type, exc, tb):
        self._close_segment()
        try:
            return super().__exit__(exc_type, exc, tb)
        finally:
            self._function_modes.pop().__exit__(exc_type, exc, tb)

    # ------------------------------------------------------------------------------------------ memory tracking
    def track(self, tensors: Iterable[torch.Tensor] | torch.Tensor) -> int:
        """Register tensors that already exist (weights, caches) as live; returns the bytes newly counted."""
        added = 0
        for t in _tensors(list(tensors) if not isinstance(tensors, torch.Tensor) else tensors):
            added += self._track_storage(t)
        self._note_peak("track")
        return added

    def mark_host(self, t: torch.Tensor) -> int:
        """Declare ``t``'s storage host memory although it is a ``device_type`` tensor here (a stand-in for a CPU
        copy, e.g. an offloaded cache): it leaves the live total and is never counted again. Returns the bytes."""
        st = t.untyped_storage()
        key = id(st)
        self._host[key] = weakref.ref(st, lambda ref, key=key, host=self._host: host.pop(key, None))
        entry = self._storages.pop(key, None)
        if entry is not None and entry[0]() is st:
            self.live_bytes -= entry[1]
            return entry[1]
        return 0

    def _track_storage(self, t: torch.Tensor) -> int:
        if t.device.type != self.device_type:
            return 0
        st = t.untyped_storage()
        key = id(st)
        host = self._host.get(key)
        if host is not None and host() is st:
            return 0
        entry = self._storages.get(key)
        nbytes = st.nbytes()
        if entry is not None and entry[0]() is st:
            if entry[1] != nbytes:  # resized in place
                self.live_bytes += nbytes - entry[1]
                self._storages[key] = (entry[0], nbytes)
            return 0
        storages = self._storages

        def died(ref, key=key, account=weakref.ref(self)):
            me = account()
            current = storages.get(key)
            if me is not None and current is not None and current[0] is ref:
                me.live_bytes -= current[1]
                del storages[key]

        self._storages[key] = (weakref.ref(st, died), nbytes)
        self.live_bytes += nbytes
        return nbytes

    def _note_peak(self, where: str) -> None:
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_op = f"{where} in {self._phase_names[-1]}" if self._phase_names else where
        for stats in self._phase_stack:
            if self.live_bytes > stats.peak_bytes:
                stats.peak_bytes = self.live_bytes
        if self.segments is not None and self.live_bytes > self._segment.peak_bytes:
            self._segment.peak_bytes = self.live_bytes

    # ------------------------------------------------------------------------------------------------- phases
    @contextmanager
    def phase(self, name: str) -> Iterator[OpStats]:
        """Attribute the ops run inside to ``name`` (phases may nest; a repeated name accumulates)."""
        stats = self.push_phase(name)
        try:
            yield stats
        finally:
            self.pop_phase()

    def push_phase(self, name: str) -> OpStats:
        """Start phase ``name`` (see :meth:`phase`; for callers that cannot use a ``with``, e.g. module hooks)."""
        stats = self.phases.get(name)
        if stats is None:
            stats = self.phases[name] = OpStats(start_bytes=self.live_bytes, peak_bytes=self.live_bytes)
        else:
            stats.peak_bytes = max(stats.peak_bytes, self.live_bytes)
        self._close_segment()
        self._phase_stack.append(stats)
        self._phase_names.append(name)
        self._open_segment()
        return stats

    def pop_phase(self) -> None:
        self._close_segment()
        self._phase_stack.pop()
        self._phase_names.pop()
        self._open_segment()

    def _close_segment(self) -> None:
        """With ``segments``: end the stretch of ops since the last phase change and start the next one."""
        if self.segments is None:
            return
        seg = self._segment
        if seg.stats.ops or seg.peak_bytes > seg.start_bytes:
            seg.end_bytes = self.live_bytes
            self.segments.append(seg)

    def _open_segment(self) -> None:
        if self.segments is not None:
            self._segment = Segment(tuple(self._phase_names), self.live_bytes, self.live_bytes, self.live_bytes)

    # ------------------------------------------------------------------------------------------------ shadows
    def values(self, t: torch.Tensor) -> torch.Tensor | None:
        """The CPU values a watched tensor carries, or None."""
        return self._shadows.get(t)

    # These walk nested args with plain methods, not recursive closures: a closure that calls itself is a reference
    # cycle, and the tensors it saw would then die only when the cyclic GC runs, moving the measured peak.
    def _shadow_of(self, value):
        """``value`` with watched tensors replaced by their shadows; None if one has none."""
        try:
            return self._swap(value, stand_in=False)
        except _NoShadow:
            return None

    def _stand_in(self, value):
        """``value`` on the CPU: shadows where known, zero stand-ins (no memory) elsewhere."""
        return self._swap(value, stand_in=True)

    def _swap(self, value, stand_in: bool):
        if isinstance(value, torch.Tensor):
            if value.device.type != self.device_type:
                return value
            shadow = self._shadows.get(value)
            if shadow is not None:
                return shadow
            if stand_in:
                return torch.zeros((), dtype=value.dtype).expand(value.shape)
            raise _NoShadow
        if isinstance(value, (list, tuple)):
            return type(value)(self._swap(item, stand_in) for item in value)
        if isinstance(value, dict):
            return {key: self._swap(item, stand_in) for key, item in value.items()}
        if isinstance(value, torch.device) and value.type == self.device_type:
            return torch.device("cpu")
        return value

    def _to_device(self, value):
        if isinstance(value, torch.Tensor):
            return torch.empty(value.shape, dtype=value.dtype, device=self.device_type)
        if isinstance(value, (list, tuple)):
            return type(value)(self._to_device(v) for v in value)
        return value

    def _set_shadows(self, out, shadow) -> None:
        if isinstance(out, torch.Tensor) and isinstance(shadow, torch.Tensor):
            if out.device.type == self.device_type and out.numel() <= _VALUE_LIMIT:
                self._shadows[out] = shadow
        elif isinstance(out, (list, tuple)) and isinstance(shadow, (list, tuple)):
            for o, s in zip(out, shadow):
                self._set_shadows(o, s)

    # ----------------------------------------------------------------------------------------------- dispatch
    def _info(self, func) -> tuple[str, tuple[int, ...], bool]:
        """(schema name, indices of the arguments it writes, launches no kernel) of an op, looked up once."""
        info = self._func_info.get(func)
        if info is None:
            name = func._schema.name
            written = tuple(i for i, a in enumerate(func._schema.arguments)
                            if a.alias_info is not None and a.alias_info.is_write)
            no_kernel = func.is_view or name in _NO_KERNEL or name.startswith("aten::empty")
            info = self._func_info[func] = (name, written, no_kernel)
        return info

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = self._info(func)[0]
        watched_in = [t for t in _tensors(args) if t.device.type == self.device_type]
        watched_in += [t for t in _tensors(tuple(kwargs.values())) if t.device.type == self.device_type]
        device_kw = kwargs.get("device")
        makes_watched = device_kw is not None and torch.device(device_kw).type == self.device_type
        if not watched_in and not makes_watched:
            return func(*args, **kwargs)

        # reading values back (.item(), .tolist(), .cpu()) and copies from the CPU onto the watched device
        if name == "aten::_local_scalar_dense":
            shadow = self._shadows.get(args[0])
            if shadow is None:
                raise RuntimeError("the value of this meta tensor is unknown (it carries no CPU shadow)")
            return shadow.item()
        if name == "aten::_to_copy" and device_kw is not None and torch.device(device_kw).type != self.device_type:
            shadow = self._shadows.get(args[0])
            if shadow is None:
                raise RuntimeError("cannot copy a meta tensor to the CPU: its values are unknown (no CPU shadow)")
            return func(shadow, *args[1:], **kwargs)

        try:
            out = func(*args, **kwargs)
            ran_on_device = True
        except NotImplementedError:
            # a meta kernel that refuses because its output shape depends on values (nonzero, boolean indexing,
            # masked_select): compute on the CPU. Other errors are real and propagate.
            cpu_out = func(*self._stand_in(args), **self._stand_in(kwargs))
            out = self._to_device(cpu_out)
            ran_on_device = False
            shadow_args = self._shadow_of(args)
            if shadow_args is not None and self._shadow_of(kwargs) is not None:
                self._set_shadows(out, cpu_out)
        if not isinstance(out, (torch.Tensor, list, tuple)):
            # scalar results (is_nonzero, equal, ...) need values
            shadow_args, shadow_kwargs = self._shadow_of(args), self._shadow_of(kwargs)
            if shadow_args is None or shadow_kwargs is None:
                raise RuntimeError(f"{name} needs values that these meta tensors do not carry")
            return func(*shadow_args, **shadow_kwargs)

        try:
            self._propagate_shadows(func, name, args, kwargs, out, ran_on_device)
        except Exception:  # noqa: BLE001 - an op the CPU cannot run: its outputs simply carry no values
            for t in _tensors(out):
                self._shadows.pop(t, None)
        self._account(func, name, args, kwargs, out, watched_in)
        return out

    def _propagate_shadows(self, func, name, args, kwargs, out, ran_on_device) -> None:
        if not ran_on_device:
            return
        watched_in = [t for t in _tensors(args) if t.device.type == self.device_type]
        copies = name in ("aten::_to_copy", "aten::copy_")
        if watched_in and not copies and not any(t in self._shadows for t in watched_in):
            return  # nothing here carries values (the common case): nothing to propagate or to invalidate
        mutated = [args[i] for i in self._info(func)[1] if i < len(args) and isinstance(args[i], torch.Tensor)]
        small = all(t.numel() <= _VALUE_LIMIT for t in _tensors(out))
        if not small:
            for t in mutated:
                self._shadows.pop(t, None)
            return
        if copies:
            src = args[1] if name == "aten::copy_" else args[0]
            if src.device.type != self.device_type:
                if name == "aten::copy_":
                    dst_shadow = self._shadows.get(args[0])
                    if dst_shadow is not None:
                        dst_shadow.copy_(src)
                    elif args[0].numel() <= _VALUE_LIMIT:
                        self._shadows[args[0]] = src.to(args[0].dtype).expand(args[0].shape).clone()
                    return
                self._set_shadows(out, src.to(dtype=out.dtype).clone())
                return
        if not watched_in and not mutated:
            # a factory op on the device (arange, full, ...): small ones carry their values; empty ones have none
            if name.startswith("aten::empty") or name.startswith("aten::new_empty"):
                return
            cpu_kwargs = dict(kwargs, device=torch.device("cpu"))
            self._set_shadows(out, func(*args, **cpu_kwargs))
            return
        shadow_args, shadow_kwargs = self._shadow_of(args), self._shadow_of(kwargs)
        if shadow_args is None or shadow_kwargs is None:
            for t in mutated:
                self._shadows.pop(t, None)
            return
        cpu_out = func(*shadow_args, **shadow_kwargs)
        if mutated:
            return  # the shadows were updated in place (views of a shadow share its storage)
        self._set_shadows(out, cpu_out)

    def _account(self, func, name, args, kwargs, out, watched_in) -> None:
        outputs = list(_tensors(out))
        for t in outputs:
            self._track_storage(t)
        self._note_peak(name)

        if self._info(func)[2]:
            kernels, nbytes = 0, 0
        else:
            kernels = 1
            written = {id(t) for t in outputs}
            nbytes = sum(_dims_bytes(t) for t in watched_in if id(t) not in written)
            nbytes += sum(_dims_bytes(t) for t in outputs if t.device.type == self.device_type)
        kind, flops, dtype = op_flops(name, args, out)
        seconds = {r.name: r.op_seconds(kind, dtype, flops, nbytes) for r in self.rooflines} if kernels else {}
        targets = [self.total, *self._phase_stack]
        if self.segments is not None:
            targets.append(self._segment.stats)
        for stats in targets:
            stats.ops += 1
            stats.kernels += kernels
            stats.bytes += nbytes
            if kind is not None:
                stats.flops[kind] = stats.flops.get(kind, 0) + flops
            for rname, value in seconds.items():
                stats.seconds[rname] = stats.seconds.get(rname, 0.0) + value
        if self.by_op is not None:
            row = self.by_op.setdefault(name, [0, 0, 0])
            row[0] += 1
            row[1] += flops
            row[2] += nbytes


def _index_on_cpu(index):
    """Python lists inside an index become CPU tensors (their values stay known; see the module docstring)."""
    def convert(item):
        if isinstance(item, list) and item and all(isinstance(x, (bool, int)) for x in item):
            return torch.tensor(item)
        return item

    if isinstance(index, tuple):
        return tuple(convert(item) for item in index)
    return convert(index)


class MetaFunctions(TorchFunctionMode):
    """The torch-function half of the accounting (entered by :class:`OpAccountant` itself).

    * Index lists: ``t[[0, 1]]`` on a meta tensor builds its index tensor on meta without dispatching an op, so its
      values would be lost; the lists are turned into CPU tensors first (same result).
    * With ``fused_attention``: ``F.scaled_dot_product_attention`` on meta tensors runs as the fused flash
      op a GPU would run. The math decomposition PyTorch uses on meta would materialise the whole fp32 score matrix
      (hundreds of GB at video shapes) and show the attention as fp32 GEMMs. Only calls without a mask or dropout
      are rerouted.
    """

    def __init__(self, device_type: str = "meta", fused_attention: bool = True) -> None:
        super().__init__()
        self.device_type = device_type
        self.fused_attention = fused_attention

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) >= 2:
            if isinstance(args[0], torch.Tensor) and args[0].device.type == self.device_type:
                args = (args[0], _index_on_cpu(args[1]), *args[2:])
        elif self.fused_attention and func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            attn_mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            dropout = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
            causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
            scale = args[6] if len(args) > 6 else kwargs.get("scale")
            if q.device.type == "meta" and q.dim() == 4 and attn_mask is None and not dropout:
                return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, bool(causal), False, scale=scale)[0]
        return func(*args, **kwargs)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (works on meta)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[id(st)] = st.nbytes()
    return sum(seen.values())
