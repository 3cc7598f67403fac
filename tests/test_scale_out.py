"""Scale-out on a real PostgreSQL server: `magi-server api` replicas and `magi-server worker` processes sharing one
queue (issue #11, acceptance 2 and 3). Every process is a real subprocess on loopback; the database is a fresh one
on the session's PostgreSQL server (tests/postgres_utils.py), the outputs folder one shared folder, as on one box.

The kill test runs twice: outputs in the shared folder, and outputs in an S3-compatible object store (moto's server
stands in for S3, which cannot be installed here: tests/s3_utils.py), each process then writing to a scratch folder
of its own, the replicas sharing only the URL-signing secret.

Workers run with a 3 s lease (renewed every second) so a killed worker's job is back in the queue within ~5 s, and
one intra-op thread each (three workers and two replicas share this machine's cores).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.media_utils import probe_video
from tests.postgres_utils import psycopg_connect
from tests.procs import ServerProcess, WorkerProcess
from tests.server_utils import read_sse

MODEL = "/api/v3/wavespeed-ai/magi-1-24b"
LEASE_S = "3"
QUIET_PROCESS = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")  # built by the first worker, read by the others


class Cluster:
    """API replicas and workers over one database and one outputs folder; everything is closed at the end."""

    def __init__(self, tmp: Path, cache: Path, dsn: str) -> None:
        self.tmp, self.cache, self.dsn = tmp, cache, dsn
        self.outputs = tmp / "outputs"
        self.object_store: str | None = None  # s3://... once use_object_store() was called
        self.env: dict[str, str] = {}
        self.apis: list[ServerProcess] = []
        self.workers: list[WorkerProcess] = []

    def use_object_store(self, url: str, env: dict[str, str]) -> None:
        self.object_store = url
        self.env = {**env, "MAGI_SERVER_URL_SECRET": "one secret for every replica"}

    def _outputs(self, name: str) -> tuple[Path | str, tuple[str, ...]]:
        """(--outputs, extra args): the shared folder, or the object store plus a scratch folder of its own."""
        if self.object_store is None:
            return self.outputs, ()
        return self.object_store, ("--scratch", str(self.tmp / f"scratch-{name}"))

    def api(self, *extra: str) -> ServerProcess:
        name = f"api{len(self.apis)}"
        outputs, scratch = self._outputs(name)
        srv = ServerProcess(db=self.dsn, outputs=outputs, cache=self.cache, command="api", env=self.env,
                            log=self.tmp / f"{name}.log", extra_args=("--lease-seconds", LEASE_S, *scratch, *extra))
        self.apis.append(srv)
        return srv.start()

    def worker(self, *extra: str, wait: bool = True) -> WorkerProcess:
        name = f"worker{len(self.workers)}"
        outputs, scratch = self._outputs(name)
        wrk = WorkerProcess(db=self.dsn, outputs=outputs, cache=self.cache, env={**QUIET_PROCESS, **self.env},
                            log=self.tmp / f"{name}.log",
                            extra_args=("--max-batch", "1", "--lease-seconds", LEASE_S, "--drain-timeout", "5",
                                        *scratch, *extra))
        self.workers.append(wrk)
        wrk.spawn()
        return wrk.wait_ready() if wait else wrk

    def rows(self, where: str = "TRUE", args: tuple = ()) -> list[dict]:
        with psycopg_connect(self.dsn) as conn:
            cur = conn.execute(f"SELECT id, status, attempts, lease_owner, outputs, idempotency_key, progress_done "
                               f"FROM magi_jobs WHERE {where}", args)
            names = [c.name for c in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log_tail(3000)}" for p in [*self.apis, *self.workers])

    def close(self) -> None:
        for proc in [*self.workers, *self.apis]:
            proc.close()


@pytest.fixture
def cluster(tmp_path, tiny_cache, postgres_server):
    database = postgres_server.database()
    c = Cluster(tmp_path, tiny_cache, postgres_server.dsn(database))
    try:
        yield c
    finally:
        c.close()
        postgres_server.drop_database(database)


def submit(srv: ServerProcess, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(srv.url + MODEL, json=body, headers=headers, timeout=30)


def result(srv: ServerProcess, job_id: str) -> dict:
    r = httpx.get(f"{srv.url}/api/v3/predictions/{job_id}/result", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def wait_for(condition, timeout_s: float, what: str, cluster: Cluster):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout_s:.0f} s; logs:\n{cluster.logs()}")


@pytest.mark.parametrize("outputs", ["folder", "s3"])
def test_two_replicas_three_workers_one_killed_mid_job(cluster: Cluster, tmp_path: Path, outputs: str, request):
    """30 jobs through two replicas, three workers, one SIGKILLed while running a job: every job completes, the
    killed worker's job on its second attempt and every other on its first, one output per job, and each MP4 has
    the requested frames when fetched through either replica. In the object store, the replicas' signed URLs also
    expire (a TTL of seconds here)."""
    object_store = None
    if outputs == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        cluster.use_object_store(bucket.url("videos"), bucket.env())
        from magi_server.serving.outputs import open_output_store

        object_store = open_output_store(bucket.url("videos"), **bucket.store_kwargs())
    ttl = ("--file-url-ttl-hours", "0.002") if object_store is not None else ()  # 7.2 s
    replicas = [cluster.api(*ttl), cluster.api(*ttl)]
    cluster.worker()  # the first builds the tiny weights into the cache; the others then only read them
    cluster.worker(wait=False)
    cluster.worker(wait=False)
    for wrk in cluster.workers[1:]:
        wrk.wait_ready()

    frames = {}
    for i in range(30):
        num_frames = 24 if i % 3 else 48
        r = submit(replicas[i % 2], {"prompt": f"job {i}", "seed": i, "num_frames": num_frames,
                                     "num_inference_steps": 8})
        assert r.status_code == 200, r.text
        frames[r.json()["data"]["id"]] = num_frames

    # kill the worker holding the first running job we see (worker ids are host:pid:random)
    pids = {str(w.pid): w for w in cluster.workers}

    def a_running_job():
        for row in cluster.rows("status = 'running' AND lease_owner IS NOT NULL"):
            pid = row["lease_owner"].split(":")[1]
            if pid in pids:
                return row
        return None

    victim_row = wait_for(a_running_job, 60, "a job running on a worker", cluster)
    victim = pids[victim_row["lease_owner"].split(":")[1]]
    victim.kill9()

    def all_ended():
        rows = cluster.rows()
        return rows if all(row["status"] in ("completed", "failed", "cancelled") for row in rows) else None

    rows = wait_for(all_ended, 240, "every job ended", cluster)
    by_id = {row["id"]: row for row in rows}
    assert set(by_id) == set(frames)
    assert {row["status"] for row in rows} == {"completed"}, [r for r in rows if r["status"] != "completed"]
    attempts = {job_id: row["attempts"] for job_id, row in by_id.items()}
    assert attempts.pop(victim_row["id"]) == 2, cluster.logs()
    assert set(attempts.values()) == {1}, attempts

    # exactly one output per job, and nothing half-written left by the killed attempt
    if object_store is None:
        stored = [p.name for p in cluster.outputs.glob("*.mp4")]
        assert not list(cluster.outputs.glob(".*.part")), list(cluster.outputs.glob(".*.part"))
    else:
        stored = object_store.names()
        assert not list(cluster.outputs.glob("*.mp4"))  # nothing in the folder the other test used
    finals = sorted(name for name in stored if ".chunk" not in name and ".latents." not in name)
    assert finals == sorted(f"{job_id}.mp4" for job_id in frames)
    if object_store is not None:  # and each job's kept latents (continuation), beside its video in the store
        kept = sorted(name for name in stored if ".latents." in name)
        assert kept == sorted(f"{job_id}.latents.safetensors" for job_id in frames)
    assert {name.split(".")[0] for name in stored} == set(frames)  # previews only of these jobs
    assert all(row["outputs"] == f'["{job_id}.mp4"]' for job_id, row in by_id.items())

    # every MP4 through either replica (the signed URLs work on both: one secret in the shared folder)
    for i, (job_id, num_frames) in enumerate(frames.items()):
        for srv in (replicas[i % 2], replicas[(i + 1) % 2]):
            data = result(srv, job_id)
            assert data["status"] == "completed" and data["outputs"][0].startswith(srv.url), data
            video = httpx.get(data["outputs"][0], timeout=30)
            assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        path = tmp_path / f"{job_id}.mp4"
        path.write_bytes(video.content)
        assert probe_video(path).frames == num_frames, job_id
        if object_store is not None:
            assert video.content == object_store.read(f"{job_id}.mp4")

    if object_store is not None:  # a signed URL stops working at its expiry (exp= unix seconds)
        url = result(replicas[0], next(iter(frames)))["outputs"][0]
        expires = int(url.split("exp=")[1].split("&")[0])
        assert httpx.get(url, headers={"range": "bytes=0-99"}, timeout=10).status_code == 206
        time.sleep(max(0.0, expires - time.time()) + 1.0)
        late = httpx.get(url, timeout=10)
        assert late.status_code == 403 and "expired" in late.text, late.text


def test_replicas_share_one_queue_its_keys_cancels_and_events(cluster: Cluster):
    """Across two replicas: --max-queue 3 admits exactly 3 of a simultaneous burst; the same Idempotency-Key sent to
    both at once makes one job; a cancel sent to replica A stops the job running on a worker within 2 s and leaves
    no output; an SSE stream opened on replica B receives every chunk event the worker publishes."""
    a, b = cluster.api("--max-queue", "3"), cluster.api("--max-queue", "3")

    # the bound holds across replicas: no worker runs, ten submits at once, five through each replica
    start = threading.Barrier(10)

    def burst(i: int) -> httpx.Response:
        start.wait()
        return submit((a, b)[i % 2], {"prompt": f"burst {i}", "seed": i, "num_frames": 24, "num_inference_steps": 8})

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(burst, range(10)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * 3 + [429] * 7, [r.text for r in answers]
    assert all("Retry-After" in r.headers for r in answers if r.status_code == 429)
    assert len(cluster.rows("status = 'queued'")) == 3
    for i, r in enumerate(r for r in answers if r.status_code == 200):  # cancels through either replica
        srv = (a, b)[i % 2]
        cancelled = httpx.post(f"{srv.url}/api/v3/predictions/{r.json()['data']['id']}/cancel", json={}, timeout=10)
        assert cancelled.status_code == 200 and cancelled.json()["data"]["status"] == "cancelled", cancelled.text

    # one Idempotency-Key, both replicas at once: one job, the same id answered twice (three keys, three jobs)
    for n in range(3):
        key, body = f"key-{n}", {"prompt": f"idempotent {n}", "seed": 100 + n, "num_frames": 24,
                                  "num_inference_steps": 8}
        together = threading.Barrier(2)

        def send(srv: ServerProcess) -> httpx.Response:
            together.wait()
            return submit(srv, body, headers={"Idempotency-Key": key})

        with ThreadPoolExecutor(2) as pool:
            first, second = pool.map(send, (a, b))
        assert first.status_code == second.status_code == 200, (first.text, second.text)
        assert first.json()["data"]["id"] == second.json()["data"]["id"]
        assert len(cluster.rows("idempotency_key = %s", (key,))) == 1

    # a worker joins: it runs the three keyed jobs, then the two below
    cluster.worker()
    for row in cluster.rows("idempotency_key IS NOT NULL"):
        wait_for(lambda: result(a, row["id"])["status"] == "completed", 60, f"job {row['id']} completed", cluster)

    # SSE on B for a job submitted through A: every chunk the worker writes, in order, then the end
    streamed = submit(a, {"prompt": "streamed through the other replica", "seed": 7, "num_frames": 96,
                          "num_inference_steps": 8})
    assert streamed.status_code == 200, streamed.text
    streamed_id = streamed.json()["data"]["id"]
    with httpx.Client(base_url=b.url, timeout=60) as client:
        events = read_sse(client, f"/api/v3/predictions/{streamed_id}/events", timeout_s=90)
    chunks = [e["data"] for e in events if e.get("event") == "chunk"]
    assert events[-1].get("event") == "completed", events
    total = result(b, streamed_id)["progress"]["chunks_total"]
    assert total == 4 and [c["index"] for c in chunks] == list(range(total)), chunks
    assert [c["frames"] for c in chunks] == [24, 48, 72, 96]
    for c in chunks:  # each preview URL (signed by B) is served by B
        assert c["url"].startswith(b.url) and httpx.get(c["url"], timeout=10).status_code == 200

    # a cancel through A stops the job running on the worker within 2 s, and no output appears
    long = submit(b, {"prompt": "cancelled while running", "seed": 8, "num_frames": 480, "num_inference_steps": 8})
    assert long.status_code == 200, long.text
    long_id = long.json()["data"]["id"]
    wait_for(lambda: cluster.rows("id = %s AND progress_done >= 1", (long_id,)), 60, "the long job's first chunk",
             cluster)
    worker = cluster.workers[0]
    cancelled = httpx.post(f"{a.url}/api/v3/predictions/{long_id}/cancel", json={}, timeout=10)
    sent = time.monotonic()
    assert cancelled.status_code == 200 and cancelled.json()["data"]["status"] == "cancelled", cancelled.text
    wait_for(lambda: f"job {long_id} cancelled" in worker.log_tail(50_000), 2.0,
             "the worker stopping the cancelled job", cluster)
    stopped_after = time.monotonic() - sent
    assert stopped_after < 2.0
    time.sleep(1.0)  # were the engine still running it, its next chunk would land now
    row = cluster.rows("id = %s", (long_id,))[0]
    assert row["status"] == "cancelled" and row["outputs"] == "[]", row
    assert not (cluster.outputs / f"{long_id}.mp4").exists()
    assert not list(cluster.outputs.glob(f".{long_id}.*.part"))
    assert result(b, long_id)["status"] == "cancelled"


def test_an_upload_ticket_from_one_replica_is_taken_by_another(cluster: Cluster, s3_bucket):
    """Presigned uploads carry their ticket in the URL: with outputs in an object store (each replica a scratch
    folder of its own), a WaveSpeed ticket issued by A takes its PUT on B; the download URL works on A, and a Magic
    Hour file_path stored through B is read by a submit through A (no worker runs: it only has to be accepted)."""
    import numpy as np

    from magi_server.media.images import encode_png

    cluster.use_object_store(s3_bucket.url("videos"), s3_bucket.env())
    a, b = cluster.api(), cluster.api()
    image = encode_png(np.full((48, 64, 3), 120, dtype=np.uint8))
    ticket = httpx.post(f"{a.url}/api/v3/media/uploads", json={"filename": "cat.png", "size": len(image)}, timeout=10)
    assert ticket.status_code == 200, ticket.text
    put_url = ticket.json()["data"]["upload"]["url"].replace(a.url, b.url)
    assert httpx.put(put_url, content=image, timeout=10).status_code == 200
    assert httpx.put(put_url, content=image, timeout=10).status_code == 404  # one PUT per ticket, on any replica
    download = httpx.get(ticket.json()["data"]["download_url"], timeout=10)  # signed by A, served by A from the store
    assert download.status_code == 200 and download.content == image

    items = httpx.post(f"{b.url}/v1/files/upload-urls", json={"items": [{"type": "image", "extension": "png"}]},
                       timeout=10).json()["items"]
    assert httpx.put(items[0]["upload_url"], content=image, timeout=10).status_code == 200
    created = httpx.post(f"{a.url}/v1/image-to-video", timeout=30, json={
        "end_seconds": 1.0, "assets": {"image_file_path": items[0]["file_path"]}, "style": {"prompt": "a cat"}})
    assert created.status_code == 200, created.text
