"""Bad sweep input: one paragraph naming the value, exit != 0, no traceback, and the existing
study (optuna.db) and runs (mlflow.db) byte for byte unchanged."""

import shutil

import pytest

from conftest import file_digest, run_cli
from test_bad_input import assert_one_paragraph_error
from test_sweep import TINY


@pytest.fixture(scope="session")  # once per pytest process: xdist interleaves modules
def existing(tmp_path_factory, mnist_dir):
    """A folder holding a finished 2-trial `momentum` study and its MLflow runs."""
    folder = tmp_path_factory.mktemp("existing-sweep")
    out = run_cli("mnist_sweep.sweep", "--sweep", "momentum", "sweep.n_trials=2", "sweep.quiet=true",
                  f"data.root={mnist_dir}", *TINY, "train.epochs=1", cwd=folder)
    assert out.returncode == 0, out.stderr[-2000:]
    return folder


CASES = {
    "unknown grammar function": (["optim.momentum=between(0.1,0.9)"], ["between", "interval"]),
    "interval low >= high": (["optim.momentum=interval(0.9,0.5)"], ["0.9", "below the high bound"]),
    "empty choice": (["optim.lr=choice()"], ["optim.lr=choice()", "empty choice"]),
    "log on a non-positive range": (["optim.lr=tag(log,interval(0,0.1))"], ["log scale", "low bound > 0"]),
    "parameter path absent": (["optim.momentun=interval(0.1,0.5)"], ["optim.momentun", "momentum"]),
    "values outside what a trial allows": (["optim.momentum=interval(0.5,1.5)"],
                                           ["optim.momentum", "1.5", "[0, 1)"]),
    "group searched with an interval": (["schedule=interval(0,1)"], ["schedule", "choice"]),
    "unknown sampler": (["sweep.sampler=bayes"], ["sweep.sampler='bayes'", "tpe", "grid"]),
    "unknown pruner": (["sweep.pruner=early"], ["sweep.pruner='early'", "hyperband"]),
    "n_trials zero": (["sweep.n_trials=0"], ["sweep.n_trials=0", "> 0"]),
    "workers zero": (["sweep.workers=0"], ["sweep.workers=0", "> 0"]),
    "workers negative": (["sweep.workers=-2"], ["sweep.workers=-2", "> 0"]),
    "unknown setting": (["sweep.n_trial=3"], ["n_trial", "n_trials"]),
    "storage folder missing": (["sweep.storage=sqlite:////no/such/dir/optuna.db"],
                               ["/no/such/dir", "does not exist"]),
    "storage scheme unknown": (["sweep.storage=redis://localhost:6379"], ["redis://", "sqlite:///"]),
    "storage password hidden": (["sweep.storage=postgresql://bob:hunter2@127.0.0.1:9/optuna"],
                                ["bob:***@127.0.0.1:9", "cannot be opened"]),
    "storage password in the query hidden": (
        ["sweep.storage='postgresql://bob@127.0.0.1:9/optuna?password=hunter2'"],  # quoted for Hydra
        ["?password=***", "cannot be opened"]),
    "resume with another metric": (["sweep.metric=val_loss"],
                                   ["'momentum'", "maximize", "val_loss", "sweep.study_name"]),
    "resume with another direction": (["sweep.direction=minimize"], ["maximize", "minimize"]),
    "unknown metric": (["sweep.metric=accuracy"], ["accuracy", "val_acc"]),
    "grid over a continuous parameter": (["sweep.sampler=grid"], ["grid", "optim.momentum"]),
}


def run_in_copy(tmp_path, existing, mnist_dir, *args):
    for name in ("optuna.db", "mlflow.db"):
        shutil.copy(existing / name, tmp_path / name)
    before = [file_digest(tmp_path / n) for n in ("optuna.db", "mlflow.db")]
    out = run_cli("mnist_sweep.sweep", *args, f"data.root={mnist_dir}", *TINY, cwd=tmp_path)
    assert [file_digest(tmp_path / n) for n in ("optuna.db", "mlflow.db")] == before
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_bad_sweep_override(case, tmp_path, existing, mnist_dir):
    overrides, expected = CASES[case]
    out = run_in_copy(tmp_path, existing, mnist_dir, "--sweep", "momentum", *overrides)
    assert_one_paragraph_error(out, expected)
    assert "hunter2" not in out.stdout + out.stderr


