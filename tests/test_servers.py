"""Against real servers: a PostgreSQL started here (as an unprivileged user, on 127.0.0.1) for the
Optuna study, and an `mlflow server` backed by it for tracking."""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import PG_PASSWORD, finish, hides_password, needs_postgres, run_cli, study_runs
from test_sweep import TINY

pytestmark = needs_postgres


@pytest.mark.slow  # 8 workers x 120 trials on the same servers: tests/test_load.py (slow tier too)
def test_two_workers_on_postgres_and_an_mlflow_server(servers, tmp_path, mnist_dir):
    out = run_cli("mnist_sweep.sweep", "--sweep", "momentum_decay", "sweep.n_trials=6",
                  "sweep.workers=2", "sweep.confirm.top=0", f"sweep.storage={servers.storage_url}",
                  f"tracking.tracking_uri={servers.tracking_url}", f"data.root={mnist_dir}", *TINY,
                  cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="momentum_decay", storage=servers.storage_url)
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 6 and len({t.number for t in done}) == 6
    client = MlflowClient(servers.tracking_url)
    parent, trial_runs = study_runs(client, "momentum_decay")
    runs = parent + trial_runs
    assert len(parent) == 1
    assert parent[0].data.tags["storage"].startswith("postgresql://mnist:***@127.0.0.1:")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(r.data.tags["trial_number"] for r in children) == sorted(str(t.number) for t in done)
    for child in children:  # exactly one run per trial, with its curves
        assert child.data.metrics["val_acc"] >= 0 and child.info.status == "FINISHED"
        assert len(client.get_metric_history(child.info.run_id, "batch_train_loss")) > 0
    for text in (out.stdout, out.stderr, servers.mlflow_log.read_text()):
        assert hides_password(text)
    for run in runs:
        assert hides_password(str(run.data.params) + str(run.data.tags))
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_worker_killed_mid_trial_against_the_servers(servers, tmp_path, mnist_dir):
    from test_sweep import kill_a_worker_mid_trial

    kill_a_worker_mid_trial(tmp_path, mnist_dir, servers.storage_url, servers.tracking_url)


