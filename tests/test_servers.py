"""Against real servers: a PostgreSQL started here (as an unprivileged user, on 127.0.0.1) for the
Optuna study, and an `mlflow server` backed by it for tracking."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import run_cli
from test_sweep import TINY

pytestmark = pytest.mark.skipif(shutil.which("initdb") is None or shutil.which("pg_ctl") is None,
                                reason="PostgreSQL (initdb, pg_ctl) is not installed")


@pytest.fixture(scope="module")
def servers():
    from mnist_sweep.servers import Postgres, free_port, start_mlflow_server, stop_process

    folder = Path(tempfile.mkdtemp(prefix="mnist-sweep-servers-"))  # /tmp: reachable by postgres
    folder.chmod(0o755)
    pg = Postgres(folder / "postgres", free_port(), "s3cret-pw-for-tests")
    pg.start()
    server = None
    try:
        pg.create_databases("optuna", "mlflow")
        port = free_port()
        server = start_mlflow_server(pg.url("mlflow"), folder / "artifacts", port,
                                     log_file=folder / "mlflow-server.log")
        yield {"storage": pg.url("optuna"), "tracking": f"http://127.0.0.1:{port}",
               "log": folder / "mlflow-server.log", "pg_log": folder / "postgres" / "postgres.log"}
    finally:
        if server is not None:
            stop_process(server)
        pg.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_on_postgres_and_an_mlflow_server(servers, tmp_path, mnist_dir):
    out = run_cli("mnist_sweep.sweep", "--sweep", "momentum_decay", "sweep.n_trials=6",
                  "sweep.workers=2", f"sweep.storage={servers['storage']}",
                  f"tracking.tracking_uri={servers['tracking']}", f"data.root={mnist_dir}", *TINY,
                  cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="momentum_decay", storage=servers["storage"])
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 6 and len({t.number for t in done}) == 6
    client = MlflowClient(servers["tracking"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.study_name = 'momentum_decay'")
    parent = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    assert len(parent) == 1
    assert parent[0].data.tags["storage"].startswith("postgresql://mnist:***@127.0.0.1:")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(r.data.tags["trial_number"] for r in children) == sorted(str(t.number) for t in done)
    for child in children:  # exactly one run per trial, with its curves
        assert child.data.metrics["val_acc"] >= 0 and child.info.status == "FINISHED"
        assert len(client.get_metric_history(child.info.run_id, "batch/train_loss")) > 0
    password = "s3cret-pw-for-tests"
    for text in (out.stdout, out.stderr, servers["log"].read_text()):
        assert password not in text
    for run in runs:
        assert password not in str(run.data.params) + str(run.data.tags)
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_worker_killed_mid_trial_against_the_servers(servers, tmp_path, mnist_dir):
    from test_sweep import kill_a_worker_mid_trial

    kill_a_worker_mid_trial(tmp_path, mnist_dir, servers["storage"], servers["tracking"])
