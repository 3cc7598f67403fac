"""A small Prometheus registry (one per app, no globals) and its text exposition for ``/metrics``.

Counters and histograms are updated by the HTTP middleware and the engine-event bridge; gauges (queue depth,
jobs by status, GPU memory) are read at scrape time from their owners through callbacks, so they cannot drift.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

DEFAULT_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)


def _label_text(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    parts = []
    for key in sorted(labels):
        value = str(labels[key]).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{key}="{value}"')
    return "{" + ",".join(parts) + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = {}
        self._histograms: dict[str, dict[tuple, list[float]]] = {}
        self._buckets: dict[str, tuple[float, ...]] = {}
        self._help: dict[str, str] = {}
        self._gauges: dict[str, Callable[[], dict[tuple, float] | float | None]] = {}

    def describe(self, name: str, text: str) -> None:
        self._help[name] = text

    def inc(self, name: str, labels: dict[str, str] | None = None, value: float = 1.0) -> None:
        key = tuple(sorted((labels or {}).items()))
        with self._lock:
            series = self._counters.setdefault(name, {})
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, labels: dict[str, str] | None = None,
                buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        key = tuple(sorted((labels or {}).items()))
        with self._lock:
            self._buckets.setdefault(name, buckets)
            series = self._histograms.setdefault(name, {})
            counts = series.setdefault(key, [0.0] * (len(self._buckets[name]) + 2))  # buckets..., +Inf/count, sum
            for i, bound in enumerate(self._buckets[name]):
                if value <= bound:
                    counts[i] += 1
            counts[-2] += 1
            counts[-1] += value

    def gauge(self, name: str, read: Callable[[], dict[tuple, float] | float | None]) -> None:
        """``read`` returns a value, or {labels-tuple: value}, or None when unknown."""
        self._gauges[name] = read

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        key = tuple(sorted((labels or {}).items()))
        with self._lock:
            return self._counters.get(name, {}).get(key, 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            counters = {n: dict(s) for n, s in self._counters.items()}
            histograms = {n: {k: list(v) for k, v in s.items()} for n, s in self._histograms.items()}
        for name in sorted(counters):
            lines.append(f"# HELP {name} {self._help.get(name, name)}")
            lines.append(f"# TYPE {name} counter")
            for key, value in sorted(counters[name].items()):
                lines.append(f"{name}{_label_text(dict(key))} {value:g}")
        for name in sorted(histograms):
            lines.append(f"# HELP {name} {self._help.get(name, name)}")
            lines.append(f"# TYPE {name} histogram")
            for key, counts in sorted(histograms[name].items()):
                labels = dict(key)
                for i, bound in enumerate(self._buckets[name]):
                    lines.append(f"{name}_bucket{_label_text({**labels, 'le': f'{bound:g}'})} {counts[i]:g}")
                lines.append(f"{name}_bucket{_label_text({**labels, 'le': '+Inf'})} {counts[-2]:g}")
                lines.append(f"{name}_count{_label_text(labels)} {counts[-2]:g}")
                lines.append(f"{name}_sum{_label_text(labels)} {counts[-1]:g}")
        for name in sorted(self._gauges):
            try:
                value = self._gauges[name]()
            except Exception:  # a failing reader must not break the whole scrape
                continue
            if value is None:
                continue
            lines.append(f"# HELP {name} {self._help.get(name, name)}")
            lines.append(f"# TYPE {name} gauge")
            if isinstance(value, dict):
                for key, v in sorted(value.items()):
                    lines.append(f"{name}{_label_text(dict(key))} {v:g}")
            else:
                lines.append(f"{name} {value:g}")
        return "\n".join(lines) + "\n"
