"""The output stores (magi_server/serving/outputs.py): a folder and an S3-compatible bucket pass the same tests.

The S3 side talks to moto's S3 server, a real subprocess on loopback (tests/s3_utils.py): no real S3-compatible
server installs on this machine, and issue #11 allows moto in its place. moto enforces neither the signature nor
the expiry of presigned URLs (``test_moto_serves_presigned_urls_whatever_their_signature_or_age`` pins that), so
a presigned URL's expiry is shown by checking its SigV4 signature the way S3 does (``verify_presigned_get``), not
by the server refusing it.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from magi_server.serving import outputs
from magi_server.serving.outputs import (
    LocalOutputStore, OutputStore, OutputStoreError, S3OutputStore, open_output_store,
)
from tests.golden_utils import REPO_ROOT
from tests.s3_utils import free_port, presigned_url_times, verify_presigned_get

# the start of an MP4 (an ftyp box): what serving.files.sniff_media calls video/mp4
MP4_HEAD = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
BAD_NAMES = ["", "../x", "/etc/passwd", "a/../b", "..", ".", ".url-signing-key", "a/.hidden", "a/b/c", "a\\b",
             "a//b", "x\x00y", "sub/", "/"]


def make_file(folder: Path, content: bytes, name: str = "finished.mp4") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content)
    return path


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> OutputStore:
    if request.param == "local":
        opened = open_output_store(str(tmp_path / "outputs"))
        assert isinstance(opened, LocalOutputStore)
    else:
        bucket = request.getfixturevalue("s3_bucket")
        opened = open_output_store(bucket.url("serving/outputs"), **bucket.store_kwargs())
        assert isinstance(opened, S3OutputStore)
    yield opened
    opened.close()


@pytest.fixture
def scratch(tmp_path) -> Path:
    """Where finished files are made before they are published (outside any store's folder)."""
    return tmp_path / "scratch"


# ------------------------------------------------------------------------------------------ both stores


def test_publish_then_read_back_the_same_bytes(store, scratch):
    video = MP4_HEAD + bytes(range(256)) * 40
    preview = MP4_HEAD + b"chunk-1" * 100
    store.publish(make_file(scratch, video, "a.mp4"), "0123abcd.mp4")
    store.publish(make_file(scratch, preview, "b.mp4"), "0123abcd.chunk1.mp4")
    store.publish(make_file(scratch, b"\x89PNG\r\n\x1a\n" + b"p" * 50, "c.png"), "uploads/input-1.png")

    assert not (scratch / "a.mp4").exists(), "publish consumes the local file"
    assert store.exists("0123abcd.mp4") and store.exists("0123abcd.chunk1.mp4")
    assert not store.exists("ffff.mp4")
    assert store.read("0123abcd.mp4") == video
    assert store.read("0123abcd.chunk1.mp4") == preview
    assert store.read("ffff.mp4") is None and store.open("ffff.mp4") is None
    assert store.names() == ["0123abcd.chunk1.mp4", "0123abcd.mp4", "uploads/input-1.png"]
    assert store.names("0123abcd.chunk") == ["0123abcd.chunk1.mp4"]
    assert store.names("uploads/") == ["uploads/input-1.png"]

    with store.open("0123abcd.mp4") as reader:  # what the API streams, byte ranges included
        assert reader.size == len(video)
        assert reader.head() == video[:32]
        assert reader.read(100, 1100) == video[100:1100]
        assert b"".join(reader.iter_bytes(5, None, chunk_size=333)) == video[5:]
        assert all(len(piece) <= 333 for piece in reader.iter_bytes(0, None, chunk_size=333))
        assert reader.read(len(video), len(video)) == b""


def test_publish_over_a_name_replaces_it_whole_while_readers_read(store, scratch):
    first, second = MP4_HEAD + b"a" * 300_000, MP4_HEAD + b"b" * 170_000
    store.publish(make_file(scratch, first, "v0"), "job.mp4")
    seen: list[bytes] = []
    stop = threading.Event()

    def keep_reading():
        while not stop.is_set():
            seen.append(store.read("job.mp4"))

    reader = threading.Thread(target=keep_reading)
    reader.start()
    try:
        for i in range(1, 13):
            store.publish(make_file(scratch, second if i % 2 else first, f"v{i}"), "job.mp4")
    finally:
        stop.set()
        reader.join()
    assert seen and all(content in (first, second) for content in seen), "a reader saw a partial object"
    assert store.read("job.mp4") == first  # the 12th publish was the first content
    assert store.names() == ["job.mp4"], "no temporary object is left behind"


def test_an_open_reader_never_mixes_two_versions(store, scratch):
    first, second = MP4_HEAD + b"1" * 50_000, MP4_HEAD + b"2" * 50_000
    store.publish(make_file(scratch, first, "v1"), "job.mp4")
    with store.open("job.mp4") as reader:
        start = reader.read(0, 20_000)
        store.publish(make_file(scratch, second, "v2"), "job.mp4")
        if isinstance(store, LocalOutputStore):
            # the open file is the old one: it reads on to its end
            assert start + reader.read(20_000) == first
        else:
            # the reader pinned the version it opened (If-Match on its ETag): a replaced object is an error
            with pytest.raises(OutputStoreError, match="PreconditionFailed|412"):
                reader.read(20_000)
    assert store.read("job.mp4") == second


def test_delete_removes_and_a_missing_name_is_fine(store, scratch):
    store.publish(make_file(scratch, MP4_HEAD + b"x" * 10), "job.mp4")
    store.publish(make_file(scratch, MP4_HEAD + b"y" * 10), "job.chunk1.mp4")
    store.delete("job.mp4")
    assert not store.exists("job.mp4") and store.read("job.mp4") is None
    assert store.names() == ["job.chunk1.mp4"]
    store.delete("job.mp4")  # again: fine
    store.delete("never-was.mp4")
    assert store.names() == ["job.chunk1.mp4"]


def test_a_name_that_could_leave_the_store_is_refused(store, scratch, tmp_path):
    path = make_file(scratch, MP4_HEAD)
    for name in BAD_NAMES:
        operations = {
            "publish": lambda: store.publish(path, name), "exists": lambda: store.exists(name),
            "read": lambda: store.read(name), "open": lambda: store.open(name),
            "delete": lambda: store.delete(name), "presigned_url": lambda: store.presigned_url(name, 60),
        }
        for what, operation in operations.items():
            with pytest.raises(OutputStoreError, match="not a valid output name"):
                operation()
                pytest.fail(f"{what}({name!r}) was accepted")
    assert path.exists(), "a refused publish leaves the local file alone"
    assert store.names() == []
    assert {p.name for p in tmp_path.iterdir()} <= {"scratch", "outputs"}, "something was written outside"


def test_publishing_a_missing_file_fails_with_one_line_naming_the_store(store, scratch):
    with pytest.raises(OutputStoreError) as caught:
        store.publish(scratch / "nope.mp4", "job.mp4")
    message = str(caught.value)
    assert store.location in message and "job.mp4" in message and "\n" not in message
    assert not store.exists("job.mp4")


# ------------------------------------------------------------------------------------------------- folder


def test_local_store_hands_out_no_presigned_urls(tmp_path, scratch):
    store = LocalOutputStore(tmp_path / "outputs")
    store.publish(make_file(scratch, MP4_HEAD), "job.mp4")
    assert store.presigned_url("job.mp4", 60) is None  # the API's own signed /files URLs serve the folder
    assert store.location == str(tmp_path / "outputs")


def test_local_store_hides_dot_files_and_follows_no_links(tmp_path, scratch):
    folder = tmp_path / "outputs"
    store = LocalOutputStore(folder)
    (folder / ".url-signing-key").write_text("secret" * 10)
    (folder / ".job.mp4.1234.part").write_bytes(b"half")
    secret = tmp_path / "elsewhere.mp4"
    secret.write_bytes(MP4_HEAD + b"not yours")
    (folder / "planted.mp4").symlink_to(secret)
    (folder / "uploads").mkdir()
    (folder / "uploads" / "linked.png").symlink_to(secret)
    store.publish(make_file(scratch, MP4_HEAD), "job.mp4")

    assert store.names() == ["job.mp4"]
    assert store.read("planted.mp4") is None and not store.exists("uploads/linked.png")
    (folder / "linked-dir").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(OutputStoreError, match="is a link"):
        store.publish(make_file(scratch, MP4_HEAD, "x.mp4"), "linked-dir/x.mp4")
    assert not (tmp_path / "x.mp4").exists()
    store.delete("planted.mp4")  # removes the link, not what it points at
    assert not (folder / "planted.mp4").is_symlink() and secret.read_bytes() == MP4_HEAD + b"not yours"


def test_local_store_copies_across_filesystems_then_renames(tmp_path, scratch, monkeypatch):
    store = LocalOutputStore(tmp_path / "outputs")
    content = MP4_HEAD + os.urandom(100_000)
    source = make_file(scratch, content)
    real_replace = os.replace
    calls = []

    def replace_across_devices(src, dst):  # the rename a scratch disk on another filesystem gets
        calls.append((Path(src), Path(dst)))
        if Path(src) == source:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace_across_devices)
    store.publish(source, "job.mp4")
    monkeypatch.undo()
    assert store.read("job.mp4") == content and not source.exists()
    temporary, final = calls[1]  # the copy went beside the target, hidden, then was renamed over it
    assert temporary.parent == tmp_path / "outputs" and temporary.name.startswith(".job.mp4.")
    assert final == tmp_path / "outputs" / "job.mp4"
    assert os.listdir(tmp_path / "outputs") == ["job.mp4"]


