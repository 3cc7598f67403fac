"""compose.yaml cannot be run here (no Docker engine), so it is linted: its structure (every service has an image or a
build, start-up order by conditions that can be met, the healthchecks those conditions wait for, host ports that do
not clash, a GPU for the worker, a drain that `docker stop` does not cut short) and, above all, every `magi-server`
command in it, which must parse with the CLI's own parser: a renamed or removed flag fails here, not on a GPU host.

Compose interpolates ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` in every value before anything else; the
lint does the same (the compose-spec rules for those forms, ``$$`` escaping a dollar), with the required variables
set as an operator must set them.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from urllib.parse import urlsplit

import pytest
import yaml

from magi_server.tools.cli import build_parser
from tests.golden_utils import REPO_ROOT

COMPOSE = REPO_ROOT / "compose.yaml"
DOCKERFILE = REPO_ROOT / "Dockerfile.cuda"
REQUIRED = {"MAGI_SERVER_URL_SECRET": "one secret", "MAGI_SERVER_API_KEYS": "key1,key2"}  # `${VAR:?...}` ones
_VARIABLE = re.compile(r"\$(?:\$|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


def interpolate(value, env: dict[str, str]):
    """``value`` (any YAML node) with compose's variable substitution applied to every string in it."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, argument = match.group(2), match.group(3) or ""
        present = name in env and (env[name] != "" or not (operator or "").startswith(":"))
        if present:
            return env[name]
        if operator and operator.endswith("?"):
            raise KeyError(f"{name} is required: {argument}")
        return argument if operator else ""

    return _VARIABLE.sub(substitute, value)


def required_variables(node) -> set[str]:
    """The names used as ``${VAR:?...}`` / ``${VAR?...}`` anywhere in the file."""
    text = json.dumps(node)
    return {m.group(1) for m in _VARIABLE.finditer(text) if m.group(2) and m.group(2).endswith("?")}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(raw) -> dict[str, dict]:
    return interpolate(raw, REQUIRED)["services"]


def _dockerfile_exec_form(instruction: str) -> list[str]:
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith(instruction + " ")]
    assert len(lines) == 1, f"one {instruction} in the exec form expected"
    return json.loads(lines[0][len(instruction) + 1:])


def argv(service: dict) -> list[str]:
    """The command a container of ``service`` runs: compose's entrypoint/command over the image's (an overridden
    entrypoint drops the image's CMD, as Docker does)."""
    built = "build" in service
    entrypoint = service.get("entrypoint")
    if entrypoint is None:
        entrypoint = _dockerfile_exec_form("ENTRYPOINT") if built else []
        command = service.get("command", _dockerfile_exec_form("CMD") if built else [])
    else:
        command = service.get("command", [])
    as_list = (lambda v: v.split() if isinstance(v, str) else list(v))
    return as_list(entrypoint) + as_list(command)


