"""Where request media comes from: raw bytes, a ``data:`` URI, a local path or an http(s) URL (:func:`open_source`),
each read under a byte cap, and which of these a caller accepts (:class:`SourcePolicy`). The URL fetch is
hand-written on http.client so that it connects only to addresses it has checked (SSRF: spec reliability.md §4.1)
and follows no redirects; ``_fetch_url`` says why urllib would not do. Outgoing POSTs to URLs a request names
(webhooks: :func:`post_to_url`) go through the same checks and pinned connections.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import math
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, Union

from magi_server.media import InputError

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]
T = TypeVar("T")


@dataclass(frozen=True)
class SourcePolicy:
    """Where ``load_image`` / ``load_video`` may read from.

    The defaults suit trusted callers (CLI, tests): local paths are read, URLs must point at public addresses on
    ports 80/443. The HTTP layer should pass ``allow_paths=False`` so that a request can never name a server file.
    ``allow_private_hosts`` exists for tests against a loopback server; never enable it for user-supplied URLs
    (spec reliability.md §4.1: SSRF to loopback / metadata addresses).
    """

    allow_paths: bool = True
    allow_private_hosts: bool = False
    allowed_ports: tuple[int, ...] | None = (80, 443)
    timeout_s: float = 15.0
    # The operator's exceptions (``--allow-private-urls``): networks ("10.0.0.0/8", "127.0.0.1") and host names
    # ("assets.internal") that may be fetched although private, on any port. Everything else keeps the rules above.
    private_allowlist: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError("SourcePolicy.timeout_s must be a positive number of seconds")
        networks, names = [], []
        for entry in self.private_allowlist:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                if not entry.strip() or "/" in entry:
                    raise ValueError(f"not a network or host name: {entry!r}") from None
                names.append(entry.strip().lower().rstrip("."))
        object.__setattr__(self, "_networks", tuple(networks))
        object.__setattr__(self, "_names", frozenset(names))

    def allows_private(self, host: str, address: str | None = None) -> bool:
        """The operator allowed this host name, or (given) this address, although private."""
        if host.lower().rstrip(".") in self._names:
            return True
        if address is None:
            return False
        ip = ipaddress.ip_address(address)
        return any(ip.version == net.version and ip in net for net in self._networks)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    # Addresses that tunnel to an IPv4 host must be judged by that host, or ::ffff:127.0.0.1 walks past the check.
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in ipaddress.IPv6Network("64:ff9b::/96"):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            return _is_public(inner)
    return ip.is_global and not ip.is_multicast


def _resolve(host: str, port: int, param: str, policy: SourcePolicy) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise InputError(param, f"could not resolve host {host!r} ({exc})") from None
    addresses: list[str] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        text = str(sockaddr[0]).split("%", 1)[0]
        if (not policy.allow_private_hosts and not _is_public(ipaddress.ip_address(text))
                and not policy.allows_private(host, text)):
            # One private answer among public ones is refused too: the attacker controls which one we would use.
            raise InputError(param, f"host {host!r} resolves to a non-public address; only public hosts are allowed")
        if text not in addresses:
            addresses.append(text)
    if not addresses:
        raise InputError(param, f"host {host!r} has no IPv4 or IPv6 address")
    return addresses


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address we validated, so a second DNS answer (rebinding) cannot redirect the request."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a validated address while the certificate is still checked against the host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float, context: Any):
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


@dataclass(frozen=True)
class CheckedURL:
    """An http(s) URL that passed the policy: its parts and the addresses it may be reached at (checked now, so a
    second DNS answer cannot move it elsewhere: connect with :meth:`connection`)."""

    url: str
    scheme: str
    host: str
    port: int
    target: str  # path and query
    addresses: tuple[str, ...]

    def connection(self, address: str, timeout_s: float) -> http.client.HTTPConnection:
        if self.scheme == "https":
            import ssl

            return _PinnedHTTPSConnection(self.host, self.port, address, timeout_s, ssl.create_default_context())
        return _PinnedHTTPConnection(self.host, self.port, address, timeout_s)


def check_url(url: str, *, param: str, policy: SourcePolicy) -> CheckedURL:
    """The URL's scheme, credentials, host, port and resolved addresses checked against ``policy`` (the SSRF rules,
    spec reliability.md §4.1); InputError naming ``param`` when any fails. Resolves the name (blocking)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InputError(param, f"malformed URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InputError(param, "only http:// and https:// URLs are allowed")
    if parts.username is not None or parts.password is not None:
        raise InputError(param, "URLs with user credentials are not allowed")
    host = parts.hostname
    if not host:
        raise InputError(param, "the URL has no host")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise InputError(param, f"invalid host name {parts.hostname!r}") from None
    port = port or (443 if scheme == "https" else 80)
    odd_port = policy.allowed_ports is not None and port not in policy.allowed_ports
    if odd_port and not policy.private_allowlist:
        raise InputError(param, f"port {port} is not allowed (allowed: {', '.join(map(str, policy.allowed_ports))})")
    addresses = _resolve(host, port, param, policy)
    # an operator-allowed private host may use any port (internal services rarely sit on 80/443)
    if odd_port and not all(policy.allows_private(host, address) for address in addresses):
        raise InputError(param, f"port {port} is not allowed (allowed: {', '.join(map(str, policy.allowed_ports))})")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return CheckedURL(url, scheme, host, port, target, tuple(addresses))


def _over_pinned_connection(checked: CheckedURL, *, param: str, deadline: float, timeout_s: float, what: str,
                            talk: Callable[[http.client.HTTPConnection], T]) -> T:
    """``talk(conn)`` over a connection to the first of ``checked``'s addresses that accepts one before
    ``deadline``. Socket timeouts apply per read, so a server trickling bytes could outlast them; a watchdog that
    shuts the socket at the deadline makes the limit total. ``what`` names the exchange in the refusals."""
    last_error: Exception | None = None
    for address in checked.addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        conn = checked.connection(address, remaining)
        try:
            conn.connect()
        except OSError as exc:
            last_error = exc
            conn.close()
            continue
        watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), _shutdown_socket, args=(conn.sock,))
        watchdog.daemon = True
        watchdog.start()
        try:
            return talk(conn)
        finally:
            watchdog.cancel()
            conn.close()
    if last_error is None:
        raise InputError(param, f"{what} did not finish within {timeout_s:g} s")
    raise InputError(param, f"could not connect to {checked.host!r} ({last_error})")


