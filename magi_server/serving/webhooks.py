"""Webhooks: signed, delivered at least once, from the job store's durable outbox (issue #12).

A submit that names a webhook (WaveSpeed ``?webhook=`` or the body's ``webhook``, fal ``?fal_webhook=``) stores the
URL in the job's meta; the store inserts the delivery row in the job's own insert transaction
(jobs.WebhookOutbox), so a 2xx submit owes its webhook through kill -9. Once the job has ended, the
:class:`WebhookDispatcher` of any process holding the store (``serve``, every ``api`` replica) claims the row for a
while, renders the body from the job as it is now (the provider's own format: each adapter's ``webhook_body``),
signs it, and POSTs it. A 2xx answer delivers it; anything else (a non-2xx status, no connection, no answer in
``timeout_s``) is logged on the row and retried after a bounded, jittered exponential backoff (tenacity's
``wait_exponential_jitter``, the schedule being written into the row so that it survives a restart) until
``max_attempts``. Receivers must therefore accept a repeat: ``webhook-id`` / ``X-Fal-Webhook-Request-Id`` stay the
same on every retry.

Every URL passes the same SSRF rules as image URLs (media/fetch.py: public addresses on ports 80/443, the operator's
``--allow-private-urls`` exceptions), checked at submit (a 4xx naming the field) and again at each delivery, where
the connection is pinned to the checked address (a DNS answer that changed to a private address is refused, for
good).

Signatures:
* WaveSpeed (api-compat.md §1.8): ``webhook-signature: v3,<hex HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>``,
  keyed by the secret ``GET /api/v3/webhook/secret`` hands the same API key (the text after ``whsec_``, used as is).
* fal (§3.6): ``X-Fal-Webhook-Signature``: hex Ed25519 over ``request_id \\n user_id \\n timestamp \\n
  sha256_hex(body)``, verifiable with the public key published at ``/.well-known/jwks.json``.
Both keys are derived from the server's kept signing secret (serving/files.py), so replicas sharing it sign alike
and a restart keeps them (a receiver's cached key or secret stays valid).

Written here rather than taken from a webhook library: the outbox must live in our own job store's transactions,
and each provider's signature scheme is its own; the HTTP POST reuses media/fetch.py's pinned connections, which
no client library offers.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tenacity import RetryCallState, wait_exponential_jitter

from magi_server.media import InputError
from magi_server.media.fetch import SourcePolicy, check_url, post_to_url
from magi_server.serving.jobs import Job, JobStoreError, WebhookDelivery

log = logging.getLogger("magi_server.serving.webhooks")

MAX_WEBHOOK_URL_CHARS = 2048
JWKS_PATH = "/.well-known/jwks.json"
WARN_EVERY_S = 30.0


def webhook_policy(allow_private_urls: tuple[str, ...], timeout_s: float = 10.0) -> SourcePolicy:
    """Where webhooks may go: the image-URL rules (public hosts, ports 80/443) plus the operator's exceptions."""
    return SourcePolicy(allow_paths=False, private_allowlist=tuple(allow_private_urls), timeout_s=timeout_s)


def check_webhook_url(url: str, field: str, policy: SourcePolicy) -> str:
    """The URL, or InputError naming ``field`` when it may not receive webhooks (blocking: resolves the host)."""
    url = url.strip()
    if len(url) > MAX_WEBHOOK_URL_CHARS:
        raise InputError(field, f"at most {MAX_WEBHOOK_URL_CHARS} characters")
    if not url.lower().startswith(("http://", "https://")):
        raise InputError(field, "must be an http:// or https:// URL")
    check_url(url, param=field, policy=policy)
    return url


