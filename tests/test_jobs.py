"""The job stores: round trips, the status machine, tenant isolation, idempotency and quotas under concurrency, and
durability across a real `kill -9` of a process that was writing to the store.

Every test that takes the `store` or `open_store` fixture runs twice: against the SQLite `JobStore` and against
`PostgresJobStore` on a real PostgreSQL server the session starts (skipped, with the reason, where PostgreSQL is
not installed). The tests under "SQLite only" check the file, its pragmas and its schema version; the PostgreSQL
store's own schema and fault tests are in tests/test_jobs_postgres.py."""
from __future__ import annotations

import ast
import dataclasses
import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest

from magi_server.serving.jobs import (
    SCHEMA_VERSION,
    TERMINAL,
    DuplicateJob,
    IdempotencyConflict,
    Job,
    JobStatus,
    JobStore,
    JobStoreError,
    QueueFull,
    QuotaExceeded,
    new_job_id,
)
from magi_server.params import GenerationParams
from magi_server.serving.stores import open_job_store
from tests.golden_utils import REPO_ROOT


class FakeClock:
    def __init__(self, start: float = 1_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


def make_params(prompt: str = "a cat surfing", **kw) -> GenerationParams:
    base = dict(prompts=(prompt,), width=720, height=720, num_frames=96, num_inference_steps=16, seed=1234)
    base.update(kw)
    return GenerationParams(**base)


def make_job(created_at: float = 100.0, owner: str = "", prompt: str = "a cat surfing", **kw) -> Job:
    return Job(id=new_job_id(), api="wavespeed", model="wavespeed-ai/magi-1-24b", status=JobStatus.QUEUED,
               params=make_params(prompt), created_at=created_at, owner=owner, **kw)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "postgres"])
