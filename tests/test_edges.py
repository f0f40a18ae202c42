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


# ------------------------------------------------------------- 2. a trial failed elsewhere


@pytest.mark.parametrize("population", [1, 2], ids=["solo", "population"])
def test_a_trial_failed_elsewhere_while_it_trains_stops_and_its_run_says_why(
        tmp_path, mnist_dir, population):
    """Another process fails a live trial (as a stale check does: FAIL in the store) while its
    worker trains it. Before, the worker's late writes were dropped at DEBUG level, it trained to
    the end, logged "complete", and its MLflow run ended FINISHED state=complete while Optuna held
    the trial as FAIL. Now its next report learns it: training stops, the run ends FAILED with
    `ended_elsewhere`, nothing more is told, and every run's status is its trial's state."""
    import sys
    import time

    from conftest import spawn

    name = f"elsewhere-{population}-{tmp_path.name[-12:]}"
    storage, tracking = stores(None, tmp_path, "sqlite", name)
    gate = tmp_path / "gate"
    process = spawn(sys.executable, "-m", "mnist_sweep.sweep", "--sweep", "momentum",
                    f"sweep.study_name={name}", "sweep.n_trials=2", "sweep.pruner=none",
                    f"sweep.population={population}", f"sweep.storage={storage}",
                    f"tracking.tracking_uri={tracking}", f"data.root={mnist_dir}", *TINY,
                    "sweep.register_model=false", cwd=tmp_path,
                    env={"PYTHONPATH": FAULT_INJECTION, "MNIST_SWEEP_GATE": str(gate),
                         "MNIST_SWEEP_HOLD_AT": "first_epoch_result"})
    try:
        deadline = time.time() + 240
        while not Path(f"{gate}.reached").exists():
            assert process.poll() is None and time.time() < deadline, "no trial reached its first epoch"
            time.sleep(0.1)
        plain = optuna.storages.RDBStorage(storage)  # another process, as its stale check does
        study_id = plain.get_study_id_from_name(name)
        running = plain.get_all_trials(study_id, states=(TrialState.RUNNING,))
        victim = min(running, key=lambda t: t.number)
        plain.set_trial_state_values(victim._trial_id, TrialState.FAIL)
        retry = optuna.storages.RetryFailedTrialCallback(max_retry=1)  # as the stale check does
        retry(optuna.load_study(study_name=name, storage=plain), plain.get_trial(victim._trial_id))
        gate.touch()
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name=name, storage=storage).trials
    failed = {t.number for t in trials if t.state == TrialState.FAIL}
    assert failed == {victim.number}, [(t.number, t.state) for t in trials]
    assert victim.number not in {t.number for t in trials if 1 in t.intermediate_values}
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 2
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retried) == 1 and retried[0].params == victim.params
    _, runs = study_runs(MlflowClient(tracking), name)
    by_trial = {int(r.data.tags["trial_number"]): r for r in runs}
    gone = by_trial[victim.number]
    assert (gone.info.status, gone.data.tags.get("ended_elsewhere")) == ("FAILED", "true")
    assert "failed this trial as stale" in gone.data.tags["fail_reason"]
    assert "test_acc" not in gone.data.metrics
    status_of = {TrialState.COMPLETE: "FINISHED", TrialState.FAIL: "FAILED"}
    assert {n: r.info.status for n, r in by_trial.items()} == {t.number: status_of[t.state] for t in trials}


# ------------------------------------------------- 7. what TPE's constant liar sees of others


def test_tpe_sees_the_params_of_trials_running_elsewhere_as_a_plain_rdbstorage_shows_them(tmp_path):
    """Optuna 5's TPE lies constantly by default (constant_liar=True): it reads the trials running
    elsewhere with their params, so that parallel workers spread out. Our storage read them light
    (no params) unless sampler_args named constant_liar, so the liar saw empty trials and ignored
    them. Now every call the sampler makes during an ask and its suggestions returns what the same
    call returns through a plain RDBStorage: the same trials, states and params."""
    from mnist_sweep.search.study import open_study
    from mnist_sweep.search.sweepfile import check_space, load_spec

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    spec = load_spec("momentum_decay", [f"sweep.storage={url}"])
    space = spec.space()
    ours, _ = open_study(spec, space, check_space(spec, space), create=True)
    elsewhere = optuna.load_study(study_name=spec.study_name, storage=url,
                                  sampler=optuna.samplers.RandomSampler(seed=1))
    for value in range(12):  # past TPE's startup trials, each schedule's params among them
        trial = elsewhere.ask()
        space.suggest(trial)
        elsewhere.tell(trial, value / 20)
    ours.trials  # our worker's cache holds the study as it is now
    running = []
    for _ in range(3):  # other workers' trials, running, with their params
        running.append(elsewhere.ask())
        space.suggest(running[-1])
    seen: list[list] = []
    read = ours._get_trials

    def sampler_reads(deepcopy=True, states=None, use_cache=False):
        trials = read(deepcopy=deepcopy, states=states, use_cache=use_cache)
        seen.append([(t.number, t.state, t.params) for t in trials if t.state == TrialState.RUNNING])
        return trials

    ours._get_trials = sampler_reads
    trial = ours.ask()
    space.suggest(trial)
    plain = optuna.load_study(study_name=spec.study_name, storage=url)
    expected = [(t.number, t.state, t.params) for t in plain.trials
                if t.state == TrialState.RUNNING and t.number != trial.number]
    liar_reads = [s for s in seen if s]
    assert liar_reads, "TPE read no running trial"
    assert all([r for r in s if r[0] != trial.number] == expected for s in liar_reads), (seen, expected)
    assert all(params for _, _, params in expected)
