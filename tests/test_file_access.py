"""Who may read stored files, and what they are served as (issue #10, acceptance 3).

With API keys on, a job's output, chunk previews, stored input image and uploads answer only to the owning key or
to the signed URLs the APIs hand out, on every listener that serves files (main, fal queue, fal run); a signed URL
stops working when it expires; uploads are accepted only as sniffed images/videos; a link planted in the outputs
folder is never followed. In process, over the real app and engine with the tiny model.
"""
from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from magi_server.media.images import encode_png
from magi_server.serving.common import ServerContext, iso_time
from magi_server.serving.files import SECRET_FILE, FileSigner, add_file_routes
from magi_server.serving.settings import ServerSettings
from tests.server_utils import running_server, tiny_settings, wait_status

MODEL = "/api/v3/wavespeed-ai/magi-1-24b"
QUEUE = "https://localhost:8443"
RUN = "https://localhost:8444"
KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"
HTML = b"<!doctype html><html><body><script>alert(document.cookie)</script></body></html>"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><rect width="1" height="1"/></svg>'
PNG = encode_png(np.full((48, 80, 3), 120, dtype=np.uint8))


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def fal_key(key: str) -> dict:
    return {"Authorization": f"Key {key}"}


def local(url: str) -> str:
    """The path and query of one of our URLs (TestClient takes them relative to its own base)."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def bare(url: str) -> str:
    """The path without the signature."""
    return urlsplit(url).path


def read_events(client, path: str, headers: dict, timeout_s: float = 60.0) -> list[tuple[str, dict]]:
    events: list[tuple[str, dict]] = []

    def read():
        with client.stream("GET", path, headers=headers) as response:
            assert response.status_code == 200
            kind = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kind = line[len("event: "):]
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line[len("data: "):])))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"the event stream did not end: {events}"
    return events


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server with two tenants and its three listeners, and key A's finished image-to-video job."""
    from magi_server.runtime.pipeline import MagiPipeline
    from magi_server.serving.app import create_app

    tmp = tmp_path_factory.mktemp("files")
    pipeline = MagiPipeline.from_pretrained("tiny", cache_dir=tmp / "cache")
    settings = tiny_settings(tmp, tmp / "cache", api_keys=(KEY_A, KEY_B), fal_queue_port=8443)
    with running_server(settings, pipeline=pipeline) as (ctx, main):
        with TestClient(create_app(ctx, "fal_queue"), base_url=QUEUE) as queue, \
                TestClient(create_app(ctx, "fal_run"), base_url=RUN) as run:
            upload = main.post("/api/v3/media/upload/binary", headers=bearer(KEY_A),
                               files={"file": ("first.png", PNG, "image/png")})
            assert upload.status_code == 200, upload.text
            download_url = upload.json()["data"]["download_url"]
            submit = main.post(MODEL, headers=bearer(KEY_A), json={
                "prompt": "a grey wall", "image": download_url, "num_frames": 48, "num_inference_steps": 8})
            assert submit.status_code == 200, submit.text
            job_id = submit.json()["data"]["id"]
            events = read_events(main, f"/api/v3/predictions/{job_id}/events", bearer(KEY_A))
            done = wait_status(main, job_id, headers=bearer(KEY_A))
            assert done["status"] == "completed", done
            job = ctx.store.get(job_id)
            previews = [data["url"] for kind, data in events if kind == "chunk"]
            assert len(previews) == 2, events
            yield {
                "ctx": ctx, "listeners": {"main": main, "fal_queue": queue, "fal_run": run}, "job": job,
                "signed": {"output": done["outputs"][0], "preview": previews[0], "upload": download_url},
                "paths": {"output": f"/files/{job_id}.mp4", "preview": bare(previews[0]),
                          "input": f"/files/uploads/{Path(job.params.image_path).name}",
                          "upload": bare(download_url)},
            }


def on_disk(ctx, path: str) -> bytes:
    return (ctx.outputs_dir / path.removeprefix("/files/")).read_bytes()


