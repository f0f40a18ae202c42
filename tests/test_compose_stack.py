"""The compose stack, for real (`make test-docker`, its own tier): the images are built, PostgreSQL,
PgBouncer (every database connection goes through it), the MLflow server and 3 sweep workers come
up from docker/compose.yaml, a small sweep runs to
exactly n_trials with one FINISHED child run per trial read back from this machine through the
MLflow API, a worker container killed mid-trial has its trial retried, and `down -v` leaves no
container or volume behind.

Where no image registry is reachable (this machine), stand-ins replace the official bases, built
from Debian's packages by docker/standin/build.sh: mnist-sweep-standin/postgres:15 (Debian's
postgresql-15 with an entry point keeping postgres:15's env contract) for postgres:15, and
mnist-sweep-standin/python:3.11-slim (Debian's python3.11) for python:3.11-slim. Where
PyTorch's CPU wheel index is unreachable (this machine), torch comes from PyPI (the CUDA build).
The compose file and Dockerfile are the same either way: only their variables differ.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, make_synthetic_mnist, study_runs, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.timeout(3600)]  # a first build takes ~10 min
DOCKER = REPO / "docker"
PASSWORD = "compose/pw@with:odd#chars"  # raw in the secret file: never in a URL
N_TRIALS, EPOCHS = 9, 30


def sh(*cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def engine_runs() -> bool:
    return shutil.which("docker") is not None and sh("docker", "info", check=False).returncode == 0


@pytest.fixture(scope="module")
def engine():
    """A Docker engine: the running one, or dockerd started here (root, overlay2)."""
    if not engine_runs():
        if os.geteuid() != 0 or shutil.which("dockerd") is None:
            pytest.skip("no Docker engine runs and none can be started here (needs root and "
                        "dockerd: apt-get install docker.io docker-compose)")
        log = open(tempfile.gettempdir() + "/mnist-sweep-dockerd.log", "ab")
        subprocess.Popen(["dockerd", "--storage-driver=overlay2"], stdout=log, stderr=log,
                         start_new_session=True)
        deadline = time.time() + 60
        while not engine_runs():
            assert time.time() < deadline, "dockerd did not start; see /tmp/mnist-sweep-dockerd.log"
            time.sleep(1)
    compose = shutil.which("docker-compose")
    if compose is None and sh("docker", "compose", "version", check=False).returncode != 0:
        pytest.skip("no compose tool (docker-compose or the docker compose plugin)")
    return [compose] if compose else ["docker", "compose"]


def available(image: str) -> bool:
    return (sh("docker", "image", "inspect", image, check=False).returncode == 0
            or sh("docker", "pull", "-q", image, check=False).returncode == 0)


@pytest.fixture(scope="module")
def images(engine) -> dict[str, str]:
    """The official bases where a registry serves them, else the stand-ins; then our image."""
    names = {"POSTGRES_IMAGE": "postgres:15", "PYTHON_IMAGE": "python:3.11-slim",
             "PGBOUNCER_BASE_IMAGE": "debian:bookworm-slim"}
    if not all(available(image) for image in names.values()):
        sh(str(DOCKER / "standin" / "build.sh"))
        names = {"POSTGRES_IMAGE": "mnist-sweep-standin/postgres:15",
                 "PYTHON_IMAGE": "mnist-sweep-standin/python:3.11-slim",
                 "PGBOUNCER_BASE_IMAGE": "mnist-sweep-standin/debian:bookworm-pgbouncer"}
    cpu_index = sh("python3", "-c", "import urllib.request; urllib.request.urlopen("
                   "'https://download.pytorch.org/whl/cpu/torch/', timeout=10)", check=False)
    torch_index = "https://download.pytorch.org/whl/cpu" if cpu_index.returncode == 0 else ""
    bundle, extra = Path("/etc/ssl/certs/ca-certificates.crt"), DOCKER / "extra-ca" / "host-bundle.crt"
    if bundle.exists():  # what this machine's pip trusts (a TLS-inspecting proxy's CA, here)
        shutil.copy(bundle, extra)
    names["MNIST_SWEEP_IMAGE"] = "mnist-sweep:test"
    names["PGBOUNCER_IMAGE"] = "mnist-sweep-pgbouncer:test"
    started = time.time()
    sh("docker", "build", "--network", "host", "-q", "--build-arg",
       f"BASE={names['PGBOUNCER_BASE_IMAGE']}", "-t", names["PGBOUNCER_IMAGE"],
       str(DOCKER / "pgbouncer"), timeout=900)
    try:
        sh("docker", "build", "--network", "host", "-q", "-f", str(DOCKER / "Dockerfile"),
           "--build-arg", f"BASE={names['PYTHON_IMAGE']}", "--build-arg", f"TORCH_INDEX={torch_index}",
           "-t", names["MNIST_SWEEP_IMAGE"], str(REPO), timeout=1800)
    finally:
        extra.unlink(missing_ok=True)
    print(f"\nimages: {names} (torch from {torch_index or 'PyPI'}), built in {time.time() - started:.0f} s")
    return names


def free_port() -> int:
    from mnist_sweep.servers.local import free_port as port

    return port()


def test_the_compose_stack_runs_a_sweep_survives_a_killed_worker_and_tears_down(engine, images, tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from mnist_sweep.base.urls import with_password

    project = f"mnist-sweep-test-{os.getpid()}"
    folder = Path(tempfile.mkdtemp(prefix="mnist-sweep-compose-"))
    folder.chmod(0o755)
    data = make_synthetic_mnist(folder / "data")
    for path in [data, *data.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # readable by the image's user `sweep`
    secret = folder / "pg_password"
    secret.write_text(PASSWORD)
    secret.chmod(0o600)  # root's only: the entry point reads it before dropping privileges
    pg_port, mlflow_port = free_port(), free_port()
    env = {**os.environ, **images, "MNIST_DATA": str(data), "PG_PASSWORD_FILE": str(secret),
           "POSTGRES_PORT": str(pg_port), "MLFLOW_PORT": str(mlflow_port), "SWEEP": "momentum"}
    # The only change to the shipped compose file: a small sweep that a killed worker can cut.
    (folder / "small-sweep.yaml").write_text(f"""
