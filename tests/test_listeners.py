"""serving/listeners.py in a real uvicorn server on loopback (in-process, a thread): each connection phase's
deadline, the room made for a new connection at the cap, the 503 when every connection is being answered, and the
starting front's answers. Short deadlines, so each test takes about a second.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import pytest
import uvicorn

from magi_server.serving.listeners import ConnectionGuard, StartingApp

HEADER_TIMEOUT_S = 0.5
BODY_GRACE_S = 0.5
MIN_RATE = 1000  # bytes per second a body must keep


async def app(scope, receive, send):
    """/slow holds its answer for a second (a connection being answered); POST reads the whole body."""
    if scope["type"] != "http":
        return
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        received += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":
        await asyncio.sleep(1.0)
    body = json.dumps({"received": received}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _Server(uvicorn.Server):
    def capture_signals(self):
        return contextlib.nullcontext()


@pytest.fixture
def served():
    guard = ConnectionGuard(max_connections=3, header_timeout_s=HEADER_TIMEOUT_S, body_grace_s=BODY_GRACE_S,
                            body_min_bytes_per_s=MIN_RATE)
    front = StartingApp("tiny")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = _Server(uvicorn.Config(front, http=guard.protocol_class(), ws="none", lifespan="off",
                                    log_config=None, access_log=False, timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        yield {"guard": guard, "front": front, "port": sock.getsockname()[1]}
    finally:
        server.should_exit = True
        thread.join(10)


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _closed_after(sock: socket.socket, limit_s: float) -> float:
    """Seconds until the server closes ``sock`` (reading and dropping what it answers), at most ``limit_s``."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    try:
        while sock.recv(4096):
            pass
    except (socket.timeout, TimeoutError):
        return float("inf")
    except OSError:
        pass
    return time.monotonic() - started


def _request(port: int, path: str = "/x") -> bytes:
    with _connect(port) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data


def test_the_starting_front_answers_liveness_and_says_loading(served):
    assert _request(served["port"], "/health/live").startswith(b"HTTP/1.1 200")
    ready = _request(served["port"], "/health/ready")
    assert ready.startswith(b"HTTP/1.1 503") and b'"loading"' in ready
    other = _request(served["port"], "/api/v3/predictions/x/result")
    assert other.startswith(b"HTTP/1.1 503") and b"retry-after: 5" in other.lower()
    served["front"].app = app  # the model is loaded: everything goes to the real app
    assert _request(served["port"], "/health/ready").startswith(b"HTTP/1.1 200")


def test_headers_that_trickle_are_cut_at_the_header_deadline(served):
    served["front"].app = app
    with _connect(served["port"]) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\n")
        for _ in range(2):
            time.sleep(0.1)
            sock.sendall(b"X-A: b\r\n")
        closed = _closed_after(sock, 3.0)
    assert HEADER_TIMEOUT_S - 0.25 < closed < HEADER_TIMEOUT_S + 0.3, closed
    assert served["guard"].closed_for_deadline == 1


def test_a_body_must_keep_its_rate_and_a_fast_one_is_untouched(served):
    served["front"].app = app
    size = 3000
    head = f"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode()
    with _connect(served["port"]) as slow:  # 1 byte every 0.1 s: far below 1000 B/s
        slow.sendall(head + b"a")
        started = time.monotonic()
        closed_at = None
        while time.monotonic() - started < 3:
            try:
                slow.sendall(b"b")
            except OSError:
                closed_at = time.monotonic() - started
                break
            slow.settimeout(0.1)
            try:
                if slow.recv(4096) == b"":
                    closed_at = time.monotonic() - started
                    break
            except (socket.timeout, TimeoutError):
                pass
    assert closed_at is not None and closed_at < BODY_GRACE_S + 0.5, closed_at
    with _connect(served["port"]) as fast:  # the same size at ~3000 B/s over a second: well within the rate
        fast.sendall(head)
        for _ in range(10):
            fast.sendall(b"c" * (size // 10))
            time.sleep(0.1)
        answer = b""
        while chunk := fast.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"received": 3000}')


def test_at_the_cap_the_longest_idle_connection_makes_room(served):
    served["front"].app = app
    idle = [_connect(served["port"]) for _ in range(3)]
    time.sleep(0.1)
    assert _request(served["port"]).startswith(b"HTTP/1.1 200")  # served: the oldest idle socket was closed for it
    assert _closed_after(idle[0], 0.3) < 0.3
    assert served["guard"].closed_for_room >= 1
    for sock in idle:
        sock.close()


def test_when_every_connection_is_being_answered_a_new_one_gets_503(served):
    served["front"].app = app
    busy = []
    for _ in range(3):
        sock = _connect(served["port"])
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        busy.append(sock)
    time.sleep(0.2)
    refused = _request(served["port"])
    assert refused.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in refused.lower(), refused
    for sock in busy:  # the answers in progress were not disturbed
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        sock.close()
    assert served["guard"].refused == 1