# ---------------------------------------------------------------------------------------------- who may read


@pytest.mark.parametrize("listener", ["main", "fal_queue", "fal_run"])
@pytest.mark.parametrize("what", ["output", "preview", "input", "upload"])
def test_only_the_owner_reads_a_file_without_a_signature(server, listener, what):
    ctx, client, path = server["ctx"], server["listeners"][listener], server["paths"][what]
    assert (ctx.outputs_dir / path.removeprefix("/files/")).is_file()
    for headers in ({}, bearer(KEY_B), fal_key(KEY_B), bearer("not-a-key"), {"Authorization": KEY_A}):
        r = client.get(path, headers=headers)
        assert r.status_code in (403, 404), (headers, r.status_code)
        assert r.content != on_disk(ctx, path)
    for headers in (bearer(KEY_A), fal_key(KEY_A)):  # the owner, with the auth header of either API
        r = client.get(path, headers=headers)
        assert r.status_code == 200, (headers, r.text)
        assert r.content == on_disk(ctx, path)
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["content-type"] == ("image/png" if what in ("input", "upload") else "video/mp4")


def test_an_unknown_file_looks_like_another_tenants(server):
    client = server["listeners"]["main"]
    missing = client.get("/files/" + "0" * 32 + ".mp4", headers=bearer(KEY_A))
    foreign = client.get(server["paths"]["output"], headers=bearer(KEY_B))
    assert missing.status_code == foreign.status_code == 404 and missing.json() == foreign.json()


@pytest.mark.parametrize("what", ["output", "preview", "upload"])
def test_signed_urls_work_without_a_key_until_they_expire(server, what):
    ctx, url = server["ctx"], server["signed"][what]
    query = dict(part.split("=", 1) for part in urlsplit(url).query.split("&"))
    assert set(query) == {"exp", "sig"}
    expires = int(query["exp"])
    ahead = expires - (time.time() + ctx.settings.file_url_ttl_s)  # rounded up to a step of ttl/24 (stable URLs)
    assert -5 < ahead <= ctx.settings.file_url_ttl_s / 24 + 5
    for client in server["listeners"].values():  # a signature covers the path, whichever listener is asked
        r = client.get(local(url))
        assert r.status_code == 200 and r.content == on_disk(ctx, bare(url))
        assert r.headers["x-content-type-options"] == "nosniff"
    main = server["listeners"]["main"]
    # the signature is bound to its path and expiry
    other = server["paths"]["output" if what != "output" else "input"]
    assert main.get(other + "?" + urlsplit(url).query).status_code == 403
    assert main.get(local(url).replace(f"exp={expires}", f"exp={expires + 3600}")).status_code == 403
    assert main.get(bare(url) + "?exp=1&sig=" + "0" * 64).status_code == 403
    real_clock = ctx.signer.clock
    try:
        ctx.signer.clock = lambda: expires - 1.0
        assert main.get(local(url)).status_code == 200
        ctx.signer.clock = lambda: expires + 1.0
        for client in server["listeners"].values():
            r = client.get(local(url))
            assert r.status_code in (403, 410) and "expired" in r.text
        # the owner's key still reads it (an expired link is not a revoked file)
        assert main.get(local(url), headers=bearer(KEY_A)).status_code == 200
    finally:
        ctx.signer.clock = real_clock


