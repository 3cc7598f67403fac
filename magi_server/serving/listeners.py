"""What every listener of the process does below and before the apps: connection admission and deadlines (what
keeps a port that anyone can reach from being taken down without a key), and :class:`StartingApp`, which answers
from the moment a listener binds while the model still loads. Light to import (no FastAPI): the composition root
binds the listeners before it imports the rest.

uvicorn gives each accepted socket a protocol object and keeps it until the client leaves; it has no deadline for a
request's headers or body and no cap on open connections, so idle or trickling sockets (slowloris) pile up until
the process runs out of file descriptors, and then the job store, the encoder and the health check fail too. No
server option covers this (uvicorn's ``limit_concurrency`` answers 503 only once a request has fully arrived, and
its keep-alive timer is reset by every byte), so :class:`ConnectionGuard` subclasses uvicorn's h11 protocol:

* every connection is in one of three phases: *waiting* for a request's headers (just accepted, or between
  keep-alive requests), *receiving* a request's body, or *answering* (the app has the whole request: a sync
  request or an event stream may hold it for minutes, legitimately);
* waiting has a fixed deadline (``header_timeout_s``, however slowly the bytes trickle); receiving must keep an
  average rate (``body_grace_s`` plus one second per ``body_min_bytes_per_s`` received); answering has none (the
  routes bound their own waits);
* at most ``max_connections`` are open (the composition root keeps it below the open-file limit). A connection
  arriving when all are taken closes the one that has waited longest without sending a request (an idle or slow
  socket, never one being answered); if every connection is being answered it gets 503 + Retry-After and is closed.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from enum import Enum

log = logging.getLogger("magi_server.serving.connections")


class Phase(Enum):
    WAITING = "waiting"  # for a request's headers
    RECEIVING = "receiving"  # a request's body
    ANSWERING = "answering"  # the app has the request


def _busy_answer(retry_after_s: int) -> bytes:
    body = json.dumps({"code": 503, "message": "too many open connections; retry later", "data": None,
                       "detail": "too many open connections"}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: {retry_after_s}\r\n"
            f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n")
    return head.encode() + body


class ConnectionGuard:
    """The open connections of every listener of the process (one file-descriptor budget), their phases and
    deadlines. :meth:`protocol_class` is what ``uvicorn.Config(http=...)`` takes."""

    def __init__(self, *, max_connections: int, header_timeout_s: float = 10.0, body_grace_s: float = 10.0,
                 body_min_bytes_per_s: int = 16 * 1024, retry_after_s: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.body_grace_s = body_grace_s
        self.body_min_bytes_per_s = body_min_bytes_per_s
        self.retry_after_s = retry_after_s
        self.clock = clock
        # every open connection, ordered by when it entered its phase: the first WAITING one has waited longest
        self.open: dict = {}
        self.closed_for_deadline = 0
        self.closed_for_room = 0
        self.refused = 0

    def make_room(self) -> bool:
        """Close the connection that has waited longest for a request; False when every one is being answered."""
        for conn in self.open:
            if conn.phase is Phase.WAITING:
                self.closed_for_room += 1
                conn.close_now()
                return True
        return False

    def protocol_class(self):
        from uvicorn.protocols.http.h11_impl import H11Protocol

        guard = self

        class GuardedH11Protocol(H11Protocol):
            phase = Phase.WAITING

            def connection_made(self, transport) -> None:
                self._since = guard.clock()
                self._body_bytes = 0
                self._deadline = None
                self._refused = False
                super().connection_made(transport)
                if len(guard.open) >= guard.max_connections and not guard.make_room():
                    # answer 503 and close once the client's request is read (closing with its bytes unread would
                    # reset the connection, and the client might never see the answer); a client that sends
                    # nothing is closed after a moment
                    guard.refused += 1
                    self._refused = True
                    transport.write(_busy_answer(guard.retry_after_s))
                    self._deadline = self.loop.call_later(0.5, transport.close)
                    return
                guard.open[self] = None
                self._enter(Phase.WAITING)

            def connection_lost(self, exc) -> None:
                guard.open.pop(self, None)
                self._cancel_deadline()
                super().connection_lost(exc)

            def data_received(self, data: bytes) -> None:
                if self._refused:  # already answered 503: its request is read only to close cleanly
                    self._cancel_deadline()
                    self.transport.close()
                    return
                if self.phase is Phase.RECEIVING:
                    self._body_bytes += len(data)
                super().data_received(data)
                self._follow()

            def on_response_complete(self) -> None:
                super().on_response_complete()
                self._follow()

            # ---------------------------------------------------------------------------------------- phases
            def _current_phase(self) -> Phase:
                cycle = self.cycle
                if cycle is None or cycle.response_complete:
                    return Phase.WAITING
                return Phase.RECEIVING if cycle.more_body else Phase.ANSWERING

            def _follow(self) -> None:
                phase = self._current_phase()
                if phase is not self.phase and self in guard.open:
                    self._enter(phase)

            def _enter(self, phase: Phase) -> None:
                self.phase = phase
                self._since = guard.clock()
                self._body_bytes = 0
                guard.open.pop(self, None)  # re-insert last: ordered by the time each entered its phase
                guard.open[self] = None
                self._cancel_deadline()
                if phase is Phase.WAITING:
                    self._arm(guard.header_timeout_s)
                elif phase is Phase.RECEIVING:
                    self._arm(guard.body_grace_s)

            def _arm(self, delay_s: float) -> None:
                self._deadline = self.loop.call_later(max(0.0, delay_s), self._check_deadline)

            def _cancel_deadline(self) -> None:
                if self._deadline is not None:
                    self._deadline.cancel()
                    self._deadline = None

            def _check_deadline(self) -> None:
                self._deadline = None
                elapsed = guard.clock() - self._since
                if self.phase is Phase.WAITING:
                    allowed = guard.header_timeout_s
                elif self.phase is Phase.RECEIVING:
                    allowed = guard.body_grace_s + self._body_bytes / guard.body_min_bytes_per_s
                else:
                    return
                if elapsed + 1e-3 < allowed:  # a body that kept its rate so far: look again when it could fall behind
                    self._arm(allowed - elapsed)
                    return
                guard.closed_for_deadline += 1
                self.close_now()

            def close_now(self) -> None:
                guard.open.pop(self, None)
                self._cancel_deadline()
                if not self.transport.is_closing():
                    self.transport.close()

        return GuardedH11Protocol


class StartingApp:
    """What a listener serves from the moment it binds, before the model is loaded (minutes for 24B): liveness
    answers 200, readiness 503 ``"loading"``, every other route 503 + Retry-After. :attr:`app` is set to the real
    app once the model is loaded; from then on every request goes to it."""

    def __init__(self, model_name: str, retry_after_s: int = 5) -> None:
        self.model_name = model_name
        self.retry_after_s = retry_after_s
        self.app = None

    async def __call__(self, scope, receive, send):
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return
        path = scope.get("path", "")
        headers = [(b"content-type", b"application/json")]
        if path == "/health/live":
            status, body = 200, {"status": "alive"}
        elif path == "/health/ready":
            status, body = 503, {"status": "loading", "model": self.model_name}
        else:
            status = 503
            body = {"code": 503, "message": "the model is loading; retry later", "data": None, "detail": "loading"}
            headers.append((b"retry-after", str(self.retry_after_s).encode()))
        payload = json.dumps(body).encode()
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
