"""Job records and their durable store: the `Job` dataclass, the status machine, and `JobStore` on SQLite.

This module owns every job row. The rule everything else rests on (reliability spec 2.3): a job is committed to
disk before its id leaves the server, so a 2xx submit survives `kill -9` and, with the default
`synchronous=FULL`, a power loss too. Delivery is at-least-once: a job that was RUNNING when the process died is
put back to QUEUED at the next start, up to a bounded number of attempts, then FAILED with error_code
"interrupted", never silently dropped. The handler that runs jobs must therefore be idempotent (outputs written
to a temp file and renamed over `<id>.mp4`).

Transitions are compare-and-set: each UPDATE names the statuses it may leave, so a terminal job never changes
again whatever order the engine, the HTTP layer and the restart path call in; a refused transition returns None.

Threads: one SQLite connection per store, guarded by one lock. SQLite allows one writer at a time anyway, every
statement here is a primary-key or indexed lookup (microseconds), and one connection keeps the store free of
per-thread state. Other processes may open the same file (WAL + busy timeout + `BEGIN IMMEDIATE`), which is
what makes `create_idempotent` atomic across API replicas, not only across threads.

Leases: one server process owns the database, so `recover_after_restart` (called once at startup, before the
engine starts) treats every RUNNING row as orphaned. Several live workers sharing one store would need a lease
column and a sweeper instead; that deployment is meant to use a database server (architecture.md).

Faults (issue #10): every SQLite failure but a constraint (disk full, I/O error, a lock held past the busy
timeout, a malformed page) surfaces as :class:`JobStoreError`, which the HTTP layer answers with 503 + Retry-After.
A store that cannot be opened at all (not a SQLite file, failing `PRAGMA quick_check`, a newer schema) raises
:class:`JobStoreUnusable` from the constructor, whose message is the one line the command line prints. A row that no
longer parses (or sits on a damaged page) raises :class:`DamagedJob` for that job only: reads by id name it, listings
skip it with a warning, so one bad row never takes the others down.

Torch-free and importing nothing from the package but `params`: this is the HTTP layer.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

from magi_server.params import GenerationParams

log = logging.getLogger("magi_server.serving.jobs")

SCHEMA_VERSION = 4
APIS = ("wavespeed", "fal", "magichour", "openai")
MAX_IDEMPOTENCY_KEY_LEN = 255  # Stripe's limit; longer keys are a client bug, not something to hash away
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
BUSY_TIMEOUT_S = 10.0


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


class JobStoreError(RuntimeError):
    pass


class DuplicateJob(JobStoreError):
    pass


class JobStoreUnusable(JobStoreError):
    """The store cannot be opened (raised by the constructor only); the message is one line for the operator."""


class CorruptJobStore(JobStoreUnusable):
    """The store file is not a SQLite database, or fails its integrity check at open."""

    def __init__(self, path, reason: str) -> None:
        super().__init__(f"the job store {path} is corrupt: {reason}; move it aside (with its -wal and -shm files) "
                         f"to start with an empty one")
        self.path, self.reason = path, reason


class DamagedJob(JobStoreError):
    """One job's row cannot be read back (a value that does not parse, a damaged page): that job only, for good."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id} is damaged in the job store and cannot be read ({reason})")
        self.job_id, self.reason = job_id, reason


class QuotaExceeded(Exception):
    """The owner already has as many waiting or running jobs as its quota allows (nothing was stored)."""

    def __init__(self, active: int, quota: int) -> None:
        super().__init__(f"this API key has {active} jobs waiting or running, its quota; retry when one has ended")
        self.active, self.quota = active, quota