def test_every_api_hands_out_signed_urls(server):
    main, run = server["listeners"]["main"], server["listeners"]["fal_run"]
    # fal (sync listener): the video URL is on the listener the client used, signed
    out = run.post("/fal-ai/magi", headers=fal_key(KEY_A),
                   json={"prompt": "fal", "resolution": "480p", "num_inference_steps": 8})
    assert out.status_code == 200, out.text
    url = out.json()["video"]["url"]
    assert url.startswith(f"{RUN}/files/") and "sig=" in url
    assert run.get(local(url)).status_code == 200
    assert run.get(bare(url)).status_code == 404 and run.get(bare(url), headers=fal_key(KEY_B)).status_code == 404
    assert run.get(bare(url), headers=fal_key(KEY_A)).status_code == 200
    # Magic Hour: the download URL stops working at the expires_at it states
    ticket = main.post("/v1/files/upload-urls", headers=bearer(KEY_A),
                       json={"items": [{"extension": "png", "type": "image"}]}).json()["items"][0]
    assert main.put(local(ticket["upload_url"]), content=PNG).status_code == 200
    created = main.post("/v1/image-to-video", headers=bearer(KEY_A),
                        json={"end_seconds": 1, "assets": {"image_file_path": ticket["file_path"]}})
    assert created.status_code == 200, created.text
    project_id = created.json()["id"]
    deadline = time.monotonic() + 60
    while (project := main.get(f"/v1/video-projects/{project_id}", headers=bearer(KEY_A)).json())["status"] not in (
            "complete", "error") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert project["status"] == "complete", project
    download = project["downloads"][0]
    assert urlsplit(download["url"]).path == f"/files/{project_id}.mp4"
    expires = int(dict(p.split("=", 1) for p in urlsplit(download["url"]).query.split("&"))["exp"])
    assert download["expires_at"] == iso_time(expires)
    assert main.get(local(download["url"])).status_code == 200
    assert main.get(bare(download["url"]), headers=bearer(KEY_B)).status_code == 404


# ---------------------------------------------------------------------------------------------------- uploads


@pytest.mark.parametrize("body, name", [(HTML, "page.html"), (SVG, "image.svg"), (HTML, "disguised.png"),
                                        (b"just some text", "notes.txt")])
def test_wavespeed_refuses_uploads_that_are_not_images_or_videos(server, body, name):
    main = server["listeners"]["main"]
    r = main.post("/api/v3/media/upload/binary", headers=bearer(KEY_A), files={"file": (name, body, "image/png")})
    assert r.status_code == 415 and r.json()["code"] == 415 and r.json()["data"] is None
    assert "image" in r.json()["message"]
    ticket = main.post("/api/v3/media/uploads", headers=bearer(KEY_A),
                       json={"filename": name, "size": len(body)}).json()["data"]
    put = main.put(local(ticket["upload"]["url"]), content=body)
    assert put.status_code == 415 and put.json()["code"] == 415
    # nothing was stored to be served: the download URL stays empty
    assert main.get(local(ticket["download_url"])).status_code == 404


@pytest.mark.parametrize("body", [HTML, SVG])
def test_magic_hour_refuses_html_and_svg_and_keeps_the_ticket(server, body):
    main = server["listeners"]["main"]
    ticket = main.post("/v1/files/upload-urls", headers=bearer(KEY_A),
                       json={"items": [{"extension": "png", "type": "image"}]}).json()["items"][0]
    refused = main.put(local(ticket["upload_url"]), content=body)
    assert refused.status_code == 415 and "image" in refused.json()["message"]
    assert set(refused.json()) == {"message"}  # Magic Hour's error shape
    assert main.put(local(ticket["upload_url"]), content=PNG).status_code == 200  # the ticket is still open


def test_uploads_are_served_as_what_their_bytes_are(server):
    ctx, main = server["ctx"], server["listeners"]["main"]
    r = main.post("/api/v3/media/upload/binary", headers=bearer(KEY_A), files={"file": ("x.html", PNG, "text/html")})
    assert r.status_code == 200 and r.json()["data"]["type"] == "image"
    url = r.json()["data"]["download_url"]
    assert bare(url).endswith(".png")  # the stored name follows the content, not the client's name
    got = main.get(local(url))
    assert got.headers["content-type"] == "image/png" and got.headers["x-content-type-options"] == "nosniff"
    assert got.headers["content-disposition"].startswith("inline")
    # a file stored before uploads were sniffed (or put there by hand) is a download, never rendered
    legacy = ctx.uploads_dir / "legacyuploadname00.html"
    legacy.write_bytes(HTML)
    r = main.get(local(ctx.upload_url(legacy.name)))
    assert r.status_code == 200 and r.content == HTML
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"].startswith("attachment")
    assert r.headers["x-content-type-options"] == "nosniff"