def post_to_url(checked: CheckedURL, body: bytes, headers: dict[str, str], *, param: str, timeout_s: float) -> int:
    """POST ``body`` to a URL :func:`check_url` passed (connected to one of its checked addresses, no redirects
    followed, everything within ``timeout_s``) and return the HTTP status; a response body is read (up to 64 KiB)
    and dropped. InputError when no connection or no answer comes."""
    deadline = time.monotonic() + timeout_s

    def post(conn: http.client.HTTPConnection) -> int:
        try:
            conn.request("POST", checked.target, body=body,
                         headers={"User-Agent": "magi-server", "Content-Length": str(len(body)), **headers})
            response = conn.getresponse()
            response.read(65536)
            return response.status
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, socket.timeout) or time.monotonic() >= deadline:
                raise InputError(param, f"no answer within {timeout_s:g} s") from None
            raise InputError(param, f"delivery failed ({type(exc).__name__}: {exc})") from None

    return _over_pinned_connection(checked, param=param, deadline=deadline, timeout_s=timeout_s, what="the delivery",
                                   talk=post)


def _fetch_url(url: str, *, param: str, max_bytes: int, policy: SourcePolicy) -> bytes:
    """GET one URL with no redirects, a total deadline and a byte cap enforced while streaming.

    urllib is not used directly: it follows redirects and resolves the name again at connect time, both of which
    defeat the address check. The lower layer it is built on (http.client) lets us connect to the checked address.
    """
    deadline = time.monotonic() + policy.timeout_s
    checked = check_url(url, param=param, policy=policy)
    return _over_pinned_connection(
        checked, param=param, deadline=deadline, timeout_s=policy.timeout_s, what="download",
        talk=lambda conn: _read_response(conn, checked.target, param=param, max_bytes=max_bytes, deadline=deadline,
                                         timeout_s=policy.timeout_s))


