"""The README's "Scale out" commands are the ones that work (issue #11, acceptance 7): parsed from the README, as the
quick-start test parses its block, and run by bash as written.

The one rule that separates a deployment from a test: in each block, a line starting with ``export `` holds the
deployment's values (database URL, outputs location, model, ports, secrets); the test puts its own ``export`` line in
their place, naming exactly the same variables, and every other line runs unchanged. Comments are comments to bash
too, so the load balancer the README mentions is not run (there is none to run).

* Every block runs first with the README's own values and ``magi-server`` replaced by a shell function that records
  its arguments: every command parses with the CLI's own parser, the workers get one GPU each, and the processes
  agree on store, model and lease.
* "many requests" and "many machines" then run for real: a real PostgreSQL (tests/postgres_utils.py), the tiny
  model, outputs in a folder / in an S3-compatible store (moto's server stands in for S3, which does not install
  here: tests/s3_utils.py). The block's background processes belong to the bash process the test started in a
  session of its own, so the test can end them and every ffmpeg they started. A WaveSpeed job submitted through the
  replica completes with an MP4 of the requested frames; then each process gets SIGTERM and must exit 0. On this
  one machine the "many machines" api and worker share the ``$SCRATCH`` folder that separate machines would not.
* "one video on several GPUs" is only parsed, with the README's values and with ``CP=2``: run as written, without a
  resolution scale, the tiny context-parallel model takes about 145 s for one 480p job on this CPU (measured), far
  beyond this file's budget; tests/test_context_parallel.py runs ``magi-server serve --cp 2`` as a real process.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from magi_server.models.config import preset
from magi_server.tools.cli import build_parser
from tests.golden_utils import REPO_ROOT
from tests.media_utils import probe_video
from tests.procs import free_port

ONE_VIDEO = "One box, one video on several GPUs"
MANY_REQUESTS = "One box, several GPUs, many requests"
MANY_MACHINES = "Many machines"
DEPLOYMENT_LINE = re.compile(r"^export\s")  # the rule above: these lines are replaced, nothing else is
WORKER_READY = re.compile(r"worker \S+ ready in ")
ROUTE = "/api/v3/wavespeed-ai/magi-1-24b"
START_TIMEOUT_S = 120.0  # two workers importing torch and loading the model on a shared 2-core machine
JOB_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 90.0  # a worker drains for up to --drain-timeout (60 s) after SIGTERM


# ------------------------------------------------------------------------------------------ the README's blocks
def scale_out_blocks() -> dict[str, str]:
    """{subsection title: its bash block} of the README's "## Scale out" section."""
    text = (REPO_ROOT / "README.md").read_text()
    assert text.count("\n## Scale out\n") == 1, "the README has one Scale out section"
    section = text.split("\n## Scale out\n", 1)[1].split("\n## ", 1)[0]
    blocks = {}
    for part in section.split("\n### ")[1:]:
        title, body = part.split("\n", 1)
        found = re.findall(r"```bash\n(.*?)```", body, re.S)
        assert len(found) == 1, f"{title!r}: one bash block expected, found {len(found)}"
        blocks[title.strip()] = found[0]
    return blocks


def deployment_values(block: str) -> dict[str, str]:
    """The variables the block's ``export`` lines set, with the README's values."""
    values = {}
    for line in block.splitlines():
        if DEPLOYMENT_LINE.match(line):
            for word in shlex.split(line, comments=True)[1:]:
                name, sep, value = word.partition("=")
                assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name), f"not an assignment: {word!r} in {line!r}"
                values[name] = value
    return values


def with_values(block: str, values: dict[str, str]) -> str:
    """The block with its ``export`` lines replaced by one setting ``values``: the same names, other values."""
    assert set(values) == set(deployment_values(block)), "the test must set exactly the variables the README sets"
    kept = [line for line in block.splitlines() if not DEPLOYMENT_LINE.match(line)]
    assignments = " ".join(f"{name}={shlex.quote(value)}" for name, value in values.items())
    return f"export {assignments}\n" + "\n".join(kept) + "\n"


