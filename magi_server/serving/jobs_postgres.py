"""`PostgresJobStore`: the job store on a PostgreSQL server, for several processes (API replicas, later GPU workers)
sharing one queue. Same public behaviour as the SQLite `JobStore` in `jobs.py`, which stays the embedded default;
`stores.open_job_store` picks one from the location (`postgresql://...` here, a file path there).

What carries over unchanged from `jobs.py` (read its docstring): a job is committed before its id is returned;
transitions are compare-and-set (`UPDATE ... WHERE status = ANY(...) RETURNING`, so a refused transition returns
None); Stripe-style idempotency with body fingerprints and a TTL; the per-owner quota; `recover_after_restart`
with bounded attempts; `prune_jobs`; the `Job` records, their row codec and the error types. Every psycopg error
but a constraint violation (server gone, connection reset, lock wait past `lock_timeout_s`, disk full on the server)
surfaces as :class:`JobStoreError` (a 503 with Retry-After upstream); a store that cannot be opened or migrated
raises :class:`JobStoreUnusable` from the constructor; a row that does not parse raises :class:`DamagedJob` for
that job only.

Atomicity across processes, under PostgreSQL's default READ COMMITTED isolation:
* `create_idempotent` takes a transaction-scoped advisory lock on (owner, key) before looking the key up, so two
  replicas cannot both miss and both insert; the unique index on (owner, idempotency_key) is the backstop.
* the quota takes an advisory lock on the owner before counting, so two submits of one owner cannot both pass.
  The COUNT is a new statement after the lock is granted, so under READ COMMITTED it sees every job the previous
  holder committed. Locks are always taken in that order (key, then owner): no deadlock between the two.
  Advisory locks rather than SERIALIZABLE: no retry loop on serialization failures, and a lock per owner never
  makes one tenant's submits wait on another's.
* transitions are single UPDATE statements, atomic on their own; `recover_after_restart` locks the rows it reads.

Leases, for GPU workers sharing the queue (the SQLite store has none: one process owns its file): `claim` takes the
oldest suitable QUEUED job with `FOR UPDATE SKIP LOCKED` and leases it to a worker id until a deadline; the worker
extends it with `renew_lease`, which answers None once the job was cancelled or taken away (the worker then stops);
passing `worker_id=` to `update_progress`/`complete`/`fail`/`requeue` fences them by the lease, so a worker that
lost its lease (paused, partitioned) can no longer write a job another worker now runs; `requeue_expired_leases`
is the sweeper, with the same bounded attempts as `recover_after_restart`. Jobs started by `mark_running` (one
`serve` process) hold no lease and are never swept.

Connections: psycopg's own pool (`psycopg_pool.ConnectionPool`, at most `max_connections`). Not one connection per
thread: uvicorn's thread pool alone has forty threads, each replica would hold that many server connections (PostgreSQL's default limit is 100 for all of them together), and connections of
finished threads would leak. Not one shared connection under a lock either: a slow statement (a lock wait) would
stall every request of the process. Each call borrows a connection for one statement or one transaction; one
that died while idle is replaced before it is lent (the pool's check), so a server restart costs no request; a
connection that breaks during a call makes that call a JobStoreError (a 503 upstream) and is not reused.

Clock: times (started_at, finished_at, TTL and prune cutoffs) come from `clock`, not the server's now(), as in the
SQLite store, so tests can pass a fake one; replicas are expected to run NTP-synchronised clocks.

Schema: tables `magi_jobs` and `magi_schema_version` (prefixed, so the store can share a database with other
software), created or migrated by :func:`migrate` at open under an advisory lock (two replicas starting at once
migrate once). Version 1 already holds the columns the workers need (`lease_owner`, `lease_expires_at`, and
`variant`, the model variant a job needs, NULL for any; nothing sets it yet). Hand-written SQL rather than an ORM:
the store is a dozen statements whose exact locking and RETURNING semantics are the point, and the SQLite store
beside it is written the same way.

psycopg is imported lazily (at open), so importing this module needs neither psycopg nor a running server.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from magi_server.serving.jobs import (
    _COLUMNS,
    _ACTIVE,
    TERMINAL,
    DuplicateJob,
    IdempotentCreate,
    Job,
    JobStatus,
    JobStore,
    JobStoreError,
    JobStoreUnusable,
    QueueFull,
    QuotaExceeded,
    WebhookOutbox,
    _json,
    _text,
)

log = logging.getLogger("magi_server.serving.jobs_postgres")

SCHEMA_VERSION = 2
JOBS_TABLE = "magi_jobs"
DELIVERIES_TABLE = "magi_webhook_deliveries"
VERSION_TABLE = "magi_schema_version"
# LISTEN/NOTIFY channel: every status change (in the transaction that makes it, so it is heard iff it committed)
# and the workers' progress and chunk events, as JSON {"id": job id, "kind": "status" | "progress" | "chunk", ...}
NOTIFY_CHANNEL = "magi_jobs"
_STATUS_INDEX = _COLUMNS.index("status")

_STATUS_VALUES = ", ".join(f"'{s.value}'" for s in JobStatus)

# _STEPS[n] takes a database from schema version n to n + 1; the next version appends a step (never edits one).
_STEPS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE {JOBS_TABLE} (
            id                      TEXT PRIMARY KEY,
            seq                     BIGINT GENERATED ALWAYS AS IDENTITY,  -- insert order: breaks created_at ties
            api                     TEXT NOT NULL,
            model                   TEXT NOT NULL,
            status                  TEXT NOT NULL CHECK (status IN ({_STATUS_VALUES})),
            params                  TEXT NOT NULL,               -- GenerationParams.to_json(), ASCII JSON
            created_at              DOUBLE PRECISION NOT NULL,
            started_at              DOUBLE PRECISION,
            finished_at             DOUBLE PRECISION,
            progress_done           BIGINT NOT NULL DEFAULT 0,
            progress_total          BIGINT NOT NULL DEFAULT 0,
            outputs                 TEXT NOT NULL DEFAULT '[]',  -- JSON list of file names
            error                   TEXT NOT NULL DEFAULT '',
            error_code              TEXT NOT NULL DEFAULT '',
            error_param             TEXT NOT NULL DEFAULT '',
            attempts                BIGINT NOT NULL DEFAULT 0,
            inference_ms            BIGINT,
            owner                   TEXT NOT NULL DEFAULT '',
            meta                    TEXT NOT NULL DEFAULT '{{}}', -- JSON object
            idempotency_key         TEXT,
            idempotency_fingerprint TEXT,
            variant                 TEXT,                        -- the model variant that must run it (workers)
            lease_owner             TEXT,                        -- the worker holding a RUNNING job
            lease_expires_at        DOUBLE PRECISION             -- when that worker's claim lapses
        )""",
        f"CREATE INDEX {JOBS_TABLE}_status_created ON {JOBS_TABLE} (status, created_at, seq)",
        f"CREATE INDEX {JOBS_TABLE}_owner_status ON {JOBS_TABLE} (owner, status)",
        f"CREATE INDEX {JOBS_TABLE}_owner_created ON {JOBS_TABLE} (owner, created_at, seq)",
        f"CREATE INDEX {JOBS_TABLE}_created ON {JOBS_TABLE} (created_at, seq)",
        f"CREATE INDEX {JOBS_TABLE}_finished ON {JOBS_TABLE} (finished_at) WHERE finished_at IS NOT NULL",
        f"CREATE INDEX {JOBS_TABLE}_leases ON {JOBS_TABLE} (lease_expires_at) WHERE status = 'running'",
        f"CREATE UNIQUE INDEX {JOBS_TABLE}_idempotency ON {JOBS_TABLE} (owner, idempotency_key) "
        f"WHERE idempotency_key IS NOT NULL",
    ),
    (  # version 2: the webhook outbox (jobs.WebhookOutbox)
        f"""CREATE TABLE {DELIVERIES_TABLE} (
            id          TEXT PRIMARY KEY,                   -- the webhook-id header: the same on every retry
            job_id      TEXT NOT NULL,
            url         TEXT NOT NULL,
            state       TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
            attempts    BIGINT NOT NULL DEFAULT 0,
            next_at     DOUBLE PRECISION NOT NULL DEFAULT 0, -- not before: a claim or a backoff moves it
            created_at  DOUBLE PRECISION NOT NULL,
            log         TEXT NOT NULL DEFAULT '[]'          -- JSON list, one entry per attempt
        )""",
        f"CREATE INDEX {DELIVERIES_TABLE}_due ON {DELIVERIES_TABLE} (state, next_at)",
        f"CREATE INDEX {DELIVERIES_TABLE}_job ON {DELIVERIES_TABLE} (job_id)",
    ),
)
assert len(_STEPS) == SCHEMA_VERSION

