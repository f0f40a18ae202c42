"""make dashboard: optuna-dashboard (pinned) serves the study storage a sweep writes."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import requests

from conftest import REPO
from mnist_sweep.servers.local import free_port, wait_for_http


def test_make_dashboard_serves_the_studys_trials(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="live", storage=storage, direction="maximize")
    study.optimize(lambda t: t.suggest_float("optim.momentum", 0.0, 0.99), n_trials=3)
    port = free_port()
    venv = str(Path(sys.executable).parents[1])
    with open(tmp_path / "dashboard.log", "ab") as log:  # a file: a pipe nobody reads fills up
        server = subprocess.Popen(["make", "-s", "-C", str(REPO), "dashboard", f"VENV={venv}"],
                                  env={"PATH": "/usr/bin:/bin", "SWEEP_STORAGE": storage,
                                       "DASHBOARD_PORT": str(port)},
                                  stdout=log, stderr=log, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/studies", server, what="optuna-dashboard")
        summaries = requests.get(f"http://127.0.0.1:{port}/api/studies", timeout=30).json()
        assert [s["study_name"] for s in summaries["study_summaries"]] == ["live"]
        detail = requests.get(f"http://127.0.0.1:{port}/api/studies/{study._study_id}", timeout=30).json()
        assert len(detail["trials"]) == 3
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
