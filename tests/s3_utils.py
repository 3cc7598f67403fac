"""A throwaway S3-compatible server for the tests: moto's server mode (`python -m moto.server`), a real subprocess
speaking the S3 HTTP API on a free loopback port, in memory.

moto stands in for S3 because no real S3-compatible server (MinIO, Ceph, SeaweedFS) installs on this machine from
the registries it reaches; issue #11 allows it. What moto does not do, the tests say where it matters: it checks
neither the signature nor the expiry of presigned URLs, so a presigned URL's expiry is verified by recomputing
its SigV4 signature, not by the server refusing it.

Credentials are fake and go only where they are passed: :meth:`MotoS3.store_kwargs` for an in-process client,
:meth:`MotoS3.env` for a subprocess's environment. Nothing here touches ``os.environ``, so no other test (or a
real AWS configuration on the machine) is affected.
"""
from __future__ import annotations

import calendar
import hashlib
import hmac
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, parse_qsl, quote, urlsplit

START_TIMEOUT_S = 30
FAKE_ACCESS_KEY_ID = "AKIAMAGITESTKEY00000"  # moto accepts any; the AKIA form is what AWS keys look like
FAKE_SECRET_ACCESS_KEY = "magi-test-secret-not-a-real-one"
REGION = "us-east-1"


def why_unavailable() -> str | None:
    """The reason the S3 tests cannot run here, or None when they can."""
    for module, install in (("boto3", "boto3"), ("moto.server", "'moto[server]'")):
        try:
            __import__(module)
        except ImportError as exc:
            return f"{module} is not importable ({exc}); pip install {install}"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class MotoS3:
    """A running server: where it is and the fake credentials that go with it."""

    endpoint_url: str
    access_key_id: str = FAKE_ACCESS_KEY_ID
    secret_access_key: str = FAKE_SECRET_ACCESS_KEY
    region: str = REGION

    def store_kwargs(self) -> dict[str, str]:
        """Keyword arguments for `open_output_store` / `S3OutputStore` that reach this server."""
        return {"endpoint_url": self.endpoint_url, "region_name": self.region,
                "access_key_id": self.access_key_id, "secret_access_key": self.secret_access_key}

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for a subprocess (a `worker`, an `api` replica) that reaches this server through the
        standard AWS variables; ``base`` defaults to a copy of this process's environment. The AWS config and
        credentials files point at nothing, so a developer's real profile is never read."""
        env = dict(os.environ if base is None else base)
        env.update({
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        })
        env.pop("AWS_SESSION_TOKEN", None)
        env.pop("AWS_PROFILE", None)
        return env

    def client(self):
        """A boto3 S3 client of this server (to make buckets and look at objects behind the store's back)."""
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(aws_access_key_id=self.access_key_id,
                                        aws_secret_access_key=self.secret_access_key, region_name=self.region)
        return session.client("s3", endpoint_url=self.endpoint_url,
                              config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))

    def make_bucket(self, name: str | None = None) -> str:
        """A new empty bucket (a fresh name when none is given)."""
        name = name or f"magi-test-{uuid.uuid4().hex[:12]}"
        self._admin().create_bucket(Bucket=name)
        return name

    def _admin(self):
        # one client per server for making buckets: a new boto3 client costs a few hundred milliseconds
        if self not in _ADMIN_CLIENTS:
            _ADMIN_CLIENTS[self] = self.client()
        return _ADMIN_CLIENTS[self]


_ADMIN_CLIENTS: dict[MotoS3, object] = {}


class MotoServer:
    """One `python -m moto.server` process on a free loopback port; `start()` then `stop()` (idempotent)."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="magi-moto-", suffix=".log", delete=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoS3:
        self.port = free_port()
        # the server itself needs no credentials; its environment is ours minus any AWS settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return MotoS3(self.endpoint_url)
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto server did not listen on port {self.port} within {START_TIMEOUT_S} s: "
                           f"{self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return Path(self._log.name).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        for server in [s for s in _ADMIN_CLIENTS if s.endpoint_url == self.endpoint_url]:
            _ADMIN_CLIENTS.pop(server).close()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on the test server: ``endpoint_url`` and ``bucket``, with the server's credentials."""

    server: MotoS3
    bucket: str

    @property
    def endpoint_url(self) -> str:
        return self.server.endpoint_url

    def url(self, prefix: str = "") -> str:
        """The ``--outputs`` location of this bucket (and ``prefix``)."""
        return f"s3://{self.bucket}/{prefix.strip('/')}" if prefix.strip("/") else f"s3://{self.bucket}"

    def store_kwargs(self) -> dict[str, str]:
        return self.server.store_kwargs()

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return self.server.env(base)


# ----------------------------------------------------------------------------------- presigned URL checking
# moto serves a presigned URL whatever its signature or age (tests/test_outputs.py pins that), so the tests check
# a presigned GET URL the way S3 does, with this independent SigV4 query-string verifier written from AWS's
# "Authenticating requests: using query parameters" description (not with botocore, which made the URL).

def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def verify_presigned_get(url: str, secret_access_key: str, now: float | None = None) -> str:
    """``"valid"``, ``"expired"`` or ``"invalid"``: what S3 would make of a GET of the SigV4-presigned ``url``
    at unix time ``now`` (default: the current time), given the secret key it should have been signed with."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    fields = dict(query)
    try:
        signature = fields["X-Amz-Signature"]
        date = fields["X-Amz-Date"]  # 20261206T193539Z
        expires = int(fields["X-Amz-Expires"])
        _access_key, day, region, service, terminator = fields["X-Amz-Credential"].split("/")
        signed_headers = fields["X-Amz-SignedHeaders"]
    except (KeyError, ValueError):
        return "invalid"
    if fields.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256" or signed_headers != "host" or not date.startswith(day):
        return "invalid"

    def encode(text: str) -> str:
        return quote(text, safe="-_.~")

    canonical_query = "&".join(f"{encode(k)}={encode(v)}" for k, v in sorted(query) if k != "X-Amz-Signature")
    canonical_request = "\n".join([
        "GET", parts.path or "/", canonical_query, f"host:{parts.netloc}", "", signed_headers, "UNSIGNED-PAYLOAD",
    ])
    scope = f"{day}/{region}/{service}/{terminator}"
    string_to_sign = "\n".join(["AWS4-HMAC-SHA256", date, scope, _sha256_hex(canonical_request.encode())])
    key = ("AWS4" + secret_access_key).encode()
    for part in (day, region, service, terminator):
        key = _hmac(key, part)
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        return "invalid"
    signed_at = calendar.timegm(time.strptime(date, "%Y%m%dT%H%M%SZ"))
    return "valid" if (time.time() if now is None else now) < signed_at + expires else "expired"


def presigned_url_times(url: str) -> tuple[int, int]:
    """(signed at, expires at) of a SigV4-presigned URL, in unix seconds."""
    fields = parse_qs(urlsplit(url).query)
    signed_at = calendar.timegm(time.strptime(fields["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"))
    return signed_at, signed_at + int(fields["X-Amz-Expires"][0])
