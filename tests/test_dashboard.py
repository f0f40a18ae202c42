"""make dashboard: optuna-dashboard (pinned) serves the study storage a sweep writes."""

import subprocess
import sys
import time
from pathlib import Path

import optuna
import requests

from conftest import REPO
from mnist_sweep.servers import free_port


def test_make_dashboard_serves_the_studys_trials(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="live", storage=storage, direction="maximize")
    study.optimize(lambda t: t.suggest_float("optim.momentum", 0.0, 0.99), n_trials=3)
    port = free_port()
    venv = str(Path(sys.executable).parents[1])
    server = subprocess.Popen(["make", "-s", "-C", str(REPO), "dashboard", f"VENV={venv}"],
                              env={"PATH": "/usr/bin:/bin", "SWEEP_STORAGE": storage,
                                   "DASHBOARD_PORT": str(port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        summaries = None
        for _ in range(120):  # it starts in a few seconds; give up after a minute
            if server.poll() is not None:
                raise AssertionError(f"optuna-dashboard exited: {server.stderr.read()[-2000:]}")
            try:
                summaries = requests.get(f"http://127.0.0.1:{port}/api/studies", timeout=2).json()
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        assert [s["study_name"] for s in summaries["study_summaries"]] == ["live"]
        detail = requests.get(f"http://127.0.0.1:{port}/api/studies/{study._study_id}", timeout=5).json()
        assert len(detail["trials"]) == 3
    finally:
        import os
        import signal

        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
