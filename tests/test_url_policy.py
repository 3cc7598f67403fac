"""The operator's URL policy over HTTP (--allow-private-urls): a request's image URL on a private host is refused
unless the operator listed that network or host, and then it is fetched (issue #12's operator setting)."""
from __future__ import annotations

import http.server
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from magi_server.media.images import encode_png
from magi_server.serving.app import create_app
from magi_server.serving.cluster import SharedQueue
from magi_server.serving.common import ServerContext
from magi_server.serving.jobs import JobStore
from magi_server.tools import cli
from tests.server_utils import tiny_settings

PNG = encode_png(np.full((48, 64, 3), 90, dtype=np.uint8))


@pytest.fixture
def image_url():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/frame.png"
    server.shutdown()


@pytest.mark.parametrize("allow, accepted", [((), False), (("127.0.0.1",), True), (("127.0.0.0/8",), True),
                                             (("10.0.0.0/8",), False)])
def test_a_private_image_url_is_fetched_only_when_the_operator_allows_it(tmp_path, image_url, allow, accepted):
    settings = tiny_settings(tmp_path, tmp_path / "cache", allow_private_urls=allow)
    store = JobStore(tmp_path / "jobs.db")
    ctx = ServerContext(settings=settings, store=store, engine=SharedQueue(store), executor=None, model_name="tiny")
    try:
        with TestClient(create_app(ctx)) as client:
            r = client.post("/api/v3/wavespeed-ai/magi-1-24b", json={"prompt": "x", "image": image_url, "seed": 1,
                                                                     "num_frames": 24, "num_inference_steps": 8})
        if accepted:
            assert r.status_code == 200, r.text
            assert store.get(r.json()["data"]["id"]).params.image_path
        else:
            assert r.status_code == 400 and r.json()["message"].startswith("image:"), r.text
            assert store.list() == []
    finally:
        store.close()


def test_a_bad_allowlist_entry_stops_serve_with_one_line(tmp_path, capsys):
    assert cli.main(["serve", "--device", "cpu", "--db", str(tmp_path / "jobs.db"),
                     "--allow-private-urls", "10.0.0.0/33"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--allow-private-urls" in err and len(err.splitlines()) == 1, err