class QueueFull(Exception):
    """The store already holds `limit` QUEUED jobs (nothing was stored): the bound every API replica shares, checked
    in the insert's own transaction so that replicas submitting at once cannot overshoot it together."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"the queue is full ({queued} jobs waiting); retry later")
        self.queued, self.limit = queued, limit


class IdempotencyConflict(JobStoreError):
    """The idempotency key was already used with a different request body (answer 409/422, do not retry)."""


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Job:
    id: str
    api: str  # wire protocol that created it: "wavespeed" | "fal" | "magichour" | "openai"
    model: str  # public model/app id the client used, echoed back in envelopes
    status: JobStatus
    params: GenerationParams
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress_done: int = 0
    progress_total: int = 0
    outputs: list[str] = field(default_factory=list)  # file names relative to the outputs folder
    error: str = ""
    error_code: str = ""  # "timeout", "interrupted", "invalid_input", "cancelled", "internal", ...
    error_param: str = ""  # the request parameter an "invalid_input" failure names (params.ParamError.param)
    attempts: int = 0
    inference_ms: int | None = None
    owner: str = ""  # opaque tenant key; "" when auth is off
    meta: dict = field(default_factory=dict)  # provider bookkeeping: webhook URL, fal app id, ...
    idempotency_key: str | None = None
    variant: str | None = None  # the served model variant that must run it (serving/routing.py); None: any

    @classmethod
    def new(cls, api: str, model: str, params: GenerationParams, *, owner: str = "", meta: dict | None = None,
            created_at: float | None = None, variant: str | None = None) -> "Job":
        return cls(id=new_job_id(), api=api, model=model, status=JobStatus.QUEUED, params=params,
                   created_at=time.time() if created_at is None else created_at, owner=owner,
                   meta=dict(meta or {}), variant=variant)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def deleted_at(self) -> float | None:
        """When its owner deleted it (Magic Hour / OpenAI DELETE: files gone, the row kept until retention)."""
        value = self.meta.get("deleted_at")
        return float(value) if isinstance(value, (int, float)) else None


_SCHEMA = f"""
CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,
    api             TEXT NOT NULL,
    model           TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ({", ".join(repr(s.value) for s in JobStatus)})),
    params          TEXT NOT NULL,               -- GenerationParams.to_json()
    created_at      REAL NOT NULL,
    started_at      REAL,
    finished_at     REAL,
    progress_done   INTEGER NOT NULL DEFAULT 0,
    progress_total  INTEGER NOT NULL DEFAULT 0,
    outputs         TEXT NOT NULL DEFAULT '[]',  -- JSON list of file names
    error           TEXT NOT NULL DEFAULT '',
    error_code      TEXT NOT NULL DEFAULT '',
    error_param     TEXT NOT NULL DEFAULT '',
    attempts        INTEGER NOT NULL DEFAULT 0,
    inference_ms    INTEGER,
    owner           TEXT NOT NULL DEFAULT '',
    meta            TEXT NOT NULL DEFAULT '{{}}',  -- JSON object
    idempotency_key TEXT,
    idempotency_fingerprint TEXT,
    variant         TEXT                         -- the model variant that must run it (NULL: any)
);
CREATE INDEX jobs_status_created ON jobs (status, created_at);
CREATE INDEX jobs_owner_created ON jobs (owner, created_at);
CREATE INDEX jobs_created ON jobs (created_at);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
"""
# version 4: the webhook outbox (WebhookOutbox)
_WEBHOOK_SCHEMA = """
CREATE TABLE webhook_deliveries (
    id          TEXT PRIMARY KEY,            -- the webhook-id header: the same on every retry
    job_id      TEXT NOT NULL,
    url         TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     REAL NOT NULL DEFAULT 0,     -- not before: a claim or a backoff moves it
    created_at  REAL NOT NULL,
    log         TEXT NOT NULL DEFAULT '[]'   -- JSON list, one entry per attempt
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_at);
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id);
"""

_COLUMNS = ("id", "api", "model", "status", "params", "created_at", "started_at", "finished_at", "progress_done",
            "progress_total", "outputs", "error", "error_code", "error_param", "attempts", "inference_ms", "owner", "meta",
            "idempotency_key", "variant")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
_ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


def _text(value: str) -> str:
    # sqlite3 encodes str as strict UTF-8, so a lone surrogate (legal in a Python str, e.g. from a JSON "\ud800"
    # escape) would raise inside a write and take a request down with it. Escape it instead: deterministic, so
    # lookups by the same owner/key still match.
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _json(value) -> str:
    # ensure_ascii keeps lone surrogates as \\udXXX escapes, which round-trip exactly through json.loads.
    return json.dumps(value, ensure_ascii=True, sort_keys=True)


def _params_json(params: GenerationParams) -> str:
    # GenerationParams.to_json already escapes non-ASCII; re-dumping guards against a future change there.
    return _json(json.loads(params.to_json()))


def _in(statuses: Iterable[JobStatus]) -> tuple[str, list[str]]:
    values = [JobStatus(s).value for s in statuses]
    return ", ".join("?" * len(values)), values


@contextmanager
def _store_errors() -> Iterator[None]:
    # "database is locked" past the busy timeout, disk full, I/O errors, a malformed page: the server answers
    # these with a 503, so they surface as the store's own error type (a raw sqlite3 error would be a 500).
    # IntegrityError is left alone: callers map it to a meaning.
    try:
        yield
    except sqlite3.IntegrityError:
        raise
    except sqlite3.DatabaseError as exc:
        raise JobStoreError(f"job store unavailable: {exc}") from exc


def _is_corruption(exc: BaseException | None) -> bool:
    """SQLITE_CORRUPT or SQLITE_NOTADB (any extended code): damage on disk, which no retry repairs."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and code & 0xFF in (11, 26)