_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM {JOBS_TABLE}"
_INSERT_COLUMNS = (*_COLUMNS, "idempotency_fingerprint")


def _lock_key(namespace: str, *parts: str) -> int:
    """A signed 64-bit advisory-lock key for (namespace, parts). Computed here, not with the server's hashtext(),
    so it does not depend on the server version; a collision only makes two unrelated submits take turns."""
    digest = hashlib.blake2b("\x1f".join((namespace, *parts)).encode("utf-8", "backslashreplace"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_MIGRATION_LOCK = _lock_key("magi-server schema migration")
_QUEUE_LOCK = _lock_key("magi-server queue bound")


def _notify(conn, job_id: str, kind: str, **data) -> None:
    """Queue a notification on ``conn``'s transaction (sent at its commit, dropped by its rollback)."""
    payload = json.dumps({"id": job_id, "kind": kind, **data}, ensure_ascii=True, separators=(",", ":"))
    conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, payload))


def _pg_text(value: str) -> str:
    """`jobs._text` (lone surrogates escaped) plus NUL, which PostgreSQL text cannot hold (SQLite can): escaped the
    same deterministic way, so a lookup by the same owner or key still matches."""
    return _text(value).replace("\x00", "\\x00")


def _pg_value(value):
    return _pg_text(value) if isinstance(value, str) else value


def _statuses(statuses: Iterable[JobStatus]) -> list[str]:
    return [JobStatus(s).value for s in statuses]


