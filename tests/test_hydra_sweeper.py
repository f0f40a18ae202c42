"""Hydra's multirun (`-m`) with the sweeper plugin named `optuna`: one study, a parent MLflow run
with nested trials, pruning and workers, in both the command-line and the hparams_search form."""

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.study import StudyDirection

from conftest import run_cli
from test_sweep import failed, finished

TINY = ["train.epochs=2", "train.batch_size=50", "data.val_size=100", "train.progress=false"]


def study_and_runs(folder, name):
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.study_name = '{name}'")
    parents = [r for r in runs if r.data.tags["sweep_role"] == "parent"]
    trials = [r for r in runs if r.data.tags["sweep_role"] == "trial"]
    return study, parents, trials


def test_dash_m_with_the_optuna_sweeper_gives_one_study_with_nested_runs(tmp_path, mnist_dir):
    out = run_cli("mnist_sweep.train", "-m", "hydra/sweeper=optuna", "optim.momentum=interval(0.5,0.99)",
                  "schedule=choice(none,step)", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
                  "hydra.sweeper.study_name=dash_m", "+hydra.sweeper.sweep.register_model=false",
                  f"data.root={mnist_dir}", *TINY, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    study, parents, trials = study_and_runs(tmp_path, "dash_m")
    # exactly n_trials finished and none failed; with 2 jobs a slot opened just as the other
    # filled the budget is closed untrained (FAIL, `excess`: see study.counts)
    assert len(finished(study)) == 4 and not failed(study)
    assert {t.params["schedule"] for t in finished(study)} <= {"none", "step"}
    assert all(0.5 <= t.params["optim.momentum"] <= 0.99 for t in finished(study))
    assert len(parents) == 1 and len(trials) == 4
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trials)
    # the command line's plain overrides are fixed for every trial
    assert all(r.data.params["train.epochs"] == "2" for r in trials)
    assert {line.split()[0] for line in out.stdout.splitlines() if line.startswith("[w")} == {"[w0", "[w1"}
    # what ran is kept in Hydra's sweep folder, as a sweep file
    assert list(tmp_path.glob("multirun/*/*/dash_m.yaml"))


def test_an_hparams_search_config_in_hydras_optuna_sweeper_form_runs(tmp_path, mnist_dir):
    """conf/hparams_search/momentum_optuna.yaml is written as for lightning-hydra-template: it
    selects /hydra/sweeper: optuna and names Hydra's Optuna sweeper's _target_ and a sampler
    by its Optuna class."""
    out = run_cli("mnist_sweep.train", "-m", "hparams_search=momentum_optuna", "hydra.sweeper.n_trials=3",
                  "+hydra.sweeper.sweep.register_model=false", f"data.root={mnist_dir}", *TINY,
                  cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    study, parents, trials = study_and_runs(tmp_path, "momentum_optuna")
    assert len(study.trials) == 3 and len(parents) == 1 and len(trials) == 3
    assert set(study.trials[0].params) == {"optim.lr", "optim.momentum", "schedule"}
    assert parents[0].data.tags["sampler"] == "tpe"


def test_a_sampler_this_sweep_does_not_run_is_refused_with_the_allowed_ones(tmp_path, mnist_dir):
    out = run_cli("mnist_sweep.train", "-m", "hydra/sweeper=optuna", "optim.momentum=interval(0.5,0.99)",
                  "hydra.sweeper.sampler._target_=optuna.samplers.NSGAIISampler",
                  f"data.root={mnist_dir}", *TINY, cwd=tmp_path, timeout=300)
    assert out.returncode != 0
    assert "NSGAIISampler is not a sampler this sweep runs" in out.stderr
    assert "optuna.samplers.TPESampler" in out.stderr
    assert not (tmp_path / "optuna.db").exists()


@pytest.mark.parametrize("overrides, direction", [
    (["hydra.sweeper.metric=val_loss"], StudyDirection.MINIMIZE),  # the metric's own direction
    ([], StudyDirection.MAXIMIZE),  # val_acc, the default metric
    (["hydra.sweeper.metric=val_loss", "hydra.sweeper.direction=maximize"], StudyDirection.MAXIMIZE),
    (["hydra.sweeper.metric=val_acc", "hydra.sweeper.direction=minimize"], StudyDirection.MINIMIZE),
])
def test_the_direction_is_the_metrics_own_unless_given(overrides, direction, tmp_path, mnist_dir):
    """Hydra's Optuna sweeper minimizes by default and `make sweep` takes the metric's
    direction; this sweeper used to maximize whatever the metric, val_loss included."""
    out = run_cli("mnist_sweep.train", "-m", "hydra/sweeper=optuna", "optim.momentum=interval(0.5,0.99)",
                  "hydra.sweeper.n_trials=1", "hydra.sweeper.study_name=direction", *overrides,
                  "+hydra.sweeper.sweep.register_model=false", f"data.root={mnist_dir}", *TINY,
                  "train.epochs=1", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    study, parents, _ = study_and_runs(tmp_path, "direction")
    assert study.direction == direction
    assert parents[0].data.tags["direction"] == direction.name.lower()


def test_the_recorded_sweep_file_has_the_storage_password_masked(tmp_path, mnist_dir):
    """The sweeper writes its settings to multirun/<date>/<time>/<study>.yaml before it opens
    the storage: here one that cannot be reached, so the sweep stops with that error after."""
    out = run_cli("mnist_sweep.train", "-m", "hydra/sweeper=optuna", "optim.momentum=interval(0.5,0.99)",
                  "hydra.sweeper.n_trials=1", "hydra.sweeper.study_name=masked",
                  "hydra.sweeper.storage=postgresql://bob:hunter2@127.0.0.1:9/optuna",
                  "+hydra.sweeper.sweep.register_model=false", f"data.root={mnist_dir}", *TINY,
                  cwd=tmp_path, timeout=300)
    assert out.returncode != 0 and "cannot be opened" in out.stderr, out.stderr[-3000:]
    (recorded,) = tmp_path.glob("multirun/*/*/masked.yaml")
    text = recorded.read_text()
    assert "hunter2" not in text and "postgresql://bob:***@127.0.0.1:9/optuna" in text
    assert "hunter2" not in out.stdout + out.stderr
