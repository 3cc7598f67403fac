"""Webhooks (issue #12 acceptance 1): the durable outbox in both job stores, WaveSpeed's HMAC and fal's Ed25519
signatures verified as a receiver would (hmac / PyNaCl against the published JWKS key), retries with backoff, the
SSRF policy at submit, the owner's delivery log, and delivery after a SIGKILL between completion and delivery.

The receiver is a real HTTP server on loopback, allowed with ``--allow-private-urls 127.0.0.1``.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from fastapi.testclient import TestClient
from nacl.signing import VerifyKey

from magi_server.runtime.pipeline import MagiPipeline
from magi_server.serving.jobs import JobStatus
from tests.procs import ServerProcess
from tests.server_utils import running_server, tiny_settings, wait_status
from tests.test_jobs import clock, make_job, open_store, store, store_location

STORE_FIXTURES = (clock, open_store, store, store_location)  # the job-store suite's: each test runs on both stores

FAST = {"resolution": "480p", "num_inference_steps": 8, "num_frames": 24}
WAVESPEED_KEYS = {"id", "model", "input", "outputs", "urls", "has_nsfw_contents", "status", "created_at", "error"}


class Receiver:
    """A webhook receiver on loopback: answers each POST with the next scripted status (the last one repeats);
    "hang" holds the request open until :meth:`release`. Records (headers, raw body, status answered)."""

    def __init__(self, script=(200,)) -> None:
        self.script = list(script)
        self.received: list[tuple[dict, bytes, int | str]] = []
        self._released = threading.Event()
        self._arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._arrived:
                    answer = receiver.script[min(len(receiver.received), len(receiver.script) - 1)]
                    receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body, answer))
                    receiver._arrived.notify_all()
                if answer == "hang":
                    receiver._released.wait(30)
                    return  # no answer at all: the sender was killed meanwhile
                self.send_response(answer)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/magi?tenant=a"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout_s: float = 60.0) -> list:
        with self._arrived:
            assert self._arrived.wait_for(lambda: len(self.received) >= count, timeout_s), self.received
            return list(self.received)

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def receiving(script=(200,)):
    receiver = Receiver(script)
    try:
        yield receiver
    finally:
        receiver.close()


def verify_wavespeed(headers: dict, body: bytes, secret: str, now: float | None = None) -> None:
    """What a WaveSpeed receiver does (api-compat.md §1.8): recompute the HMAC over id.timestamp.body with the
    secret (text after whsec_), compare in constant time, refuse events older than 300 s."""
    assert headers["webhook-signature"].startswith("v3,")
    message = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = hmac.new(secret.removeprefix("whsec_").encode(), message, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["webhook-signature"][3:], expected), "WaveSpeed signature does not verify"
    assert abs((now or time.time()) - int(headers["webhook-timestamp"])) < 300


def verify_fal(headers: dict, body: bytes, jwks: dict) -> None:
    """What a fal receiver does (§3.6): Ed25519 over request_id, user_id, timestamp, sha256(body), with a JWKS key."""
    message = "\n".join((headers["x-fal-webhook-request-id"], headers["x-fal-webhook-user-id"],
                         headers["x-fal-webhook-timestamp"], hashlib.sha256(body).hexdigest())).encode()
    signature = bytes.fromhex(headers["x-fal-webhook-signature"])
    verified = False
    for key in jwks["keys"]:
        assert (key["kty"], key["crv"], key["alg"]) == ("OKP", "Ed25519", "EdDSA")
        raw = base64.urlsafe_b64decode(key["x"] + "=" * (-len(key["x"]) % 4))
        VerifyKey(raw).verify(message, signature)  # raises BadSignatureError when it does not verify
        verified = True
    assert verified


# -- the outbox in both stores ---------------------------------------------------------------------------------------


def test_the_outbox_owes_a_webhook_from_the_submit_and_sends_it_once_the_job_ended(store, clock):
    job = store.create(make_job(meta={"webhook": "https://hooks.example/a"}))
    quiet = store.create(make_job())
    [owed] = store.webhook_deliveries(job.id)
    assert (owed.url, owed.state, owed.attempts) == ("https://hooks.example/a", "pending", 0)
    assert store.webhook_deliveries(quiet.id) == []
    assert store.claim_webhooks(30.0) == []  # not due while the job runs
    store.mark_running(job.id)
    store.complete(job.id, [f"{job.id}.mp4"], 5)
    [claimed] = store.claim_webhooks(30.0)
    assert claimed.id == owed.id and store.claim_webhooks(30.0) == []  # claimed: nobody else takes it meanwhile
    clock.now += 31.0
    assert [d.id for d in store.claim_webhooks(30.0)] == [owed.id]  # a claim that lapsed (its sender died)
    after = store.record_webhook_attempt(owed.id, {"status": 500, "error": "HTTP 500"}, delivered=False,
                                         next_at=clock.now + 5)
    assert (after.state, after.attempts, after.log[-1]["status"]) == ("pending", 1, 500)
    assert store.claim_webhooks(30.0) == []
    clock.now += 5.0
    [again] = store.claim_webhooks(30.0)
    done = store.record_webhook_attempt(again.id, {"status": 200, "error": ""}, delivered=True, next_at=None)
    assert (done.state, done.attempts, [e["status"] for e in done.log]) == ("delivered", 2, [500, 200])
    clock.now += 100.0
    assert store.claim_webhooks(30.0) == []


def test_a_failed_job_owes_its_webhook_too_and_attempts_end_in_failed(store, clock):
    job = store.create(make_job(meta={"webhook": "https://hooks.example/b"}))
    store.fail(job.id, "image: not an image", "invalid_input", "image")
    [claimed] = store.claim_webhooks(30.0)
    gone = store.record_webhook_attempt(claimed.id, {"status": None, "error": "refused"}, delivered=False,
                                        next_at=None)
    assert gone.state == "failed" and store.claim_webhooks(30.0) == []


def test_restart_releases_claims_and_retention_forgets_deliveries(store, clock):
    job = store.create(make_job(meta={"webhook": "https://hooks.example/c"}))
    store.cancel(job.id)
    assert len(store.claim_webhooks(600.0)) == 1
    assert store.release_webhook_claims() == 1  # the one process owning the store starts again
    assert len(store.claim_webhooks(600.0)) == 1
    clock.now += 10 * 24 * 3600
    assert [j.id for j in store.prune_jobs(3600.0)] == [job.id]
    assert store.webhook_deliveries(job.id) == []


# -- over HTTP, in process ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


@contextmanager
def webhook_server(tmp_path, pipeline, **overrides):
    settings = tiny_settings(tmp_path, tmp_path / "cache", allow_private_urls=("127.0.0.1",),
                             webhook_backoff_s=0.05, webhook_backoff_max_s=0.2, webhook_timeout_s=5.0,
                             **overrides)
    with running_server(settings, pipeline=pipeline) as pair:
        yield pair


def wait_delivered(client, path: str, timeout_s: float = 30.0, headers=None) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        deliveries = client.get(path, headers=headers).json()
        deliveries = deliveries.get("data", deliveries)["deliveries"]
        if deliveries and all(d["state"] != "pending" for d in deliveries):
            return deliveries
        time.sleep(0.05)
    raise AssertionError(f"not delivered: {deliveries}")


def test_wavespeed_webhook_is_signed_retried_and_logged(tmp_path, pipeline):
    keys = {"Authorization": "Bearer key-one"}
    with receiving(script=(500, 500, 200)) as receiver, \
            webhook_server(tmp_path, pipeline, api_keys=("key-one", "key-two")) as (ctx, client):
        r = client.post("/api/v3/wavespeed-ai/magi-1-4.5b-distill", params={"webhook": receiver.url},
                        json={"prompt": "a lighthouse", "seed": 7, **FAST}, headers=keys)
        assert r.status_code == 200, r.text
        job_id = r.json()["data"]["id"]
        data = wait_status(client, job_id, headers=keys)
        assert data["status"] == "completed"
        received = receiver.wait_for(3)
        deliveries = wait_delivered(client, f"/api/v3/predictions/{job_id}/webhooks", headers=keys)
        secret = client.get("/api/v3/webhook/secret", headers=keys).json()["data"]["secret"]
        other = client.get("/api/v3/webhook/secret", headers={"Authorization": "Bearer key-two"}).json()
        assert secret.startswith("whsec_") and other["data"]["secret"] != secret  # one secret per API key
        # someone else's delivery log is a 404, like the prediction itself
        assert client.get(f"/api/v3/predictions/{job_id}/webhooks",
                          headers={"Authorization": "Bearer key-two"}).status_code == 404

    assert [answer for _, _, answer in received] == [500, 500, 200]
    ids = {headers["webhook-id"] for headers, _, _ in received}
    assert len(ids) == 1  # every retry is the same event: receivers dedupe on it
    headers, body, _ = received[-1]
    verify_wavespeed(headers, body, secret)
    with pytest.raises(AssertionError):
        verify_wavespeed(headers, body, other["data"]["secret"])  # the negative control: another key's secret
    payload = json.loads(body)
    assert set(payload) >= WAVESPEED_KEYS and payload["id"] == job_id and payload["status"] == "completed"
    assert payload["outputs"] == data["outputs"] and payload["has_nsfw_contents"] == [False]
    assert payload["input"] == {"prompt": "a lighthouse", "seed": 7, **FAST}
    assert payload["model"] == data["model"] and payload["error"] == ""  # the served variant, truthfully
    [delivery] = deliveries
    assert delivery["state"] == "delivered" and delivery["attempts"] == 3 and delivery["id"] in ids
    assert [entry["status"] for entry in delivery["log"]] == [500, 500, 200]
    assert delivery["url"] == receiver.url


def test_wavespeed_webhook_refusals_at_submit(tmp_path, pipeline):
    settings = tiny_settings(tmp_path, tmp_path / "cache")  # no --allow-private-urls
    with receiving() as receiver, running_server(settings, pipeline=pipeline) as (ctx, client):
        route = "/api/v3/wavespeed-ai/magi-1-24b"
        for params, body in (({"webhook": receiver.url}, {}), ({}, {"webhook": receiver.url}),
                             ({"webhook": "ftp://hooks.example/x"}, {})):
            r = client.post(route, params=params, json={"prompt": "x", **body})
            assert r.status_code == 400 and r.json()["message"].startswith("webhook: "), r.text
        r = client.post(route, params={"webhook": "https://hooks.example/x"},
                        json={"prompt": "x", "enable_base64_output": True})
        assert r.status_code == 400 and "base64" in r.json()["message"]
        r = client.post(route, params={"webhook": "https://a.example/x"}, json={"prompt": "x",
                                                                                "webhook": "https://b.example/x"})
        assert r.status_code == 400 and r.json()["message"].startswith("webhook: ")
        assert ctx.store.count_by_status().get(JobStatus.QUEUED, 0) == 0 and receiver.received == []


def test_a_failed_job_posts_its_failure(tmp_path, pipeline):
    with receiving() as receiver, webhook_server(tmp_path, pipeline) as (ctx, client):
        job = ctx.store.create(make_job(meta={"webhook": receiver.url, "webhook_input": {"prompt": "x"}}))
        ctx.store.fail(job.id, "image: could not be fetched", "media", "image")
        [(headers, body, _)] = receiver.wait_for(1)
    payload = json.loads(body)
    assert payload["status"] == "failed" and payload["code"] == 1402 and payload["outputs"] == []
    assert payload["error"] == "image: could not be fetched" and payload["input"] == {"prompt": "x"}


def test_fal_webhook_payload_and_ed25519_signature(tmp_path, pipeline):
    from magi_server.serving.app import create_app

    queue_base = "https://localhost:8443"
    with receiving() as receiver, webhook_server(tmp_path, pipeline, fal_queue_port=8443) as (ctx, client), \
            TestClient(create_app(ctx, "fal_queue"), base_url=queue_base) as queue:
        r = queue.post("/fal-ai/magi-distilled", params={"fal_webhook": receiver.url},
                       json={"prompt": "a harbour at dusk", "seed": 11, "resolution": "480p",
                             "num_inference_steps": 8})
        assert r.status_code == 200, r.text
        request_id = r.json()["request_id"]
        [(headers, body, _)] = receiver.wait_for(1)
        result = queue.get(f"/fal-ai/magi-distilled/requests/{request_id}").json()
        jwks = queue.get("/.well-known/jwks.json").json()
        assert client.get("/.well-known/jwks.json").json() == jwks  # the same key on every listener
        log = wait_delivered(queue, f"/fal-ai/magi-distilled/requests/{request_id}/webhooks")
    verify_fal(headers, body, jwks)
    tampered = body.replace(b"\"OK\"", b"\"KO\"")
    with pytest.raises(Exception, match="Signature was forged or corrupt"):
        verify_fal(headers, tampered, jwks)  # the negative control
    payload = json.loads(body)
    assert set(payload) == {"request_id", "gateway_request_id", "status", "payload", "error"}
    assert payload["request_id"] == payload["gateway_request_id"] == request_id == headers["x-fal-webhook-request-id"]
    assert payload["status"] == "OK" and payload["error"] is None and payload["payload"] == result
    assert payload["payload"]["video"]["url"].startswith(queue_base)  # the listener the client used
    assert log[0]["state"] == "delivered" and log[0]["log"][0]["status"] == 200


def test_fal_webhook_of_a_failed_request(tmp_path, pipeline):
    with receiving() as receiver, webhook_server(tmp_path, pipeline) as (ctx, client):
        job = ctx.store.create(replace(make_job(meta={"webhook": receiver.url, "app": "fal-ai/magi-distilled"}),
                                       api="fal", model="fal-ai/magi-distilled"))
        ctx.store.fail(job.id, "num_frames: too many", "invalid_input", "num_frames")
        [(headers, body, _)] = receiver.wait_for(1)
    payload = json.loads(body)
    assert payload["status"] == "ERROR" and payload["error"] == "Invalid status code: 422"
    assert payload["payload"]["detail"][0]["loc"] == ["body", "num_frames"]
    assert headers["x-fal-webhook-request-id"] == payload["request_id"] == job.id


# -- kill -9 between completion and delivery ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_webhook_survives_sigkill_between_completion_and_delivery(tmp_path):
    """The receiver holds the first POST open (the job has completed and the delivery is under way); the server is
    SIGKILLed there; after a restart on the same store the webhook arrives, with the same id and a valid signature."""
    with receiving(script=("hang", 200)) as receiver:
        server = ServerProcess(db=tmp_path / "jobs.db", outputs=tmp_path / "outputs", cache=tmp_path / "cache",
                               log=tmp_path / "server.log",
                               extra_args=("--allow-private-urls", "127.0.0.1"))
        with server:
            server.start()
            r = httpx.post(f"{server.url}/api/v3/wavespeed-ai/magi-1-24b", params={"webhook": receiver.url},
                           json={"prompt": "a kite", "seed": 5, **FAST}, timeout=30)
            assert r.status_code == 200, r.text
            job_id = r.json()["data"]["id"]
            secret = httpx.get(f"{server.url}/api/v3/webhook/secret").json()["data"]["secret"]
            [(first_headers, _, _)] = receiver.wait_for(1, timeout_s=120)  # completed, delivery in flight
            server.kill9()
            server.proc.wait(10)
            receiver.release()
            server.start()
            [_, (headers, body, answer)] = receiver.wait_for(2, timeout_s=60)
            deliveries = httpx.get(f"{server.url}/api/v3/predictions/{job_id}/webhooks").json()["data"]["deliveries"]
            deadline = time.monotonic() + 10
            while deliveries[0]["state"] == "pending" and time.monotonic() < deadline:
                time.sleep(0.1)
                deliveries = httpx.get(f"{server.url}/api/v3/predictions/{job_id}/webhooks").json()["data"][
                    "deliveries"]
    assert answer == 200 and headers["webhook-id"] == first_headers["webhook-id"]
    verify_wavespeed(headers, body, secret)  # the secret outlived the process
    payload = json.loads(body)
    assert payload["id"] == job_id and payload["status"] == "completed" and len(payload["outputs"]) == 1
    assert deliveries[0]["state"] == "delivered" and deliveries[0]["log"][-1]["status"] == 200
