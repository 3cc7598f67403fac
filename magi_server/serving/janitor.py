"""Retention: the janitor deletes finished jobs, with their outputs, chunk previews, kept latents (continue_from)
and stored inputs, and uploads nobody used, once they are older than the server's time to live
(``serve --keep-jobs-hours``).

Rows go first and files after (:meth:`JobStore.prune_jobs` returns the rows it deleted): a crash in between
leaves orphan files, never a job whose result URL points at a missing file. Hosted APIs keep results for days,
not forever; without this a busy server fills its disk.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from magi_server.params import kept_latents_name
from magi_server.serving.jobs import Job, JobStatus, JobStore

log = logging.getLogger("magi_server.serving.janitor")


def disk_bytes(folder: str | Path) -> int:
    """Bytes of the regular files under ``folder`` (links are not followed): what the disk gauge reports."""
    total = 0
    for path in Path(folder).rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except OSError:  # removed while we looked
            continue
    return total


def _inputs_of(job: Job) -> tuple[str | None, ...]:
    """The stored inputs a job reads: its image, prefix video, or the latents it continues."""
    return job.params.image_path, job.params.video_path, job.params.prefix_latents_path


class Janitor:
    """Sweeps every ``interval_s`` on a thread of its own; :meth:`sweep` is one pass (tests call it directly)."""

    def __init__(self, store: JobStore, outputs_dir: str | Path, ttl_s: float, interval_s: float = 600.0,
                 clock: Callable[[], float] = time.time, output_store=None) -> None:
        self.store = store
        self.output_store = output_store  # serving.outputs.OutputStore holding the finished outputs, if not the folder
        self.clock = clock  # wall-clock time, compared with file modification times
        self.outputs_dir = Path(outputs_dir)
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> list[Job]:
        """Delete the jobs that ended more than ``ttl_s`` ago, then their files; returns the deleted jobs."""
        jobs = self.store.prune_jobs(self.ttl_s)
        for job in jobs:
            self._remove(self._files_of(job))
            if self.output_store is not None:
                self._remove_objects(job)
        self._remove(self._stale_uploads())
        if jobs:
            log.info("retention: removed %d job(s) older than %.0f h", len(jobs), self.ttl_s / 3600)
        return jobs

    def _files_of(self, job: Job) -> list[Path]:
        files = [self.outputs_dir / name for name in job.outputs]
        files += self.outputs_dir.glob(f"{job.id}.chunk*.mp4")  # the chunk previews streamed while it ran
        files.append(self.outputs_dir / kept_latents_name(job.id))  # what a continuation of it would have read
        uploads = (self.outputs_dir / "uploads").resolve()
        for stored in _inputs_of(job):
            # only an input this server stored for the job: a path outside the uploads folder is not ours to delete
            if stored and Path(stored).resolve().parent == uploads:
                files.append(Path(stored))
        return files

    def _stale_uploads(self) -> list[Path]:
        """Uploads (filled or never-used tickets) older than the time to live that no waiting or running job reads."""
        in_use = {Path(p).name for job in self.store.list([JobStatus.QUEUED, JobStatus.RUNNING], limit=100_000)
                  for p in _inputs_of(job) if p}
        cutoff = self.clock() - self.ttl_s
        stale = []
        for path in (self.outputs_dir / "uploads").glob("*"):
            try:
                if path.is_file() and path.name not in in_use and path.stat().st_mtime < cutoff:
                    stale.append(path)
            except OSError:
                continue
        return stale

    def _remove_objects(self, job: Job) -> None:
        """The job's output, chunk previews, kept latents and shared input copies in the object store."""
        try:
            # the copies of its stored inputs shared with workers (input-<random>: only ever this job's)
            inputs = {f"uploads/{Path(p).name}" for p in _inputs_of(job) if p and Path(p).name.startswith("input-")}
            for name in {*job.outputs, *self.output_store.names(f"{job.id}.chunk"), kept_latents_name(job.id),
                         *inputs}:
                self.output_store.delete(name)
        except Exception as exc:  # noqa: BLE001 - the store's one-line error; left for the operator's lifecycle rules
            log.warning("could not remove job %s's outputs from %s: %s", job.id, self.output_store.location, exc)

    @staticmethod
    def _remove(paths) -> None:
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove %s: %s", path, exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="magi-janitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except Exception:  # a store error now is retried at the next sweep; the server goes on
                log.exception("retention sweep failed")