def redact_dsn(dsn: str) -> str:
    """The DSN without its password (URL userinfo or a `password=` parameter): what messages and logs show."""
    redacted = re.sub(r"(://[^:/@?#]*):[^@/?#]*@", r"\1:***@", dsn)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", r"\1***", redacted, flags=re.IGNORECASE)


def _import_psycopg():
    try:
        import psycopg
    except ImportError as exc:  # the SQLite default needs no driver; a PostgreSQL URL does
        raise JobStoreUnusable("a PostgreSQL job store needs the psycopg package (pip install 'psycopg>=3.1') "
                               f"and the libpq library: {exc}") from exc
    return psycopg


@contextmanager
def _store_errors() -> Iterator[None]:
    """psycopg errors as the store's own: JobStoreError (a 503 upstream) for everything but a constraint
    violation, which callers map to a meaning (DuplicateJob, a retried idempotent submit)."""
    import psycopg  # already imported by the constructor: a dict lookup

    try:
        yield
    except psycopg.IntegrityError:
        raise
    except psycopg.Error as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise JobStoreError(f"job store unavailable: {first_line}") from exc


def _connection_kwargs(dsn: str, *, connect_timeout_s: float, lock_timeout_s: float,
                       statement_timeout_s: float) -> dict:
    # lock_timeout bounds every lock wait (row locks, advisory locks): past it the call is a JobStoreError, the
    # counterpart of SQLite's busy timeout. statement_timeout stops a runaway statement holding a connection.
    # Appended to the DSN's own `options` (a keyword argument would replace them, e.g. a search_path).
    options = f"-c lock_timeout={int(lock_timeout_s * 1000)} -c statement_timeout={int(statement_timeout_s * 1000)}"
    from psycopg.conninfo import conninfo_to_dict

    given = conninfo_to_dict(dsn).get("options")
    options = f"{given} {options}" if given else options
    return {"autocommit": True, "connect_timeout": max(1, int(round(connect_timeout_s))), "options": options,
            "application_name": "magi-server"}


def _connect(dsn: str, *, connect_timeout_s: float, lock_timeout_s: float, statement_timeout_s: float):
    psycopg = _import_psycopg()
    return psycopg.connect(dsn, **_connection_kwargs(dsn, connect_timeout_s=connect_timeout_s,
                                                     lock_timeout_s=lock_timeout_s,
                                                     statement_timeout_s=statement_timeout_s))