def store_location(request, tmp_path) -> str:
    """Where the store under test lives: a SQLite file, or a fresh database on the session's PostgreSQL server."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres_dsn")
    return str(tmp_path / "db" / "jobs.sqlite3")


@pytest.fixture
def open_store(store_location, clock):
    """Opens one more store on the same location (each stands for one API replica); all closed after the test."""
    opened = []

    def open_another(**kw):
        opened.append(open_job_store(store_location, clock=clock, **kw))
        return opened[-1]

    yield open_another
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store):
    return open_store()


# -- records ------------------------------------------------------------------------------------------------


def test_every_field_round_trips(tmp_path, store):
    params = GenerationParams(prompts=("first scene ☃", "second \"scene\"\n"), width=1280, height=720,
                              num_frames=121, num_inference_steps=32, seed=2**31 - 1, model="magi-1-4.5b-distill",
                              image_path="/inputs/abc.png", trim_to_frames=True, window_size=4)
    job = Job(id=new_job_id(), api="magichour", model="image-to-video", status=JobStatus.COMPLETED, params=params,
              created_at=1.25, started_at=2.5, finished_at=3.75, progress_done=7, progress_total=9,
              outputs=["x.mp4", "x.jpg"], error="boom ✗", error_code="internal", attempts=2, inference_ms=12345,
              owner="sha256:abcd", meta={"webhook": "https://example.com/h?x=1", "name": "清明"},
              idempotency_key=None)
    stored = store.create(job)
    assert stored == job
    again = store.get(job.id)
    assert again == job
    assert isinstance(again.params.prompts, tuple) and again.status is JobStatus.COMPLETED
    assert again.is_terminal and not make_job().is_terminal
    assert TERMINAL == {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}
    assert JobStatus("queued") is JobStatus.QUEUED and JobStatus.RUNNING == "running"


def test_new_job_id_is_uuid4_hex():
    ids = {new_job_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 32 and set(i) <= set("0123456789abcdef") and i[12] == "4" for i in ids)
    job = Job.new("fal", "fal-ai/magi", make_params(), owner="o", meta={"a": 1})
    assert job.status is JobStatus.QUEUED and len(job.id) == 32 and job.attempts == 0


def test_lone_surrogates_never_make_a_write_raise(store):
    bad = "evil \ud800 prompt \udfff"
    job = make_job(prompt=bad, owner="tenant\udc80", meta={"note": bad})
    store.create(job)
    got = store.get(job.id)
    # JSON columns (params, meta) keep the exact string; plain text columns escape the surrogate deterministically.
    assert got.params.prompts == (bad,) and got.meta == {"note": bad}
    assert store.get(job.id, owner="tenant\udc80") == got
    assert store.list(owner="tenant\udc80") == [got]
    assert store.mark_running(job.id)
    failed = store.fail(job.id, f"bad input: {bad}", "invalid_input")
    assert failed.status is JobStatus.FAILED and "evil" in failed.error
    assert store.get("\ud800" * 32) is None
    store.create_idempotent(make_job(), "key\udc00", "fp\ud800")
    assert store.create_idempotent(make_job(), "key\udc00", "fp\ud800")[1] is False


def test_create_rejects_duplicates_and_bad_records(store):
    job = store.create(make_job())
    with pytest.raises(DuplicateJob):
        store.create(Job(**{**job.__dict__, "model": "another"}))
    with pytest.raises(ValueError):
        store.create(Job(**{**make_job().__dict__, "api": "replicate"}))
    with pytest.raises(ValueError):
        store.create(Job(**{**make_job().__dict__, "idempotency_key": "k"}))
    assert store.count_by_status()[JobStatus.QUEUED] == 1
    assert isinstance(DuplicateJob("x"), JobStoreError) and isinstance(JobStoreError("x"), RuntimeError)


# -- status machine -----------------------------------------------------------------------------------------


def test_happy_path_transitions(store, clock):
    job = store.create(make_job())
    clock.now = 10.0
    running = store.mark_running(job.id)
    assert running.status is JobStatus.RUNNING and running.started_at == 10.0 and running.attempts == 1
    progressed = store.update_progress(job.id, 3, 16)
    assert (progressed.progress_done, progressed.progress_total) == (3, 16)
    clock.now = 20.0
    done = store.complete(job.id, [f"{job.id}.mp4"], 9876)
    assert done.status is JobStatus.COMPLETED and done.finished_at == 20.0
    assert done.outputs == [f"{job.id}.mp4"] and done.inference_ms == 9876 and done.is_terminal
    assert store.get(job.id) == done


@pytest.mark.parametrize("end", ["complete", "fail", "cancel"])
def test_terminal_jobs_never_change_again(store, end):
    job = store.create(make_job())
    store.mark_running(job.id)
    final = {"complete": lambda: store.complete(job.id, ["o.mp4"], 1),
             "fail": lambda: store.fail(job.id, "oom", "oom"),
             "cancel": lambda: store.cancel(job.id)}[end]()
    assert final.is_terminal
    assert store.mark_running(job.id) is None
    assert store.update_progress(job.id, 5, 6) is None
    assert store.complete(job.id, ["other.mp4"], 2) is None
    assert store.fail(job.id, "late", "timeout") is None
    assert store.cancel(job.id) is None
    assert store.requeue(job.id) is None
    assert store.recover_after_restart() == ([], [])
    assert store.get(job.id) == final


def test_forbidden_transitions_from_queued_and_running(store):
    job = store.create(make_job())
    assert store.complete(job.id, ["x.mp4"], 1) is None  # never ran
    assert store.update_progress(job.id, 1, 2) is None
    assert store.requeue(job.id) is None
    assert store.mark_running(job.id).status is JobStatus.RUNNING
    assert store.mark_running(job.id) is None  # no double claim
    assert store.get(job.id).attempts == 1
    assert store.mark_running("nope") is None and store.cancel("nope") is None


def test_cancel_and_fail_from_queued_and_running(store):
    queued, running = store.create(make_job()), store.create(make_job())
    store.mark_running(running.id)
    c1, c2 = store.cancel(queued.id), store.cancel(running.id)
    assert c1.status is c2.status is JobStatus.CANCELLED and c1.error_code == "cancelled" and c1.finished_at
    failed = store.fail(store.create(make_job()).id, "waited too long", "timeout")
    assert failed.status is JobStatus.FAILED and (failed.error, failed.error_code) == ("waited too long", "timeout")


def test_requeue_for_a_graceful_drain(store):
    job = store.create(make_job())
    store.mark_running(job.id)
    store.update_progress(job.id, 4, 8)
    back = store.requeue(job.id)
    assert back.status is JobStatus.QUEUED and back.started_at is None and back.progress_done == 0
    assert back.attempts == 0  # a drain is refunded: it is not the job's fault
    store.mark_running(job.id)
    assert store.requeue(job.id, refund_attempt=False).attempts == 1


def test_recover_after_restart_requeues_then_fails(store):
    a, b, c = (store.create(make_job(created_at=t)) for t in (1.0, 2.0, 3.0))
    store.mark_running(a.id)
    store.mark_running(b.id)
    assert store.recover_after_restart(max_attempts=2) == ([a.id, b.id], [])
    assert [j.id for j in store.queued_in_order()] == [a.id, b.id, c.id]
    store.mark_running(a.id)
    assert store.get(a.id).attempts == 2
    assert store.recover_after_restart(max_attempts=2) == ([], [a.id])
    failed = store.get(a.id)
    assert failed.status is JobStatus.FAILED and failed.error_code == "interrupted" and "2 of 2" in failed.error
    with pytest.raises(ValueError):
        store.recover_after_restart(max_attempts=0)


# -- reads ----------------------------------------------------------------------------------------------------


def test_owner_isolation(store):
    mine, theirs = store.create(make_job(owner="alice")), store.create(make_job(owner="bob"))
    assert store.get(mine.id, owner="alice") == mine
    assert store.get(theirs.id, owner="alice") is None  # same answer as an unknown id: no existence oracle
    assert store.get(new_job_id(), owner="alice") is None
    assert store.get(theirs.id) == theirs  # owner=None: auth off / admin
    assert [j.id for j in store.list(owner="alice")] == [mine.id]
    assert store.list(owner="carol") == []


def test_ordering_and_filters(store):
    jobs = [store.create(make_job(created_at=t)) for t in (5.0, 1.0, 3.0, 3.0)]
    by_time = [jobs[1], jobs[2], jobs[3], jobs[0]]  # equal created_at: insertion order
    assert [j.id for j in store.queued_in_order()] == [j.id for j in by_time]
    assert [j.id for j in store.list()] == [j.id for j in reversed(by_time)]
    assert [j.id for j in store.list(limit=2)] == [jobs[0].id, jobs[3].id]
    store.mark_running(jobs[2].id)
    assert [j.id for j in store.list([JobStatus.RUNNING])] == [jobs[2].id]
    assert len(store.list([JobStatus.RUNNING, JobStatus.QUEUED])) == 4
    assert store.list([]) == [] and store.list(limit=0) == []
    assert jobs[2].id not in [j.id for j in store.queued_in_order()]


def test_counts_and_queue_depth(store):
    ids = [store.create(make_job()).id for _ in range(6)]
    store.mark_running(ids[0])
    store.mark_running(ids[1])
    store.complete(ids[1], ["x.mp4"], 1)
    store.fail(ids[2], "x", "internal")
    store.cancel(ids[3])
    counts = store.count_by_status()
    assert counts == {JobStatus.QUEUED: 2, JobStatus.RUNNING: 1, JobStatus.COMPLETED: 1, JobStatus.FAILED: 1,
                      JobStatus.CANCELLED: 1}
    assert store.queue_depth() == 2


def test_prune_deletes_only_old_terminal_jobs(store, clock):
    clock.now = 100.0
    old_done, old_failed, old_queued, old_running = (store.create(make_job()) for _ in range(4))
    store.mark_running(old_done.id)
    store.complete(old_done.id, ["a.mp4"], 1)
    store.fail(old_failed.id, "x", "internal")
    store.mark_running(old_running.id)
    clock.now = 200.0
    recent = store.create(make_job())
    store.cancel(recent.id)
    clock.now = 250.0
    assert store.prune_jobs(older_than_s=1000) == []
    pruned = store.prune_jobs(older_than_s=100)  # cutoff 150: only the two finished at t=100
    assert {j.id for j in pruned} == {old_done.id, old_failed.id}
    assert [j.outputs for j in pruned if j.id == old_done.id] == [["a.mp4"]]
    assert store.get(old_done.id) is None and store.get(old_failed.id) is None
    assert store.get(old_queued.id) and store.get(old_running.id) and store.get(recent.id)
    assert [j.id for j in store.prune_jobs(older_than_s=0)] == [recent.id]


def at_once(n: int, call) -> tuple[list, list]:
    """``call(i)`` for i in range(n) on n threads released together: (results, exceptions raised), in no order."""
    barrier = threading.Barrier(n)
    results, raised = [], []

    def run(i: int) -> None:
        barrier.wait()
        try:
            results.append(call(i))
        except Exception as exc:
            raised.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, raised


# -- idempotency ----------------------------------------------------------------------------------------------


def test_idempotent_create_from_20_threads_makes_one_job(open_store):
    # Two stores on one location stand in for two API replicas: the guard must hold across connections too.
    stores = [open_store(), open_store()]
    results, errors = at_once(20, lambda i: stores[i % 2].create_idempotent(make_job(owner="alice"), "key-1", "fp-A"))
    assert errors == []
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert stores[0].count_by_status()[JobStatus.QUEUED] == 1
    job = stores[1].get(results[0][0].id)
    assert job.idempotency_key == "key-1"

    with pytest.raises(IdempotencyConflict):
        stores[0].create_idempotent(make_job(owner="alice"), "key-1", "fp-B")
    other, created = stores[0].create_idempotent(make_job(owner="bob"), "key-1", "fp-B")
    assert created and other.id != job.id  # keys are scoped per tenant


def test_quota_holds_across_two_stores_under_concurrency(open_store):
    """24 submits of one owner at once through two replicas, with a quota of 3: exactly 3 are stored, whether
    with or without an idempotency key; other owners are not held back, and an ended job frees a place."""
    stores = [open_store(), open_store()]

    def submit(i: int) -> str:
        s = stores[i % 2]
        if i % 3:
            return s.create(make_job(owner="alice"), quota=3).id
        return s.create_idempotent(make_job(owner="alice"), f"key-{i}", "fp", quota=3)[0].id

    admitted, refused = at_once(24, submit)
    assert all(isinstance(exc, QuotaExceeded) for exc in refused), refused
    assert len(admitted) == 3 and len(refused) == 21
    assert {(e.active, e.quota) for e in refused} == {(3, 3)}
    assert stores[1].count_by_status()[JobStatus.QUEUED] == 3
    assert stores[0].create(make_job(owner="bob"), quota=3).owner == "bob"
    with pytest.raises(QuotaExceeded):
        stores[1].create(make_job(owner="alice"), quota=3)
    stores[0].mark_running(admitted[0])
    stores[1].complete(admitted[0], ["x.mp4"], 1)
    assert stores[1].create(make_job(owner="alice"), quota=3).status is JobStatus.QUEUED


def test_queue_bound_holds_across_two_stores_under_concurrency(open_store):
    """20 submits of different owners at once through two replicas, at most 4 waiting: exactly 4 are stored (keyed
    or not); a job that starts running leaves the queue and frees a place; a replay of a stored key is never
    refused."""
    stores = [open_store(), open_store()]

    def submit(i: int) -> str:
        s = stores[i % 2]
        if i % 2:
            return s.create(make_job(owner=f"owner-{i}"), max_queued=4).id
        return s.create_idempotent(make_job(owner=f"owner-{i}"), f"key-{i}", "fp", max_queued=4)[0].id

    admitted, refused = at_once(20, submit)
    assert all(isinstance(exc, QueueFull) for exc in refused), refused
    assert len(admitted) == 4 and len(refused) == 16
    assert {(e.queued, e.limit) for e in refused} == {(4, 4)}
    assert stores[0].queue_depth() == 4
    keyed = [job for job in (stores[1].get(i) for i in admitted) if job.idempotency_key]
    if keyed:
        replay, created = stores[1].create_idempotent(make_job(owner=keyed[0].owner), keyed[0].idempotency_key,
                                                      "fp", max_queued=4)
        assert not created and replay.id == keyed[0].id
    with pytest.raises(QueueFull):
        stores[1].create(make_job(), max_queued=4)
    stores[0].mark_running(admitted[0])
    assert stores[1].create(make_job(), max_queued=4).status is JobStatus.QUEUED


def test_idempotency_key_expires_after_ttl(store, clock):
    clock.now = 1000.0
    first, created = store.create_idempotent(make_job(created_at=1000.0), "k", "fp")
    assert created
    clock.now = 1000.0 + 3600
    assert store.create_idempotent(make_job(), "k", "fp", ttl_s=86400)[0].id == first.id
    clock.now = 1000.0 + 86401
    second, created = store.create_idempotent(make_job(created_at=clock.now), "k", "other-body", ttl_s=86400)
    assert created and second.id != first.id
    assert store.get(first.id).idempotency_key is None  # the old job lives on, without the key
    with pytest.raises(ValueError):
        store.create_idempotent(make_job(), "k" * 256, "fp")
    with pytest.raises(ValueError):
        store.create_idempotent(make_job(), "k2", "")


# -- SQLite only: the file, its pragmas and its schema version (PostgreSQL's: tests/test_jobs_postgres.py) ------


def test_wal_and_synchronous_full_are_set(tmp_path):
    with JobStore(tmp_path / "a.db") as s:
        conn = s._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
        job = s.create(make_job())
        s.mark_running(job.id)
        s.update_progress(job.id, 1, 2)  # commits without fsync, then must restore FULL
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    with JobStore(tmp_path / "b.db", synchronous="normal") as s:
        assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == 1
    with pytest.raises(ValueError):
        JobStore(tmp_path / "c.db", synchronous="sometimes")
    # What another process sees: the file itself is in WAL mode and versioned.
    conn = sqlite3.connect(tmp_path / "a.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT progress_done FROM jobs").fetchone()[0] == 1
    conn.close()
    assert (tmp_path / "a.db").stat().st_mode & 0o077 == 0  # prompts and tenant keys: owner-only


def test_reopen_keeps_data_and_refuses_newer_schema(tmp_path):
    path = tmp_path / "nested" / "dir" / "jobs.db"
    with JobStore(path) as s:
        job = s.create(make_job())
    with JobStore(path) as s:
        assert s.get(job.id) == job
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(JobStoreError, match="schema version 99"):
        JobStore(path)


def test_a_version_1_store_is_migrated_in_place(tmp_path):
    """Version 2 added the parameter a failure names, 3 the variant, 4 the webhook outbox; a store written by version
    1 keeps its jobs and gains them all."""
    path = tmp_path / "v1.db"
    with JobStore(path) as s:
        job = s.create(make_job())
        s.fail(job.id, "image: not a PNG", "invalid_input", "image")
    conn = sqlite3.connect(path)  # back to what version 1 wrote
    conn.execute("ALTER TABLE jobs DROP COLUMN error_param")
    conn.execute("ALTER TABLE jobs DROP COLUMN variant")
    conn.execute("DROP TABLE webhook_deliveries")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with JobStore(path) as s:
        old = s.get(job.id)
        assert (old.status, old.error, old.error_param, old.variant) == (JobStatus.FAILED, "image: not a PNG", "", None)
        other = s.create(make_job(prompt="second", variant="4.5B-distill"))
        assert s.fail(other.id, "seed: too big", "invalid_input", "seed").error_param == "seed"
        assert s.get(other.id).variant == "4.5B-distill"
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    assert conn.execute("SELECT COUNT(*) FROM webhook_deliveries").fetchone()[0] == 0
    conn.close()


# -- lifecycle and threads ----------------------------------------------------------------------------------------


def test_closed_store_raises(open_store):
    s = open_store()
    assert not s.closed
    s.close()
    s.close()
    assert s.closed
    with pytest.raises(JobStoreError):
        s.get("x")
    with pytest.raises(JobStoreError):
        s.create(make_job())


def test_many_threads_mixed_work(store):
    ids = [store.create(make_job()).id for _ in range(40)]
    errors = []

    def worker(chunk: list[str]) -> None:
        try:
            for job_id in chunk:
                store.mark_running(job_id)
                store.update_progress(job_id, 1, 2)
                store.list(limit=5)
                store.complete(job_id, [f"{job_id}.mp4"], 1)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(ids[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.count_by_status()[JobStatus.COMPLETED] == 40


# -- durability across kill -9 -----------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from magi_server.serving.jobs import Job, JobStatus, new_job_id
    from magi_server.serving.stores import open_job_store
    from magi_server.params import GenerationParams

    location, n, run_id = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    store = open_job_store(location)
    params = GenerationParams(prompts=("durable",), width=64, height=64, num_frames=8, num_inference_steps=2, seed=1)
    for _ in range(n):
        job = store.create(Job(id=new_job_id(), api="fal", model="m", status=JobStatus.QUEUED, params=params,
                               created_at=0.0))
        print("CREATED", job.id, flush=True)  # only after create() returned: the caller may now hand it out
    run_id = run_id if run_id != "-" else store.queued_in_order()[0].id
    assert store.mark_running(run_id) is not None
    print("RUNNING", run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _run_and_kill(location: str, n: int, run_id: str) -> tuple[list[str], str]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, location, str(n), run_id], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines()]
    created = [i for tag, i in lines if tag == "CREATED"]
    running = [i for tag, i in lines if tag == "RUNNING"]
    assert len(created) == n and len(running) == 1
    return created, running[0]


def test_jobs_survive_kill_9_and_interrupted_job_is_bounded(store_location):
    created1, victim = _run_and_kill(store_location, 20, "-")
    with open_job_store(store_location) as s:
        assert all(s.get(i) is not None for i in created1)
        assert s.get(victim).status is JobStatus.RUNNING
        assert s.recover_after_restart(max_attempts=2) == ([victim], [])
        assert s.get(victim).status is JobStatus.QUEUED and s.get(victim).attempts == 1

    created2, again = _run_and_kill(store_location, 20, victim)  # the same job crashes the process a second time
    assert again == victim
    with open_job_store(store_location) as s:
        assert all(s.get(i) is not None for i in created1 + created2)
        assert s.recover_after_restart(max_attempts=2) == ([], [victim])
        dead = s.get(victim)
        assert dead.status is JobStatus.FAILED and dead.error_code == "interrupted" and dead.attempts == 2
        assert s.queue_depth() == 39  # every other job is still waiting to run


# -- layering ----------------------------------------------------------------------------------------------------


def test_jobs_module_is_torch_free_and_imports_only_params():
    source = (REPO_ROOT / "magi_server" / "serving" / "jobs.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert {m for m in imported if m.startswith("magi_server")} == {"magi_server.params"}
    probe = "import sys, magi_server.serving.jobs; print(json.dumps(sorted(m for m in sys.modules if m.startswith('torch'))))"
    proc = subprocess.run([sys.executable, "-c", "import json; " + probe], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_queue_position_counts_the_queued_jobs_ahead(store):
    first, second, third = (store.create(make_job(created_at=t)) for t in (1.0, 2.0, 2.0))
    assert [store.queue_position(j.id) for j in (first, second, third)] == [0, 1, 2]
    store.mark_running(first.id)
    assert [store.queue_position(j.id) for j in (first, second, third)] == [None, 0, 1]
    assert store.queue_position("no-such-job") is None


def test_a_deleted_job_is_marked_in_the_store_for_every_replica(open_store, clock):
    """Magic Hour's and OpenAI's DELETE: only an ended job can be marked (a running one is cancelled first); the mark
    is in the row, so another replica on the same store answers it as deleted; a second delete marks it again."""
    a, b = open_store(), open_store()
    job = a.create(make_job(meta={"name": "kept"}))
    assert a.mark_deleted(job.id) is None and a.get(job.id).deleted_at is None  # still queued
    a.cancel(job.id)
    clock.now += 5.0
    deleted = a.mark_deleted(job.id)
    assert deleted.deleted_at == clock.now and deleted.meta["name"] == "kept"  # merged into the meta, not replacing it
    assert b.get(job.id).deleted_at == clock.now
    clock.now += 5.0
    assert b.mark_deleted(job.id).deleted_at == clock.now  # deleting again: still deleted (a 204 / 200 upstream)
    assert a.mark_deleted("0" * 32) is None


def test_listing_by_api(store):
    """The history routes ask the store for one wire protocol's jobs (WaveSpeed's predictions, OpenAI's videos)."""
    mine = [store.create(make_job(created_at=float(i), owner="k")) for i in range(3)]
    fal = store.create(dataclasses.replace(make_job(created_at=10.0, owner="k"), api="fal"))
    assert [j.id for j in store.list(owner="k", api="wavespeed")] == [j.id for j in reversed(mine)]
    assert [j.id for j in store.list(owner="k", api="fal")] == [fal.id]
    assert [j.id for j in store.list(api="wavespeed", limit=2)] == [mine[2].id, mine[1].id]
    assert store.list(api="openai") == []