@pytest.mark.slow  # three whole sweeps at once (~40 s of a 2-core machine)
def test_drivers_started_together_on_a_new_study_share_one_parent_run(servers, tmp_path, mnist_dir):
    """A cluster array (or docker compose --scale) starts the same command N times at once."""
    import subprocess
    import sys

    name = f"array-{tmp_path.name}"
    command = [sys.executable, "-m", "mnist_sweep.sweep", "--sweep", "momentum",
               f"sweep.study_name={name}", "sweep.n_trials=6", "sweep.quiet=true",
               f"sweep.storage={servers.storage_url}", f"tracking.tracking_uri={servers.tracking_url}",
               f"data.root={mnist_dir}", *TINY, "train.epochs=1"]
    processes = [subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
    errors = [finish(p, 300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], errors
    study = optuna.load_study(study_name=name, storage=servers.storage_url)
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 6
    client = MlflowClient(servers.tracking_url)
    parents, children = study_runs(client, name)
    assert len(parents) == 1 and study.user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id
    assert len(children) == 6
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}


def test_a_password_in_the_tracking_uri_is_not_recorded(servers, tmp_path, mnist_dir):
    """Tracking straight into the PostgreSQL database (no MLflow server): the URI, password
    included, is part of the trial's config.yaml (masked there); it is not a param (where a
    trial ran is not what it is), and no param or tag shows the password."""
    from conftest import FAST

    uri = servers.pg.url("mlflow")
    out = run_cli("mnist_sweep.train", f"data.root={mnist_dir}", *FAST, "train.epochs=1",
                  f"tracking.tracking_uri={uri}", "tracking.experiment=direct-pg", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert hides_password(out.stdout + out.stderr)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("direct-pg")
    run = client.search_runs([experiment.experiment_id])[0]
    assert "tracking.tracking_uri" not in run.data.params  # where it ran: not a param
    assert hides_password(str(run.data.params) + str(run.data.tags))
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert hides_password(open(config).read())


def this_machines_address() -> str | None:
    """A non-loopback IPv4 address of this machine: what another machine would connect to."""
    from mnist_sweep.servers.local import machine_interfaces

    found = [str(i.ip) for i in machine_interfaces() if i.version == 4 and not i.ip.is_loopback]
    return found[0] if found else None


def connect_from_outside(url: str):
    """The client address PostgreSQL saw for a connection to `url`."""
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as connection:
        return str(connection.execute("select inet_client_addr()").fetchone()[0])


@pytest.mark.skipif(this_machines_address() is None, reason="this machine has no non-loopback address")
def test_postgresql_admits_only_the_allowed_networks():
    """pg_hba.conf: this machine and --allow-net; a worker elsewhere is refused, by name."""
    import psycopg

    from mnist_sweep.servers.local import PgBouncer, Postgres, free_port, machine_interfaces
    from mnist_sweep.base.urls import with_password

    import shutil
    import tempfile
    from pathlib import Path

    address = this_machines_address()
    folder = Path(tempfile.mkdtemp(prefix="mnist-sweep-hba-"))  # /tmp: reachable by postgres
    folder.chmod(0o755)
    network = next(str(i.network) for i in machine_interfaces() if str(i.ip) == address)
    for networks, admitted in ((["10.255.0.0/16"], False), ([network], True)):
        pg = Postgres(folder, free_port(), PG_PASSWORD, "0.0.0.0", address, networks)
        pg.start()
        pg.create_databases("optuna")
        pooler = PgBouncer(folder / "pgbouncer", free_port(), PG_PASSWORD, pg)
        pooler.start()
        try:
            url = with_password("postgresql", "mnist", PG_PASSWORD, address, pg.port, "postgres")
            pooled = pooler.url("optuna")  # PgBouncer admits what PostgreSQL admits
            if admitted:
                assert connect_from_outside(url) == address
                assert connect_from_outside(pooled) == "127.0.0.1"  # PgBouncer's connection
            else:
                with pytest.raises(psycopg.OperationalError, match=f'no pg_hba.conf entry for host "{address}"'):
                    connect_from_outside(url)
                with pytest.raises(psycopg.OperationalError):
                    connect_from_outside(pooled)
        finally:
            pooler.stop()
            pg.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(this_machines_address() is None, reason="this machine has no non-loopback address")
def test_make_server_for_other_machines_then_a_sweep_and_a_worker_reach_it_by_name_and_address(tmp_path, mnist_dir):
    """The user's path across machines: `make server ARGS="--host 0.0.0.0"`, source urls.env,
    `make sweep` through the servers by this machine's host name (as urls.env says) and a
    `make worker` joining by its non-loopback address (PostgreSQL sees that address, as it would
    another machine's); the MLflow server answers those names and refuses others (403). Then
    SIGTERM: both servers stop."""
    import os
    import signal
    import socket
    import stat
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import requests

    from mnist_sweep.servers.local import free_port

    address, name = this_machines_address(), socket.gethostname()
    folder = Path(tempfile.mkdtemp(prefix="mnist-sweep-make-server-"))
    folder.chmod(0o755)
    pg_port, mlflow_port, pooler_port = free_port(), free_port(), free_port()
    server = subprocess.Popen([sys.executable, "-m", "mnist_sweep.server", "--dir", str(folder / "srv"),
                               "--host", "0.0.0.0", "--pg-port", str(pg_port),
                               "--mlflow-port", str(mlflow_port), "--pooler-port", str(pooler_port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1",
                                   "MNIST_SWEEP_PG_PASSWORD": PG_PASSWORD})
    try:
        lines = []
        while not any("Ctrl-C stops both" in line for line in lines):
            line = server.stdout.readline()
            assert line, server.stderr.read()
            lines.append(line)
        printed = "".join(lines)
        assert hides_password(printed)
        assert f"postgresql://mnist:***@{name}:{pg_port}/optuna" in printed
        assert f"postgresql://mnist:***@{name}:{pooler_port}/optuna" in printed  # PgBouncer
        assert f"http://{name}:{mlflow_port}" in printed and address in printed
        urls = folder / "srv" / "urls.env"
        for secret in (urls, folder / "srv" / "password", folder / "srv" / "pgbouncer" / "userlist.txt"):
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert PG_PASSWORD not in (folder / "srv" / "pgbouncer" / "pgbouncer.ini").read_text()
        env = dict(line.removeprefix("export ").split("=", 1) for line in urls.read_text().split("\n")
                   if line and not line.startswith("#"))  # what `source` reads: comments say why
        env = {k: v.strip("'") for k, v in env.items()}
        # workers reach the study through PgBouncer, which connects to PostgreSQL from here
        assert env["SWEEP_STORAGE"].endswith(f"@{name}:{pooler_port}/optuna")
        assert env["MLFLOW_TRACKING_URI"] == f"http://{name}:{mlflow_port}"
        by_address = {k: v.replace(f"{name}:", f"{address}:") for k, v in env.items()}
        assert connect_from_outside(by_address["SWEEP_STORAGE"]) == "127.0.0.1"
        direct = by_address["SWEEP_STORAGE"].replace(f":{pooler_port}/", f":{pg_port}/")
        assert connect_from_outside(direct) == address

        search = f"http://{address}:{mlflow_port}/api/2.0/mlflow/experiments/search?max_results=1"
        for host, code in ((f"{name}:{mlflow_port}", 200), (f"{address}:{mlflow_port}", 200),
                           (f"127.0.0.1:{mlflow_port}", 200), (f"attacker.example:{mlflow_port}", 403)):
            assert requests.get(search, headers={"Host": host}, timeout=10).status_code == code, host

        common = ["--sweep", "momentum", "sweep.quiet=true", f"data.root={mnist_dir}", *TINY,
                  "train.epochs=1"]
        sweep = run_cli("mnist_sweep.sweep", *common, "sweep.n_trials=2", cwd=tmp_path, env=env)
        assert sweep.returncode == 0, sweep.stderr[-2000:]
        worker = run_cli("mnist_sweep.sweep", "--join", *common, "sweep.n_trials=4", cwd=tmp_path,
                         env=by_address)
        assert worker.returncode == 0, worker.stderr[-2000:]
        study = optuna.load_study(study_name="momentum", storage=by_address["SWEEP_STORAGE"])
        assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 4
        parents, children = study_runs(MlflowClient(by_address["MLFLOW_TRACKING_URI"]), "momentum")
        assert len(parents) == 1 and len(children) == 4
        assert {r.info.status for r in children} == {"FINISHED"}
        assert hides_password(sweep.stdout + sweep.stderr + worker.stdout + worker.stderr)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    assert server.returncode == 0, server.stderr.read()[-2000:]
    for port in (pg_port, mlflow_port, pooler_port):  # all stopped: nothing listens any more
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    assert not (folder / "srv" / "postgres" / "data" / "postmaster.pid").exists()


def test_workers_logging_the_same_new_datasets_at_once_all_get_them(servers, cfg_factory, tmp_path):
    """MLflow stores a dataset once per experiment: it looks for the row, then inserts it. Workers
    whose first trials start together all look, find nothing and insert; on PostgreSQL all but
    one insert then fail on the unique key (CI saw 2 of 8 first trials fail so). Provoked here:
    8 threads released together, for several new datasets in turn."""
    import threading

    from mnist_sweep.tracking.runs import MlflowTracker

    trackers = [MlflowTracker(servers.tracking_url, f"datasets-race-{tmp_path.name}") for _ in range(8)]
    errors, runs = [], []
    for val_size in (100, 101, 102, 103, 104):  # each a new digest: a new dataset row to insert
        cfg = cfg_factory(f"data.val_size={val_size}")
        run_ids = [t.start_run(run_name=f"v{val_size}-{i}") for i, t in enumerate(trackers)]
        start = threading.Barrier(len(trackers))

        def log(tracker, run_id):
            start.wait()
            try:
                tracker.log_datasets(run_id, cfg.data)
            except Exception as error:  # noqa: BLE001 - what the race raises is the finding
                errors.append(f"{type(error).__name__}: {str(error)[:300]}")

        threads = [threading.Thread(target=log, args=pair) for pair in zip(trackers, run_ids)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        runs += run_ids
    assert not errors, errors
    client = MlflowClient(servers.tracking_url)
    for run_id in runs:  # every run has its three splits, each dataset stored once (one digest)
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert sorted(d.dataset.name.split("/")[-1] for d in inputs) == ["test", "train", "val"]
