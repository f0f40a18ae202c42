"""Results at the edges (issue 25): a value that is no result, a database outage longer than the
grace period, retries that never nest, and what TPE sees of other workers' running trials. Real
SQLite and PostgreSQL storages, real sweep processes on synthetic data."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import FAULT_INJECTION, needs_postgres, run_cli, study_runs
from test_sweep import TINY

# ----------------------------------------------------------------------------- 1. a NaN value


def stores(request, tmp_path: Path, kind: str, name: str) -> tuple[str, str]:
    """(Optuna storage, MLflow tracking URI): SQLite files here, or the shared servers."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    servers = request.getfixturevalue("servers")
    return servers.storage_url, servers.tracking_url


@pytest.mark.parametrize("population", [1, 4], ids=["solo", "population"])
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=needs_postgres)])
def test_a_nan_final_value_ends_the_trial_diverged_and_the_study_still_loads(
        request, tmp_path, mnist_dir, kind, population):
    """With sweep.metric=val_loss and no pruner, a trial whose last epoch's validation loss is
    NaN (its training loss finite) was told COMPLETE with NaN: SQLite stored NULL and every read
    of the study failed Optuna's `assert value is not None` (PostgreSQL sorted the NaN as best).
    Now it ends as a diverged trial: PRUNED with NaN at that epoch, `diverged` attribute, its run
    FAILED with state=diverged; the study loads and its best trial is a finite one."""
    name = f"nan-{kind}-{population}-{tmp_path.name[-12:]}"
    storage, tracking = stores(request, tmp_path, kind, name)
    out = run_cli("mnist_sweep.sweep", "--sweep", "momentum", f"sweep.study_name={name}",
                  "sweep.n_trials=4", "sweep.metric=val_loss", "sweep.pruner=none",
                  f"sweep.population={population}", f"sweep.storage={storage}",
                  f"tracking.tracking_uri={tracking}", f"data.root={mnist_dir}", *TINY,
                  "train.epochs=2", cwd=tmp_path, timeout=300,
                  env={"PYTHONPATH": FAULT_INJECTION, "MNIST_SWEEP_NAN_AT": "final_val_loss"})
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.trials  # every trial reads back
    diverged = [t for t in trials if "diverged" in t.user_attrs]
    assert len(diverged) == 1, [(t.number, t.state, t.value) for t in trials]
    nan_trial = diverged[0]
    assert nan_trial.state == TrialState.PRUNED and nan_trial.value is None
    assert math.isnan(nan_trial.intermediate_values[2])
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and all(math.isfinite(t.value) for t in complete)
    assert study.best_trial.number != nan_trial.number and math.isfinite(study.best_value)
    _, runs = study_runs(MlflowClient(tracking), name)
    by_trial = {r.data.tags["trial_number"]: r for r in runs}
    run = by_trial[str(nan_trial.number)]
    assert (run.info.status, run.data.tags["state"]) == ("FAILED", "diverged")
    assert all(by_trial[str(t.number)].info.status == "FINISHED" for t in complete)
    assert "best trial #" in out.stdout and f"#{nan_trial.number}:" not in out.stdout.split("best trial")[-1]