def models(args) -> tuple[str, ...]:
    """The variants a parsed command names (``--model`` given once, or repeated where a command takes a list)."""
    return tuple(args.model) if isinstance(args.model, (list, tuple)) else (args.model,)


def parse_cli(args: list[str]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"README command `magi-server {shlex.join(args)}` does not parse: {err.getvalue().strip()}")


# A stand-in for the magi-server executable: each call appends "CUDA_VISIBLE_DEVICES<TAB>arguments" (shell-quoted)
# to $MAGI_README_CALLS, in one write, so calls made in the background do not interleave.
RECORDER = r"""magi-server() {
  printf '%s\t%s\n' "${CUDA_VISIBLE_DEVICES-}" "$(printf '%q ' "$@")" >> "$MAGI_README_CALLS"
}
"""


def dry_run(block: str, tmp_path: Path, values: dict[str, str] | None = None) -> list[tuple[str, object]]:
    """Run ``block`` with bash (its own values unless ``values``) with magi-server recorded instead of started;
    returns (CUDA_VISIBLE_DEVICES, parsed arguments) per call."""
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    script = "set -eu\n" + RECORDER + (block if values is None else with_values(block, values)) + "wait\n"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env={**env, "MAGI_README_CALLS": str(calls)},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    recorded = []
    for line in calls.read_text().splitlines():
        devices, args = line.split("\t", 1)
        recorded.append((devices, parse_cli(shlex.split(args))))
    return recorded


def test_the_section_has_its_three_blocks():
    blocks = scale_out_blocks()
    assert list(blocks) == [ONE_VIDEO, MANY_REQUESTS, MANY_MACHINES]
    assert "torchrun" not in blocks[ONE_VIDEO]  # launching the ranks with torchrun is not supported yet
    for title, block in blocks.items():
        assert deployment_values(block), f"{title!r} names its deployment values in export lines"


@pytest.mark.parametrize("values", ["readme", "test"])
def test_one_video_block_parses(tmp_path, values):
    block = scale_out_blocks()[ONE_VIDEO]
    readme = deployment_values(block)
    ours = {**readme, "MODEL": "tiny", "CP": "2", "PORT": str(free_port())} if values == "test" else None
    calls = dry_run(block, tmp_path, ours)
    assert len(calls) == 1
    args = calls[0][1]
    expected = ours or readme
    assert args.command == "serve" and models(args) == (expected["MODEL"],) and args.port == int(expected["PORT"])
    assert args.cp == int(expected["CP"]) > 1
    if values == "readme":  # the README's N must be one its model can take
        dit = preset(expected["MODEL"]).dit
        assert dit.num_attention_heads % args.cp == 0 and dit.num_query_groups % args.cp == 0


def _processes(calls) -> tuple[list, list, list]:
    by_command = {"migrate": [], "worker": [], "api": []}
    for devices, args in calls:
        by_command[args.command].append((devices, args))
    assert sum(map(len, by_command.values())) == len(calls), [args.command for _, args in calls]
    return by_command["migrate"], by_command["worker"], by_command["api"]


@pytest.mark.parametrize("title", [MANY_REQUESTS, MANY_MACHINES])
def test_scale_out_blocks_as_written_start_one_worker_per_gpu_over_one_store(tmp_path, title):
    block = scale_out_blocks()[title]
    values = deployment_values(block)
    migrate, workers, apis = _processes(dry_run(block, tmp_path))
    assert len(migrate) == 1 and len(apis) == 1
    gpus = values["GPUS"].split()
    assert len(gpus) > 1 and sorted(devices for devices, _ in workers) == sorted(gpus)  # one worker per GPU
    everyone = [args for _, args in workers + apis]
    assert {a.db for a in everyone} == {migrate[0][1].db} and migrate[0][1].db.startswith("postgresql://")
    assert {models(a) for a in everyone} == {(values["MODEL"],)} and len({a.outputs for a in everyone}) == 1
    assert len({a.lease_seconds for a in everyone}) == 1
    api = apis[0][1]
    if title == MANY_MACHINES:
        assert api.outputs.startswith("s3://") and len({a.scratch for a in everyone}) == 1
        assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(values)
        assert values["MAGI_SERVER_URL_SECRET"] and values["MAGI_SERVER_API_KEYS"]  # keys: the host is not loopback
        assert api.host not in ("127.0.0.1", "localhost") and api.public_url == values["PUBLIC_URL"]


