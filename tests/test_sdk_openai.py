"""The official OpenAI SDK (``openai`` 3.51.0), unchanged except its ``base_url``, against a real ``magi-server
serve`` subprocess (tiny preset, CPU, one API key): ``client.videos`` creates a video (the SDK always sends
multipart; once with an ``input_reference`` image file), polls it, downloads its content, thumbnail and spritesheet,
lists it page by page and deletes it; refusals come back as the SDK's typed errors with OpenAI error objects.

The SDK is a plain HTTP client, so it runs in the test process. Every call has a timeout and the client no retries,
so a broken server fails the test instead of hanging it.
"""
from __future__ import annotations

import base64
import time
import warnings

import numpy as np
import pytest

from magi_server.media.images import encode_png, load_image
from magi_server.params import FPS, nearest_aspect, output_size
from tests.media_utils import probe_video
from tests.procs import ServerProcess

openai = pytest.importorskip("openai", reason="the OpenAI SDK is not installed: add openai==3.51.0 to the test extra")

API_KEY = "sk-test-0123"
SCALE = 0.125  # serve --model tiny renders every size at 1/8
TIMEOUT_S = 60.0

# the SDK marks the Sora-era videos methods deprecated; they work, and are what users call
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai-sdk")
    srv = ServerProcess(db=tmp / "jobs.db", outputs=tmp / "outputs", cache=tmp / "cache", log=tmp / "server.log",
                        extra_args=("--api-key", API_KEY))
    try:
        srv.start()
        yield srv
    finally:
        srv.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(api_key=API_KEY, base_url=f"{server.url}/v1", max_retries=0, timeout=TIMEOUT_S)


def poll(client, video_id: str):
    """retrieve() until the video ends, as a user's loop would (poll() is the SDK's own helper, used below)."""
    deadline = time.monotonic() + TIMEOUT_S
    statuses = []
    while time.monotonic() < deadline:
        video = client.videos.retrieve(video_id)
        statuses.append(video.status)
        if video.status in ("completed", "failed"):
            return video, statuses
        time.sleep(0.1)
    raise AssertionError(f"{video_id} did not finish: {statuses[-5:]}")


def test_create_poll_download_list_delete(client, server, tmp_path):
    video = client.videos.create(prompt="a lighthouse at dusk", seconds="2", size="832x480",
                                 extra_body={"seed": 42})
    assert isinstance(video, openai.types.Video)
    assert video.id.startswith("video_") and video.object == "video" and video.status in ("queued", "in_progress")
    assert video.model == "tiny" and video.seconds == "2" and video.prompt == "a lighthouse at dusk"
    done, statuses = poll(client, video.id)
    assert done.status == "completed" and done.progress == 100 and done.error is None, done
    assert set(statuses) <= {"queued", "in_progress", "completed"}
    width, height = output_size("480p", "16:9", SCALE)
    assert done.size == f"{width}x{height}" and done.completed_at >= done.created_at

    content = client.videos.download_content(video.id)
    path = tmp_path / "video.mp4"
    content.write_to_file(path)
    output = server.outputs / f"{video.id.removeprefix('video_')}.mp4"
    assert path.read_bytes() == output.read_bytes()  # the very file the server wrote
    info = probe_video(path)
    assert (info.frames, info.width, info.height, info.fps) == (2 * FPS, width, height, FPS)

    thumbnail = client.videos.download_content(video.id, variant="thumbnail")
    assert thumbnail.response.headers["content-type"] == "image/webp"
    assert load_image(thumbnail.read()).shape == (height, width, 3)
    sheet = client.videos.download_content(video.id, variant="spritesheet")
    assert sheet.response.headers["content-type"] == "image/jpeg"
    assert load_image(sheet.read()).shape == (height, 2 * width, 3)

    # a second video, then the list one item a page: the SDK's cursor page follows last_id with after=
    other = client.videos.create_and_poll(prompt="a harbour", seconds="1", poll_interval_ms=100)
    assert other.status == "completed"
    first = client.videos.list(limit=1)
    assert [v.id for v in first.data] == [other.id] and first.has_more is True
    second = first.get_next_page()
    assert [v.id for v in second.data] == [video.id]
    assert [v.id for v in client.videos.list(limit=1)] == [other.id, video.id]  # auto-paging, all pages
    assert [v.id for v in client.videos.list(order="asc")] == [video.id, other.id]

    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (video.id, "video.deleted", True)
    with pytest.raises(openai.NotFoundError) as missing:
        client.videos.retrieve(video.id)
    assert missing.value.status_code == 404 and missing.value.body["message"] and missing.value.body["param"] is None
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(video.id)
    assert [v.id for v in client.videos.list()] == [other.id]


def test_input_reference_image_file(client, tmp_path):
    image = np.full((112, 64, 3), 80, dtype=np.uint8)
    image[:, :32, 2] = 250
    path = tmp_path / "first.png"
    path.write_bytes(encode_png(image))
    with path.open("rb") as file:
        video = client.videos.create(prompt="a tower at noon", seconds="1", input_reference=file)
    width, height = output_size("720p", nearest_aspect(64, 112), SCALE)  # no size: the image's aspect ratio
    assert video.size == f"{width}x{height}"
    done = client.videos.poll(video.id, poll_interval_ms=100)
    assert done.status == "completed", done
    content = client.videos.download_content(video.id).read()
    assert content[4:8] == b"ftyp"
    # the reference object instead of a file: this SDK version takes only files as input_reference itself, so the
    # object goes through extra_body (sent as input_reference[image_url] in its multipart)
    data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    by_url = client.videos.create(prompt="a tower at noon", seconds="1", size="480x832",
                                  extra_body={"input_reference": {"image_url": data_url}})
    assert by_url.size == "x".join(map(str, output_size("480p", "9:16", SCALE)))
    assert client.videos.poll(by_url.id, poll_interval_ms=100).status == "completed"


def test_errors_are_openai_error_objects(client, server):
    with pytest.raises(openai.BadRequestError) as bad:
        client.videos.create(prompt="x", size="1792x1024")
    assert bad.value.status_code == 400
    assert bad.value.body["param"] == "size" and bad.value.body["type"] == "invalid_request_error"
    assert "1792x1024" in bad.value.body["message"] and bad.value.body["code"] == "invalid_value"

    with pytest.raises(openai.BadRequestError) as bad:
        client.videos.create(prompt="x", seconds="12.5")
    assert bad.value.body["param"] == "seconds"

    with pytest.raises(openai.BadRequestError) as unknown_model:
        client.videos.create(prompt="x", model="sora-2-pro")
    body = unknown_model.value.body
    assert body["param"] == "model" and "sora-2-pro" in body["message"] and "tiny" in body["message"]

    with pytest.raises(openai.BadRequestError) as unknown_field:
        client.videos.create(prompt="x", extra_body={"aspect": "wide"})
    assert unknown_field.value.body["param"] == "aspect" and unknown_field.value.body["code"] == "unknown_parameter"

    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve("video_" + "0" * 32)
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        openai.OpenAI(api_key="sk-wrong", base_url=f"{server.url}/v1", max_retries=0).videos.list()
    assert unauthorized.value.body["code"] == "invalid_api_key"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(openai.NotFoundError) as remix:  # a route this server does not have
            client.videos.remix("video_" + "0" * 32, prompt="x")
    assert remix.value.body["code"] == "not_found"
