"""Confirmation (search/confirm.py): the search's top configurations trained again with fresh
seeds; the champion is the best mean. Real sweeps on synthetic data, real SQLite stores."""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import finish, run_cli, spawn, study_runs, wait_for
from test_bad_input import assert_one_paragraph_error
from test_sweep import TINY, load, sweep_cli

CONFIRM = ["sweep.confirm.top=2", "sweep.confirm.seeds=2", "sweep.pruner=none"]
# Two configurations far apart on the synthetic data after 2 epochs: learnt, and near chance;
# minimized val_loss, so that a planted lucky value (0.0) beats any real one.
PLANTED_SWEEP = """
sweep: {study_name: planted, n_trials: 1, pruner: none, metric: val_loss}
params:
  optim.lr: tag(log, interval(0.0001, 0.5))
  optim.momentum: interval(0.0, 0.99)
fixed: {train.epochs: 2}
enqueue:
  - {optim.lr: 0.05, optim.momentum: 0.9}
"""
BAD = {"optim.lr": 0.0005, "optim.momentum": 0.0}


def confirmation_trials(study: optuna.Study) -> list:
    return [t for t in study.trials if t.state == TrialState.COMPLETE]


def confirmation_runs(folder) -> list:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    return client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "tags.sweep_role = 'confirmation'",
        max_results=1000,
    )


def test_confirmation_trains_the_top_configurations_with_fresh_seeds(tmp_path, mnist_dir):
    out = sweep_cli(tmp_path, mnist_dir, "--sweep", "momentum", "sweep.n_trials=3", *CONFIRM)
    assert out.returncode == 0, out.stderr[-3000:]
    search = load(tmp_path, "momentum")
    confirmation = load(tmp_path, "momentum-confirm-3-2x2")
    # the search's trials are untouched: three, none with a seed of its own
    assert len(search.trials) == 3 and all("train.seed" not in t.params for t in search.trials)
    ranked = sorted(
        (t for t in search.trials if t.state == TrialState.COMPLETE), key=lambda t: (-t.value, t.number)
    )
    top = {t.number: t.params for t in ranked[:2]}
    trials = confirmation_trials(confirmation)
    assert len(trials) == 4
    # each top configuration with each fresh seed, once; the search trained with train.seed=0
    slots = Counter((t.user_attrs["confirms_trial"], t.params["train.seed"]) for t in trials)
    assert set(slots) == {(n, s) for n in top for s in (1, 2)} and set(slots.values()) == {1}
    for t in trials:
        search_params = {k: v for k, v in t.params.items() if k != "train.seed"}
        assert search_params == top[t.user_attrs["confirms_trial"]]
    # recorded on the search study; the console's last lines say it
    result = search.user_attrs["confirmation"]
    assert result["search_trials"] == 3 and result["seeds"] == [1, 2]
    assert "confirmed over 2 fresh seeds" in out.stdout
    assert ("is still first" in out.stdout) == result["search_best_still_first"]
    # MLflow: runs nested under the parent, tagged with what they confirm and their seed
    runs = confirmation_runs(tmp_path)
    (parent,), _ = study_runs(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), "momentum")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert {(int(r.data.tags["confirms_trial"]), int(r.data.tags["confirm_seed"])) for r in runs} == set(slots)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["confirmed_champion_trial"] == str(result["champion_trial"])
    assert parent.data.tags["best_trial"] == str(result["champion_trial"])
    assert "Confirmed over fresh seeds" in parent.data.tags["mlflow.note.content"]
    # the parent's params: the champion's search trial's, not a confirmation run's fresh seed
    champion = search.trials[result["champion_trial"]]
    assert parent.data.tags["params_trial"] == str(champion.number)
    search_run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(
        champion.user_attrs["mlflow_run_id"])
    assert parent.data.params["train.seed"] == search_run.data.params["train.seed"]
    assert int(parent.data.params["train.seed"]) not in {seed for _, seed in slots}
    assert "params are trial" not in parent.data.tags["mlflow.note.content"]
    # asked again with more seeds: not the recorded 2 x 2 (it was ignored: only the search's
    # trial count was compared), a confirmation of 2 x 3 that the parent then reports
    assert result["asked"] == [2, 2]
    out = sweep_cli(tmp_path, mnist_dir, "--sweep", "momentum", "--confirm", "sweep.n_trials=3",
                    "sweep.confirm.top=2", "sweep.confirm.seeds=3", "sweep.pruner=none")
    assert out.returncode == 0, out.stderr[-3000:]
    result = load(tmp_path, "momentum").user_attrs["confirmation"]
    assert result["asked"] == [2, 3] and result["seeds"] == [1, 2, 3]
    assert len(confirmation_trials(load(tmp_path, "momentum-confirm-3-2x3"))) == 6