# --------------------------------------------------------------------------------------------- the real runs
@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    """The tiny preset's weights, made once before the workers start (as a downloaded model would be)."""
    from magi_server.runtime.tiny import ensure_tiny_weights

    cache = tmp_path_factory.mktemp("tiny-cache") / "magi-server"
    ensure_tiny_weights(cache)
    return cache


def _magi_server_bin() -> Path:
    """The folder whose ``magi-server`` the README's lines will run: the test's own virtual environment."""
    for folder in (Path(sys.executable).parent, REPO_ROOT / ".venv" / "bin"):
        if (folder / "magi-server").is_file():
            return folder
    pytest.fail("no magi-server executable beside the test's Python or in .venv/bin: install the package first")


class BlockRun:
    """A README block run by ``bash`` in a session of its own, with a trailer of the test's: after the block's
    lines it writes the ids of its background processes, then waits for each and writes its exit status."""

    def __init__(self, script: str, *, cwd: Path, env: dict[str, str]) -> None:
        self.log_path, self.pids_path, self.exits_path = cwd / "block.log", cwd / "pids", cwd / "exits"
        trailer = (f"jobs -p > {shlex.quote(str(self.pids_path))}.tmp && "
                   f"mv {shlex.quote(str(self.pids_path))}.tmp {shlex.quote(str(self.pids_path))}\n"
                   f"for pid in $(jobs -p); do code=0; wait \"$pid\" || code=$?; "
                   f"echo \"$pid $code\" >> {shlex.quote(str(self.exits_path))}; done\n")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(["bash", "-c", "set -eu\n" + script + trailer], cwd=cwd, env=env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def log(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_until(self, condition, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and not self.exits_path.exists():
                raise AssertionError(f"the block stopped (bash exit {self.proc.returncode}) before {what}:\n"
                                     f"{self.log()}")
            if self.pids_path.exists():
                dead = [pid for pid in map(int, self.pids_path.read_text().split()) if not _running(pid)]
                assert not dead, f"background process(es) {dead} of the block ended before {what}:\n{self.log()}"
            value = condition()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"{what} not within {timeout_s:.0f} s; log:\n{self.log()}")

    def background_pids(self) -> list[int]:
        self.wait_until(self.pids_path.exists, 30, "the block's background processes started")
        return [int(pid) for pid in self.pids_path.read_text().split()]

    def stop(self) -> dict[int, int]:
        """SIGTERM to each background process; their exit statuses as bash's wait saw them."""
        pids = self.background_pids()
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        self.proc.wait(timeout=STOP_TIMEOUT_S)
        exits = dict(map(int, line.split()) for line in self.exits_path.read_text().splitlines())
        assert set(exits) == set(pids), (exits, pids)
        return exits

    def close(self) -> None:
        """Whatever is left of the session (the processes, the ffmpeg encoders they started) is killed."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie that bash has not reaped yet has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _process_env(tiny_cache: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without anything a deployment would set (the block sets those), plus the test's plumbing:
    the magi-server to run, the tiny weights, one intra-op thread per process on this shared machine."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MAGI_SERVER_", "PG")) and k not in ("CUDA_VISIBLE_DEVICES", "VIRTUAL_ENV")}
    env.update(PATH=f"{_magi_server_bin()}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", MAGI_SERVER_CACHE=str(tiny_cache), **(extra or {}))
    return env


def _run_one_job(run: BlockRun, base_url: str, headers: dict[str, str], tmp_path: Path) -> tuple[str, dict]:
    """Wait for the replica, submit a small WaveSpeed job, wait for it to complete; (job id, result data) with the
    MP4 fetched through its signed URL (no key) and checked for the requested frames."""
    def ready() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{base_url}/health/ready", timeout=2).status_code == 200
        return False

    run.wait_until(ready, START_TIMEOUT_S, "the api replica ready")
    submitted = httpx.post(base_url + ROUTE, headers=headers, timeout=30,
                           json={"prompt": "a red fox", "seed": 5, "num_frames": 24, "num_inference_steps": 8})
    assert submitted.status_code == 200, submitted.text
    job_id = submitted.json()["data"]["id"]

    def finished():
        data = httpx.get(f"{base_url}/api/v3/predictions/{job_id}/result", headers=headers, timeout=10).json()["data"]
        return data if data["status"] in ("completed", "failed", "cancelled") else None

    data = run.wait_until(finished, START_TIMEOUT_S + JOB_TIMEOUT_S, "the job finished")
    assert data["status"] == "completed", (data, run.log())
    video = httpx.get(data["outputs"][0], timeout=30)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4", video.text[:300]
    path = tmp_path / "fetched.mp4"
    path.write_bytes(video.content)
    assert probe_video(path).frames == 24
    return job_id, data


def _assert_clean_stop(run: BlockRun, workers: int) -> None:
    log = run.log(200_000)
    assert len(WORKER_READY.findall(log)) == workers, log[-6000:]
    exits = run.stop()
    assert len(exits) == workers + 1 and set(exits.values()) == {0}, (exits, run.log())


@pytest.fixture
def database(postgres_server):
    name = postgres_server.database()
    yield postgres_server.dsn(name)
    postgres_server.drop_database(name)


def test_many_requests_block_runs_as_written(tmp_path, tiny_cache, database):
    block = scale_out_blocks()[MANY_REQUESTS]
    port = free_port()
    outputs = tmp_path / "outputs"
    values = {"DB": database, "OUT": str(outputs), "MODEL": "tiny", "PORT": str(port), "GPUS": "0 1"}
    run = BlockRun(with_values(block, values), cwd=tmp_path, env=_process_env(tiny_cache))
    try:
        job_id, _ = _run_one_job(run, f"http://127.0.0.1:{port}", {}, tmp_path)
        assert probe_video(outputs / f"{job_id}.mp4").frames == 24  # written into the shared folder
        assert "schema version 0 -> " in run.log(200_000)  # the migrate line made the schema
        _assert_clean_stop(run, workers=2)
    finally:
        run.close()


def test_many_machines_block_runs_as_written(tmp_path, tiny_cache, database, s3_bucket):
    from magi_server.serving.outputs import open_output_store

    block = scale_out_blocks()[MANY_MACHINES]
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    aws = s3_bucket.env({})  # the standard AWS variables reaching the S3 stand-in
    values = {
        "DB": database, "MODEL": "tiny", "GPUS": "0", "OUT": s3_bucket.url("outputs"),
        "SCRATCH": str(tmp_path / "scratch"),
        **{name: aws[name] for name in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
                                        "AWS_SECRET_ACCESS_KEY")},
        "MAGI_SERVER_URL_SECRET": "the secret every replica shares", "MAGI_SERVER_API_KEYS": "key-a,key-b",
        "HOST": "127.0.0.1", "PORT": str(port), "PUBLIC_URL": public_url,
    }
    profile = {name: aws[name] for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")}  # no real profile
    run = BlockRun(with_values(block, values), cwd=tmp_path, env=_process_env(tiny_cache, profile))
    try:
        job_id, data = _run_one_job(run, public_url, {"Authorization": "Bearer key-b"}, tmp_path)
        without_key = httpx.get(f"{public_url}/api/v3/predictions/{job_id}/result", timeout=10)
        assert without_key.status_code == 401  # MAGI_SERVER_API_KEYS reached the replica
        assert data["outputs"][0].startswith(public_url + "/files/")  # --public-url names the signed URLs
        store = open_output_store(s3_bucket.url("outputs"), **s3_bucket.store_kwargs())
        assert f"{job_id}.mp4" in store.names()  # the video lives in the object store
        _assert_clean_stop(run, workers=1)
    finally:
        run.close()