def _shutdown_socket(sock: socket.socket | None) -> None:
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _read_response(conn: http.client.HTTPConnection, target: str, *, param: str, max_bytes: int, deadline: float,
                   timeout_s: float) -> bytes:
    too_slow = InputError(param, f"download did not finish within {timeout_s:g} s")
    # Kept here: http.client drops conn.sock once a response that closes the connection has been opened.
    sock = conn.sock
    response = None
    try:
        conn.request("GET", target, headers={"User-Agent": "magi-server", "Accept": "*/*",
                                             "Accept-Encoding": "identity"})
        response = conn.getresponse()
        if 300 <= response.status < 400:
            raise InputError(param, f"the URL redirects (HTTP {response.status}); redirects are not followed, "
                                    "give the final URL")
        if response.status != 200:
            raise InputError(param, f"the URL answered HTTP {response.status}")
        declared = response.getheader("Content-Length")
        expected = int(declared) if declared and declared.strip().isdigit() else None
        if expected is not None and expected > max_bytes:
            raise InputError(param, f"the download is larger than {max_bytes} bytes")
        blocks: list[bytes] = []
        total = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise too_slow
            # The per-read timeout shrinks with the deadline, so a server trickling a byte at a time cannot stretch
            # the download; read1 returns after one socket read instead of waiting for a full buffer.
            sock.settimeout(remaining)
            block = response.read1(65536)
            if not block:
                break
            total += len(block)
            if total > max_bytes:
                raise InputError(param, f"the download is larger than {max_bytes} bytes")
            blocks.append(block)
        if time.monotonic() >= deadline:
            raise too_slow
        if expected is not None and total != expected:
            raise InputError(param, f"the download was cut short ({total} of {expected} bytes)")
        return b"".join(blocks)
    except (OSError, http.client.HTTPException) as exc:
        if isinstance(exc, socket.timeout) or time.monotonic() >= deadline:
            raise too_slow from None
        raise InputError(param, f"download failed ({type(exc).__name__}: {exc})") from None
    finally:
        if response is not None:
            response.close()
        if sock is not None:
            sock.close()


def _decode_data_uri(uri: str, *, param: str, max_bytes: int) -> bytes:
    header, sep, payload = uri[len("data:"):].partition(",")
    if not sep:
        raise InputError(param, "malformed data: URI (no comma)")
    if "base64" not in [p.strip().lower() for p in header.split(";")]:
        raise InputError(param, "data: URIs must be base64-encoded (data:<type>;base64,...)")
    payload = "".join(payload.split())
    # Reject by the encoded length first so an oversized URI is never decoded into memory.
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise InputError(param, f"the data is larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(param, "the data: URI is not valid base64") from None
    if len(data) > max_bytes:
        raise InputError(param, f"the data is larger than {max_bytes} bytes")
    return data


def _check_path(source: str | os.PathLike, *, param: str, max_bytes: int, policy: SourcePolicy) -> Path:
    if not policy.allow_paths:
        raise InputError(param, "must be an http(s) URL or a data: URI")
    path = Path(source)
    try:
        if not path.exists():
            raise InputError(param, f"file not found: {str(path)!r}")
        if not path.is_file():
            raise InputError(param, f"not a regular file: {str(path)!r}")
        size = path.stat().st_size
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise InputError(param, f"cannot read {str(path)!r} ({getattr(exc, 'strerror', None) or exc})") from None
    if size == 0:
        raise InputError(param, "the file is empty")
    if size > max_bytes:
        raise InputError(param, f"the file is larger than {max_bytes} bytes")
    return path


def read_path(path: Path, *, param: str, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(param, f"cannot read {str(path)!r} ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise InputError(param, f"the file is larger than {max_bytes} bytes")
    return data


def open_source(source: Any, *, param: str, max_bytes: int, policy: SourcePolicy) -> bytes | Path:
    """Bytes for in-memory sources and downloads, a checked ``Path`` for local files (so videos are not copied)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise InputError(param, f"the data is larger than {max_bytes} bytes")
        return data
    if isinstance(source, os.PathLike):
        return _check_path(source, param=param, max_bytes=max_bytes, policy=policy)
    if not isinstance(source, str):
        raise InputError(param, f"expected a URL, a data: URI, a path or bytes, got {type(source).__name__}")
    if not source.strip():
        raise InputError(param, "the value is empty")
    lowered = source.lstrip().lower()
    if lowered.startswith("data:"):
        return _decode_data_uri(source.strip(), param=param, max_bytes=max_bytes)
    if lowered.startswith(("http://", "https://")):
        return _fetch_url(source.strip(), param=param, max_bytes=max_bytes, policy=policy)
    if re.match(r"^[a-z][a-z0-9+.-]*://", lowered):
        raise InputError(param, "only http://, https:// and data: URIs are allowed")
    return _check_path(source, param=param, max_bytes=max_bytes, policy=policy)