class WebhookKeys:
    """The signing keys, derived from one 32-byte master key: WaveSpeed's per-API-key HMAC secrets and fal's
    Ed25519 key pair."""

    def __init__(self, master: bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self._master = master
        seed = hmac.new(master, b"fal-webhook-ed25519", hashlib.sha256).digest()
        self._fal_key = Ed25519PrivateKey.from_private_bytes(seed)
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self._fal_public = self._fal_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.fal_key_id = hashlib.sha256(self._fal_public).hexdigest()[:16]

    def wavespeed_secret(self, owner: str) -> str:
        """What ``GET /api/v3/webhook/secret`` answers the API key whose tenant id is ``owner``."""
        return "whsec_" + hmac.new(self._master, b"wavespeed-webhook\n" + owner.encode("utf-8", "backslashreplace"),
                                   hashlib.sha256).hexdigest()[:48]

    def wavespeed_headers(self, job: Job, delivery_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        key = self.wavespeed_secret(job.owner).removeprefix("whsec_").encode()
        message = f"{delivery_id}.{timestamp}.".encode() + body
        return {"webhook-id": delivery_id, "webhook-timestamp": str(timestamp),
                "webhook-signature": "v3," + hmac.new(key, message, hashlib.sha256).hexdigest()}

    def fal_headers(self, job: Job, delivery_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        user_id = job.owner or "local"  # fal's account id; here the API key's tenant id ("local" with auth off)
        message = "\n".join((job.id, user_id, str(timestamp), hashlib.sha256(body).hexdigest())).encode()
        return {"X-Fal-Webhook-Request-Id": job.id, "X-Fal-Webhook-User-Id": user_id,
                "X-Fal-Webhook-Timestamp": str(timestamp),
                "X-Fal-Webhook-Signature": self._fal_key.sign(message).hex(),
                "X-Fal-Webhook-Delivery-Id": delivery_id}

    def jwks(self) -> dict:
        """The public key fal receivers verify with, as a JWKS document (RFC 8037 OKP key)."""
        x = base64.urlsafe_b64encode(self._fal_public).rstrip(b"=").decode()
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.fal_key_id, "use": "sig",
                          "alg": "EdDSA"}]}


@dataclass(frozen=True)
class WebhookFormat:
    """How one API's webhooks look: ``render(ctx, job) -> dict`` (the body) and ``sign(keys, job, delivery id,
    timestamp, body bytes) -> headers``."""

    render: Callable[[Any, Job], dict]
    sign: Callable[[WebhookKeys, Job, str, int, bytes], dict[str, str]]


