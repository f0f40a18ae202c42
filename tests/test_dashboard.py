"""make dashboard: optuna-dashboard (pinned) serves the study storage a sweep writes."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import requests

from conftest import REPO, hides_password, needs_postgres, pooled_storage
from mnist_sweep.base.urls import redact_uri
from mnist_sweep.servers.local import free_port, wait_for_http


def serve(storage: str, tmp_path, looks: int = 1) -> None:
    """`make dashboard` over `storage` (a study "live" of 3 trials): its study list and the
    study's trials, asked `looks` times, as a browser left open asks again and again."""
    port = free_port()
    venv = str(Path(sys.executable).parents[1])
    with open(tmp_path / "dashboard.log", "ab") as log:  # a file: a pipe nobody reads fills up
        server = subprocess.Popen(["make", "-s", "-C", str(REPO), "dashboard", f"VENV={venv}"],
                                  env={"PATH": "/usr/bin:/bin", "SWEEP_STORAGE": storage,
                                       "DASHBOARD_PORT": str(port)},
                                  stdout=log, stderr=log, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/studies", server, what="optuna-dashboard")
        for _ in range(looks):
            summaries = requests.get(f"http://127.0.0.1:{port}/api/studies", timeout=30).json()
            live, = [s for s in summaries["study_summaries"] if s["study_name"] == "live"]
            detail = requests.get(f"http://127.0.0.1:{port}/api/studies/{live['study_id']}",
                                  timeout=30).json()
            assert len(detail["trials"]) == 3
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    said = (tmp_path / "dashboard.log").read_text()
    # ours, not optuna-dashboard's own command (which prepares statements on the server)
    assert f"optuna-dashboard over {redact_uri(storage)} on http://127.0.0.1:" in said, said
    assert hides_password(said)


def make_live_study(storage) -> None:
    study = optuna.create_study(study_name="live", storage=storage, direction="maximize")
    study.optimize(lambda t: t.suggest_float("optim.momentum", 0.0, 0.99), n_trials=3)


def test_make_dashboard_serves_the_studys_trials(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    make_live_study(storage)
    serve(storage, tmp_path)


@needs_postgres
def test_make_dashboard_reads_through_pgbouncer_without_prepared_statements(servers, tmp_path):
    """Through make server's PgBouncer (transaction pooling) the dashboard asks the same queries
    again and again: it connects as the sweep's workers do, without the server-side prepared
    statements psycopg 3 makes of a query run 5 times (the next run may go to a server
    connection where that name is another client's query; CI saw SQLAlchemy crash on the rows of
    the wrong query in a test that read a study that way)."""
    from mnist_sweep.dashboard import dashboard_storage

    storage = servers.storage_url
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name="live", storage=pooled_storage(storage))
    make_live_study(pooled_storage(storage))
    with dashboard_storage(storage).engine.connect() as connection:
        assert connection.connection.driver_connection.prepare_threshold is None
    serve(storage, tmp_path, looks=8)



def test_a_storage_no_sweep_writes_is_refused_in_one_paragraph(tmp_path):
    from conftest import run_cli

    out = run_cli("mnist_sweep.dashboard", "redis://user:s3cret-pw@127.0.0.1:6379/0", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert "not one a sweep writes" in out.stderr and "s3cret-pw" not in out.stdout + out.stderr
    # a server that does not answer (nothing listens on port 9): one paragraph, no password
    out = run_cli("mnist_sweep.dashboard", cwd=tmp_path,
                  env={"SWEEP_STORAGE": "postgresql://user:s3cret-pw@127.0.0.1:9/optuna"})
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert "cannot be read" in out.stderr and "s3cret-pw" not in out.stdout + out.stderr
