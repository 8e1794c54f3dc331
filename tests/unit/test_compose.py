"""Static checks of compose.yaml: docker-compose 1.29 validates it, and its shape is right.

No Docker engine is needed: `docker-compose config` only parses and resolves the file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from inferq.cli import build_parser

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
DEV_DEFAULT = re.compile(r"^\$\{POSTGRES_PASSWORD:-[^}]*\}$")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE_KEY", re.IGNORECASE)
# a YAML key or a `- KEY=value` list item whose name looks like a secret, with a value
SECRET_LINE = re.compile(
    r"^\s*(?:-\s*)?[\"']?(\w*(?:PASSWORD|SECRET|TOKEN|API_KEY)\w*)[\"']?\s*[:=]\s*([^#\s].*?)\s*$",
    re.IGNORECASE,
)
URL_CREDENTIALS = re.compile(r"://[^:/@\s]+:([^@\s]+)@")
SERVICES = {"redis", "postgres", "migrate", "model", "worker", "worker-gpu", "enqueue", "gateway"}


def _docker_compose(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"}
    return subprocess.run(
        [exe, "-f", str(COMPOSE_FILE), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with COMPOSE_FILE.open() as f:
        return yaml.safe_load(f)


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_docker_compose_config_is_valid() -> None:
    result = _docker_compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_docker_compose_resolves_all_profiles() -> None:
    result = _docker_compose("--profile", "gpu", "--profile", "sample", "config")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == SERVICES
    worker_env = _env(resolved["services"]["worker"])
    assert worker_env["INFERQ_DATABASE_URL"] == (
        "postgresql+psycopg://inferq:inferq@postgres:5432/inferq"
    )
    assert _env(resolved["services"]["worker-gpu"])["INFERQ_DEVICE"] == "cuda"


def test_services_exist(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "Compose spec file: no top-level version"
    assert set(compose["services"]) == SERVICES
    assert {"redis-data", "postgres-data", "models"} <= set(compose["volumes"])


def test_worker_waits_for_backends_migrate_and_model(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("worker", "worker-gpu"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["model"]["condition"] == "service_completed_successfully"
        assert services[name]["command"] == ["worker"]
        assert "models:/data" in services[name]["volumes"]
        env = _env(services[name])
        assert env["INFERQ_BROKER_URL"] == "redis://redis:6379/0"
        assert env["INFERQ_DATABASE_URL"].startswith("postgresql+psycopg://inferq:")
        assert env["INFERQ_DATABASE_URL"].endswith("@postgres:5432/inferq")
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("migrate", "model", "enqueue"):
        assert services[name]["restart"] == "no"
    assert services["migrate"]["command"] == ["migrate"]
    assert services["model"]["command"] == ["model", "prepare"]
    assert "models:/data" in services["model"]["volumes"]
    assert "profiles" not in services["worker"]


def test_gpu_profile_reserves_an_nvidia_device(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert _env(gpu)["INFERQ_DEVICE"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices
    assert "TORCH_INDEX" in gpu["build"]["args"]


def test_sample_profile_submits_and_waits(compose: dict[str, Any]) -> None:
    enqueue = compose["services"]["enqueue"]
    assert enqueue["profiles"] == ["sample"]
    command = enqueue["command"]
    assert command[0] == "submit"
    assert "--wait" in command
    assert build_parser().parse_args(command).text == "What is the capital of France?"


def test_every_inferq_command_parses(compose: dict[str, Any]) -> None:
    """The commands compose runs are real verbs of our CLI."""
    for name, service in compose["services"].items():
        if service.get("image", "").startswith(("redis", "postgres")):
            continue
        build_parser().parse_args(service["command"])  # exits (fails) on an unknown verb
        assert name


def test_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["redis"]["image"] == "redis:7-alpine"
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    assert "--appendonly" in services["redis"]["command"]
    assert services["postgres"]["image"] == "postgres:15-alpine"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "inferq"
    for name in ("worker", "worker-gpu"):
        worker = services[name]
        assert "/readyz" in " ".join(worker["healthcheck"]["test"])
        assert _env(worker)["INFERQ_METRICS_PORT"] in " ".join(worker["healthcheck"]["test"])
    assert services["enqueue"]["depends_on"]["worker"]["condition"] == "service_healthy"


def test_no_plaintext_secrets(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key, value in _env(service).items():
            if SECRET_KEY.search(key):
                assert DEV_DEFAULT.match(value), f"{name}: {key} is a plaintext secret"
    text = COMPOSE_FILE.read_text()
    for password in URL_CREDENTIALS.findall(text):
        assert DEV_DEFAULT.match(password), f"plaintext password in a URL: {password}"
    for line in text.splitlines():
        match = SECRET_LINE.match(line)
        if match:
            value = match.group(2).strip().strip("'\"")
            assert DEV_DEFAULT.match(value), f"plaintext secret: {line.strip()}"


def test_gateway_serves_on_its_port_after_migrate(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    args = build_parser().parse_args(gateway["command"])
    assert (args.verb, args.host, args.port) == ("serve", "0.0.0.0", 8000)
    assert f"{args.port}/healthz" in " ".join(gateway["healthcheck"]["test"])
    assert gateway["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert _env(gateway)["INFERQ_BROKER_URL"] == "redis://redis:6379/0"
