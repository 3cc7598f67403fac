"""Real ``magi-server serve`` / ``api`` / ``worker`` subprocesses for tests that need a process to kill or an SDK
to point at.

Every wait has a deadline, the server only listens on 127.0.0.1, and its output goes to a log file whose tail is
put into every failure message (a server that died at startup is otherwise a silent timeout). The server runs in
its own session so that ``close()`` can also end the ffmpeg encoders it started: after a ``kill -9`` they are
orphans of ours, and a test must not leave them behind.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 60.0  # cold start on a 2-core CPU: torch import + building the tiny weights (cached afterwards)


def free_port() -> int:
    """A port the kernel just handed out on loopback (closed again: a tiny race, handled by retrying in start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _location(value: Path | str) -> Path | str:
    """A URL (postgresql://..., s3://...) stays a string; anything else is a path."""
    return value if isinstance(value, str) and "://" in value else Path(value)


class ServerProcess:
    """``python -m magi_server serve --model tiny`` (or ``api``: ``command="api"``, no model) on a free loopback port
    over a given db (a file, or a postgresql:// URL)/outputs/cache. ``env``: added to the process's environment."""

    def __init__(self, *, db: Path | str, outputs: Path | str, cache: Path, log: Path, extra_args: tuple[str, ...] = (),
                 nofile_limit: int | None = None, command: str = "serve", env: dict | None = None,
                 model: str = "tiny") -> None:
        self.db = _location(db)
        self.outputs, self.cache, self.log_path = _location(outputs), Path(cache), Path(log)
        self.extra_args = tuple(extra_args)
        self.command = command
        self.model = model
        self.env = dict(env or {})
        self.nofile_limit = nofile_limit  # the server's open-file limit (soft and hard), e.g. the usual 1024
        self.spawned_at: float | None = None  # time.monotonic() just before the process was started
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._groups: list[int] = []  # every session we started (a restart reuses this object)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # ------------------------------------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = READY_TIMEOUT_S) -> "ServerProcess":
        """Start and wait for /health/ready == 200. Retries on a new port if the chosen one was taken meanwhile."""
        for _ in range(3):
            self.port = free_port()
            self._spawn()
            if self._wait_ready(timeout_s):
                return self
            if "address already in use" not in self.log_tail().lower():
                break
        tail = self.log_tail()
        self.close()
        raise AssertionError(f"server did not become ready within {timeout_s:.0f} s; log tail:\n{tail}")

    def spawn(self) -> "ServerProcess":
        """Start the process on a free port without waiting for it (tests of what it answers while starting)."""
        self.port = free_port()
        self._spawn()
        return self

    def _limit_files(self) -> None:  # runs in the child before exec
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile_limit, self.nofile_limit))

    def _spawn(self) -> None:
        device = ("--device", "cpu") if self.command == "serve" else ()
        cmd = [sys.executable, "-m", "magi_server", self.command, "--model", self.model, *device,
               "--host", "127.0.0.1", "--port", str(self.port), "--db", str(self.db), "--outputs", str(self.outputs),
               "--cache-dir", str(self.cache), *self.extra_args]
        self._run(cmd)

    def _run(self, cmd: list[str]) -> None:
        """Start ``cmd`` in a session of its own, its output appended to the log."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **self.env}
        env.pop("MAGI_SERVER_API_KEYS", None)  # auth must be off for these tests whatever the caller's shell has
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {' '.join(cmd)}\n".encode())
            log.flush()
            self.spawned_at = time.monotonic()
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=self._limit_files if self.nofile_limit else None)
        self._groups.append(self.proc.pid)

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return False

    def kill9(self) -> None:
        """SIGKILL the server process itself (not its group: that is what a crash or the OOM killer does)."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        assert self.proc.returncode == -signal.SIGKILL, self.proc.returncode

    def close(self) -> None:
        """Stop whatever is left of this server's session: the server (if alive) and any ffmpeg it left behind."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass
            for pgid in self._groups:  # start_new_session: each server led its own group
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if self.proc is not None:
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self.proc = None
            self._groups.clear()

    # ------------------------------------------------------------------------------------------------- helpers
    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class WorkerProcess(ServerProcess):
    """``python -m magi_server worker --model tiny`` over a shared PostgreSQL store; ready once it logs so. Its own
    session, like ServerProcess (whose kill9, close and log_tail it shares), so close() also ends the encoders a
    killed worker left behind."""

    def __init__(self, *, db: str, outputs: Path | str, cache: Path, log: Path, extra_args: tuple[str, ...] = (),
                 env: dict | None = None) -> None:
        super().__init__(db=db, outputs=outputs, cache=cache, log=log, extra_args=extra_args, command="worker",
                         env=env)

    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "magi_server", "worker", "--model", self.model, "--device", "cpu",
               "--db", str(self.db), "--outputs", str(self.outputs), "--cache-dir", str(self.cache), *self.extra_args]
        self._run(cmd)

    def spawn(self) -> "WorkerProcess":
        self._spawn()
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> "WorkerProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if " ready in " in self.log_tail(100_000):
                return self
            time.sleep(0.1)
        raise AssertionError(f"worker not ready within {timeout_s:.0f} s; log tail:\n{self.log_tail()}")

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> "WorkerProcess":
        return self.spawn().wait_ready(timeout_s)