SWEEP_FILES = {
    "not YAML": ("params: [unclosed\n  - {", ["not valid YAML"]),
    "not a mapping": ("- just\n- a list\n", ["mapping", "list"]),
    "unknown section": ("sweep: {n_trials: 2}\nparameters: {}\n", ["parameters", "params"]),
    "conditional under an unknown option": (
        "params:\n  schedule: choice(none, step)\nconditional:\n  schedule:\n    warmup:\n"
        "      schedule.gamma: interval(0.5, 0.9)\n", ["warmup", "none, step", "cosine"]),
    "conditional without its choice": (
        "params:\n  optim.lr: interval(0.01, 0.1)\nconditional:\n  schedule:\n    step:\n"
        "      schedule.gamma: interval(0.5, 0.9)\n", ["conditional.schedule", "choice"]),
    "enqueue of an unknown parameter": (
        "params:\n  optim.lr: interval(0.01, 0.1)\nenqueue:\n  - {optim.momentum: 0.5}\n",
        ["enqueue[0]", "optim.momentum"]),
    "enqueue of a value outside its range": (  # Optuna would run it with a warning, and fail
        "params:\n  optim.momentum: interval(0.5, 0.9)\nenqueue:\n  - {optim.momentum: 1.2}\n",
        ["enqueue[0]", "optim.momentum=1.2", "interval(0.5, 0.9)"]),
    "enqueue of a choice not offered": (
        "params:\n  schedule: choice(none, step)\nenqueue:\n  - {schedule: cosine}\n",
        ["enqueue[0]", "schedule='cosine'", "choice(none, step)"]),
    "int interval with fractional bounds": (
        "params:\n  schedule: choice(step)\nconditional:\n  schedule:\n    step:\n"
        "      schedule.step_size: int(interval(0.5, 10.7))\n", ["int(interval(0.5, 10.7))", "whole-number"]),
}


@pytest.mark.parametrize("case", list(SWEEP_FILES))
def test_bad_sweep_file(case, tmp_path, existing, mnist_dir):
    text, expected = SWEEP_FILES[case]
    (tmp_path / "bad.yaml").write_text(text)
    out = run_in_copy(tmp_path, existing, mnist_dir, "--sweep", str(tmp_path / "bad.yaml"))
    assert_one_paragraph_error(out, expected)


def test_missing_sweep_file_lists_the_shipped_ones(tmp_path, existing, mnist_dir):
    out = run_in_copy(tmp_path, existing, mnist_dir, "--sweep", "momentum_decayy")
    assert_one_paragraph_error(out, ["momentum_decayy", "momentum_decay", "seed_note", "wide"])


# Settings refused before any store is made: run in an empty folder, where a sweep would create
# optuna.db and mlflow.db (issue 25: sampler_args=5 was a TypeError after both were made).
FRESH_CASES = {
    "sampler_args a number": (["sweep.sampler_args=5"],
                              ["sweep.sampler_args=5", "mapping of keyword arguments", "null"]),
    "sampler_args a list": (["sweep.sampler_args=[1]"],
                            ["sweep.sampler_args=[1]", "mapping of keyword arguments"]),
    "pruner_args a number": (["sweep.pruner_args=5"],
                             ["sweep.pruner_args=5", "mapping of keyword arguments", "null"]),
    "pruner_args a list": (["sweep.pruner_args=[1]"],
                           ["sweep.pruner_args=[1]", "mapping of keyword arguments"]),
    "grace_period equal to the heartbeat": (
        ["sweep.heartbeat_interval=10", "sweep.grace_period=10"],
        ["sweep.grace_period=10", "sweep.heartbeat_interval=10", "greater than"]),
    "grace_period below the heartbeat": (  # the default heartbeat (10 s)
        ["sweep.grace_period=5"], ["sweep.grace_period=5", "sweep.heartbeat_interval=10"]),
}


@pytest.mark.parametrize("case", list(FRESH_CASES))
def test_bad_setting_is_refused_before_any_store_is_made(case, tmp_path, mnist_dir):
    overrides, expected = FRESH_CASES[case]
    out = run_cli("mnist_sweep.sweep", "--sweep", "momentum", "sweep.quiet=true", *overrides,
                  f"data.root={mnist_dir}", *TINY, "train.epochs=1", cwd=tmp_path)
    assert_one_paragraph_error(out, expected)
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "mlruns").exists()


def test_null_sampler_and_pruner_args_and_a_grace_period_above_the_heartbeat_are_accepted(tmp_path):
    out = run_cli("mnist_sweep.sweep", "--sweep", "momentum", "--show", "sweep.sampler_args=null",
                  "sweep.pruner_args={n_startup_trials: 2}", "sweep.heartbeat_interval=10",
                  "sweep.grace_period=11", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "grace_period: 11" in out.stdout
