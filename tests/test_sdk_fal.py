"""The official fal-client (1.0.3) against a real `magi-server serve` process over TLS (api-compat.md §7, fal).

The server runs in a subprocess with the tiny preset and its two TLS listeners; fal-client runs in another
subprocess, because it reads FAL_QUEUE_RUN_HOST / FAL_RUN_HOST when it is imported and httpx reads SSL_CERT_FILE
(our test CA) from the environment. Nothing in fal-client is patched: only its documented environment.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from magi_server.params import output_size
from magi_server.media.images import encode_png
from tests.media_utils import probe_video

MISSING = [name for name in ("fal_client", "trustme") if importlib.util.find_spec(name) is None]
needs_sdk = pytest.mark.skipif(bool(MISSING), reason=f"{' and '.join(MISSING)} not installed "
                                                     "(pip install 'fal-client==1.0.3' trustme: the test extra)")
REPO = Path(__file__).resolve().parents[1]
KEY = "test-key"
SERVER_START_TIMEOUT_S = 90
CLIENT_TIMEOUT_S = 120


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import httpx
    import trustme

    tmp = tmp_path_factory.mktemp("fal-sdk")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, bundle = tmp / "cert.pem", tmp / "key.pem", tmp / "ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(bundle))
    trust = ssl.create_default_context(cafile=str(bundle))
    port, queue_port, run_port = free_ports(3)
    log_path = tmp / "server.log"
    cmd = [sys.executable, "-m", "magi_server", "serve", "--model", "tiny", "--port", str(port),
           "--fal-queue-port", str(queue_port), "--fal-run-port", str(run_port), "--tls-cert", str(cert),
           "--tls-key", str(key), "--db", str(tmp / "jobs.db"), "--outputs", str(tmp / "outputs"),
           "--cache-dir", str(tmp / "cache"), "--api-key", KEY, "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                main = httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2)
                # the TLS listeners start beside the main one: wait for them too (404: up, route unknown)
                tls = httpx.get(f"https://localhost:{queue_port}/", timeout=2, verify=trust)
                ready = main.status_code == 200 and tls.status_code == 404
            except httpx.HTTPError:
                ready = False
            if ready:
                break
            time.sleep(0.2)
        if not ready:
            raise AssertionError(f"server did not become ready:\n{log_path.read_text(errors='replace')[-4000:]}")
        yield {"tmp": tmp, "bundle": bundle, "trust": trust, "queue": f"localhost:{queue_port}", "run": f"localhost:{run_port}",
               "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def run_client(server, script: str, *, key: str = KEY) -> dict:
    env = {**os.environ, "FAL_KEY": key, "FAL_QUEUE_RUN_HOST": server["queue"], "FAL_RUN_HOST": server["run"],
           "SSL_CERT_FILE": str(server["bundle"]), "PYTHONPATH": str(REPO)}
    env.pop("SSL_CERT_DIR", None)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=server["tmp"], env=env,
                          capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    if done.returncode != 0:
        tail = server["log"].read_text(errors="replace")[-3000:]
        raise AssertionError(f"client failed ({done.returncode}):\n{done.stderr[-4000:]}\nserver log:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def download(server, url: str, name: str):
    import httpx

    r = httpx.get(url, verify=server["trust"], timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    path = server["tmp"] / name
    path.write_bytes(r.content)
    return probe_video(path)


@needs_sdk
def test_subscribe_submit_status_result_run(server):
    image = np.zeros((90, 160, 3), dtype=np.uint8)  # 16:9: aspect "auto" keeps 16:9
    image[:, :80, 2] = 200
    (server["tmp"] / "first.png").write_bytes(encode_png(image))
    out = run_client(server, """
        import json
        import fal_client

        events, enqueued = [], []

        def on_update(status):
            events.append({"type": type(status).__name__, "position": getattr(status, "position", None),
                           "messages": [line["message"] for line in (getattr(status, "logs", None) or [])]})

        i2v = fal_client.subscribe(
            "fal-ai/magi/image-to-video",
            arguments={"prompt": "a blue wall", "image_url": fal_client.encode_file("first.png"), "num_frames": 96,
                       "resolution": "480p", "num_inference_steps": 8},
            with_logs=True, on_enqueue=enqueued.append, on_queue_update=on_update)

        app = "fal-ai/magi-distilled"
        args = {"prompt": "rain", "num_frames": 96, "resolution": "480p", "num_inference_steps": 8, "seed": 7}
        handle = fal_client.submit(app, arguments=args)
        first = fal_client.status(app, handle.request_id, with_logs=True)  # URL built by the client itself
        got = handle.get()
        final = fal_client.status(app, handle.request_id, with_logs=True)
        again = fal_client.result(app, handle.request_id)
        try:
            fal_client.cancel(app, handle.request_id)
            cancel_error = None
        except fal_client.FalClientHTTPError as exc:
            cancel_error = exc.status_code

        sync = fal_client.run(app, arguments=args)

        try:
            fal_client.submit(app, arguments={**args, "num_inference_steps": 64})
            invalid = None
        except fal_client.FalClientHTTPError as exc:
            invalid = {"status": exc.status_code, "detail": exc.message}

        try:
            fal_client.SyncClient(key="wrong-key").submit(app, arguments=args)
            unauthorized = None
        except fal_client.FalClientHTTPError as exc:
            unauthorized = exc.status_code

        print(json.dumps({
            "i2v": i2v, "events": events, "enqueued": enqueued, "request_id": handle.request_id,
            "first": type(first).__name__, "final": {"type": type(final).__name__, "metrics": final.metrics,
                                                     "messages": [line["message"] for line in final.logs]},
            "got": got, "again": again, "cancel_error": cancel_error, "sync": sync, "invalid": invalid,
            "unauthorized": unauthorized,
        }))
    """)

    # subscribe(): Queued/InProgress updates (with log lines), then Completed; the output downloads
    types = [e["type"] for e in out["events"]]
    assert types[-1] == "Completed" and set(types) <= {"Queued", "InProgress", "Completed"}
    assert all(e["position"] >= 0 for e in out["events"] if e["type"] == "Queued")
    assert any(m.startswith("chunk ") for m in out["events"][-1]["messages"])
    assert len(out["enqueued"]) == 1
    assert isinstance(out["i2v"]["seed"], int)
    info = download(server, out["i2v"]["video"]["url"], "i2v.mp4")
    assert (info.frames, info.width, info.height) == (96, *output_size("480p", "16:9", 0.125))
    assert out["i2v"]["video"]["url"].startswith(f"https://{server['queue']}/files/")

    # submit / status / result on magi-distilled
    assert out["first"] in ("Queued", "InProgress", "Completed")
    assert out["final"]["type"] == "Completed" and out["final"]["metrics"]["inference_time"] > 0
    assert out["final"]["messages"][-1].startswith("completed in")
    assert out["got"] == out["again"] and out["got"]["seed"] == 7
    info = download(server, out["got"]["video"]["url"], "t2v.mp4")
    assert (info.frames, info.width, info.height) == (96, *output_size("480p", "16:9", 0.125))
    assert out["cancel_error"] == 400  # ALREADY_COMPLETED

    # run() on the sync host: same schema and seed, same video as the queued run of the same input
    assert out["sync"]["seed"] == 7 and out["sync"]["video"]["url"].startswith(f"https://{server['run']}/files/")
    info = download(server, out["sync"]["video"]["url"], "sync.mp4")
    assert (info.frames, info.width, info.height) == (96, *output_size("480p", "16:9", 0.125))
    assert (server["tmp"] / "sync.mp4").read_bytes() == (server["tmp"] / "t2v.mp4").read_bytes()

    assert out["invalid"]["status"] == 422
    assert out["invalid"]["detail"][0]["loc"] == ["body", "num_inference_steps"]
    assert out["unauthorized"] == 401


@needs_sdk
def test_cancel_and_failure_surface_as_sdk_errors(server):
    out = run_client(server, """
        import json
        import fal_client

        app = "fal-ai/magi"
        long = {"prompt": "long", "num_frames": 192, "num_inference_steps": 64}
        handle = fal_client.submit(app, arguments=long)
        fal_client.cancel(app, handle.request_id)  # 202 CANCELLATION_REQUESTED: no exception
        final = None
        for event in handle.iter_events(with_logs=True, interval=0.05):
            final = event
        try:
            handle.get()
            result_error = None
        except fal_client.FalClientHTTPError as exc:
            result_error = {"status": exc.status_code, "error_type": exc.error_type}
        print(json.dumps({"final": type(final).__name__, "error": final.error, "error_type": final.error_type,
                          "result_error": result_error}))
    """)
    assert out["final"] == "Completed" and out["error"] and out["error_type"] == "request_cancelled"
    assert out["result_error"] == {"status": 400, "error_type": "request_cancelled"}


def test_tls_helper_certificate_verifies(tmp_path):
    """magi_server.serving.tls.init_tls: the server certificate verifies against the bundle for each host name."""
    pytest.importorskip("trustme", reason="magi_server.serving.tls needs trustme (the tls extra)")
    from magi_server.serving.tls import init_tls

    files = init_tls(tmp_path, ("localhost", "127.0.0.1"))
    assert files.server_key.stat().st_mode & 0o077 == 0
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    client_ctx = ssl.create_default_context(cafile=str(files.bundle))
    for host in ("localhost", "127.0.0.1"):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def accept():
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=host) as tls:
                assert tls.recv(2) == b"ok"
        thread.join(10)
        listener.close()
    with pytest.raises(ssl.SSLCertVerificationError):  # a name the certificate does not cover
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        threading.Thread(target=lambda: _accept_quietly(listener, server_ctx), daemon=True).start()
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            client_ctx.wrap_socket(raw, server_hostname="example.com")
    listener.close()
    env = files.client_env("localhost:8443", "localhost:8444")
    assert env["SSL_CERT_FILE"] == str(files.bundle) and env["FAL_QUEUE_RUN_HOST"] == "localhost:8443"


def _accept_quietly(listener: socket.socket, server_ctx: ssl.SSLContext) -> None:
    try:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True):
            pass
    except (OSError, ssl.SSLError):
        pass
