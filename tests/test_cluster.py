"""The API replica's and the worker's pieces without processes (serving/cluster.py, serving/worker.py): the event
bridge's polling fallback and de-duplication, the shared queue's admission, the worker's fenced writes and stops,
and the commands' refusal of a store they cannot share. The processes themselves: tests/test_scale_out.py."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from magi_server.serving.cluster import LeaseSweeper, SharedQueue, StoreEventBridge
from magi_server.serving.events import EventHub
from magi_server.serving.jobs import JobStatus, JobStoreError
from magi_server.serving.worker import FencedStore, WorkerLink
from magi_server.tools import cli


class FakeStore:
    """What the bridge, the queue and the link read: jobs by id, a queue depth that can fail."""

    def __init__(self) -> None:
        self.jobs: dict[str, SimpleNamespace] = {}
        self.down = False
        self.calls: list[tuple] = []

    def get(self, job_id):
        if self.down:
            raise JobStoreError("down")
        return self.jobs.get(job_id)

    def queue_depth(self):
        if self.down:
            raise JobStoreError("down")
        return sum(1 for j in self.jobs.values() if j.status is JobStatus.QUEUED)

    def requeue_expired_leases(self, max_attempts):
        self.calls.append(("sweep", max_attempts))
        return [], []

    def complete(self, job_id, outputs, ms, *, worker_id=None, meta_updates=None):
        self.calls.append(("complete", job_id, worker_id))
        return None

    def requeue(self, job_id, *, worker_id=None):
        self.calls.append(("requeue", job_id, worker_id))
        return SimpleNamespace(id=job_id)


def job(status: JobStatus, done: int = 0, total: int = 0) -> SimpleNamespace:
    return SimpleNamespace(status=status, progress_done=done, progress_total=total)


def test_the_bridge_publishes_notifications_once_and_polls_what_is_watched():
    store, hub = FakeStore(), EventHub()
    bridge = StoreEventBridge(store, hub)
    hub.publish("a", "status", status=JobStatus.QUEUED)  # the replica's own submit said it
    bridge.on_message({"id": "a", "kind": "status", "status": "queued"})  # the store's notification repeats it
    bridge.on_message({"id": "a", "kind": "status", "status": "running"})
    bridge.on_message({"id": "a", "kind": "chunk", "index": 0, "chunks_done": 1, "chunks_total": 3, "frames": 24,
                       "preview": "a.chunk0.mp4"})
    bridge.on_message({"id": 5, "kind": "status", "status": "running"})  # not ours to trust: ignored
    bridge.on_message({"id": "a", "kind": "status", "status": "bogus"})
    assert [(e.kind, e.data.get("status")) for e in hub.since("a")] == [
        ("status", JobStatus.QUEUED), ("status", JobStatus.RUNNING), ("chunk", None)]

    # notifications lost (the listening connection was down): a tick re-reads the jobs someone waits on
    async def wait_while_ticking():
        waiting = asyncio.ensure_future(hub.wait("a", hub.since("a")[-1].id, timeout_s=5))
        await asyncio.sleep(0.05)
        assert hub.watched() == ["a"]
        store.jobs["a"] = job(JobStatus.RUNNING, done=2, total=3)
        bridge.on_tick()
        first = await waiting
        store.jobs["a"] = job(JobStatus.COMPLETED, done=3, total=3)
        waiting = asyncio.ensure_future(hub.wait("a", first[-1].id, timeout_s=5))
        await asyncio.sleep(0.05)
        bridge.on_tick()
        return first, await waiting

    progressed, ended = asyncio.run(wait_while_ticking())
    assert [(e.kind, e.data) for e in progressed] == [("progress", {"chunks_done": 2, "chunks_total": 3})]
    assert [(e.kind, e.data["status"]) for e in ended] == [("status", JobStatus.COMPLETED)]
    assert hub.watched() == []
    store.down = True
    bridge.on_tick()  # a store that is down too: nothing raised, the next tick tries again


def test_the_shared_queue_admits_until_drained_and_reads_the_store_at_most_once_a_second():
    store, now = FakeStore(), [0.0]
    queue = SharedQueue(store, clock=lambda: now[0])
    store.jobs = {"a": job(JobStatus.QUEUED), "b": job(JobStatus.QUEUED)}
    assert queue.accepting() and queue.alive() and queue.queue_depth == 2 and queue.running_count == 0
    store.jobs["c"] = job(JobStatus.QUEUED)
    assert queue.queue_depth == 2  # cached
    now[0] = 1.5
    assert queue.queue_depth == 3
    store.down = True
    now[0] = 3.0
    assert not queue.alive() and queue.queue_depth == 3  # the last known depth
    queue.drain()
    assert not queue.accepting() and queue.draining


def test_the_sweeper_runs_at_most_once_per_period():
    store, now = FakeStore(), [0.0]
    sweeper = LeaseSweeper(store, max_attempts=2, every_s=1.5, clock=lambda: now[0])
    for t in (0.0, 0.5, 1.4, 1.6, 2.0, 3.2):
        now[0] = t
        sweeper.maybe_sweep()
    assert store.calls == [("sweep", 2)] * 3


def test_a_worker_writes_only_under_its_lease_and_stops_what_was_cancelled_elsewhere(tmp_path):
    store = FakeStore()
    fenced = FencedStore(store, "w1")
    assert fenced.complete("a", ["a.mp4"], 5) is None and store.calls[-1] == ("complete", "a", "w1")
    assert fenced.cancel("a") is None  # never written from a worker
    assert fenced.queue_depth() == 0  # reads pass through

    stopped = []
    engine = SimpleNamespace(cancel=stopped.append, accepting=lambda: True)
    link = WorkerLink(store, engine, worker_id="w1", capacity=1, lease_s=3, outputs_dir=tmp_path)
    link._held.update({"a", "b"})
    (tmp_path / ".a.mp4.0123.part").write_bytes(b"half")
    (tmp_path / "a.chunk0.mp4").write_bytes(b"old preview")
    (tmp_path / "b.mp4").write_bytes(b"someone else's")
    link.on_message({"id": "a", "kind": "status", "status": "cancelled"})
    link.on_message({"id": "z", "kind": "status", "status": "cancelled"})  # not held here
    link.on_message({"id": "b", "kind": "progress"})
    assert stopped == ["a"]
    link._clear_partial_files("a")  # a claim of attempt 2+ clears the dead attempt's files, only that job's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.mp4"]
    assert sorted(link.give_back()) == ["a", "b"] and link.held == []
    assert store.calls[-2:] == [("requeue", "a", "w1"), ("requeue", "b", "w1")]


@pytest.mark.parametrize("command", ["api", "worker"])
def test_api_and_worker_refuse_a_store_they_cannot_share(command, tmp_path, capsys):
    assert cli.main([command, "--db", str(tmp_path / "jobs.db")]) == 2
    err = capsys.readouterr().err
    assert "PostgreSQL job store" in err and "--db postgresql://" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "jobs.db").exists()


def test_an_input_image_reaches_a_worker_on_another_machine_through_the_object_store(tmp_path):
    """The replica keeps the fitted input PNG in its own uploads folder and shares a copy as uploads/<name>; a worker
    without that file fetches it into its own folder and runs the job on that path."""
    from magi_server.params import GenerationParams
    from magi_server.serving.common import _share_input
    from magi_server.serving.outputs import LocalOutputStore

    bucket = LocalOutputStore(tmp_path / "bucket")
    replica_input = tmp_path / "replica" / "uploads" / "input-abc.png"
    replica_input.parent.mkdir(parents=True)
    replica_input.write_bytes(b"\x89PNG fitted input")
    _share_input(SimpleNamespace(output_store=bucket), replica_input)
    assert replica_input.read_bytes() == bucket.read("uploads/input-abc.png") == b"\x89PNG fitted input"

    params = GenerationParams(prompts=("x",), width=64, height=64, num_frames=24, num_inference_steps=8, seed=1,
                              image_path=str(replica_input))
    other_machine = tmp_path / "worker"
    link = WorkerLink(FakeStore(), SimpleNamespace(), worker_id="w", capacity=1, lease_s=3,
                      outputs_dir=other_machine, output_store=bucket)
    assert link._local_inputs(params) is params  # the path exists here (one machine): nothing to fetch
    replica_input.unlink()
    local = link._local_inputs(params)
    assert local.image_path == str(other_machine / "uploads" / "input-abc.png")
    assert (other_machine / "uploads" / "input-abc.png").read_bytes() == b"\x89PNG fitted input"
    missing = GenerationParams(prompts=("x",), width=64, height=64, num_frames=24, num_inference_steps=8, seed=1,
                               image_path=str(tmp_path / "nowhere" / "input-gone.png"))
    assert link._local_inputs(missing) is missing  # the prefill then fails the job, naming the image


def test_a_worker_runs_one_model(postgres_dsn, tmp_path, capsys):
    assert cli.main(["worker", "--db", postgres_dsn, "--outputs", str(tmp_path), "--model", "tiny",
                     "--model", "other=" + str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "a worker runs one model" in err and len(err.splitlines()) == 1, err