def planted_search(folder, mnist_dir) -> tuple[int, int]:
    """A finished search of one real trial (a good configuration) and one added as computed
    elsewhere: a bad configuration with a lucky single val_loss of 0.0, the search's best. The
    numbers of (the good, the lucky)."""
    sweep_file = folder / "planted.yaml"
    sweep_file.write_text(PLANTED_SWEEP)
    out = sweep_cli(folder, mnist_dir, "--sweep", str(sweep_file))
    assert out.returncode == 0, out.stderr[-3000:]
    study = load(folder, "planted")
    good = study.trials[0]
    study.add_trial(
        optuna.trial.create_trial(
            params=BAD,
            distributions=good.distributions,
            value=0.0,
            user_attrs={"test_acc": 1.0},
            intermediate_values={1: 0.1, 2: 0.0},
        )
    )
    return good.number, len(study.trials) - 1


def test_the_champion_is_the_best_mean_not_the_luckiest_seed(tmp_path, mnist_dir):
    good, lucky = planted_search(tmp_path, mnist_dir)
    out = sweep_cli(tmp_path, mnist_dir, "--sweep", str(tmp_path / "planted.yaml"), "--confirm",
                    "sweep.n_trials=2", "sweep.confirm.top=2", "sweep.confirm.seeds=2")
    assert out.returncode == 0, out.stderr[-3000:]
    result = load(tmp_path, "planted").user_attrs["confirmation"]
    assert result["search_best_trial"] == lucky  # the lucky run led the search ...
    assert result["champion_trial"] == good  # ... the mean over fresh seeds does not follow it
    assert not result["search_best_still_first"]
    assert f"the search's best trial #{lucky} is not first" in out.stdout
    means = {c["trial"]: c["mean"] for c in result["configs"]}
    assert means[good] < means[lucky]  # val_loss
    (parent,), _ = study_runs(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), "planted")
    assert parent.data.tags["best_trial"] == str(good)
    assert parent.info.status == "FINISHED"


