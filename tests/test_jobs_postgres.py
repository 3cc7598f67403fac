"""The PostgreSQL job store's own concerns, on a real server the session starts (tests/postgres_utils.py): choosing
the store from the location, the versioned schema and its migration, faults surfacing as the store's errors
(an unreachable server, dropped connections, a lock held too long, a damaged row), the connection pool's bound,
text PostgreSQL cannot hold, and the leases GPU workers hold (claim, renewal, fencing, the sweeper). The behaviour
both stores share is tested against both in tests/test_jobs.py."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from magi_server.serving.jobs import DamagedJob, JobStatus, JobStore, JobStoreError, JobStoreUnusable, QuotaExceeded
from magi_server.serving.stores import is_postgres_url, open_job_store
from tests.golden_utils import REPO_ROOT
from tests.postgres_utils import free_port
from tests.test_jobs import FakeClock, at_once, make_job


@pytest.fixture
def pg_store(postgres_dsn):
    from magi_server.serving.jobs_postgres import PostgresJobStore

    with PostgresJobStore(postgres_dsn) as s:
        yield s


@pytest.fixture
def database_dsn(postgres_server):
    """A database of its own, for tests that count the store's server connections (pg_stat_activity names the
    database, not the schema). Returns (URL, database name)."""
    name = postgres_server.database()
    yield postgres_server.dsn(name), name
    postgres_server.drop_database(name)


def _admin_query(dsn: str, sql: str, args: tuple = ()) -> list[tuple]:
    """One statement on its own connection to the store's database, as an operator with psql would."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, args)
        return cur.fetchall() if cur.description else []


# -- choosing the store ----------------------------------------------------------------------------------------------


def test_a_path_names_the_sqlite_store(tmp_path):
    with open_job_store(str(tmp_path / "jobs.db")) as s:
        assert isinstance(s, JobStore)
    with open_job_store(tmp_path / "other.db", synchronous="NORMAL") as s:  # a Path too, and SQLite's options
        assert isinstance(s, JobStore)
    assert is_postgres_url("PostgreSQL://h/db") and is_postgres_url(" postgres://h/db")
    assert not is_postgres_url("postgresql.db") and not is_postgres_url(tmp_path / "postgresql:")


def test_a_postgresql_url_names_the_postgresql_store(postgres_dsn):
    from magi_server.serving.jobs_postgres import PostgresJobStore

    assert postgres_dsn.startswith("postgresql://")
    for dsn in (postgres_dsn, "postgres://" + postgres_dsn.removeprefix("postgresql://")):
        with open_job_store(dsn) as s:
            assert isinstance(s, PostgresJobStore) and not s.closed and s.location == dsn  # no password here


