"""The server's Prometheus metrics, kept by prometheus-client in a registry per app context (no module globals,
never the library's default registry), and their exposition for ``/metrics``.

Counters and the histogram are updated by the HTTP middleware, the submit path and the engine-event bridge. Gauges
(queue depth, jobs by status, GPU memory, engine liveness, disk used by outputs) are read from their owners at scrape time, so they
cannot drift. Label values must come from small fixed sets: :func:`method_label` folds made-up HTTP methods.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import Metric

# prometheus_client is imported where it is used: importing it fills its global default registry with process
# collectors that read /proc, and importing magi_server must open no files (tests/test_imports.py)

GENERATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


def method_label(method: str) -> str:
    """The method as a label value: a client can send any token as a method, and each would be a new series."""
    return method if method in HTTP_METHODS else "other"


@dataclass(frozen=True)
class GaugeReaders:
    """Where each gauge reads its value at scrape time; ``gpu_memory_bytes`` returns None off-GPU (no sample)."""

    queue_depth: Callable[[], int]
    jobs_by_status: Callable[[], Mapping[str, int]]
    gpu_memory_bytes: Callable[[], int | None]
    engine_alive: Callable[[], bool]
    outputs_bytes: Callable[[], int] = lambda: 0  # what the outputs folder holds (videos, previews, inputs)


class _ScrapeTimeGauges:
    """A prometheus-client collector: the registry calls :meth:`collect` on each scrape."""

    def __init__(self, read: GaugeReaders) -> None:
        from prometheus_client.core import GaugeMetricFamily

        self.read = read
        self.gauge_family = GaugeMetricFamily

    def collect(self) -> Iterator[Metric]:
        for build in (self._queue_depth, self._jobs, self._gpu_memory, self._engine_alive, self._outputs_bytes):
            try:
                metric = build()
            except Exception:  # a failing owner must not break the whole scrape: that gauge is left out
                continue
            if metric is not None:
                yield metric

    def _queue_depth(self) -> Metric:
        return self.gauge_family("magi_queue_depth", "jobs waiting for the GPU", value=self.read.queue_depth())

    def _jobs(self) -> Metric:
        family = self.gauge_family("magi_jobs", "jobs in the store, by status", labels=["status"])
        for status, count in sorted(self.read.jobs_by_status().items()):
            family.add_metric([status], count)
        return family

    def _gpu_memory(self) -> Metric | None:
        used = self.read.gpu_memory_bytes()
        if used is None:
            return None
        return self.gauge_family("magi_gpu_memory_used_bytes", "device memory allocated by the model and jobs",
                                 value=used)

    def _outputs_bytes(self) -> Metric:
        return self.gauge_family("magi_outputs_disk_bytes", "bytes of the videos, previews and inputs kept on disk",
                                 value=self.read.outputs_bytes())

    def _engine_alive(self) -> Metric:
        return self.gauge_family("magi_engine_alive", "1 when the GPU loop is running",
                                 value=1.0 if self.read.engine_alive() else 0.0)


class Metrics:
    """One server's metrics. Update them through the attributes, e.g. ``jobs_submitted.labels(api="fal").inc()``."""

    def __init__(self, gauges: GaugeReaders | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("magi_http_requests_total", "HTTP requests by route template, method and "
                                     "status code", ["route", "method", "code"], registry=r)
        self.jobs_submitted = Counter("magi_jobs_submitted_total", "jobs accepted, by API", ["api"], registry=r)
        self.jobs_rejected = Counter("magi_jobs_rejected_total", "submits refused before anything was stored, "
                                     "by reason", ["reason"], registry=r)
        self.jobs_finished = Counter("magi_jobs_finished_total", "jobs that reached a terminal state, by outcome",
                                     ["outcome"], registry=r)
        self.generation_seconds = Histogram("magi_generation_seconds", "time from prefill to the finished MP4",
                                            buckets=GENERATION_BUCKETS, registry=r)
        if gauges is not None:
            r.register(_ScrapeTimeGauges(gauges))

    def exposition(self) -> tuple[bytes, str]:
        """The body and content type of a ``/metrics`` answer."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