class IdempotentCreate:
    """What both stores (this one and jobs_postgres.PostgresJobStore) decide the same way over their own SQL: who may
    read a row by id (:meth:`_owned_job`), and the Stripe-style submit: inside
    the store's own write transaction, with its own lock held, look the key up; a key older than the TTL is
    forgotten, the same body replays, another body is a conflict; a new job passes the quota and the queue bound.
    Each store supplies the SQL: ``_key_row``, ``_forget_key``, ``_check_quota``, ``_check_queue``, ``_insert``,
    ``_fetch`` and ``_clock``."""

    @classmethod
    def _owned_job(cls, row: tuple | None, owner: str | None) -> Job | None:
        """A row read by id as the Job ``get`` answers: None when absent or (``owner``, already escaped the way the
        store stores it) someone else's, checked before parsing so another tenant learns nothing, not even that a
        row is damaged."""
        if row is None or (owner is not None and dict(zip(_COLUMNS, row))["owner"] != owner):
            return None
        return cls._row_to_job(row)

    @staticmethod
    def _check_key(key: str, fingerprint: str) -> None:
        if not key or len(key) > MAX_IDEMPOTENCY_KEY_LEN:
            raise ValueError(f"idempotency key must be 1..{MAX_IDEMPOTENCY_KEY_LEN} characters")
        if not fingerprint:
            raise ValueError("fingerprint must not be empty")

    def _create_keyed(self, conn, job: Job, key: str, safe_key: str, safe_fp: str, owner: str,
                      ttl_s: float | None, quota: int | None, max_queued: int | None) -> tuple[Job, bool]:
        row = self._key_row(conn, owner, safe_key)
        if row is not None:
            existing_id, stored_fp, created_at = row
            if ttl_s is not None and created_at < self._clock() - ttl_s:
                self._forget_key(conn, existing_id)
            elif stored_fp == safe_fp:
                return self._fetch(conn, existing_id), False
            else:
                raise IdempotencyConflict("idempotency key was already used with a different request body")
        self._check_quota(conn, owner, quota)
        self._check_queue(conn, max_queued)
        return self._insert(conn, replace(job, idempotency_key=key), safe_fp), True


WEBHOOK_STATES = ("pending", "delivered", "failed")
MAX_WEBHOOK_LOG = 50  # attempts kept per delivery (the count goes on): a receiver failing for days stays bounded


@dataclass
class WebhookDelivery:
    """One webhook a job owes its submitter: created with the job (same transaction), due once the job has ended,
    retried until ``state`` leaves "pending". ``id`` is the webhook-id every retry repeats (receivers dedupe on it);
    ``log`` holds one entry per attempt: ``{"at", "status", "error", "ms"}``."""

    id: str
    job_id: str
    url: str
    state: str = "pending"
    attempts: int = 0
    next_at: float = 0.0
    created_at: float = 0.0
    log: list[dict] = field(default_factory=list)


_DELIVERY_COLUMNS = ("id", "job_id", "url", "state", "attempts", "next_at", "created_at", "log")


