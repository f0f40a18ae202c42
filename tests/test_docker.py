"""docker/: what can be checked without a Docker engine. `docker compose config` validates the
compose file where the client has compose; the rest holds everywhere: ports bound to 127.0.0.1,
health checks, named volumes, credentials only from the environment, and a worker command that
our own CLI accepts."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO, run_cli

DOCKER = REPO / "docker"


def compose_file() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def env_example() -> dict[str, str]:
    lines = (DOCKER / ".env.example").read_text().splitlines()
    return dict(l.split("=", 1) for l in lines if l.strip() and not l.startswith("#"))


def substitute(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?message}, as compose resolves them."""
    def one(match):
        name, op, rest = match.group(1), match.group(2), match.group(3)
        return env.get(name) or (rest if op == ":-" else "")
    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, text)


def has_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not has_compose(), reason="this docker client has no compose plugin "
                    "('docker compose' is an unknown command), so `docker compose config` cannot "
                    "run here; the structure is checked by the other tests in this file")
def test_docker_compose_config_validates(tmp_path):
    out = subprocess.run(["docker", "compose", "-f", str(DOCKER / "compose.yaml"), "--env-file",
                          str(DOCKER / ".env.example"), "config", "--quiet"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_services_health_checks_volumes_and_loopback_ports():
    compose = compose_file()
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "worker"}
    for name in ("postgres", "mlflow"):
        assert "test" in services[name]["healthcheck"]
    for dependency in services["worker"]["depends_on"].values():
        assert dependency == {"condition": "service_healthy"}
    for name, service in services.items():
        for port in service.get("ports", []):  # nothing published beyond this machine
            assert port.startswith("127.0.0.1:"), (name, port)
    assert "ports" not in services["worker"]  # workers only connect out, and they scale
    assert set(compose["volumes"]) == {"pgdata", "mlartifacts"}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in compose["volumes"] or source.startswith((".", "${")), (name, volume)


def test_credentials_come_from_the_environment_only():
    text = (DOCKER / "compose.yaml").read_text()
    assert "${POSTGRES_PASSWORD:?" in text  # compose refuses to start without one
    example = env_example()
    password = example["POSTGRES_PASSWORD"]
    assert password not in text.replace("POSTGRES_PASSWORD", "")
    used = set(re.findall(r"\$\{(\w+)", text))
    assert used <= set(example), f"not in .env.example: {used - set(example)}"
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO)
    assert ignored.returncode == 0, "docker/.env must be git-ignored"


def test_the_worker_image_runs_unprivileged_with_the_projects_pins():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    assert "ARG BASE=" in dockerfile and "ARG TORCH_INDEX=" in dockerfile  # CPU default, CUDA by arg
    for pin in re.findall(r"torch(?:vision)?==[\d.]+", dockerfile):
        assert pin in pyproject, pin


def test_the_worker_command_is_one_our_cli_accepts(tmp_path):
    """The compose worker's command, resolved with .env.example, through `--show` (opens nothing)."""
    worker = compose_file()["services"]["worker"]
    args = [substitute(str(a), env_example()) for a in worker["command"]]
    out = run_cli("mnist_sweep.sweep", *args, "--show", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "storage: postgresql://mnist:***@postgres:5432/optuna" in out.stdout
    assert env_example()["POSTGRES_PASSWORD"] not in out.stdout
