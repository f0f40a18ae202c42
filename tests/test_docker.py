"""docker/: what can be checked without a Docker engine (the stack itself runs in
test_compose_stack.py, `make test-docker`). The compose tool validates the file where there is
one; the rest holds everywhere: ports bound to 127.0.0.1, health checks, named volumes, the
password only in a secret file, an image whose processes run unprivileged, and a worker command
that our own CLI accepts."""

from __future__ import annotations

import os
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


def compose_tool() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.mark.skipif(compose_tool() is None, reason="no compose tool here (neither docker-compose "
                    "nor the docker compose plugin); the structure is checked by the other tests")
def test_the_compose_tool_accepts_the_file(tmp_path):
    """docker-compose 1.29 refuses what compose v2 alone knows (a top-level `name:`, say)."""
    secret = tmp_path / "pg_password"
    secret.write_text("x")
    out = subprocess.run([*compose_tool(), "-f", str(DOCKER / "compose.yaml"), "--env-file",
                          str(DOCKER / ".env.example"), "config", "--quiet"],
                         capture_output=True, text=True, env={**os.environ, "PG_PASSWORD_FILE": str(secret)})
    assert out.returncode == 0, out.stderr
    assert "name" not in compose_file()  # the top-level key 1.29 refuses


def test_services_health_checks_volumes_and_loopback_ports():
    compose = compose_file()
    services = compose["services"]
    assert set(services) == {"postgres", "pgbouncer", "mlflow", "worker"}
    for name in ("postgres", "pgbouncer", "mlflow"):
        assert "test" in services[name]["healthcheck"]
    for name in ("mlflow", "worker"):  # the database only through the pooler
        assert "pgbouncer" in services[name]["depends_on"] and "postgres" not in services[name]["depends_on"]
        assert "@pgbouncer:6432/" in str(services[name]["environment"])
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


def test_the_password_is_a_secret_file_never_a_variable_or_argument():
    compose = compose_file()
    text = (DOCKER / "compose.yaml").read_text()
    assert "PASSWORD}" not in text and "POSTGRES_PASSWORD:" not in text  # no ${..._PASSWORD}
    assert compose["secrets"]["pg_password"]["file"].endswith("secrets/pg_password}")
    for name, service in compose["services"].items():
        assert service["secrets"] == ["pg_password"], name
        environment = service["environment"]
        assert environment.get("PGPASSWORD_FILE", environment.get("POSTGRES_PASSWORD_FILE")) == \
            "/run/secrets/pg_password", name
        for url in [substitute(v, env_example()) for v in environment.values() if "postgresql://" in str(v)]:
            assert ":" not in url.split("://", 1)[1].split("@", 1)[0], url  # user, no password
    used = set(re.findall(r"\$\{(\w+)", text))
    assert used <= set(env_example()), f"not in .env.example: {used - set(env_example())}"
    for path in ("docker/.env", "docker/secrets/pg_password", "docker/extra-ca/host.crt"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert ignored.returncode == 0, f"{path} must be git-ignored"


def test_the_image_drops_root_after_reading_its_secrets():
    """The entry point reads the secret as root, exports it as PGPASSWORD (libpq's own variable,
    used for password-less postgresql:// URLs), then runs the command as `sweep`."""
    dockerfile = (DOCKER / "Dockerfile").read_text()
    entrypoint = (DOCKER / "entrypoint.sh").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'ENTRYPOINT ["mnist-sweep-entrypoint"]' in dockerfile
    assert "useradd --create-home --uid 1000 sweep" in dockerfile
    assert "exec setpriv --reuid=sweep --regid=sweep --init-groups" in entrypoint
    assert 'PGPASSWORD="$(cat "$PGPASSWORD_FILE")"' in entrypoint
    assert "ARG BASE=" in dockerfile and "ARG TORCH_INDEX=" in dockerfile  # CPU default, CUDA by arg
    for pin in re.findall(r"torch(?:vision)?==[\d.]+", dockerfile):
        assert pin in pyproject, pin


def test_the_worker_command_is_one_our_cli_accepts(tmp_path):
    """The compose worker's command and environment, resolved with .env.example, through
    `--show` (opens nothing)."""
    worker = compose_file()["services"]["worker"]
    command = [substitute(str(a), env_example()) for a in worker["command"]]
    assert command[:3] == ["python", "-m", "mnist_sweep.sweep"]
    storage = substitute(worker["environment"]["SWEEP_STORAGE"], env_example())
    out = run_cli("mnist_sweep.sweep", *command[3:], "--show", cwd=tmp_path,
                  env={"SWEEP_STORAGE": storage})
    assert out.returncode == 0, out.stderr
    assert "storage: postgresql://mnist@pgbouncer:6432/optuna" in out.stdout