class WebhookOutbox:
    """The durable webhook outbox both stores keep (this one and jobs_postgres.PostgresJobStore), over their own
    SQL: a delivery row is inserted in the transaction that inserts its job (so a 2xx submit owes its webhook
    even through kill -9), becomes due when the job is terminal, and is claimed for a while (``lease_s``) by the
    process that sends it, so replicas never send one at the same time. Each store supplies ``_outbox_write()`` /
    ``_outbox_read()`` (a transaction / a connection), ``_ph`` (its placeholder), ``_deliveries_table``,
    ``_jobs_table``, ``_claim_lock`` (row locking for concurrent claimers) and ``_clock``."""

    _ph = "?"
    _deliveries_table = "webhook_deliveries"
    _jobs_table = "jobs"
    _claim_lock = ""
    _store_text = staticmethod(_text)

    def _sql(self, text: str) -> str:
        return text.replace("?", self._ph)

    def _add_delivery(self, conn, job: Job) -> None:
        """Inside the job's insert: the webhook it owes, when its meta names one."""
        url = job.meta.get("webhook")
        if not url:
            return
        conn.execute(self._sql(f"INSERT INTO {self._deliveries_table} (id, job_id, url, state, attempts, next_at, "
                               f"created_at, log) VALUES (?, ?, ?, 'pending', 0, 0, ?, '[]')"),
                     (uuid.uuid4().hex, self._store_text(job.id), self._store_text(str(url)), float(job.created_at)))

    @staticmethod
    def _delivery(row: tuple) -> WebhookDelivery:
        data = dict(zip(_DELIVERY_COLUMNS, row))
        try:
            data["log"] = json.loads(data["log"])
        except ValueError:
            data["log"] = []
        return WebhookDelivery(**data)

    def claim_webhooks(self, lease_s: float, limit: int = 8) -> list[WebhookDelivery]:
        """Up to ``limit`` due deliveries (pending, ``next_at`` passed, their job ended), each claimed for
        ``lease_s`` seconds (its ``next_at`` moved past the send); [] cheaply, without a write, when none is due."""
        terminal = ", ".join(f"'{s.value}'" for s in TERMINAL)
        due = (f"FROM {self._deliveries_table} d JOIN {self._jobs_table} j ON j.id = d.job_id "
               f"WHERE d.state = 'pending' AND d.next_at <= ? AND j.status IN ({terminal})")
        now = self._clock()
        with self._outbox_read() as conn:
            if conn.execute(self._sql(f"SELECT 1 {due} LIMIT 1"), (now,)).fetchone() is None:
                return []
        columns = ", ".join(f"d.{c}" for c in _DELIVERY_COLUMNS)
        with self._outbox_write() as conn:
            rows = conn.execute(self._sql(f"SELECT {columns} {due} ORDER BY d.next_at LIMIT ?{self._claim_lock}"),
                                (now, int(limit))).fetchall()
            for row in rows:
                conn.execute(self._sql(f"UPDATE {self._deliveries_table} SET next_at = ? WHERE id = ?"),
                             (now + lease_s, row[0]))
        return [self._delivery(row) for row in rows]

    def record_webhook_attempt(self, delivery_id: str, entry: dict, *, delivered: bool,
                               next_at: float | None) -> WebhookDelivery | None:
        """Log one attempt: ``delivered`` ends it; else it is due again at ``next_at``, or failed for good when
        that is None (attempts spent). None when the delivery is gone (its job was pruned meanwhile)."""
        state = "delivered" if delivered else ("pending" if next_at is not None else "failed")
        with self._outbox_write() as conn:
            row = conn.execute(self._sql(f"SELECT log FROM {self._deliveries_table} WHERE id = ?"),
                               (delivery_id,)).fetchone()
            if row is None:
                return None
            try:
                log_entries = json.loads(row[0])
            except ValueError:
                log_entries = []
            log_entries = (log_entries + [entry])[-MAX_WEBHOOK_LOG:]
            conn.execute(self._sql(f"UPDATE {self._deliveries_table} SET state = ?, attempts = attempts + 1, "
                                   f"next_at = ?, log = ? WHERE id = ?"),
                         (state, next_at if next_at is not None else 0.0, _json(log_entries), delivery_id))
            row = conn.execute(self._sql(f"SELECT {', '.join(_DELIVERY_COLUMNS)} FROM {self._deliveries_table} "
                                         f"WHERE id = ?"), (delivery_id,)).fetchone()
        return self._delivery(row)

    def webhook_deliveries(self, job_id: str) -> list[WebhookDelivery]:
        """The deliveries one job owes or made, oldest first (the owner's delivery log)."""
        with self._outbox_read() as conn:
            rows = conn.execute(self._sql(f"SELECT {', '.join(_DELIVERY_COLUMNS)} FROM {self._deliveries_table} "
                                          f"WHERE job_id = ? ORDER BY created_at, id"),
                                (self._store_text(job_id),)).fetchall()
        return [self._delivery(row) for row in rows]

    def release_webhook_claims(self) -> int:
        """Make every pending delivery due now: for the one process that owns its store, at start (a claim the
        dead process held, or a backoff it was waiting out, would otherwise hold the webhook back)."""
        with self._outbox_write() as conn:
            cur = conn.execute(self._sql(f"UPDATE {self._deliveries_table} SET next_at = ? "
                                         f"WHERE state = 'pending' AND next_at > ?"), (self._clock(),) * 2)
            return cur.rowcount

    def _forget_deliveries(self, conn, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            conn.execute(self._sql(f"DELETE FROM {self._deliveries_table} WHERE job_id = ?"), (job_id,))


class JobStore(IdempotentCreate, WebhookOutbox):
    """Durable job table in one SQLite file. Every write has committed (and, with FULL, fsynced) on return.

    `synchronous`: FULL (default) survives power loss; NORMAL survives only a process crash, one fsync cheaper
    per write. `clock`: the time source for started_at/finished_at, prune and key expiry (tests pass a fake).
    Strings in plain text columns (owner, error, ...) that hold lone surrogates come back with them escaped as
    `\\udXXX`; params and meta are JSON and come back exactly.
    """

    def __init__(self, path: str | Path, *, synchronous: str = "FULL", clock: Callable[[], float] = time.time):
        mode = synchronous.upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, got {synchronous!r}")
        self._synchronous = mode
        self._clock = clock
        self._lock = threading.Lock()
        self.path = path if str(path) == ":memory:" else Path(path)
        if isinstance(self.path, Path):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # Prompts and tenant keys live here: create the file owner-only before SQLite creates it with the
                # umask (SQLite gives the -wal and -shm files the same permissions as the main file).
                os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            except OSError as exc:  # a folder we may not write, a directory where the file should be, ...
                raise JobStoreUnusable(f"the job store {self.path} cannot be opened: {exc.strerror or exc}") from exc
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so the write lock is taken before the first
        # read of a read-modify-write, which is what makes check-then-insert atomic across processes.
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            self._open()
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    # -- setup ----------------------------------------------------------------------------------------------

    def _open(self) -> None:
        """Configure, check and migrate; every failure is a JobStoreUnusable with a one-line message."""
        try:
            with _store_errors():
                self._configure()
                self._check_integrity()
            self._migrate()
        except JobStoreUnusable:
            raise
        except JobStoreError as exc:
            if _is_corruption(exc.__cause__):  # e.g. "file is not a database"
                raise CorruptJobStore(self.path, str(exc.__cause__)) from exc
            raise JobStoreUnusable(f"the job store {self.path} cannot be opened: {exc}") from exc

    def _check_integrity(self) -> None:
        """`PRAGMA quick_check` (every page and index entry, in O(size)): a damaged file is refused at start
        rather than answering 503s at random later. A row that only breaks a CHECK or NOT NULL rule is not
        refused: that row answers as damaged (DamagedJob) and the rest of the store serves on."""
        problems = [row[0] for row in self._conn.execute("PRAGMA quick_check").fetchall()]
        problems = [p for p in problems if p != "ok" and "constraint failed" not in p]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CorruptJobStore(self.path, f"{problems[0][:200]}{more}")

    def _configure(self) -> None:
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        journal = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower()
        if journal != "wal" and self.path != ":memory:":
            # WAL is what lets pollers read while the engine writes; falling back silently to a rollback journal
            # (e.g. on a network file system) would turn every poll into a lock wait.
            raise JobStoreUnusable(f"could not put the job store {self.path} in WAL mode (got {journal!r}); "
                                   f"use a local disk")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")

    def _migrate(self) -> None:
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JobStoreUnusable(f"{self.path} has schema version {version}, newer than this server's "
                                    f"{SCHEMA_VERSION}; upgrade magi-server or point it at another database")
            if version == 0:
                for statement in (_SCHEMA + _WEBHOOK_SCHEMA).split(";"):
                    if statement.strip():
                        conn.execute(statement)
            else:  # each later version adds its step here, inside this transaction
                if version < 2:
                    conn.execute("ALTER TABLE jobs ADD COLUMN error_param TEXT NOT NULL DEFAULT ''")
                if version < 3:
                    conn.execute("ALTER TABLE jobs ADD COLUMN variant TEXT")
                if version < 4:
                    for statement in _WEBHOOK_SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock, _store_errors():
            if self._conn is None:
                raise JobStoreError("job store is closed")
            yield self._conn

    @contextmanager
    def _write(self, *, fsync: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction holding SQLite's write lock from its first statement; committed on normal exit.

        fsync=False commits without waiting for the disk. In WAL mode such a commit is still atomic and ordered
        (the WAL is append-only), and the next fsynced commit makes it durable along with itself.
        """
        relax = not fsync and self._synchronous in ("FULL", "EXTRA")
        with self._read() as conn:
            if relax:
                conn.execute("PRAGMA synchronous = NORMAL")  # per connection, and only between transactions
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:  # a failed COMMIT (disk full, I/O error) leaves it open
                        conn.execute("ROLLBACK")
                    raise
            finally:
                if relax:
                    conn.execute(f"PRAGMA synchronous = {self._synchronous}")

    def _outbox_read(self):
        return self._read()

    def _outbox_write(self):
        return self._write()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @property
    def closed(self) -> bool:
        return self._conn is None

    def __enter__(self) -> "JobStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- rows <-> records -----------------------------------------------------------------------------------

    @staticmethod
    def _row_to_job(row: tuple) -> Job:
        """The row as a Job; DamagedJob when a value in it does not parse (whatever the parser raised)."""
        data = dict(zip(_COLUMNS, row))
        try:
            data["status"] = JobStatus(data["status"])
            data["params"] = GenerationParams.from_json(data["params"])
            data["outputs"] = json.loads(data["outputs"])
            data["meta"] = json.loads(data["meta"])
            if not isinstance(data["outputs"], list) or not isinstance(data["meta"], dict):
                raise ValueError("outputs or meta has the wrong JSON type")
        except Exception as exc:  # noqa: BLE001 - any parser failure means the stored value is not one we wrote
            raise DamagedJob(str(data["id"]), f"{type(exc).__name__}: {str(exc)[:200]}") from exc
        return Job(**data)

    @classmethod
    def _rows_to_jobs(cls, rows: Iterable[tuple]) -> list[Job]:
        """The rows that parse; a damaged one is skipped with a warning, so one bad row never fails a listing."""
        jobs = []
        for row in rows:
            try:
                jobs.append(cls._row_to_job(row))
            except DamagedJob as exc:
                log.warning("skipping a damaged job row: %s", exc)
        return jobs

    @staticmethod
    def _job_to_row(job: Job, fingerprint: str | None) -> dict:
        return {
            "id": _text(job.id), "api": _text(job.api), "model": _text(job.model),
            "status": JobStatus(job.status).value, "params": _params_json(job.params),
            "created_at": float(job.created_at), "started_at": job.started_at, "finished_at": job.finished_at,
            "progress_done": int(job.progress_done), "progress_total": int(job.progress_total),
            "outputs": _json([str(o) for o in job.outputs]), "error": _text(job.error),
            "error_code": _text(job.error_code), "error_param": _text(job.error_param), "attempts": int(job.attempts), "inference_ms": job.inference_ms,
            "owner": _text(job.owner), "meta": _json(job.meta),
            "idempotency_key": None if job.idempotency_key is None else _text(job.idempotency_key),
            "idempotency_fingerprint": fingerprint,
            "variant": None if job.variant is None else _text(job.variant),
        }

    def _fetch(self, conn: sqlite3.Connection, job_id: str) -> Job | None:
        row = conn.execute(f"{_SELECT} WHERE id = ?", (_text(job_id),)).fetchone()
        return None if row is None else self._row_to_job(row)

    def _insert(self, conn: sqlite3.Connection, job: Job, fingerprint: str | None) -> Job:
        row = self._job_to_row(job, fingerprint)
        if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (row["id"],)).fetchone() is not None:
            raise DuplicateJob(f"job {job.id!r} already exists")
        names = ", ".join(row)
        conn.execute(f"INSERT INTO jobs ({names}) VALUES ({', '.join(':' + n for n in row)})", row)
        self._add_delivery(conn, job)
        return self._fetch(conn, row["id"])

    @staticmethod
    def _check_new(job: Job) -> None:
        if job.api not in APIS:
            raise ValueError(f"job.api must be one of {APIS}, got {job.api!r}")
        if not job.id:
            raise ValueError("job.id must not be empty")

    # -- creation -------------------------------------------------------------------------------------------

    def _check_quota(self, conn: sqlite3.Connection, owner: str, quota: int | None) -> None:
        """Inside the write transaction of an insert, so two submits of one owner cannot both pass."""
        if quota is None:
            return
        marks, values = _in(_ACTIVE)
        active = conn.execute(f"SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN ({marks})",
                              (owner, *values)).fetchone()[0]
        if active >= quota:
            raise QuotaExceeded(active, quota)

    def _check_queue(self, conn: sqlite3.Connection, max_queued: int | None) -> None:
        """Inside the write transaction of an insert (SQLite's write lock: one insert at a time, every process)."""
        if max_queued is None:
            return
        queued = conn.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (JobStatus.QUEUED.value,)).fetchone()[0]
        if queued >= max_queued:
            raise QueueFull(queued, max_queued)

    def create(self, job: Job, *, quota: int | None = None, max_queued: int | None = None) -> Job:
        """Insert `job`; durable on return. Raises DuplicateJob when the id exists, QuotaExceeded when its owner
        already has `quota` waiting or running jobs, QueueFull when `max_queued` jobs are already waiting."""
        self._check_new(job)
        if job.idempotency_key is not None:
            raise ValueError("a job with an idempotency key must be created with create_idempotent()")
        try:
            with self._write() as conn:
                self._check_quota(conn, _text(job.owner), quota)
                self._check_queue(conn, max_queued)
                return self._insert(conn, job, None)
        except sqlite3.IntegrityError as exc:  # backstop for the primary key; the check above runs under the lock
            raise DuplicateJob(f"job {job.id!r} already exists") from exc

    def create_idempotent(self, job: Job, key: str, fingerprint: str, *, ttl_s: float | None = None,
                          quota: int | None = None, max_queued: int | None = None) -> tuple[Job, bool]:
        """Stripe-style submit: (existing job, False) for a replay of `key` by the same owner with the same body
        fingerprint, IdempotencyConflict for a different body, else (`job` stored with the key, True).

        `ttl_s`: a key older than this is forgotten (Stripe keeps keys at least 24 h) and the call creates a new
        job; the old job itself is untouched apart from losing its key. `quota` and `max_queued` as for
        :meth:`create` (a replay is never refused).
        """
        self._check_new(job)
        self._check_key(key, fingerprint)
        safe_key, safe_fp, owner = _text(key), _text(fingerprint), _text(job.owner)
        # BEGIN IMMEDIATE takes SQLite's write lock before the lookup, so two replicas cannot both miss and both
        # insert; the unique index is the backstop if someone writes the table without this method.
        with self._write() as conn:
            return self._create_keyed(conn, job, key, safe_key, safe_fp, owner, ttl_s, quota, max_queued)

    @staticmethod
    def _key_row(conn: sqlite3.Connection, owner: str, key: str) -> tuple | None:
        return conn.execute("SELECT id, idempotency_fingerprint, created_at FROM jobs WHERE owner = ? AND "
                            "idempotency_key = ?", (owner, key)).fetchone()

    @staticmethod
    def _forget_key(conn: sqlite3.Connection, job_id: str) -> None:
        conn.execute("UPDATE jobs SET idempotency_key = NULL, idempotency_fingerprint = NULL WHERE id = ?", (job_id,))

    # -- reads ----------------------------------------------------------------------------------------------

    def get(self, job_id: str, owner: str | None = None) -> Job | None:
        """The job, or None when unknown or (with `owner`) owned by someone else: both look the same to a client.

        DamagedJob when its row cannot be read back (with `owner`, only to that owner, unless the damage is to the
        page itself, where nothing of the row can be read)."""
        try:
            with self._read() as conn:
                row = conn.execute(f"{_SELECT} WHERE id = ?", (_text(job_id),)).fetchone()
        except JobStoreError as exc:
            if _is_corruption(exc.__cause__):  # the page this lookup landed on is damaged: this job, not the store
                raise DamagedJob(job_id, str(exc.__cause__)) from exc
            raise
        return self._owned_job(row, None if owner is None else _text(owner))

    def list(self, statuses: Iterable[JobStatus] | None = None, limit: int = 100,
             owner: str | None = None, api: str | None = None) -> list[Job]:
        """Newest first; ``api``: only the jobs that wire protocol created."""
        where, args = [], []
        if statuses is not None:
            marks, values = _in(statuses)
            if not values:
                return []
            where.append(f"status IN ({marks})")
            args += values
        if owner is not None:
            where.append("owner = ?")
            args.append(_text(owner))
        if api is not None:
            where.append("api = ?")
            args.append(_text(api))
        if limit <= 0:
            return []
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        wanted = None if statuses is None else {JobStatus(s) for s in statuses}
        return self._select(
            f"{clause} ORDER BY created_at DESC, rowid DESC LIMIT ?", (*args, int(limit)), newest_first=True,
            limit=limit, keep=lambda job: (wanted is None or job.status in wanted)
            and (owner is None or job.owner == _text(owner)) and (api is None or job.api == api))

    def queued_in_order(self) -> list[Job]:
        """Every QUEUED job, oldest first: the order the restart path resubmits them in."""
        # rowid breaks created_at ties (and survives a clock step backwards within one second) in insert order.
        return self._select("WHERE status = ? ORDER BY created_at, rowid", (JobStatus.QUEUED.value,),
                            newest_first=False, keep=lambda job: job.status is JobStatus.QUEUED)

    def _select(self, tail: str, args: tuple, *, newest_first: bool, keep: Callable[[Job], bool],
                limit: int | None = None) -> list[Job]:
        """The jobs of ``SELECT ... FROM jobs <tail>``, damaged ones skipped (with a warning each). ``tail`` orders
        by creation; ``keep`` and ``limit`` say in Python what its WHERE and LIMIT say, for the slow path."""
        try:
            with self._read() as conn:
                return self._rows_to_jobs(conn.execute(f"{_SELECT} {tail}", args).fetchall())
        except JobStoreError as exc:
            if not _is_corruption(exc.__cause__):
                raise
        # A damaged page on the way: walk the creation-time index (it holds every rowid, so this reads no table
        # page), read the rows one by one and leave out those that cannot be read. O(all jobs), only when damaged.
        order = "DESC" if newest_first else "ASC"
        with self._read() as conn:
            rowids = [r[0] for r in conn.execute(
                f"SELECT rowid FROM jobs INDEXED BY jobs_created ORDER BY created_at {order}, rowid {order}")]
        jobs: list[Job] = []
        for rowid in rowids:
            if limit is not None and len(jobs) >= limit:
                break
            try:
                with self._read() as conn:
                    jobs += [job for job in self._rows_to_jobs(
                        conn.execute(f"{_SELECT} WHERE rowid = ?", (rowid,)).fetchall()) if keep(job)]
            except JobStoreError as exc:
                if not _is_corruption(exc.__cause__):
                    raise
                log.warning("skipping a job on a damaged page of the job store (row %d): %s", rowid, exc.__cause__)
        return jobs

    def count_by_status(self) -> dict[JobStatus, int]:
        counts = {s: 0 for s in JobStatus}
        with self._read() as conn:
            for status, n in conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status"):
                if status in JobStatus._value2member_map_:  # a damaged status value is no status to count
                    counts[JobStatus(status)] = n
        return counts

    def queue_depth(self) -> int:
        with self._read() as conn:
            return conn.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (JobStatus.QUEUED.value,)).fetchone()[0]

    def queue_position(self, job_id: str) -> int | None:
        """0-based place of a QUEUED job among the queued ones (oldest first); None when it is not queued."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT (SELECT COUNT(*) FROM jobs o WHERE o.status = 'queued' AND (o.created_at < j.created_at "
                "OR (o.created_at = j.created_at AND o.rowid < j.rowid))) FROM jobs j WHERE j.id = ? "
                "AND j.status = 'queued'", (_text(job_id),)).fetchone()
        return None if row is None else int(row[0])

    # -- transitions ----------------------------------------------------------------------------------------

    def _transition(self, job_id: str, allowed: Iterable[JobStatus], sets: str, args: tuple = (), *,
                    fsync: bool = True) -> Job | None:
        marks, values = _in(allowed)
        with self._write(fsync=fsync) as conn:
            cur = conn.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND status IN ({marks})",
                               (*args, _text(job_id), *values))
            if cur.rowcount != 1:
                return None
            row = conn.execute(f"{_SELECT} WHERE id = ?", (_text(job_id),)).fetchone()
        # parsed after the commit: a damaged row still takes the transition (then raises DamagedJob)
        return self._row_to_job(row)

    def mark_running(self, job_id: str) -> Job | None:
        """QUEUED -> RUNNING; counts an attempt."""
        return self._transition(
            job_id, [JobStatus.QUEUED],
            "status = 'running', started_at = ?, attempts = attempts + 1, progress_done = 0",
            (self._clock(),))

    def update_progress(self, job_id: str, done: int, total: int) -> Job | None:
        """Progress of a RUNNING job. Not fsynced on its own, so it is cheap to call every step: losing the last
        tick in a power cut is harmless, and the next status change fsyncs it anyway."""
        return self._transition(job_id, [JobStatus.RUNNING], "progress_done = ?, progress_total = ?",
                                (max(0, int(done)), max(0, int(total))), fsync=False)

    def complete(self, job_id: str, outputs: Iterable[str], inference_ms: int | None, *,
                 meta_updates: dict | None = None) -> Job | None:
        """RUNNING -> COMPLETED. ``meta_updates``: keys merged into the job's meta in the same write (JSON merge
        patch: a key given replaces the stored one), e.g. the safety checker's verdict."""
        # skipped when there is nothing to merge: a row whose meta is damaged still completes (DamagedJob after)
        merge = ", meta = json_patch(meta, ?)" if meta_updates else ""
        return self._transition(
            job_id, [JobStatus.RUNNING],
            "status = 'completed', finished_at = ?, outputs = ?, inference_ms = ?, error = '', error_code = ''" + merge,
            (self._clock(), _json([str(o) for o in outputs]), None if inference_ms is None else int(inference_ms),
             *((_json(meta_updates),) if meta_updates else ())))

    def fail(self, job_id: str, error: str, error_code: str, error_param: str = "") -> Job | None:
        """QUEUED or RUNNING -> FAILED (a queued job can fail too: timeout in queue, input gone)."""
        return self._transition(
            job_id, _ACTIVE, "status = 'failed', finished_at = ?, error = ?, error_code = ?, error_param = ?",
            (self._clock(), _text(error), _text(error_code), _text(error_param)))

    def cancel(self, job_id: str) -> Job | None:
        """QUEUED or RUNNING -> CANCELLED. The engine still has to stop a running job; the row is final now."""
        return self._transition(
            job_id, _ACTIVE, "status = 'cancelled', finished_at = ?, error = 'cancelled', error_code = 'cancelled'",
            (self._clock(),))

    def mark_deleted(self, job_id: str) -> Job | None:
        """A terminal job deleted by its owner: ``meta.deleted_at`` set (the row stays until retention, so every
        replica answers it as deleted); None when the job is not terminal (cancel it first) or unknown."""
        return self._transition(job_id, TERMINAL, "meta = json_patch(meta, ?)",
                                (_json({"deleted_at": self._clock()}),))

    def requeue(self, job_id: str, *, refund_attempt: bool = True) -> Job | None:
        """RUNNING -> QUEUED for a graceful drain.

        `refund_attempt`: a drain is not the job's fault, so by default the attempt does not count towards
        `recover_after_restart`'s max_attempts (which exists to stop jobs that keep killing the worker).
        """
        attempts = "MAX(attempts - 1, 0)" if refund_attempt else "attempts"
        return self._transition(
            job_id, [JobStatus.RUNNING],
            f"status = 'queued', started_at = NULL, progress_done = 0, attempts = {attempts}")

    def recover_after_restart(self, max_attempts: int = 2) -> tuple[list[str], list[str]]:
        """Resolve jobs a dead process left RUNNING: back to QUEUED while attempts < max_attempts, else FAILED
        with error_code "interrupted". Returns (requeued ids, failed ids). Call once, before the engine starts."""
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        requeued, failed = [], []
        with self._write() as conn:
            now = self._clock()
            rows = conn.execute("SELECT id, attempts FROM jobs WHERE status = ? ORDER BY created_at, rowid",
                                (JobStatus.RUNNING.value,)).fetchall()
            for job_id, attempts in rows:
                if attempts < max_attempts:
                    conn.execute("UPDATE jobs SET status = 'queued', started_at = NULL, progress_done = 0 "
                                 "WHERE id = ?", (job_id,))
                    requeued.append(job_id)
                else:
                    message = (f"interrupted: the server stopped while this job was running, "
                               f"{attempts} of {max_attempts} attempts used")
                    conn.execute("UPDATE jobs SET status = 'failed', finished_at = ?, error = ?, "
                                 "error_code = 'interrupted' WHERE id = ?", (now, message, job_id))
                    failed.append(job_id)
        return requeued, failed

    # -- retention ------------------------------------------------------------------------------------------

    def prune_jobs(self, older_than_s: float) -> list[Job]:
        """Delete terminal jobs finished more than `older_than_s` ago and return them, so the caller can delete
        their output and input files (after this returns: a crash in between leaves orphan files, never rows
        that point at missing files)."""
        marks, values = _in(TERMINAL)
        with self._write() as conn:
            where = f"status IN ({marks}) AND finished_at < ?"
            args = (*values, self._clock() - older_than_s)
            rows = conn.execute(f"{_SELECT} WHERE {where}", args).fetchall()
            conn.execute(f"DELETE FROM jobs WHERE {where}", args)
            self._forget_deliveries(conn, [row[0] for row in rows])
        return self._rows_to_jobs(rows)  # a damaged row is deleted all the same; its files are not known
