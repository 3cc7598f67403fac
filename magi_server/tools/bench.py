"""``magi-server bench``: drive a WaveSpeed-compatible endpoint with a workload and report speed and cost.

Works against this server or the hosted WaveSpeed API (given a key): it submits the workload's requests with the
given concurrency, polls each prediction until it is terminal (and, where the server streams events, records the
time to the first finished chunk), then reports per-request latency (p50 / p90 / max), videos per hour, and the
cost per video twice: the hosted list price from the providers' published pricing rules (api-compat.md §6) and the
self-hosted cost from a GPU price per hour. It writes a JSON result and a Markdown table.

Pricing rules (n = frames, s = steps, r = 1 for 720p and 0.5 for 480p):
* WaveSpeed ``wavespeed-ai/magi-1-24b``: $0.08 x ceil(n / 24)
* fal ``fal-ai/magi/image-to-video`` (and ``fal-ai/magi``): $0.20 x ceil(n / 24) x r x max(1, s / 16)
* fal ``fal-ai/magi-distilled``: $0.08 x ceil(n / 24) x r x max(1, s / 16)
Magic Hour publishes no MAGI-1 price, so it has none.
"""
from __future__ import annotations

import json
import math
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

PRICED_APIS = ("wavespeed-ai/magi-1-24b", "fal-ai/magi/image-to-video", "fal-ai/magi", "fal-ai/magi-distilled")


def hosted_price(api: str, *, num_frames: int, resolution: str = "720p", steps: int = 16) -> float | None:
    """The hosted list price in dollars of one request (None when the provider publishes none)."""
    units = math.ceil(num_frames / 24)
    tier = {"720p": 1.0, "480p": 0.5}.get(resolution)
    if api == "wavespeed-ai/magi-1-24b":
        return round(0.08 * units, 6)
    if tier is None:
        raise ValueError(f"resolution must be 480p or 720p for fal pricing, got {resolution!r}")
    step_factor = max(1.0, steps / 16)
    if api in ("fal-ai/magi/image-to-video", "fal-ai/magi"):
        return round(0.20 * units * tier * step_factor, 6)
    if api == "fal-ai/magi-distilled":
        return round(0.08 * units * tier * step_factor, 6)
    return None


@dataclass(frozen=True)
class Workload:
    requests: tuple[dict, ...]  # WaveSpeed bodies; cycled until ``count`` requests were sent
    model: str = "wavespeed-ai/magi-1-24b"
    count: int = 4
    concurrency: int = 1
    price_as: tuple[str, ...] = PRICED_APIS  # which hosted prices to compare with
    defaults: dict = field(default_factory=lambda: {"num_frames": 96, "resolution": "720p", "num_inference_steps": 16})

    @classmethod
    def load(cls, path: str | Path) -> "Workload":
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("requests"), list) or not data["requests"]:
            raise ValueError(f"{path}: a workload is a JSON object with a non-empty 'requests' list")
        for i, body in enumerate(data["requests"]):
            if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
                raise ValueError(f"{path}: requests[{i}] must be an object with a 'prompt' string")
        count = int(data.get("count", len(data["requests"])))
        concurrency = int(data.get("concurrency", 1))
        if count < 1 or concurrency < 1:
            raise ValueError(f"{path}: count and concurrency must be >= 1")
        return cls(
            requests=tuple(data["requests"]), model=data.get("model", cls.model), count=count,
            concurrency=concurrency, price_as=tuple(data.get("price_as", PRICED_APIS)),
            defaults={**cls.__dataclass_fields__["defaults"].default_factory(), **data.get("defaults", {})},
        )


