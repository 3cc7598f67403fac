"""ServerSettings: everything ``magi-server serve`` is configured with.

The CLI builds it from flags and the environment (the one place either is read); nothing below the composition
root reads the environment.
"""
from __future__ import annotations

from dataclasses import dataclass

from magi_server.params import MAX_PROMPT_CHARS


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``magi-server serve`` is configured with (the CLI builds it; nothing reads env vars below it)."""

    model: str = "tiny"  # preset name or weights folder (or NAME=FOLDER): the first served variant
    more_models: tuple[str, ...] = ()  # further variants served at once (--model repeated; serving/routing.py)
    route_map: tuple[tuple[str, str], ...] = ()  # (hosted route, variant name) the operator fixed (--route-map)
    host: str = "127.0.0.1"
    port: int = 8000
    db_path: str = "magi-server.db"
    outputs_dir: str = "outputs"
    public_base_url: str | None = None  # how clients reach us (defaults to http://host:port)
    api_keys: tuple[str, ...] = ()  # empty: auth off (only allowed on loopback)
    device: str = "cpu"
    compile: bool | None = None  # torch.compile of the DiT layers; None: on for CUDA, off elsewhere
    cp: int = 1  # context parallelism: ranks (processes, GPUs) one video's DiT calls are split over (Ulysses)
    max_queue: int = 64
    max_queue_per_key: int | None = None  # None: half of max_queue when several API keys are configured
    max_batch_size: int = 4
    memory_budget_bytes: int = 1 << 62
    max_body_bytes: int = 25 * 1024 * 1024
    job_timeout_s: float | None = 3600.0
    sync_timeout_s: float = 600.0  # WaveSpeed sync mode / fal run: how long a request may hold its connection
    max_attempts: int = 2  # runs of one job across crashes before it fails as "interrupted"
    max_prompt_chars: int = MAX_PROMPT_CHARS
    keep_jobs_s: float | None = 7 * 24 * 3600.0  # finished jobs and their files live this long; None: forever
    # hosted-API defaults for fields a provider does not expose (api-compat.md §8.4)
    default_num_frames: int = 96
    default_resolution: str = "720p"
    default_steps: int = 16
    # the longest video a request may ask for (--max-frames): one minute by default, WaveSpeed's documented bound;
    # every API takes up to this many (fal's own schema stops at 192, Magic Hour's at 60 s: longer is an extension)
    max_num_frames: int = 1440
    resolution_scale: float = 1.0  # < 1 renders every size smaller (the tiny preset uses 1/8 so a CPU keeps up)
    fal_queue_port: int | None = None  # TLS listeners for fal-client (it only speaks https)
    fal_run_port: int | None = None
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    cache_dir: str | None = None  # where the tiny preset's generated weights are kept
    allow_private_image_hosts: bool = False
    # --allow-private-urls: networks and host names a request's URLs may point at although private (media/fetch.py)
    allow_private_urls: tuple[str, ...] = ()
    prompt_enhancer: str | None = None  # a local causal LM checkpoint folder (runtime/prompt_enhancer.py)
    # a local image-classification checkpoint folder run on every output's chunks (runtime/safety_checker.py), and
    # the labels of it that flag a frame (empty: the checker's defaults, nsfw/porn/hentai/sexy); None: no checker
    safety_checker: str | None = None
    safety_labels: tuple[str, ...] = ()
    # signed file URLs (serving/files.py): None keeps a random secret in <outputs_dir>/.url-signing-key (0600)
    file_url_secret: str | None = None
    file_url_ttl_s: float = 24 * 3600.0  # how long a handed-out output/preview/upload URL works without a key
    # connections (serving/connections.py): the cap is also kept below the process's open-file limit
    max_connections: int = 1000
    header_timeout_s: float = 10.0  # a request's headers must be complete this long after it may start
    body_min_bytes_per_s: int = 16 * 1024  # a body must arrive at least this fast on average (after a 10 s grace)
    drain_timeout_s: float = 60.0  # on SIGTERM, how long the running jobs may take to finish before re-queueing
    # scale-out (serving/cluster.py, serving/worker.py): a worker's claim on a job lapses this long after its last
    # renewal (it renews every third of it), and then the job goes back to the queue
    lease_s: float = 30.0
    # s3://bucket/prefix: finished outputs and chunk previews live in that object store (serving/outputs.py), and
    # outputs_dir only holds what is being written, the uploads and the URL-signing secret; None: outputs_dir
    output_store: str | None = None
    worker_id: str | None = None  # a worker's name in the store's leases; None: host:pid:random
    # webhooks (serving/webhooks.py): attempts per delivery, and the backoff between them (jittered exponential from
    # webhook_backoff_s, at most webhook_backoff_max_s); a receiver gets webhook_timeout_s to answer
    webhook_attempts: int = 10
    webhook_backoff_s: float = 2.0
    webhook_backoff_max_s: float = 900.0
    webhook_timeout_s: float = 10.0

    def base_url(self) -> str:
        return (self.public_base_url or f"http://{self.host}:{self.port}").rstrip("/")