def test_importing_the_stores_needs_neither_psycopg_nor_a_server():
    probe = ("import sys, magi_server.serving.stores, magi_server.serving.jobs_postgres; "
             "print('psycopg' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# -- schema --------------------------------------------------------------------------------------------------------


def test_schema_is_versioned_and_holds_the_worker_columns(pg_store, postgres_dsn):
    from magi_server.serving.jobs_postgres import SCHEMA_VERSION, migrate

    assert _admin_query(postgres_dsn, "SELECT version FROM magi_schema_version") == [(SCHEMA_VERSION,)]
    columns = {name for (name,) in _admin_query(
        postgres_dsn, "SELECT column_name FROM information_schema.columns "
                      "WHERE table_name = 'magi_jobs' AND table_schema = current_schema()")}
    assert {"lease_owner", "lease_expires_at", "variant", "idempotency_fingerprint", "seq"} <= columns
    job = pg_store.create(make_job())
    assert migrate(postgres_dsn) == (SCHEMA_VERSION, SCHEMA_VERSION)  # nothing to do, data untouched
    assert pg_store.get(job.id) == job


def test_replicas_starting_at_once_migrate_once(postgres_server):
    """Four processes' worth of migrations on an empty database at the same moment: one creates the schema, the
    others wait on the migration lock and find it done."""
    from magi_server.serving.jobs_postgres import SCHEMA_VERSION, migrate

    name = postgres_server.database()
    try:
        dsn = postgres_server.dsn(name)
        results, errors = at_once(4, lambda _: migrate(dsn))
        assert errors == []
        assert sorted(results) == [(0, SCHEMA_VERSION)] + [(SCHEMA_VERSION, SCHEMA_VERSION)] * 3
    finally:
        postgres_server.drop_database(name)


def test_a_newer_schema_is_refused(pg_store, postgres_dsn):
    from magi_server.serving.jobs_postgres import PostgresJobStore, migrate

    _admin_query(postgres_dsn, "UPDATE magi_schema_version SET version = 99")
    with pytest.raises(JobStoreUnusable, match="schema version 99, newer than"):
        PostgresJobStore(postgres_dsn)
    with pytest.raises(JobStoreUnusable, match="schema version 99"):
        migrate(postgres_dsn)


# -- faults --------------------------------------------------------------------------------------------------------


def test_an_unreachable_server_is_one_line_without_the_password():
    pytest.importorskip("psycopg")
    from magi_server.serving.jobs_postgres import redact_dsn

    dsn = f"postgresql://magi:s3cret-pw@127.0.0.1:{free_port()}/jobs"
    with pytest.raises(JobStoreUnusable) as info:
        open_job_store(dsn, connect_timeout_s=2)
    message = str(info.value)
    assert "cannot be opened" in message and "s3cret-pw" not in message and "magi:***@127.0.0.1" in message
    assert "\n" not in message
    assert redact_dsn("host=db user=u password='a b\\'c' dbname=j") == "host=db user=u password=*** dbname=j"
    assert (redact_dsn("postgresql://h/db?password=x&sslmode=require")
            == "postgresql://h/db?password=***&sslmode=require")


def test_dropped_connections_are_replaced_and_a_break_mid_call_is_a_store_error(database_dsn):
    import psycopg

    from magi_server.serving.jobs_postgres import PostgresJobStore

    dsn, database = database_dsn
    pg_store = PostgresJobStore(dsn)
    job = pg_store.create(make_job())
    killed = _admin_query(dsn, "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                                        "WHERE datname = %s AND application_name = 'magi-server'", (database,))
    assert killed and all(ok for (ok,) in killed)
    # the pool checks a connection before lending it: the dead ones are replaced, no call fails
    assert pg_store.get(job.id) == job
    assert pg_store.mark_running(job.id).status is JobStatus.RUNNING
    pg_store.close()
    # a connection that breaks during a call is a store error (a 503 upstream), not a 500
    with PostgresJobStore(dsn) as pg_store, pytest.raises(JobStoreError) as info:
        with pg_store._connection() as conn:
            conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    assert isinstance(info.value.__cause__, psycopg.Error)


def test_a_lock_held_past_the_lock_timeout_is_a_store_error(postgres_dsn):
    import psycopg

    from magi_server.serving.jobs_postgres import PostgresJobStore

    with PostgresJobStore(postgres_dsn, lock_timeout_s=0.2) as s:
        job = s.create(make_job())
        with psycopg.connect(postgres_dsn) as holder:  # an operator's transaction holding the row
            holder.execute("SELECT id FROM magi_jobs WHERE id = %s FOR UPDATE", (job.id,))
            with pytest.raises(JobStoreError, match="lock timeout"):
                s.mark_running(job.id)
            assert s.get(job.id).status is JobStatus.QUEUED  # plain reads never wait on row locks
            holder.rollback()
        assert s.mark_running(job.id).status is JobStatus.RUNNING


def test_a_damaged_row_is_that_job_only(pg_store, postgres_dsn):
    good, bad = pg_store.create(make_job(owner="alice")), pg_store.create(make_job(owner="alice"))
    _admin_query(postgres_dsn, "UPDATE magi_jobs SET params = '{not json' WHERE id = %s", (bad.id,))
    with pytest.raises(DamagedJob) as info:
        pg_store.get(bad.id)
    assert info.value.job_id == bad.id
    assert pg_store.get(bad.id, owner="mallory") is None  # another tenant learns nothing
    assert [j.id for j in pg_store.list()] == [good.id]
    assert [j.id for j in pg_store.queued_in_order()] == [good.id]
    with pytest.raises(DamagedJob):  # the transition is taken; only reading the row back fails
        pg_store.cancel(bad.id)
    assert pg_store.count_by_status()[JobStatus.CANCELLED] == 1
    assert pg_store.prune_jobs(older_than_s=-1e12) == []  # deleted all the same; its files are not known
    assert pg_store.count_by_status()[JobStatus.CANCELLED] == 0


# -- connections and text ------------------------------------------------------------------------------------------


def test_the_pool_bounds_the_server_connections(database_dsn):
    from magi_server.serving.jobs_postgres import PostgresJobStore

    dsn, database = database_dsn
    with PostgresJobStore(dsn, max_connections=2) as s:
        ids = [s.create(make_job()).id for _ in range(16)]
        seen, errors = [], []

        def work(chunk: list[str]) -> None:
            try:
                for job_id in chunk:
                    s.mark_running(job_id)
                    s.update_progress(job_id, 1, 2)
                    s.complete(job_id, [f"{job_id}.mp4"], 1)
                    seen.append(_admin_query(dsn, "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = %s "
                                                           "AND application_name = 'magi-server'", (database,))[0][0])
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(ids[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and max(seen) <= 2
        assert s.count_by_status()[JobStatus.COMPLETED] == 16


def test_text_postgresql_cannot_hold_is_escaped_not_refused(pg_store):
    job = make_job(owner="tenant\x00x", prompt="nul \x00 in a prompt", meta={"note": "a\x00b"})
    stored = pg_store.create(job)
    assert stored.owner == "tenant\\x00x"  # plain text column: escaped deterministically
    assert stored.params.prompts == ("nul \x00 in a prompt",) and stored.meta == {"note": "a\x00b"}  # JSON: exact
    assert pg_store.get(job.id, owner="tenant\x00x") == stored
    assert pg_store.list(owner="tenant\x00x") == [stored]
    assert pg_store.fail(job.id, "bad \x00 input", "invalid_input").error == "bad \\x00 input"
    assert pg_store.get("\x00" * 32) is None
    first, created = pg_store.create_idempotent(make_job(), "key\x00", "fp\x00")
    assert created and pg_store.create_idempotent(make_job(), "key\x00", "fp\x00") == (first, False)


def test_serve_with_an_unreachable_postgresql_store_stops_with_one_line_and_exit_code_2(tmp_path):
    pytest.importorskip("psycopg")
    url = f"postgresql://magi:s3cret-pw@127.0.0.1:{free_port()}/jobs?connect_timeout=2"
    done = subprocess.run([sys.executable, "-m", "magi_server.tools.cli", "serve", "--model", "tiny", "--db", url,
                           "--outputs", str(tmp_path / "outputs"), "--port", "0"],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stdout == "", done.stderr
    assert "cannot be opened" in done.stderr and "s3cret-pw" not in done.stderr


def test_the_migrate_command_creates_the_schema_once(postgres_dsn, tmp_path):
    def migrate(location: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "magi_server.tools.cli", "migrate", "--db", location],
                              capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)

    first, again = migrate(postgres_dsn), migrate(postgres_dsn)
    assert first.returncode == 0 and first.stdout.strip().endswith("schema version 0 -> 2"), first
    assert again.returncode == 0 and again.stdout.strip().endswith("schema version 2, nothing to do"), again
    sqlite = migrate(str(tmp_path / "jobs.db"))
    assert sqlite.returncode == 0 and (tmp_path / "jobs.db").is_file(), sqlite
    unreachable = migrate(f"postgresql://magi:s3cret-pw@127.0.0.1:{free_port()}/jobs?connect_timeout=2")
    assert unreachable.returncode == 2 and len(unreachable.stderr.splitlines()) == 1, unreachable
    assert "s3cret-pw" not in unreachable.stderr + unreachable.stdout


# -- leases ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def leased_stores(postgres_dsn, clock):
    """Three stores on one database with one fake clock: three worker processes' views of the queue."""
    from magi_server.serving.jobs_postgres import PostgresJobStore

    stores = [PostgresJobStore(postgres_dsn, clock=clock) for _ in range(3)]
    yield stores
    for s in stores:
        s.close()


def _lease(dsn: str, job_id: str) -> tuple:
    return _admin_query(dsn, "SELECT lease_owner, lease_expires_at FROM magi_jobs WHERE id = %s", (job_id,))[0]


def test_claims_take_the_oldest_suitable_job_once(leased_stores, postgres_dsn):
    a, b, c = leased_stores
    old, new, big = (a.create(make_job(created_at=t)) for t in (1.0, 2.0, 0.5))
    _admin_query(postgres_dsn, "UPDATE magi_jobs SET variant = '24B' WHERE id = %s", (big.id,))
    first = b.claim("w1", ["4.5B-distill"], lease_s=30)
    assert first.id == old.id and first.status is JobStatus.RUNNING and first.attempts == 1
    assert first.started_at == 1000.0 and _lease(postgres_dsn, old.id) == ("w1", 1030.0)
    assert c.claim("w2", ["4.5B-distill"], lease_s=30).id == new.id  # the 24B job is not this worker's
    assert c.claim("w2", ["4.5B-distill"], lease_s=30) is None
    assert a.claim("w3", ["24B", "4.5B"], lease_s=30).id == big.id
    assert a.claim("w3", None, lease_s=30) is None
    with pytest.raises(ValueError):
        a.claim("", None, lease_s=30)
    with pytest.raises(ValueError):
        a.claim("w1", None, lease_s=0)


def test_concurrent_claimers_split_the_queue_without_overlap(leased_stores):
    ids = {leased_stores[0].create(make_job(created_at=float(i))).id for i in range(30)}

    def worker(n: int) -> list[str]:
        claimed = []
        while (job := leased_stores[n % 3].claim(f"w{n}", None, lease_s=30)) is not None:
            claimed.append(job.id)
            assert leased_stores[n % 3].complete(job.id, [f"{job.id}.mp4"], 1, worker_id=f"w{n}")
        return claimed

    per_worker, errors = at_once(6, worker)
    claimed = [job_id for ids_of_one in per_worker for job_id in ids_of_one]
    assert errors == []
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    assert leased_stores[1].count_by_status()[JobStatus.COMPLETED] == 30


def test_a_lapsed_lease_is_requeued_and_the_old_worker_is_fenced_out(leased_stores, postgres_dsn, clock):
    a, b, sweeper = leased_stores
    job = a.create(make_job())
    assert a.claim("w1", None, lease_s=30).id == job.id
    clock.now += 20
    assert a.renew_lease(job.id, "w1", 30) is not None and _lease(postgres_dsn, job.id) == ("w1", 1050.0)
    assert b.renew_lease(job.id, "w2", 30) is None  # not w2's to renew
    assert a.update_progress(job.id, 3, 8, worker_id="w1").progress_done == 3
    clock.now += 29
    assert sweeper.requeue_expired_leases() == ([], [])  # still within the renewed lease
    clock.now += 2  # w1 stopped renewing (killed, partitioned)
    assert sweeper.requeue_expired_leases(max_attempts=2) == ([job.id], [])
    back = sweeper.get(job.id)
    assert back.status is JobStatus.QUEUED and back.attempts == 1 and back.progress_done == 0
    assert _lease(postgres_dsn, job.id) == (None, None)
    again = b.claim("w2", None, lease_s=30)
    assert again.id == job.id and again.attempts == 2
    # w1 comes back to life: nothing it does lands any more
    assert a.renew_lease(job.id, "w1", 30) is None
    assert a.update_progress(job.id, 8, 8, worker_id="w1") is None
    assert a.complete(job.id, ["stale.mp4"], 1, worker_id="w1") is None
    assert a.fail(job.id, "late", "internal", worker_id="w1") is None
    assert a.requeue(job.id, worker_id="w1") is None
    done = b.complete(job.id, [f"{job.id}.mp4"], 5, worker_id="w2")
    assert done.status is JobStatus.COMPLETED and done.outputs == [f"{job.id}.mp4"] and done.attempts == 2


def test_a_job_whose_leases_keep_lapsing_fails_as_interrupted(leased_stores, clock):
    a, _, sweeper = leased_stores
    job = a.create(make_job())
    for attempt in (1, 2):
        assert a.claim(f"w{attempt}", None, lease_s=10).attempts == attempt
        clock.now += 11
        requeued, failed = sweeper.requeue_expired_leases(max_attempts=2)
    assert (requeued, failed) == ([], [job.id])
    dead = sweeper.get(job.id)
    assert dead.status is JobStatus.FAILED and dead.error_code == "interrupted" and "2 of 2" in dead.error
    assert "stopped renewing its lease" in dead.error
    with pytest.raises(ValueError):
        sweeper.requeue_expired_leases(max_attempts=0)


def test_cancel_ends_a_lease_and_the_sweeper_leaves_unleased_jobs_alone(leased_stores, clock):
    a, b, sweeper = leased_stores
    leased, unleased = a.create(make_job(created_at=1.0)), a.create(make_job(created_at=2.0))
    assert a.claim("w1", None, lease_s=10).id == leased.id
    assert b.mark_running(unleased.id).status is JobStatus.RUNNING  # one `serve` process: no lease
    assert sweeper.cancel(leased.id).status is JobStatus.CANCELLED
    assert a.renew_lease(leased.id, "w1", 10) is None  # how the worker learns to stop
    assert a.complete(leased.id, ["x.mp4"], 1, worker_id="w1") is None
    clock.now += 3600
    assert sweeper.requeue_expired_leases() == ([], [])
    assert sweeper.get(unleased.id).status is JobStatus.RUNNING
    graceful = a.create(make_job(created_at=3.0))
    assert a.claim("w1", None, lease_s=10).id == graceful.id
    back = a.requeue(graceful.id, worker_id="w1")  # a drain: refunded, lease released
    assert back.status is JobStatus.QUEUED and back.attempts == 0


# -- notifications ---------------------------------------------------------------------------------------------------


def test_every_status_change_and_published_event_is_heard_by_listeners(leased_stores, clock):
    """LISTEN/NOTIFY: a listener on another connection hears each status change as the transaction that made it
    commits (create, claim, completion, cancel, a sweep's re-queue) and each published event; a rolled-back change
    (a refused quota) is never heard; ticks come while nothing is said."""
    a, b, _ = leased_stores
    heard, ticks = [], []
    listener = a.listener(heard.append, on_tick=lambda: ticks.append(1), tick_s=0.1).start()
    try:
        assert listener.connected.is_set()
        first, second = b.create(make_job(owner="o")), b.create(make_job(created_at=200.0))
        assert b.queue_position(first.id) == 0 and b.queue_position(second.id) == 1
        with pytest.raises(QuotaExceeded):
            b.create(make_job(owner="o"), quota=1)
        assert b.claim("w1", None, lease_s=5).id == first.id
        assert b.queue_position(first.id) is None and b.queue_position(second.id) == 0
        b.publish(first.id, "chunk", index=0, chunks_done=1, chunks_total=2, frames=24, preview="p.mp4")
        assert b.complete(first.id, ["x.mp4"], 5, worker_id="w1") is not None
        assert b.claim("w2", None, lease_s=5).id == second.id
        clock.now += 10
        assert b.requeue_expired_leases(max_attempts=2) == ([second.id], [])
        assert b.cancel(second.id) is not None
        expected = [(first.id, "status", "queued"), (second.id, "status", "queued"), (first.id, "status", "running"),
                    (first.id, "chunk", None), (first.id, "status", "completed"), (second.id, "status", "running"),
                    (second.id, "status", "queued"), (second.id, "status", "cancelled")]
        deadline = time.monotonic() + 10
        while len(heard) < len(expected) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # nothing more (the refused create) may arrive
        assert [(m["id"], m["kind"], m.get("status")) for m in heard] == expected, heard
        assert heard[3] == {"id": first.id, "kind": "chunk", "index": 0, "chunks_done": 1, "chunks_total": 2,
                            "frames": 24, "preview": "p.mp4"}
        assert ticks
    finally:
        listener.stop()
    assert not listener.connected.is_set()


def test_a_restarting_serve_leaves_the_workers_leased_jobs_alone(leased_stores):
    """One database, a `serve` process and workers: the serve's restart re-queues its own orphaned job (no lease)
    but not a job a live worker holds."""
    a, b, _ = leased_stores
    own, leased = a.create(make_job(created_at=1.0)), a.create(make_job(created_at=2.0))
    assert a.mark_running(own.id) is not None
    assert b.claim("w1", None, lease_s=30).id == leased.id
    assert a.recover_after_restart(max_attempts=2) == ([own.id], [])
    assert b.get(leased.id).status is JobStatus.RUNNING
    assert b.complete(leased.id, ["x.mp4"], 1, worker_id="w1") is not None