@dataclass
class RequestResult:
    index: int
    status: str
    latency_s: float
    first_chunk_s: float | None
    num_frames: int
    resolution: str
    steps: int
    hosted_cost: dict[str, float | None]
    error: str = ""
    output: str = ""


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run(
    client,
    workload: Workload,
    *,
    api_key: str | None = None,
    gpu_dollars_per_hour: float | None = None,
    poll_s: float = 0.5,
    timeout_s: float = 3600.0,
    stream: bool = True,
) -> dict:
    """Run the workload with ``client`` (an httpx.Client whose base_url is the endpoint) and return the report."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[RequestResult] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        body = {**workload.defaults, **workload.requests[index % len(workload.requests)]}
        frames = int(body.get("num_frames", 96))
        resolution = str(body.get("resolution", "720p"))
        steps = int(body.get("num_inference_steps", 16))
        costs = {}
        for api in workload.price_as:
            try:
                costs[api] = hosted_price(api, num_frames=frames, resolution=resolution, steps=steps)
            except ValueError:
                costs[api] = None
        start = time.monotonic()
        first_chunk = None
        try:
            response = client.post(f"/api/v3/{workload.model}", json=body, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"submit answered {response.status_code}: {response.text[:200]}")
            job_id = response.json()["data"]["id"]
            if stream:
                first_chunk = _time_to_first_chunk(client, job_id, headers, start, timeout_s)
            data = _poll(client, job_id, headers, poll_s, start + timeout_s)
            status = data["status"]
            error = data.get("error", "")
            output = (data.get("outputs") or [""])[0]
        except Exception as exc:  # one failing request is a result, not the end of the benchmark
            status, error, output = "error", str(exc), ""
        result = RequestResult(index, status, time.monotonic() - start, first_chunk, frames, resolution, steps,
                               costs, error, output)
        with lock:
            results.append(result)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=workload.concurrency) as pool:
        list(pool.map(one, range(workload.count)))
    wall_s = time.monotonic() - started
    return _report(workload, sorted(results, key=lambda r: r.index), wall_s, gpu_dollars_per_hour)


def _poll(client, job_id: str, headers: dict, poll_s: float, deadline: float) -> dict:
    while True:
        data = client.get(f"/api/v3/predictions/{job_id}/result", headers=headers).json()["data"]
        if data["status"] in ("completed", "failed", "cancelled", "timeout", "deleted"):
            return data
        if time.monotonic() > deadline:
            raise TimeoutError(f"prediction {job_id} not finished in time")
        time.sleep(poll_s)


def _time_to_first_chunk(client, job_id: str, headers: dict, start: float, timeout_s: float) -> float | None:
    """Seconds from submit to the first ``chunk`` event (None when the endpoint does not stream)."""
    try:
        with client.stream("GET", f"/api/v3/predictions/{job_id}/events", headers=headers,
                           timeout=timeout_s) as response:
            if response.status_code != 200:
                return None
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[len("event: "):].strip()
                    if event == "chunk":
                        return time.monotonic() - start
                    if event in ("completed", "failed", "cancelled"):
                        return None
    except Exception:  # the hosted APIs have no event stream: that is "n/a", not a failure
        return None
    return None


def _report(workload: Workload, results: list[RequestResult], wall_s: float, gpu_per_hour: float | None) -> dict:
    done = [r for r in results if r.status == "completed"]
    latencies = [r.latency_s for r in done]
    firsts = [r.first_chunk_s for r in done if r.first_chunk_s is not None]
    videos_per_hour = len(done) / wall_s * 3600 if wall_s > 0 and done else 0.0
    self_cost = None
    if gpu_per_hour is not None and done:
        self_cost = gpu_per_hour * (wall_s / 3600) / len(done)
    hosted = {}
    for api in workload.price_as:
        prices = [r.hosted_cost.get(api) for r in done]
        hosted[api] = None if not prices or any(p is None for p in prices) else round(sum(prices) / len(prices), 6)
    return {
        "model": workload.model,
        "count": workload.count,
        "concurrency": workload.concurrency,
        "completed": len(done),
        "failed": len(results) - len(done),
        "wall_seconds": round(wall_s, 3),
        "latency_seconds": {
            "p50": _percentile(latencies, 0.5), "p90": _percentile(latencies, 0.9),
            "max": max(latencies) if latencies else None,
            "mean": statistics.fmean(latencies) if latencies else None,
        },
        "time_to_first_chunk_seconds": {"p50": _percentile(firsts, 0.5), "max": max(firsts) if firsts else None},
        "videos_per_hour": round(videos_per_hour, 3),
        "hosted_cost_per_video": hosted,
        "self_hosted_cost_per_video": None if self_cost is None else round(self_cost, 6),
        "gpu_dollars_per_hour": gpu_per_hour,
        "requests": [asdict(r) for r in results],
    }


def markdown(report: dict) -> str:
    def fmt(value, unit=""):
        if value is None:
            return "n/a"
        return f"{value:.2f}{unit}" if isinstance(value, float) else f"{value}{unit}"

    lat, first = report["latency_seconds"], report["time_to_first_chunk_seconds"]
    lines = [
        f"# magi-server bench: {report['model']}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| requests (completed / failed) | {report['completed']} / {report['failed']} |",
        f"| concurrency | {report['concurrency']} |",
        f"| latency p50 / p90 / max | {fmt(lat['p50'], ' s')} / {fmt(lat['p90'], ' s')} / {fmt(lat['max'], ' s')} |",
        f"| time to first chunk p50 | {fmt(first['p50'], ' s')} |",
        f"| videos per hour | {fmt(report['videos_per_hour'])} |",
        f"| self-hosted cost per video | {fmt(report['self_hosted_cost_per_video'], ' $')} "
        f"(at {fmt(report['gpu_dollars_per_hour'], ' $/h')}) |",
    ]
    for api, price in report["hosted_cost_per_video"].items():
        lines.append(f"| hosted list price per video, {api} | {fmt(price, ' $')} |")
    lines += ["", "| # | status | frames | resolution | steps | latency | first chunk | " +
              " | ".join(report["hosted_cost_per_video"]) + " |",
              "|---" * (7 + len(report["hosted_cost_per_video"])) + "|"]
    for r in report["requests"]:
        costs = " | ".join(fmt(r["hosted_cost"].get(api), " $") for api in report["hosted_cost_per_video"])
        lines.append(f"| {r['index']} | {r['status']} | {r['num_frames']} | {r['resolution']} | {r['steps']} | "
                     f"{fmt(r['latency_s'], ' s')} | {fmt(r['first_chunk_s'], ' s')} | {costs} |")
    return "\n".join(lines) + "\n"