class WebhookDispatcher:
    """Claims due deliveries every ``poll_s`` on a thread of its own and sends them on up to ``senders`` threads."""

    def __init__(self, ctx, formats: Mapping[str, WebhookFormat], *, policy: SourcePolicy, max_attempts: int = 10,
                 backoff_initial_s: float = 1.0, backoff_max_s: float = 600.0, poll_s: float = 0.25,
                 senders: int = 4, clock: Callable[[], float] = time.time) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.ctx = ctx
        self.formats = dict(formats)
        self.policy = policy
        self.max_attempts = max_attempts
        self.poll_s = poll_s
        self.clock = clock
        # tenacity's schedule: initial * 2^(n-1) plus up to `initial` of jitter, never above backoff_max_s
        self._wait = wait_exponential_jitter(multiplier=backoff_initial_s, max=backoff_max_s,
                                             jitter=backoff_initial_s)
        # a claim outlives one send (its timeout) with room to spare; a process that dies holding it frees it then
        self.lease_s = policy.timeout_s + 30.0
        self._senders = senders
        self._pool = ThreadPoolExecutor(max_workers=senders, thread_name_prefix="webhook-send")
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._quiet_until = 0.0  # a failing pass (the store down) is logged at most every WARN_EVERY_S

    def backoff_s(self, attempts_made: int) -> float:
        """Seconds to wait after the ``attempts_made``-th failed attempt (tenacity's jittered exponential wait)."""
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
        state.attempt_number = attempts_made
        return float(self._wait(state))

    def start(self) -> "WebhookDispatcher":
        self._thread = threading.Thread(target=self._loop, name="webhook-dispatcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.is_set() and not getattr(self.ctx.store, "closed", False):
            try:
                self._claim_and_send()
            except Exception:  # noqa: BLE001 - a store outage or a bug must not end deliveries for good
                if time.monotonic() >= self._quiet_until:
                    log.warning("webhook dispatch pass failed; retrying every %.2f s", self.poll_s, exc_info=True)
                    self._quiet_until = time.monotonic() + WARN_EVERY_S
            self._stop.wait(self.poll_s)

    def _claim_and_send(self) -> None:
        with self._lock:
            room = self._senders - self._in_flight
        if room <= 0:
            return
        for delivery in self.ctx.store.claim_webhooks(self.lease_s, limit=room):
            with self._lock:
                self._in_flight += 1
            self._pool.submit(self._send_guarded, delivery)

    def _send_guarded(self, delivery: WebhookDelivery) -> None:
        try:
            self.send(delivery)
        except JobStoreError as exc:  # the attempt could not be recorded: the claim lapses and it is sent again
            log.warning("webhook %s of job %s: could not record the attempt (%s)", delivery.id, delivery.job_id, exc)
        except Exception:  # noqa: BLE001 - logged; the claim lapses and the delivery is tried again
            log.exception("webhook %s of job %s: unexpected error", delivery.id, delivery.job_id)
        finally:
            with self._lock:
                self._in_flight -= 1

    def send(self, delivery: WebhookDelivery) -> WebhookDelivery | None:
        """One attempt at ``delivery``: render, sign, POST, record (with the next try's time, or failed for good)."""
        store = self.ctx.store
        job = store.get(delivery.job_id)
        started = time.monotonic()
        entry: dict = {"at": round(self.clock(), 3), "status": None, "error": ""}
        final = False  # a failure that no retry can fix
        if job is None:
            entry["error"], final = "the job no longer exists", True
        elif job.api not in self.formats:
            entry["error"], final = f"no webhook format for {job.api!r} jobs", True
        else:
            fmt = self.formats[job.api]
            body = json.dumps(fmt.render(self.ctx, job), ensure_ascii=False, separators=(",", ":")).encode()
            timestamp = int(self.clock())
            headers = {"Content-Type": "application/json", **fmt.sign(self.ctx.webhook_keys, job, delivery.id,
                                                                      timestamp, body)}
            try:
                checked = check_url(delivery.url, param="webhook", policy=self.policy)
            except InputError as exc:  # refused now (the name moved to a private address): not worth retrying
                entry["error"], final = exc.message, True
            else:
                try:
                    entry["status"] = post_to_url(checked, body, headers, param="webhook",
                                                  timeout_s=self.policy.timeout_s)
                    if not 200 <= entry["status"] < 300:
                        entry["error"] = f"HTTP {entry['status']}"
                except InputError as exc:
                    entry["error"] = exc.message
        entry["ms"] = int((time.monotonic() - started) * 1000)
        delivered = not entry["error"]
        made = delivery.attempts + 1
        next_at = None if delivered or final or made >= self.max_attempts else self.clock() + self.backoff_s(made)
        if delivered:
            log.info("webhook %s of job %s delivered (HTTP %s, attempt %d)", delivery.id, delivery.job_id,
                     entry["status"], made)
        else:
            log.warning("webhook %s of job %s: attempt %d failed (%s); %s", delivery.id, delivery.job_id, made,
                        entry["error"], "giving up" if next_at is None else
                        f"next try in {next_at - self.clock():.1f} s")
        return store.record_webhook_attempt(delivery.id, entry, delivered=delivered, next_at=next_at)


def delivery_view(delivery: WebhookDelivery) -> dict:
    """A delivery as its owner sees it (the delivery log routes)."""
    return {"id": delivery.id, "url": delivery.url, "state": delivery.state, "attempts": delivery.attempts,
            "next_attempt_at": delivery.next_at if delivery.state == "pending" and delivery.attempts else None,
            "log": delivery.log}


async def checked_webhook_url(ctx, url: str, field: str) -> str:
    """:func:`check_webhook_url` under the server's policy, off the event loop; ParamError naming ``field``."""
    import asyncio

    from magi_server.params import ParamError

    try:
        return await asyncio.to_thread(check_webhook_url, url, field,
                                       webhook_policy(ctx.settings.allow_private_urls))
    except InputError as exc:
        raise ParamError(field, exc.message) from None