def _migrate(conn) -> tuple[int, int]:
    """Bring the schema to SCHEMA_VERSION in one transaction; returns (version found, version now)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} ("
                     f"singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton), version INTEGER NOT NULL)")
        row = conn.execute(f"SELECT version FROM {VERSION_TABLE}").fetchone()
        found = 0 if row is None else int(row[0])
        if found > SCHEMA_VERSION:
            raise JobStoreUnusable(f"the job store has schema version {found}, newer than this server's "
                                   f"{SCHEMA_VERSION}; upgrade magi-server or point it at another database")
        for step in _STEPS[found:]:
            for statement in step:
                conn.execute(statement)
        conn.execute(f"INSERT INTO {VERSION_TABLE} (singleton, version) VALUES (TRUE, %s) "
                     f"ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version", (SCHEMA_VERSION,))
    if found < SCHEMA_VERSION:
        log.info("job store schema migrated from version %d to %d", found, SCHEMA_VERSION)
    return found, SCHEMA_VERSION


def migrate(dsn: str, *, connect_timeout_s: float = 10.0, lock_timeout_s: float = 60.0) -> tuple[int, int]:
    """Create or upgrade the schema of the database at `dsn`; returns (version found, version now). Safe to run
    while replicas are up and from several processes at once (one migrates, the others find it done).
    JobStoreUnusable when the database cannot be reached or is newer than this code."""
    try:
        with _store_errors():
            with _connect(dsn, connect_timeout_s=connect_timeout_s, lock_timeout_s=lock_timeout_s,
                          statement_timeout_s=0) as conn:
                return _migrate(conn)
    except JobStoreUnusable:
        raise
    except JobStoreError as exc:
        raise JobStoreUnusable(f"the job store {redact_dsn(dsn)} cannot be opened: {exc}") from exc


class PostgresJobStore(IdempotentCreate, WebhookOutbox):
    """Durable job table on a PostgreSQL server; every write has committed on return (with the server's
    `synchronous_commit`, on by default, that is flushed to its WAL). Public methods as `jobs.JobStore`.

    `clock`: the time source for started_at/finished_at, prune and key expiry (tests pass a fake).
    `max_connections`: the pool's size, per store. `lock_timeout_s`: the longest any statement waits for a lock
    before the call fails with JobStoreError. Strings in plain text columns that hold lone surrogates or NUL come
    back escaped (`\\udXXX`, `\\x00`); params and meta are JSON and come back exactly.
    """

    def __init__(self, dsn: str, *, clock: Callable[[], float] = time.time, max_connections: int = 8,
                 connect_timeout_s: float = 10.0, lock_timeout_s: float = 10.0, statement_timeout_s: float = 60.0,
                 pool_wait_s: float = 30.0) -> None:
        self._clock = clock
        self._dsn = dsn  # for the listener's own connection (listener())
        self._connect_timeout_s = connect_timeout_s
        self.location = redact_dsn(dsn)
        _import_psycopg()

        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        from psycopg_pool import ConnectionPool

        kwargs = _connection_kwargs(dsn, connect_timeout_s=connect_timeout_s, lock_timeout_s=lock_timeout_s,
                                    statement_timeout_s=statement_timeout_s)
        # one plain connection first: it migrates, and an unreachable or refused server fails here with its own
        # words (the pool would retry in the background and report only a timeout)
        migrate(dsn, connect_timeout_s=connect_timeout_s, lock_timeout_s=lock_timeout_s)
        # check: a connection that died while idle (a server restart, an idle timeout) is replaced before it is
        # lent, at the cost of one round trip per call, so a restart of the server costs no failed request
        self._pool = ConnectionPool(dsn, kwargs=kwargs, min_size=1, max_size=max_connections, timeout=pool_wait_s,
                                    open=False, name="magi-job-store", check=ConnectionPool.check_connection)
        self._pool.open(wait=False)

    # -- connections ------------------------------------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[object]:
        """A connection in autocommit mode: each statement is its own transaction."""
        with _store_errors(), self._pool.connection() as conn:
            yield conn

    @contextmanager
    def _transaction(self, *, durable: bool = True) -> Iterator[object]:
        """One transaction, committed on normal exit and rolled back on any exception (QuotaExceeded included).

        durable=False commits without waiting for the server's WAL flush: a crash of the server may lose it, but
        never reorders it, and the next durable commit flushes it along with itself (progress ticks only)."""
        with self._connection() as conn, conn.transaction():
            if not durable:
                conn.execute("SET LOCAL synchronous_commit = off")
            yield conn

    # the webhook outbox's SQL dialect (jobs.WebhookOutbox): concurrent claimers skip each other's rows
    _ph = "%s"
    _deliveries_table = DELIVERIES_TABLE
    _jobs_table = JOBS_TABLE
    _claim_lock = " FOR UPDATE OF d SKIP LOCKED"
    _store_text = staticmethod(_pg_text)

    def _outbox_read(self):
        return self._connection()

    def _outbox_write(self):
        return self._transaction()

    def close(self) -> None:
        self._pool.close()

    @property
    def closed(self) -> bool:
        return self._pool.closed

    def __enter__(self) -> "PostgresJobStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- rows <-> records -------------------------------------------------------------------------------------

    # One codec for both stores: what a stored job looks like is defined once, in jobs.py.
    _row_to_job = staticmethod(JobStore._row_to_job)
    _rows_to_jobs = staticmethod(JobStore._rows_to_jobs)
    _check_new = staticmethod(JobStore._check_new)

    @staticmethod
    def _job_to_row(job: Job, fingerprint: str | None) -> dict:
        return {name: _pg_value(value) for name, value in JobStore._job_to_row(job, fingerprint).items()}


    def _fetch(self, conn, job_id: str) -> Job | None:
        row = conn.execute(f"{_SELECT} WHERE id = %s", (_pg_text(job_id),)).fetchone()
        return None if row is None else self._row_to_job(row)

    def _insert(self, conn, job: Job, fingerprint: str | None) -> Job:
        row = self._job_to_row(job, fingerprint)
        values = [row[name] for name in _INSERT_COLUMNS]
        inserted = conn.execute(
            f"INSERT INTO {JOBS_TABLE} ({', '.join(_INSERT_COLUMNS)}) VALUES ({', '.join(['%s'] * len(values))}) "
            f"ON CONFLICT (id) DO NOTHING RETURNING {', '.join(_COLUMNS)}", values).fetchone()
        if inserted is None:
            raise DuplicateJob(f"job {job.id!r} already exists")
        self._add_delivery(conn, job)
        _notify(conn, job.id, "status", status=JobStatus.QUEUED.value)  # wakes the workers' claim loops
        return self._row_to_job(inserted)

    # -- creation ---------------------------------------------------------------------------------------------

    def _check_quota(self, conn, owner: str, quota: int | None) -> None:
        """Inside the insert's transaction, under the owner's advisory lock: two submits cannot both pass."""
        if quota is None:
            return
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key("quota", owner),))
        active = conn.execute(f"SELECT COUNT(*) FROM {JOBS_TABLE} WHERE owner = %s AND status = ANY(%s::text[])",
                              (owner, _statuses(_ACTIVE))).fetchone()[0]
        if active >= quota:
            raise QuotaExceeded(int(active), quota)

    def _check_queue(self, conn, max_queued: int | None) -> None:
        """Inside the insert's transaction, under the queue's advisory lock (taken last: key, owner, queue), so
        replicas submitting at once cannot overshoot the bound together."""
        if max_queued is None:
            return
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_QUEUE_LOCK,))
        queued = conn.execute(f"SELECT COUNT(*) FROM {JOBS_TABLE} WHERE status = %s",
                              (JobStatus.QUEUED.value,)).fetchone()[0]
        if queued >= max_queued:
            raise QueueFull(int(queued), max_queued)

    def create(self, job: Job, *, quota: int | None = None, max_queued: int | None = None) -> Job:
        """Insert `job`; durable on return. Raises DuplicateJob when the id exists, QuotaExceeded when its owner
        already has `quota` waiting or running jobs, QueueFull when `max_queued` jobs are already waiting."""
        self._check_new(job)
        if job.idempotency_key is not None:
            raise ValueError("a job with an idempotency key must be created with create_idempotent()")
        with self._transaction() as conn:
            self._check_quota(conn, _pg_text(job.owner), quota)
            self._check_queue(conn, max_queued)
            return self._insert(conn, job, None)

    def create_idempotent(self, job: Job, key: str, fingerprint: str, *, ttl_s: float | None = None,
                          quota: int | None = None, max_queued: int | None = None) -> tuple[Job, bool]:
        """Stripe-style submit: (existing job, False) for a replay of `key` by the same owner with the same body
        fingerprint, IdempotencyConflict for a different body, else (`job` stored with the key, True).

        `ttl_s`: a key older than this is forgotten and the call creates a new job; the old job keeps everything
        but its key. `quota` as for :meth:`create` (a replay is never refused)."""
        self._check_new(job)
        self._check_key(key, fingerprint)
        import psycopg

        safe_key, safe_fp, owner = _pg_text(key), _pg_text(fingerprint), _pg_text(job.owner)
        for attempt in range(2):
            try:
                return self._create_idempotent_once(job, key, safe_key, safe_fp, owner, ttl_s, quota, max_queued)
            except psycopg.IntegrityError as exc:
                # Only a writer that bypassed the advisory lock can get here (the unique index caught it); the
                # key is now taken, so looking again answers as a replay or a conflict.
                if attempt == 1:
                    raise JobStoreError(f"job store unavailable: {exc}") from exc
        raise AssertionError("unreachable")

    def _create_idempotent_once(self, job: Job, key: str, safe_key: str, safe_fp: str, owner: str,
                                ttl_s: float | None, quota: int | None, max_queued: int | None) -> tuple[Job, bool]:
        with self._transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key("idempotency", owner, safe_key),))
            return self._create_keyed(conn, job, key, safe_key, safe_fp, owner, ttl_s, quota, max_queued)

    @staticmethod
    def _key_row(conn, owner: str, key: str) -> tuple | None:
        return conn.execute(f"SELECT id, idempotency_fingerprint, created_at FROM {JOBS_TABLE} "
                            f"WHERE owner = %s AND idempotency_key = %s", (owner, key)).fetchone()

    @staticmethod
    def _forget_key(conn, job_id: str) -> None:
        conn.execute(f"UPDATE {JOBS_TABLE} SET idempotency_key = NULL, idempotency_fingerprint = NULL "
                     f"WHERE id = %s", (job_id,))

    # -- reads ------------------------------------------------------------------------------------------------

    def get(self, job_id: str, owner: str | None = None) -> Job | None:
        """The job, or None when unknown or (with `owner`) owned by someone else: both look the same to a client.
        DamagedJob when its row cannot be read back (with `owner`, only to that owner)."""
        with self._connection() as conn:
            row = conn.execute(f"{_SELECT} WHERE id = %s", (_pg_text(job_id),)).fetchone()
        return self._owned_job(row, None if owner is None else _pg_text(owner))

    def list(self, statuses: Iterable[JobStatus] | None = None, limit: int = 100,
             owner: str | None = None, api: str | None = None) -> list[Job]:
        """Newest first (``api``: only that wire protocol's jobs); damaged rows are skipped with a warning."""
        where, args = [], []
        if statuses is not None:
            values = _statuses(statuses)
            if not values:
                return []
            where.append("status = ANY(%s::text[])")
            args.append(values)
        if owner is not None:
            where.append("owner = %s")
            args.append(_pg_text(owner))
        if api is not None:
            where.append("api = %s")
            args.append(_pg_text(api))
        if limit <= 0:
            return []
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._connection() as conn:
            rows = conn.execute(f"{_SELECT} {clause} ORDER BY created_at DESC, seq DESC LIMIT %s",
                                (*args, int(limit))).fetchall()
        return self._rows_to_jobs(rows)

    def queued_in_order(self) -> list[Job]:
        """Every QUEUED job, oldest first (insert order breaks created_at ties): the order the restart path
        resubmits them in."""
        with self._connection() as conn:
            rows = conn.execute(f"{_SELECT} WHERE status = %s ORDER BY created_at, seq",
                                (JobStatus.QUEUED.value,)).fetchall()
        return self._rows_to_jobs(rows)

    def count_by_status(self) -> dict[JobStatus, int]:
        counts = {s: 0 for s in JobStatus}
        with self._connection() as conn:
            for status, n in conn.execute(f"SELECT status, COUNT(*) FROM {JOBS_TABLE} GROUP BY status"):
                counts[JobStatus(status)] = int(n)  # the CHECK constraint admits no other value
        return counts

    def queue_depth(self) -> int:
        with self._connection() as conn:
            return int(conn.execute(f"SELECT COUNT(*) FROM {JOBS_TABLE} WHERE status = %s",
                                    (JobStatus.QUEUED.value,)).fetchone()[0])

    def queue_position(self, job_id: str) -> int | None:
        """0-based place of a QUEUED job among the queued ones (claim order: oldest first); None when not queued."""
        with self._connection() as conn:
            row = conn.execute(
                f"SELECT (SELECT COUNT(*) FROM {JOBS_TABLE} o WHERE o.status = 'queued' "
                f"AND (o.created_at, o.seq) < (j.created_at, j.seq)) FROM {JOBS_TABLE} j "
                f"WHERE j.id = %s AND j.status = 'queued'", (_pg_text(job_id),)).fetchone()
        return None if row is None else int(row[0])

    # -- transitions ------------------------------------------------------------------------------------------

    def _transition(self, job_id: str, allowed: Iterable[JobStatus], sets: str, args: tuple = (), *,
                    durable: bool = True, worker_id: str | None = None, announce: bool = True) -> Job | None:
        """One compare-and-set UPDATE. `worker_id` fences it: the job must also be leased to that worker, so a
        worker whose lease lapsed (and whose job another worker now runs) can no longer change it. `announce`:
        notify the job's (new) status in the same transaction (every status change does)."""
        fence, fence_args = ("", ()) if worker_id is None else (" AND lease_owner = %s", (_pg_text(worker_id),))
        with self._transaction(durable=durable) as conn:
            row = conn.execute(
                f"UPDATE {JOBS_TABLE} SET {sets} WHERE id = %s AND status = ANY(%s::text[]){fence} "
                f"RETURNING {', '.join(_COLUMNS)}",
                (*args, _pg_text(job_id), _statuses(allowed), *fence_args)).fetchone()
            if row is not None and announce:
                _notify(conn, row[0], "status", status=row[_STATUS_INDEX])
        # parsed after the commit: a damaged row still takes the transition (then raises DamagedJob)
        return None if row is None else self._row_to_job(row)

    def mark_running(self, job_id: str) -> Job | None:
        """QUEUED -> RUNNING; counts an attempt. Holds no lease (one `serve` process; workers use :meth:`claim`)."""
        return self._transition(
            job_id, [JobStatus.QUEUED],
            "status = 'running', started_at = %s, attempts = attempts + 1, progress_done = 0", (self._clock(),))

    def update_progress(self, job_id: str, done: int, total: int, *, worker_id: str | None = None) -> Job | None:
        """Progress of a RUNNING job; committed without waiting for the WAL flush, so cheap to call every step."""
        return self._transition(job_id, [JobStatus.RUNNING], "progress_done = %s, progress_total = %s",
                                (max(0, int(done)), max(0, int(total))), durable=False, worker_id=worker_id,
                                announce=False)

    def complete(self, job_id: str, outputs: Iterable[str], inference_ms: int | None, *,
                 worker_id: str | None = None, meta_updates: dict | None = None) -> Job | None:
        """RUNNING -> COMPLETED (with `worker_id`: only while that worker holds the job's lease). `meta_updates`:
        keys merged into the job's meta in the same UPDATE (a key given replaces the stored one)."""
        # meta is JSON text (ASCII, no NUL or lone surrogate: the adapters refuse those), so jsonb takes it; the
        # merge is skipped when there is nothing to merge, leaving the stored text as it was
        merge = ", meta = (meta::jsonb || %s::jsonb)::text" if meta_updates else ""
        return self._transition(
            job_id, [JobStatus.RUNNING],
            "status = 'completed', finished_at = %s, outputs = %s, inference_ms = %s, error = '', error_code = ''"
            + merge,
            (self._clock(), _json([str(o) for o in outputs]), None if inference_ms is None else int(inference_ms),
             *((_json(meta_updates),) if meta_updates else ())),
            worker_id=worker_id)

    def mark_deleted(self, job_id: str) -> Job | None:
        """A terminal job deleted by its owner: ``meta.deleted_at`` set (see `JobStore.mark_deleted`)."""
        return self._transition(job_id, TERMINAL, "meta = (meta::jsonb || %s::jsonb)::text",
                                (_json({"deleted_at": self._clock()}),), announce=False)

    def fail(self, job_id: str, error: str, error_code: str, error_param: str = "", *,
             worker_id: str | None = None) -> Job | None:
        """QUEUED or RUNNING -> FAILED (a queued job can fail too: timeout in queue, input gone); with
        `worker_id`, only a RUNNING job leased to that worker."""
        return self._transition(
            job_id, _ACTIVE, "status = 'failed', finished_at = %s, error = %s, error_code = %s, error_param = %s",
            (self._clock(), _pg_text(error), _pg_text(error_code), _pg_text(error_param)), worker_id=worker_id)

    def cancel(self, job_id: str) -> Job | None:
        """QUEUED or RUNNING -> CANCELLED. The engine still has to stop a running job; the row is final now (a
        worker learns it when its next :meth:`renew_lease` answers None)."""
        return self._transition(
            job_id, _ACTIVE,
            "status = 'cancelled', finished_at = %s, error = 'cancelled', error_code = 'cancelled'", (self._clock(),))

    def requeue(self, job_id: str, *, refund_attempt: bool = True, worker_id: str | None = None) -> Job | None:
        """RUNNING -> QUEUED for a graceful drain; by default the attempt is refunded (a drain is not the job's
        fault, and `recover_after_restart`'s max_attempts exists to stop jobs that keep killing the worker)."""
        attempts = "GREATEST(attempts - 1, 0)" if refund_attempt else "attempts"
        return self._transition(
            job_id, [JobStatus.RUNNING],
            f"status = 'queued', started_at = NULL, progress_done = 0, attempts = {attempts}, "
            f"lease_owner = NULL, lease_expires_at = NULL", worker_id=worker_id)

    def recover_after_restart(self, max_attempts: int = 2) -> tuple[list[str], list[str]]:
        """Resolve jobs a dead process left RUNNING: back to QUEUED while attempts < max_attempts, else FAILED with
        error_code "interrupted". Returns (requeued ids, failed ids), oldest first.

        Like the SQLite store's, this treats every RUNNING row without a lease as orphaned: right for one `serve`
        process per database, called once before its engine starts. Jobs leased to workers sharing the database
        are left alone: :meth:`requeue_expired_leases` resolves the jobs of those that died."""
        return self._resolve_orphans(max_attempts, "the server stopped while this job was running",
                                     lapsed_leases_only=False)

    def _resolve_orphans(self, max_attempts: int, why: str, *, lapsed_leases_only: bool) -> tuple[list[str], list[str]]:
        """RUNNING jobs (all, or those whose lease has lapsed): re-queued while attempts < max_attempts, else failed
        as "interrupted". SKIP LOCKED: two sweepers at once split the work instead of waiting on each other."""
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        with self._transaction() as conn:
            now = self._clock()
            # a serve process's own jobs hold no lease; a worker's leased job is the sweeper's to judge, never a
            # restarting serve's (it would steal a job a live worker is running)
            lapsed = " AND lease_expires_at < %s" if lapsed_leases_only else " AND lease_owner IS NULL"
            rows = conn.execute(f"SELECT id, attempts FROM {JOBS_TABLE} WHERE status = %s{lapsed} "
                                f"ORDER BY created_at, seq FOR UPDATE SKIP LOCKED",
                                (JobStatus.RUNNING.value, *((now,) if lapsed_leases_only else ()))).fetchall()
            requeued = [job_id for job_id, attempts in rows if attempts < max_attempts]
            failed = [(job_id, attempts) for job_id, attempts in rows if attempts >= max_attempts]
            if requeued:
                conn.execute(f"UPDATE {JOBS_TABLE} SET status = 'queued', started_at = NULL, progress_done = 0, "
                             f"lease_owner = NULL, lease_expires_at = NULL WHERE id = ANY(%s::text[])", (requeued,))
            for job_id in requeued:
                _notify(conn, job_id, "status", status=JobStatus.QUEUED.value)
            for job_id, attempts in failed:
                message = f"interrupted: {why}, {attempts} of {max_attempts} attempts used"
                conn.execute(f"UPDATE {JOBS_TABLE} SET status = 'failed', finished_at = %s, error = %s, "
                             f"error_code = 'interrupted', lease_expires_at = NULL WHERE id = %s",
                             (now, message, job_id))
                _notify(conn, job_id, "status", status=JobStatus.FAILED.value)
        return requeued, [job_id for job_id, _ in failed]

    # -- leases (GPU workers sharing the queue) --------------------------------------------------------------

    def claim(self, worker_id: str, variants: Iterable[str] | None, lease_s: float) -> Job | None:
        """The oldest QUEUED job this worker can run -> RUNNING, leased to `worker_id` for `lease_s` seconds; counts
        an attempt. None when no job suits. `variants`: the model variants the worker serves (a job without a
        variant suits every worker); None takes any job.

        `FOR UPDATE SKIP LOCKED`: concurrent claimers take different jobs and never wait on one another; a row
        another claimer holds is skipped, not double-claimed. The worker renews with :meth:`renew_lease` well
        within `lease_s`; if it stops (killed, partitioned), :meth:`requeue_expired_leases` puts the job back."""
        if not worker_id:
            raise ValueError("worker_id must not be empty")
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        suits, suits_args = "", ()
        if variants is not None:
            suits = " AND (variant IS NULL OR variant = ANY(%s::text[]))"
            suits_args = ([_pg_text(v) for v in variants],)
        now = self._clock()
        with self._transaction() as conn:
            row = conn.execute(
                f"UPDATE {JOBS_TABLE} SET status = 'running', started_at = %s, attempts = attempts + 1, "
                f"progress_done = 0, lease_owner = %s, lease_expires_at = %s "
                f"WHERE id = (SELECT id FROM {JOBS_TABLE} WHERE status = 'queued'{suits} "
                f"ORDER BY created_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED) "
                f"RETURNING {', '.join(_COLUMNS)}",
                (now, _pg_text(worker_id), now + lease_s, *suits_args)).fetchone()
            if row is not None:
                _notify(conn, row[0], "status", status=JobStatus.RUNNING.value)
        return None if row is None else self._row_to_job(row)

    def renew_lease(self, job_id: str, worker_id: str, lease_s: float) -> Job | None:
        """Extend the lease of a RUNNING job `worker_id` holds to now + `lease_s`; the job, or None when the worker
        no longer holds it (cancelled, failed, or re-queued after its lease lapsed): the worker must then stop
        and write nothing. Not waited onto the WAL: a lost renewal only makes the lease look shorter."""
        return self._transition(job_id, [JobStatus.RUNNING], "lease_expires_at = %s", (self._clock() + lease_s,),
                                durable=False, worker_id=worker_id, announce=False)

    def requeue_expired_leases(self, max_attempts: int = 2) -> tuple[list[str], list[str]]:
        """The sweeper: RUNNING jobs whose lease has lapsed go back to QUEUED while attempts < max_attempts,
        else FAILED "interrupted". Returns (requeued ids, failed ids). Jobs running without a lease (one `serve`
        process, :meth:`mark_running`) are not touched. Safe to run from every process at once."""
        return self._resolve_orphans(max_attempts, "the worker running this job stopped renewing its lease",
                                     lapsed_leases_only=True)

    # -- notifications (LISTEN/NOTIFY) -------------------------------------------------------------------------

    def publish(self, job_id: str, kind: str, **data) -> None:
        """Tell every listener about a job event that changes no status (a worker's progress and chunk events;
        status changes are announced by the transitions themselves). At most once: a listener that was
        disconnected misses it, which is why listeners also poll (:class:`StoreListener`)."""
        with self._connection() as conn:
            _notify(conn, _pg_text(job_id), kind, **data)

    def listener(self, on_message: Callable[[dict], None], *, on_tick: Callable[[], None] | None = None,
                 tick_s: float = 1.0, name: str = "magi-store-listener") -> "StoreListener":
        """A :class:`StoreListener` (not started) on this store's database and channel."""
        return StoreListener(self._dsn, on_message, on_tick=on_tick, tick_s=tick_s, name=name,
                             connect_timeout_s=self._connect_timeout_s)

    # -- retention --------------------------------------------------------------------------------------------

    def prune_jobs(self, older_than_s: float) -> list[Job]:
        """Delete terminal jobs finished more than `older_than_s` ago and return them, oldest first, so the caller
        can delete their files (after this returns: a crash in between leaves orphan files, never rows that point
        at missing files)."""
        with self._transaction() as conn:
            rows = conn.execute(
                f"WITH gone AS (DELETE FROM {JOBS_TABLE} WHERE status = ANY(%s::text[]) AND finished_at < %s "
                f"RETURNING seq, {', '.join(_COLUMNS)}) "
                f"SELECT {', '.join(_COLUMNS)} FROM gone ORDER BY created_at, seq",
                (_statuses(TERMINAL), self._clock() - older_than_s)).fetchall()
            self._forget_deliveries(conn, [row[0] for row in rows])
        return self._rows_to_jobs(rows)  # a damaged row is deleted all the same; its files are not known


class StoreListener:
    """A thread that LISTENs on :data:`NOTIFY_CHANNEL` over a connection of its own and hands every message (the
    decoded JSON object) to ``on_message``; every ``tick_s`` without one, and after each reconnect, it calls
    ``on_tick`` (the caller's polling fallback: a notification sent while this connection was down is lost, so
    whoever relies on them re-reads what it watches there). A broken connection is retried with a growing pause
    (up to 5 s); :attr:`connected` says whether it currently listens. Callbacks run on this thread and must not
    raise for long: an exception is logged and the loop goes on."""

    def __init__(self, dsn: str, on_message: Callable[[dict], None], *, on_tick: Callable[[], None] | None = None,
                 tick_s: float = 1.0, name: str = "magi-store-listener", connect_timeout_s: float = 10.0) -> None:
        self._dsn = dsn
        self._on_message = on_message
        self._on_tick = on_tick
        self._tick_s = tick_s
        self._connect_timeout_s = connect_timeout_s
        self._stop = threading.Event()
        self._conn = None
        self.connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, wait_s: float | None = 10.0) -> "StoreListener":
        """Start listening; with ``wait_s``, wait that long for the first LISTEN (so nothing sent after this
        returns is missed), logging a warning when the database cannot be reached yet."""
        self._thread.start()
        if wait_s and not self.connected.wait(wait_s):
            log.warning("the job store's notifications are not reachable yet; polling every %.1f s meanwhile",
                        self._tick_s)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        pause = 0.2
        while not self._stop.is_set():
            try:
                with _connect(self._dsn, connect_timeout_s=self._connect_timeout_s, lock_timeout_s=10.0,
                              statement_timeout_s=10.0) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.connected.set()
                    pause = 0.2
                    self._tick()  # whatever was sent while we were not listening
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=self._tick_s):
                            self._deliver(note.payload)
                            if self._stop.is_set():
                                break
                        self._tick()
            except Exception as exc:  # the server restarted, the network broke, ...: poll, then listen again
                if self._stop.is_set():
                    break
                if self.connected.is_set():
                    log.warning("lost the job store's notifications (%s); polling until they are back",
                                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
                self.connected.clear()
                self._tick()
                self._stop.wait(pause)
                pause = min(pause * 2, 5.0)
        self.connected.clear()

    def _deliver(self, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            log.warning("ignored a notification that is not JSON: %.200r", payload)
            return
        try:
            self._on_message(message)
        except Exception:
            log.exception("a job-store notification handler failed")

    def _tick(self) -> None:
        if self._on_tick is None:
            return
        try:
            self._on_tick()
        except Exception:
            log.exception("a job-store polling step failed")
