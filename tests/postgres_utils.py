"""A throwaway PostgreSQL server for the tests: Debian's own binaries (`initdb`, `pg_ctl`), a data folder in a
temporary directory, loopback TCP on a free port plus a Unix socket in that directory, trust authentication.

PostgreSQL refuses to run as root, so as root (CI containers) `initdb` and `pg_ctl` run as the `postgres` system
user, which owns the temporary directory. The server is started once per test session (about a second) and each
test gets a fresh schema in a shared database (a millisecond; `CREATE DATABASE` takes a quarter second). fsync
is off: these tests kill clients, never the server host, and a crash of the test machine loses nothing anyone
needs.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

MISSING_BINARIES = "PostgreSQL server binaries (initdb, pg_ctl) not installed"
SUPERUSER = "magi_test"
SHARED_DATABASE = "magi_tests"  # holds the per-test schemas
START_TIMEOUT_S = 60


def find_server_binaries() -> tuple[str, str] | None:
    """(initdb, pg_ctl) from the PATH, else from Debian's versioned folder (newest version first), else None."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return initdb, pg_ctl
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                      key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.name.split(".")])
    for folder in reversed(versions):
        initdb, pg_ctl = os.path.join(folder, "initdb"), os.path.join(folder, "pg_ctl")
        if os.access(initdb, os.X_OK) and os.access(pg_ctl, os.X_OK):
            return initdb, pg_ctl
    return None


def why_unavailable() -> str | None:
    """The reason the tests cannot start a server here, or None when they can."""
    if find_server_binaries() is None:
        return MISSING_BINARIES
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root without runuser: cannot start PostgreSQL as the postgres user"
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres system user to run PostgreSQL as"
    try:
        import psycopg  # noqa: F401 - needs the system libpq too
    except ImportError as exc:
        return f"psycopg (with libpq) is not importable: {exc}"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One server process; `start()` then `stop()` (idempotent). `database()` makes a fresh database."""

    def __init__(self) -> None:
        binaries = find_server_binaries()
        if binaries is None:
            raise RuntimeError(MISSING_BINARIES)
        self.initdb, self.pg_ctl = binaries
        self.root = Path(tempfile.mkdtemp(prefix="magi-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "server.log"
        self.port = 0
        self.running = False
        self._shared_database_made = False

    def _as_server_user(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def _run(self, argv: list[str], timeout: float = START_TIMEOUT_S) -> None:
        proc = subprocess.run(self._as_server_user(argv), capture_output=True, text=True, timeout=timeout,
                              cwd=self.root)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({proc.returncode}): {proc.stderr[-2000:]}\n{log}")

    def start(self) -> "PostgresServer":
        self.sockets.mkdir()
        if os.geteuid() == 0:
            server_user = pwd.getpwnam("postgres")
            for path in (self.root, self.sockets):
                os.chown(path, server_user.pw_uid, server_user.pw_gid)
        self._run([self.initdb, "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                   "--locale=C", "--no-sync", "--no-instructions"])
        for attempt in range(3):  # the free port may be taken between the probe and the bind
            self.port = free_port()
            options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.sockets} "
                       f"-c fsync=off -c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB")
            try:
                self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(START_TIMEOUT_S),
                           "-o", options, "start"], timeout=START_TIMEOUT_S + 10)
                self.running = True
                return self
            except RuntimeError:
                if attempt == 2:
                    raise
        return self

    def stop(self) -> None:
        if self.running:
            self.running = False
            subprocess.run(self._as_server_user([self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"]),
                           capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def admin(self):
        """An autocommit connection to the maintenance database (the caller closes it)."""
        import psycopg

        return psycopg.connect(self.dsn(), autocommit=True)

    def database(self) -> str:
        """A fresh, empty database; returns its name. About 0.25 s (a copy of the template): tests that do not need
        a database of their own take a schema (`schema_dsn`)."""
        name = f"t_{uuid.uuid4().hex}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def schema_dsn(self) -> tuple[str, str]:
        """(name, URL) of a fresh, empty schema in the shared test database, the URL's `search_path` set to it: to
        the job store it is an empty database, in a millisecond. Schemas share the database's advisory locks,
        which only makes concurrent tests take turns."""
        if not self._shared_database_made:
            with self.admin() as conn:
                conn.execute(f'CREATE DATABASE "{SHARED_DATABASE}"')
            self._shared_database_made = True
        name = f"s_{uuid.uuid4().hex}"
        with psycopg_connect(self.dsn(SHARED_DATABASE)) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return name, f"{self.dsn(SHARED_DATABASE)}?options=-csearch_path%3D{name}"

    def drop_schema(self, name: str) -> None:
        with psycopg_connect(self.dsn(SHARED_DATABASE)) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def psycopg_connect(dsn: str):
    import psycopg

    return psycopg.connect(dsn, autocommit=True)
