"""Which job store a location names: `open_job_store("postgresql://...")` is the PostgreSQL store that several
processes share, anything else the path of the embedded SQLite store (the default, `magi-server.db`).

A module of its own so `jobs.py` stays free of the PostgreSQL store, and so psycopg is imported only when a
PostgreSQL URL is opened: SQLite users need neither the driver nor libpq.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magi_server.serving.jobs import JobStore

if TYPE_CHECKING:
    from magi_server.serving.jobs_postgres import PostgresJobStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.strip().lower().startswith(POSTGRES_SCHEMES)


def open_job_store(location: str | Path, **kw) -> "JobStore | PostgresJobStore":
    """The store at `location`: a `postgresql://` or `postgres://` URL opens :class:`PostgresJobStore`, any other
    string or path the SQLite :class:`JobStore` (":memory:" included). Keyword arguments go to the constructor
    (`clock` suits both; `synchronous` is SQLite's, `max_connections` PostgreSQL's). Raises JobStoreUnusable with
    a one-line message when the store cannot be opened."""
    if is_postgres_url(location):
        from magi_server.serving.jobs_postgres import PostgresJobStore

        return PostgresJobStore(location.strip(), **kw)
    return JobStore(location, **kw)


def migrate_job_store(location: str | Path) -> tuple[int, int]:
    """Create or upgrade the store's schema (``magi-server migrate``): (version found, version now). PostgreSQL
    replicas can then start without racing to migrate; a SQLite file migrates itself at open, so this opens it."""
    if is_postgres_url(location):
        from magi_server.serving.jobs_postgres import migrate

        return migrate(location.strip())
    from magi_server.serving.jobs import SCHEMA_VERSION

    with JobStore(location):
        return SCHEMA_VERSION, SCHEMA_VERSION
