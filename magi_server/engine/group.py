"""Several engines in one process, one per served model variant, behind the one engine interface the HTTP layer
reads (admission, cancel, health, metrics, drain).

Each variant keeps its own engine thread, scheduler, queue bound and runner (its own weights): jobs of different
variants never share a batch, so one variant's long jobs do not change another's outputs. The HTTP layer admits a
submit into its variant's engine (:meth:`member`); everything else asks the group, which answers for all: it
accepts only while every member does, is alive only while every member is, and its queue depth and running count
are the members' sums. A cancel goes to every member (only the one holding the job acts on it).
"""
from __future__ import annotations

from collections.abc import Mapping

from magi_server.engine.loop import Engine


class EngineGroup:
    def __init__(self, engines: Mapping[str, Engine]) -> None:
        if not engines:
            raise ValueError("an engine group needs at least one engine")
        self.engines = dict(engines)
        self._first = next(iter(self.engines.values()))

    def member(self, variant: str | None) -> Engine:
        """The engine of ``variant`` (None: the first, e.g. a job stored before variants were recorded); KeyError
        for a variant this process does not run."""
        return self._first if variant is None else self.engines[variant]

    # what the HTTP layer reads of "the engine"
    @property
    def retry_after_s(self) -> float:
        return self._first.retry_after_s

    @property
    def dead_reason(self) -> str | None:
        return next((f"{name}: {e.dead_reason}" for name, e in self.engines.items() if e.dead_reason), None)

    @property
    def draining(self) -> bool:
        return self._first.draining

    def accepting(self) -> bool:
        return all(e.accepting() for e in self.engines.values())

    def alive(self, max_silence_s: float = 60.0) -> bool:
        return all(e.alive(max_silence_s) for e in self.engines.values())

    @property
    def queue_depth(self) -> int:
        return sum(e.queue_depth for e in self.engines.values())

    @property
    def running_count(self) -> int:
        return sum(e.running_count for e in self.engines.values())

    def queue_position(self, job_id: str) -> int | None:
        return next((p for e in self.engines.values() if (p := e.queue_position(job_id)) is not None), None)

    def cancel(self, job_id: str) -> None:
        for e in self.engines.values():
            e.cancel(job_id)

    def start(self) -> None:
        for e in self.engines.values():
            e.start()

    def drain(self) -> None:
        for e in self.engines.values():
            e.drain()

    def stop(self, timeout: float = 10.0) -> None:
        for e in self.engines.values():
            e.stop(timeout)