def test_byte_ranges_for_video_players(server):
    ctx, main = server["ctx"], server["listeners"]["main"]
    path = server["paths"]["output"]
    whole = on_disk(ctx, path)
    r = main.get(path, headers={**bearer(KEY_A), "Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == whole[10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{len(whole)}"
    r = main.get(path, headers={**bearer(KEY_A), "Range": f"bytes={len(whole)}-"})
    assert r.status_code == 416


# ------------------------------------------------------------------------------------------------------ links


def test_planted_links_are_not_followed(server, tmp_path):
    ctx, main = server["ctx"], server["listeners"]["main"]
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"outside the outputs folder" * 10)
    job_id = server["job"].id
    planted = [ctx.outputs_dir / f"{job_id}.chunk77.mp4", ctx.outputs_dir / ("f" * 32 + ".mp4"),
               ctx.uploads_dir / "plantedlinkname000.png"]
    for link in planted:
        link.symlink_to(secret)
    # a link to a file inside the folder is not followed either
    (ctx.uploads_dir / "plantedinnerlink00.png").symlink_to(ctx.outputs_dir / f"{job_id}.mp4")
    planted.append(ctx.uploads_dir / "plantedinnerlink00.png")
    try:
        for link in planted:
            path = f"/files/uploads/{link.name}" if link.parent == ctx.uploads_dir else f"/files/{link.name}"
            for client in server["listeners"].values():
                assert client.get(local(ctx.signer.sign(path))).status_code == 404, path
                assert client.get(path, headers=bearer(KEY_A)).status_code == 404, path
        # a submit cannot read through one either
        r = main.post(MODEL, headers=bearer(KEY_A), json={
            "prompt": "x", "image": "http://testserver/files/uploads/plantedlinkname000.png", "num_frames": 24})
        assert r.status_code == 400, r.text
    finally:
        for link in planted:
            link.unlink()


# ------------------------------------------------------------------------------------------ no keys, secrets


def test_without_keys_files_stay_readable_and_signatures_are_still_checked(tmp_path):
    settings = tiny_settings(tmp_path, tmp_path / "cache", file_url_ttl_s=60.0)
    ctx = ServerContext(settings, store=None, engine=None, executor=None, model_name="none")
    app = FastAPI()  # only the file routes: no job is needed to read a file without keys
    add_file_routes(app, ctx)
    name = "a" * 32 + ".mp4"
    ctx.outputs_dir.mkdir(parents=True)
    (ctx.outputs_dir / name).write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(100))
    with TestClient(app) as client:
        assert client.get(f"/files/{name}").status_code == 200  # loopback dev mode: no tenants, no keys
        url = ctx.file_url(name)
        assert client.get(local(url)).status_code == 200
        ctx.signer.clock = lambda: time.time() + 61
        assert client.get(local(url)).status_code == 403


def test_the_signing_secret_is_kept_owner_only_and_survives_restarts(tmp_path):
    settings = ServerSettings(outputs_dir=str(tmp_path / "outputs"))
    first, second = FileSigner.for_settings(settings), FileSigner.for_settings(settings)
    assert first.sign("/files/x.mp4", 2_000_000_000) == second.sign("/files/x.mp4", 2_000_000_000)
    mode = stat.S_IMODE(os.stat(tmp_path / "outputs" / SECRET_FILE).st_mode)
    assert mode == 0o600
    configured = FileSigner.for_settings(ServerSettings(outputs_dir=str(tmp_path / "o2"), file_url_secret="s" * 40))
    assert configured.sign("/files/x.mp4", 1) != first.sign("/files/x.mp4", 1)
    assert not (tmp_path / "o2" / SECRET_FILE).exists()