@pytest.mark.parametrize("population", ["1", pytest.param("auto", marks=pytest.mark.slow)])
def test_killed_mid_confirmation_the_same_command_finishes_exactly_k_by_n(
    tmp_path, mnist_dir, population
):
    """kill -9 with one slot done and the next mid-way (one at a time), or with all four
    mid-way (one population): the same command ends with each slot finished exactly once."""
    args = ["--sweep", "momentum", "sweep.n_trials=2", *CONFIRM, f"data.root={mnist_dir}", *TINY,
            # small batches make trials long enough to be caught mid-way; one thread, as torch's
            # spinning threads on 2 busy cores made them 5x slower under the suite's other tests
            "train.batch_size=10", "train.epochs=20", "train.threads=1",
            "tracking.batch_curve_every=50",
            "sweep.heartbeat_interval=1", "sweep.grace_period=4",
            "sweep.register_model=false", "train.progress=false",
            f"sweep.confirm.population={population}"]
    process = spawn(sys.executable, "-m", "mnist_sweep.sweep", *args, cwd=tmp_path)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    opened: list[optuna.Study] = []  # loaded once it exists: a load per look is slower than a trial

    def mid_confirmation():
        if not opened:
            opened.append(optuna.load_study(study_name="momentum-confirm-2-2x2", storage=storage))
        trials = opened[0].trials
        mid_way = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
        if population == "1":
            return mid_way and any(t.state == TrialState.COMPLETE for t in trials)
        return len(mid_way) == 4

    try:
        wait_for(mid_confirmation, "confirmation trials mid-way", timeout=240)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # kill -9: nothing ends anything
        finish(process, 30)
    again = run_cli("mnist_sweep.sweep", *args, cwd=tmp_path, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    confirmation = load(tmp_path, "momentum-confirm-2-2x2")
    complete = confirmation_trials(confirmation)
    slots = Counter(t.user_attrs["confirm_slot"] for t in complete)
    assert sorted(slots) == [0, 1, 2, 3] and set(slots.values()) == {1}  # exactly k x n
    runs = confirmation_runs(tmp_path)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 4
    assert len({(r.data.tags["confirms_trial"], r.data.tags["confirm_seed"]) for r in finished}) == 4
    killed = 1 if population == "1" else 4
    assert sorted(r.info.status for r in runs) == ["FAILED"] * killed + ["FINISHED"] * 4
    assert load(tmp_path, "momentum").user_attrs["confirmation"]["search_trials"] == 2


def test_bad_confirm_settings_and_a_search_not_over_are_refused(tmp_path, mnist_dir):
    out = sweep_cli(tmp_path, mnist_dir, "--sweep", "momentum", "sweep.confirm.top=-1")
    assert_one_paragraph_error(out, ["sweep.confirm.top=-1", "an integer >= 0"])
    out = sweep_cli(tmp_path, mnist_dir, "--sweep", "momentum", "sweep.confirm.every=2")
    assert_one_paragraph_error(out, ["unknown setting(s) every", "allowed: top, seeds, population"])
    out = sweep_cli(tmp_path, mnist_dir, "--sweep", "momentum", "--confirm", "sweep.confirm.top=0")
    assert_one_paragraph_error(out, ["nothing to confirm"])
    assert not (tmp_path / "optuna.db").exists()  # nothing made
    shown = run_cli("mnist_sweep.sweep", "--sweep", "momentum_decay", "--show", cwd=tmp_path)
    assert "confirm:\n    top: 5\n    seeds: 5\n    population: auto" in shown.stdout  # the default sweep
    first = sweep_cli(tmp_path, mnist_dir, "--sweep", "momentum", "sweep.n_trials=1", "train.epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    out = sweep_cli(tmp_path, mnist_dir, "--sweep", "momentum", "--confirm", "sweep.n_trials=2",
                    "train.epochs=1", *CONFIRM[:2])
    assert_one_paragraph_error(out, ["is not over", "1 of sweep.n_trials=2"])


def test_the_seed_table_is_a_confirmation_of_the_notes_configurations(tmp_path, mnist_dir):
    out = run_cli("mnist_sweep.seed_table", "--seeds", "2", f"data.root={mnist_dir}", *TINY,
                  "train.epochs=1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) == 3 and all(len(row.split("|")[4].split(",")) == 2 for row in rows)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    (name,) = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    trials = confirmation_trials(optuna.load_study(study_name=name, storage=storage))
    assert sorted((t.params["schedule"], t.params["train.seed"]) for t in trials) == [
        (schedule, seed) for schedule in ("none", "plateau", "step") for seed in (1, 2)
    ]


def test_two_workers_confirm_each_slot_once_and_register_the_confirmed_champion(tmp_path, mnist_dir):
    """Two worker processes take the enqueued slots one at a time: none trained twice, none
    sampled afresh; the registry's champion is the confirmed one's typical seed."""
    out = sweep_cli(tmp_path, mnist_dir, "--sweep", "momentum", "sweep.n_trials=3", *CONFIRM,
                    "sweep.workers=2", "sweep.confirm.population=1", "sweep.register_model=auto")
    assert out.returncode == 0, out.stderr[-3000:]
    confirmation = load(tmp_path, "momentum-confirm-3-2x2")
    trained = [t for t in confirmation.trials if not t.user_attrs.get("excess")]
    assert all("confirm_slot" in t.user_attrs for t in trained)  # nothing sampled
    assert sorted(t.user_attrs["confirm_slot"] for t in trained) == [0, 1, 2, 3]
    result = load(tmp_path, "momentum").user_attrs["confirmation"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("momentum", "champion")
    assert champion.run_id == result["champion_run_id"]
    assert client.get_run(champion.run_id).data.tags["sweep_role"] == "confirmation"


def test_the_registered_seed_is_the_one_closest_to_the_mean_by_validation():
    """Validation picks the model too (the test set only reports); a diverged seed (NaN) or a
    seed without a run (tracking off) is never picked, and none at all gives None, not an
    error after the whole confirmation."""
    from mnist_sweep.search.confirm import ConfigResult

    def result(values, test_accs, run_ids):
        return ConfigResult(0, 3, "#3", {}, [1, 2, 3, 4][:len(values)], values, test_accs, run_ids, 0)

    nan = float("nan")
    # by validation: seed a (0.95 against a mean of 0.9525); by test it would be seed c
    assert result([0.95, 0.96, 0.98, 0.92], [0.97, 0.90, 0.93, 0.99], ["a", "b", "c", "d"]) \
        .representative_run() == "a"
    assert result([0.9, nan, 0.93], [0.9, nan, 0.93], ["a", "b", "c"]).representative_run() in {"a", "c"}
    assert result([0.9, 0.91], [0.9, 0.91], ["", ""]).representative_run() is None
    assert result([nan], [nan], ["a"]).representative_run() is None


def test_a_command_that_cannot_confirm_leaves_a_finished_parent_ended(tmp_path, mnist_dir, monkeypatch):
    """A search over, its confirmation not made: a joining worker (`--join`) or --create-only
    never makes it (its maker, `make sweep`, does), so it must not set the ended parent back to
    RUNNING (nobody would end it again); the command that confirms does."""
    out = sweep_cli(tmp_path, mnist_dir, "--sweep", "momentum", "sweep.n_trials=1",
                    "sweep.confirm.top=0", "sweep.pruner=none")
    assert out.returncode == 0, out.stderr[-3000:]
    from mnist_sweep.base.hydra_config import compose
    from mnist_sweep.search.driver import start_parent_run
    from mnist_sweep.search.study import open_study
    from mnist_sweep.search.sweepfile import load_spec
    from mnist_sweep.tracking.runs import open_tracker

    monkeypatch.chdir(tmp_path)  # the default stores: ./optuna.db, ./mlflow.db
    spec = load_spec("momentum", ["sweep.n_trials=1", "sweep.pruner=none", *CONFIRM[:2],
                                  f"data.root={mnist_dir}", *TINY])
    study = open_study(spec, spec.space(), compose(spec.fixed), create=False)[0]
    tracker = open_tracker(compose(spec.fixed).tracking)
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert tracker.client.get_run(parent).info.status == "FINISHED"
    assert start_parent_run(spec, study, tracker, made_here=False, confirms=False) == parent
    assert tracker.client.get_run(parent).info.status == "FINISHED"
    assert start_parent_run(spec, study, tracker, made_here=False, confirms=True) == parent
    assert tracker.client.get_run(parent).info.status == "RUNNING"  # until its confirmation ends
    # when a recorded confirmation is made again: other k x n asked, or seeds given up (once)
    from mnist_sweep.search.driver import confirmation_left

    recorded = {"search_trials": 1, "asked": [2, 2], "attempts": 1,
                "configs": [{"trial": 0, "missing": 0}]}
    for changes, left in [({}, False), ({"asked": [2, 3]}, True),
                          ({"configs": [{"trial": 0, "missing": 1}]}, True),
                          ({"configs": [{"trial": 0, "missing": 1}], "attempts": 2}, False)]:
        study.set_user_attr("confirmation", {**recorded, **changes})
        assert confirmation_left(study, spec) is left, changes