def parse_magi_server(args: list[str]) -> argparse.Namespace:
    """``magi-server args...`` through the CLI's parser; an unknown or misspelled flag fails with argparse's line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"magi-server {' '.join(args)}\ndoes not parse: {err.getvalue().strip()}")


def magi_commands(services: dict[str, dict]) -> dict[str, argparse.Namespace]:
    found = {}
    for name, service in services.items():
        command = argv(service)
        if command and command[0] == "magi-server":
            found[name] = parse_magi_server(command[1:])
    return found


def test_operator_secrets_are_required_not_defaulted(raw):
    """Compose refuses to start without the URL secret and the API keys instead of running with a made-up one."""
    assert required_variables(raw) == set(REQUIRED)
    for name in REQUIRED:
        with pytest.raises(KeyError, match=name):
            interpolate(raw, {k: v for k, v in REQUIRED.items() if k != name})


def test_every_service_has_an_image_or_a_build(services):
    assert {"postgres", "minio", "migrate", "api", "worker"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            build = service["build"]
            assert (REPO_ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve(), name
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["minio"]["image"].startswith("minio/minio:")
    bucket_jobs = [n for n, s in services.items() if str(s.get("image", "")).startswith("minio/mc:")]
    assert len(bucket_jobs) == 1, bucket_jobs


def test_every_magi_server_command_parses_with_the_cli(services):
    commands = magi_commands(services)
    assert {name: ns.command for name, ns in commands.items()} == {"migrate": "migrate", "api": "api",
                                                                  "worker": "worker"}
    for name, service in services.items():
        if "build" in service:  # the image's entrypoint is `serve ...`: every magi service states its own
            assert name in commands and service.get("entrypoint") == ["magi-server"], name


def test_processes_share_one_store_one_model_one_lease_and_the_bucket_that_is_made(services):
    commands = magi_commands(services)
    api, worker, migrate = commands["api"], commands["worker"], commands["migrate"]
    assert api.db == worker.db == migrate.db
    store = urlsplit(api.db)
    assert store.scheme == "postgresql" and store.hostname == "postgres" and not store.password
    assert store.username == services["postgres"]["environment"]["POSTGRES_USER"]
    assert store.path.lstrip("/") == services["postgres"]["environment"]["POSTGRES_DB"]
    assert api.model == worker.model and api.lease_seconds == worker.lease_seconds
    assert api.outputs == worker.outputs and api.outputs.startswith("s3://")
    bucket = urlsplit(api.outputs).netloc
    bucket_job = next(s for s in services.values() if str(s.get("image", "")).startswith("minio/mc:"))
    assert f"mb --ignore-existing local/{bucket}" in " ".join(argv(bucket_job))
    for name in ("api", "worker", "migrate"):
        env = services[name]["environment"]
        assert env["PGPASSWORD"] == services["postgres"]["environment"]["POSTGRES_PASSWORD"], name
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert urlsplit(env["AWS_ENDPOINT_URL"]).hostname == "minio", name
        assert env["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"], name
        assert env["AWS_SECRET_ACCESS_KEY"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"], name
        assert env["AWS_DEFAULT_REGION"], name
        assert any(v.split(":")[1] == "/weights" for v in services[name]["volumes"]), name  # HF_HOME in the image


def test_api_replicas_listen_with_keys_a_shared_secret_and_a_public_url(services):
    api = magi_commands(services)["api"]
    env = services["api"]["environment"]
    assert api.host == "0.0.0.0" and env["MAGI_SERVER_API_KEYS"] and env["MAGI_SERVER_URL_SECRET"]
    assert api.public_url and services["api"]["deploy"]["replicas"] >= 2
    assert any(port.rsplit(":", 1)[1] == str(api.port) for port in services["api"]["ports"])
    health = " ".join(services["api"]["healthcheck"]["test"])
    assert f"127.0.0.1:{api.port}/health/ready" in health


def test_start_up_order_waits_on_conditions_that_can_be_met(services):
    one_shot = {name for name, s in services.items() if s.get("restart") == "no"}
    assert {"migrate"} < one_shot
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions (the long form)"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on a missing service {target}"
            condition = spec["condition"]
            if condition == "service_healthy":
                check = services[target].get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), f"{target} has no healthcheck"
            else:
                assert condition == "service_completed_successfully", (name, condition)
                assert target in one_shot, f"{target} is waited on to finish but restarts"
    for name in ("api", "worker"):
        assert set(services[name]["depends_on"]) >= {"postgres", "minio", "migrate"} | (one_shot - {name})
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"

    def reaches(start: str, seen: tuple[str, ...] = ()) -> None:
        assert start not in seen, f"depends_on cycle: {' -> '.join((*seen, start))}"
        for target in services[start].get("depends_on", {}):
            reaches(target, (*seen, start))

    for name in services:
        reaches(name)


def test_no_inherited_healthcheck_on_processes_without_an_http_port(services):
    """The image's HEALTHCHECK polls port 8000: a worker or the migration would be marked unhealthy."""
    for name, command in magi_commands(services).items():
        if command.command in ("worker", "migrate"):
            assert services[name]["healthcheck"] == {"disable": True}, name


def test_host_ports_do_not_clash(services):
    taken: dict[int, str] = {}
    for name, service in services.items():
        replicas = service.get("deploy", {}).get("replicas", 1)
        for port in service.get("ports", []):
            host = str(port).rsplit(":", 1)[0].split(":")[-1]  # an optional IP in front
            first, _, last = host.partition("-")
            ports = range(int(first), int(last or first) + 1)
            assert len(ports) >= replicas, f"{name}: {replicas} replicas need {replicas} host ports, not {host}"
            for number in ports:
                assert number not in taken, f"host port {number}: {taken[number]} and {name}"
                taken[number] = name


def test_worker_reserves_an_nvidia_gpu_and_drains_before_docker_kills_it(services):
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and (d.get("device_ids") or d.get("count"))
               for d in devices), devices
    assert magi_commands(services)["worker"].device == "cuda"
    grace = re.fullmatch(r"(\d+)s", worker["stop_grace_period"])
    assert grace and int(grace.group(1)) > magi_commands(services)["worker"].drain_timeout


def test_named_volumes_are_declared(raw, services):
    declared = set(raw.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(("/", ".", "~")):
                assert source in declared, f"{name}: volume {source} is not declared"


def test_interpolation_follows_the_compose_rules():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("$$HOME ${SET} $SET ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET}", env) == "$HOME x x d d  "
    with pytest.raises(KeyError):
        interpolate("${EMPTY:?needed}", env)
    assert interpolate("${EMPTY?needed}", env) == ""