services:
  worker:
    command: ["python", "-m", "mnist_sweep.sweep", "--sweep", "momentum", "sweep.workers=1",
              "sweep.quiet=true", "sweep.n_trials={N_TRIALS}", "sweep.pruner=none",
              "sweep.heartbeat_interval=1", "sweep.grace_period=10", "data.download=false",
              "data.val_size=100", "train.batch_size=50", "train.epochs={EPOCHS}", "train.threads=1"]
""")
    compose = [*engine, "-p", project, "-f", str(DOCKER / "compose.yaml"), "-f",
               str(folder / "small-sweep.yaml")]
    storage = with_password("postgresql", "mnist", PASSWORD, "127.0.0.1", pg_port, "optuna")
    tracking = f"http://127.0.0.1:{mlflow_port}"
    started = time.time()
    try:
        sh(*compose, "up", "-d", "--no-build", "--scale", "worker=3", env=env, timeout=600)
        up = time.time() - started

        def study():
            return optuna.load_study(study_name="momentum", storage=storage)

        victim = wait_for(lambda: next((t for t in study().trials if t.state == TrialState.RUNNING
                                        and t.intermediate_values and "mlflow_run_id" in t.user_attrs), None),
                          "a trial mid-way in a worker container", 300)
        # every connection to the study's and the runs' databases comes from PgBouncer
        (pooler,) = sh(*compose, "ps", "-q", "pgbouncer", env=env).stdout.split()
        pooler_address = inspect(pooler, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")
        import psycopg

        with psycopg.connect(storage) as c:
            # (this test's own connections come from the host's side of the compose network)
            clients = c.execute(
                "select distinct host(client_addr) from pg_stat_activity where datname in "
                "('optuna', 'mlflow') and client_addr is distinct from (select client_addr "
                "from pg_stat_activity where pid = pg_backend_pid())").fetchall()
        assert clients == [(pooler_address,)], (clients, pooler_address)
        container = victim.user_attrs["worker"].split(":")[0]  # the container's host name: its id
        sh("docker", "kill", container)  # SIGKILL: no cleanup in that container
        killed_at = time.time() - started
        wait_for(lambda: len([t for t in study().trials
                              if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) >= N_TRIALS,
                 "the study's n_trials", 600)
        workers = sh(*compose, "ps", "-q", "worker", env=env).stdout.split()
        wait_for(lambda: all(inspect(c, "{{.State.Status}}") == "exited" for c in workers),
                 "the workers to exit", 120)
        swept = time.time() - started

        trials = study().trials
        done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len(done) == N_TRIALS and len({t.number for t in done}) == N_TRIALS
        cut = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("excess")]
        assert [t.number for t in cut] == [victim.number]
        retried = [t for t in done if t.system_attrs.get("failed_trial") == victim.number]
        assert len(retried) == 1 and retried[0].params == victim.params
        hosts = {t.user_attrs["worker"].split(":")[0] for t in done}
        assert len(hosts) >= 2 and container not in {t.user_attrs["worker"].split(":")[0] for t in retried}

        client = MlflowClient(tracking)  # from this machine, by the published port
        parents, children = study_runs(client, "momentum")
        assert len(parents) == 1
        by_trial = {}
        for run in children:
            by_trial.setdefault(int(run.data.tags["trial_number"]), []).append(run)
        for t in done:  # one FINISHED child run per finished trial, with its curves
            (run,) = by_trial[t.number]
            assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
            assert len(client.get_metric_history(run.info.run_id, "val_acc")) == EPOCHS
        (killed_run,) = by_trial[victim.number]
        assert killed_run.info.status == "FAILED"

        codes = {c: inspect(c, "{{.State.ExitCode}}") for c in workers}
        assert codes.pop(next(c for c in codes if c.startswith(container))) == "137"  # SIGKILL
        assert set(codes.values()) == {"0"}
        for c in sh(*compose, "ps", "-q", env=env).stdout.split():  # no password shown anywhere
            shown = sh("docker", "inspect", c).stdout
            assert PASSWORD not in shown and "pg_password" in shown
        for c in sh(*compose, "ps", "-q", "mlflow", "postgres", "pgbouncer", env=env).stdout.split():
            processes = sh("docker", "top", c, "-eo", "pid,user,args").stdout
            assert PASSWORD not in processes
            users = {line.split()[1] for line in processes.splitlines()[1:]}
            assert users and "root" not in users, processes  # runs unprivileged
        print(f"\ncompose stack: up {up:.0f} s, worker killed at {killed_at:.0f} s, "
              f"{N_TRIALS} trials done and workers exited at {swept:.0f} s")
    finally:
        logs = sh(*compose, "logs", "--no-color", env=env, check=False).stdout
        down = sh(*compose, "down", "-v", "--remove-orphans", env=env, check=False, timeout=300)
        shutil.rmtree(folder, ignore_errors=True)
    assert down.returncode == 0, down.stderr
    assert PASSWORD not in logs
    assert not sh("docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}").stdout.strip()
    assert not sh("docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}").stdout.strip()


def inspect(container: str, template: str) -> str:
    return sh("docker", "inspect", "-f", template, container).stdout.strip()