def test_a_folder_that_cannot_be_one_fails_at_open(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputStoreError) as caught:
        open_output_store(str(blocker / "outputs"))
    assert str(blocker / "outputs") in str(caught.value) and "\n" not in str(caught.value)


def test_boto3_is_imported_only_when_an_s3_location_is_opened(tmp_path):
    probe = (
        "import sys\n"
        "from magi_server.serving.outputs import open_output_store\n"
        f"store = open_output_store({str(tmp_path / 'outputs')!r})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 'torch')))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------- S3


def test_s3_objects_live_under_the_prefix_with_their_content_type(s3_bucket, scratch):
    store = open_output_store(s3_bucket.url("team-a/out"), **s3_bucket.store_kwargs())
    neighbour = open_output_store(s3_bucket.url("team-b"), **s3_bucket.store_kwargs())
    store.publish(make_file(scratch, MP4_HEAD + b"v"), "job.mp4")
    neighbour.publish(make_file(scratch, b"not media"), "other.bin")

    client = s3_bucket.server.client()
    keys = sorted(item["Key"] for item in client.list_objects_v2(Bucket=s3_bucket.bucket)["Contents"])
    assert keys == ["team-a/out/job.mp4", "team-b/other.bin"]
    assert client.head_object(Bucket=s3_bucket.bucket, Key="team-a/out/job.mp4")["ContentType"] == "video/mp4"
    assert client.head_object(Bucket=s3_bucket.bucket, Key="team-b/other.bin")["ContentType"] == \
        "application/octet-stream"
    assert store.names() == ["job.mp4"] and neighbour.names() == ["other.bin"]
    assert store.location == f"s3://{s3_bucket.bucket}/team-a/out at {s3_bucket.endpoint_url}"
    client.close()


def test_s3_large_file_goes_up_in_parts_and_arrives_whole(s3_bucket, scratch):
    store = open_output_store(s3_bucket.url(), **s3_bucket.store_kwargs())
    content = MP4_HEAD + os.urandom(9 * 1024 * 1024)  # over boto3's 8 MiB multipart threshold
    store.publish(make_file(scratch, content), "big.mp4")
    client = s3_bucket.server.client()
    etag = client.head_object(Bucket=s3_bucket.bucket, Key="big.mp4")["ETag"]
    client.close()
    assert etag.strip('"').endswith("-2"), f"expected a two-part upload, ETag {etag}"
    assert store.read("big.mp4") == content


def test_s3_presigned_url_downloads_the_exact_bytes_and_is_signed_for_its_lifetime(s3_bucket, scratch):
    store = open_output_store(s3_bucket.url("out"), **s3_bucket.store_kwargs())
    content = MP4_HEAD + os.urandom(70_000)
    store.publish(make_file(scratch, content), "job.mp4")
    before = int(time.time())
    url = store.presigned_url("job.mp4", 600)
    answer = httpx.get(url, timeout=10)
    assert answer.status_code == 200 and answer.content == content
    assert answer.headers["content-type"] == "video/mp4"

    secret = s3_bucket.server.secret_access_key
    signed_at, expires_at = presigned_url_times(url)
    assert before - 1 <= signed_at <= time.time() and expires_at == signed_at + 600
    assert verify_presigned_get(url, secret) == "valid"
    assert verify_presigned_get(url, secret, now=expires_at - 1) == "valid"
    assert verify_presigned_get(url, secret, now=expires_at) == "expired"
    assert verify_presigned_get(url, "some-other-secret") == "invalid"
    assert verify_presigned_get(url.replace("X-Amz-Expires=600", "X-Amz-Expires=6000"), secret) == "invalid"
    other_key = url.replace("/out/job.mp4?", "/out/job.chunk1.mp4?")
    assert other_key != url and verify_presigned_get(other_key, secret) == "invalid"

    for bad in (0, 0.5, 7 * 24 * 3600 + 1):
        with pytest.raises(OutputStoreError, match="1 s to 7 days"):
            store.presigned_url("job.mp4", bad)


def test_moto_serves_presigned_urls_whatever_their_signature_or_age(s3_bucket, scratch):
    """Why expiry is checked by verifying the signature: past its 1 s lifetime, a presigned URL is one S3 refuses
    (the verifier says so), but moto still serves it, as it serves one with a forged signature. If this starts
    failing, moto enforces presigned URLs and the expiry test can be made against the server itself."""
    store = open_output_store(s3_bucket.url(), **s3_bucket.store_kwargs())
    content = MP4_HEAD + b"expiring"
    store.publish(make_file(scratch, content), "job.mp4")
    url = store.presigned_url("job.mp4", 1)
    _signed_at, expires_at = presigned_url_times(url)
    time.sleep(max(0.0, expires_at - time.time()) + 0.2)
    assert verify_presigned_get(url, s3_bucket.server.secret_access_key) == "expired"
    assert httpx.get(url, timeout=10).content == content
    forged = url[: url.index("X-Amz-Signature=") + len("X-Amz-Signature=")] + "0" * 64
    assert verify_presigned_get(forged, s3_bucket.server.secret_access_key) == "invalid"
    assert httpx.get(forged, timeout=10).content == content


def test_a_missing_bucket_fails_at_open_naming_the_location(s3_bucket):
    with pytest.raises(OutputStoreError) as caught:
        open_output_store("s3://no-such-bucket-here/out", **s3_bucket.store_kwargs())
    message = str(caught.value)
    assert message.startswith(f"output store s3://no-such-bucket-here/out at {s3_bucket.endpoint_url}: ")
    assert "does not exist" in message and "\n" not in message


def test_an_unreachable_endpoint_fails_at_open_in_one_line(s3_bucket):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    kwargs = {**s3_bucket.store_kwargs(), "endpoint_url": endpoint}
    started = time.monotonic()
    with pytest.raises(OutputStoreError) as caught:
        open_output_store(s3_bucket.url("out"), **kwargs)
    message = str(caught.value)
    assert message.startswith(f"output store s3://{s3_bucket.bucket}/out at {endpoint}: cannot reach the store")
    assert "\n" not in message and s3_bucket.server.secret_access_key not in message
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("location", ["s3://", "s3:///prefix", "s3://AKIAX:hunter2@bucket/out",
                                      "s3://bucket:9000/out", "s3://bucket/out?x=1", "s3://bucket/../up"])
def test_a_malformed_s3_location_is_refused_without_echoing_secrets(location):
    with pytest.raises(OutputStoreError) as caught:
        open_output_store(location, endpoint_url="http://127.0.0.1:9")
    assert "s3://bucket" in str(caught.value) or "bucket" not in location
    assert "hunter2" not in str(caught.value) and "\n" not in str(caught.value)


def test_the_standard_aws_environment_alone_reaches_the_store(s3_bucket, scratch):
    """What a worker or API replica does: nothing but AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION
    and AWS_ENDPOINT_URL in its environment (boto3 reads them itself), and the location."""
    content = MP4_HEAD + os.urandom(5000)
    source = make_file(scratch, content)
    probe = (
        "import sys\n"
        "from magi_server.serving.outputs import open_output_store\n"
        "store = open_output_store(sys.argv[1])\n"
        "store.publish(sys.argv[2], 'job.mp4')\n"
        "print(store.location)\n"
        "print(store.presigned_url('job.mp4', 60))\n"
    )
    env = s3_bucket.env()
    env.pop("AWS_REGION", None)
    done = subprocess.run([sys.executable, "-c", probe, s3_bucket.url("out"), str(source)], capture_output=True,
                          text=True, cwd=REPO_ROOT, env=env, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    location, url = done.stdout.strip().splitlines()
    assert location == f"{s3_bucket.url('out')} at {s3_bucket.endpoint_url}"
    assert url.startswith(f"{s3_bucket.endpoint_url}/{s3_bucket.bucket}/out/job.mp4?"), url  # path-style
    assert httpx.get(url, timeout=10).content == content
    assert verify_presigned_get(url, s3_bucket.server.secret_access_key) == "valid"
