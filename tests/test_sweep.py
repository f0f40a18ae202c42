"""The sweep end to end on synthetic data: real Optuna SQLite storage, real MLflow store, real
worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import caught, finish, run_cli, stopped_if_still
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from mnist_sweep.search.study import best_complete

TINY = ["data.val_size=100", "train.batch_size=50", "train.epochs=3"]


def sweep_cli(folder: Path, mnist_dir: Path, *args: str, timeout: float = 300):
    return run_cli("mnist_sweep.sweep", *args, f"data.root={mnist_dir}", *TINY, cwd=folder,
                   timeout=timeout)


def load(folder: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")


def finished(study: optuna.Study) -> list:
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def failed(study: optuna.Study) -> list:
    """FAIL trials, leaving out excess slots (opened for a slot another worker had just filled,
    closed untrained: see study.counts)."""
    return [t for t in study.trials if t.state == TrialState.FAIL and not t.user_attrs.get("excess")]


@pytest.fixture(scope="session")  # once per pytest process: xdist interleaves modules
def two_worker_sweep(tmp_path_factory, mnist_dir):
    """momentum_decay, 8 trials, 2 workers, plots refreshed every 3 trials."""
    folder = tmp_path_factory.mktemp("sweep")
    out = sweep_cli(folder, mnist_dir, "--sweep", "momentum_decay", "sweep.n_trials=8",
                    "sweep.workers=2", "sweep.report_every=3", "sweep.register_model=auto",
                    "sweep.confirm.top=0")  # the search alone (confirmation: test_confirm.py)
    assert out.returncode == 0, out.stderr[-3000:]
    return folder, out


def test_two_workers_finish_exactly_n_trials_without_duplicates_or_lock_errors(two_worker_sweep):
    folder, out = two_worker_sweep
    study = load(folder, "momentum_decay")
    done = finished(study)
    assert len(done) == 8
    numbers = [t.number for t in done]
    assert len(set(numbers)) == len(numbers)
    assert "database is locked" not in out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    workers = {line.split()[0] for line in out.stdout.splitlines() if line.startswith("[w")}
    assert workers == {"[w0", "[w1"}  # both workers trained trials
    assert study.trials[0].params == {"optim.lr": 0.01, "optim.momentum": 0.78, "schedule": "none"}
    # the deep link to the study's trials in MLflow's Model training view, best first
    link = next(line for line in out.stdout.splitlines() if "review the trials" in line).split()[-1]
    assert link.startswith("http://127.0.0.1:5000/#/experiments/") and "workflowType=machine_learning" in link
    assert "orderByKey=metrics.%60val_acc%60&orderByAsc=false" in link
    assert "tags.study_name%20%3D%20%27momentum_decay%27" in link


def test_conditional_parameters_appear_only_with_their_option(two_worker_sweep):
    folder, _ = two_worker_sweep
    own = {"step": {"schedule.step_size", "schedule.gamma"},
           "plateau": {"schedule.patience", "schedule.factor"}, "onecycle": {"schedule.max_lr"}}
    conditional = set().union(*own.values())
    schedules = set()
    for trial in finished(load(folder, "momentum_decay")):
        schedule = trial.params["schedule"]
        schedules.add(schedule)
        assert set(trial.params) & conditional == own.get(schedule, set()), trial.params
    assert len(schedules) >= 3  # the check covered several options


def test_mlflow_has_one_parent_and_a_child_per_trial(two_worker_sweep):
    folder, _ = two_worker_sweep
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name == "momentum_decay" and parent.info.status == "FINISHED"
    assert parent.data.tags["sampler"] == "tpe" and parent.data.tags["pruner"] == "median"
    assert parent.data.tags["storage"] == "sqlite:///optuna.db"
    # the sweep's own metrics stay apart from the trials' (sweep_*)
    assert {"sweep_best_val_acc", "sweep_trials_finished"} <= set(parent.data.metrics)
    assert "val_acc" not in parent.data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    study = load(folder, "momentum_decay")
    best = best_complete(study)  # the one rule the report follows
    assert best is not None
    best_run = client.get_run(best.user_attrs["mlflow_run_id"])
    tags = parent.data.tags
    assert tags["best_trial"] == str(best.number) and tags["best_run_id"] == best_run.info.run_id
    assert {k.removeprefix("best.") for k in tags if k.startswith("best.")} == set(best.params)
    # the best configuration as the parent's params, under the trials' keys
    assert parent.data.params == best_run.data.params and tags["params_trial"] == str(best.number)
    note = tags["mlflow.note.content"]
    assert f"Best: trial {best.number}, [{best_run.info.run_name}](#/experiments/" in note
    assert f"val_acc {best.value:.4f}" in note and "test_acc" in note and "plots/" in note
    assert "workflowType=machine_learning" in note
    assert client.get_model_version_by_alias("momentum_decay", "champion").run_id == best_run.info.run_id
    experiment = client.get_experiment(parent.info.experiment_id)
    assert "parent run" in experiment.tags["mlflow.note.content"]
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == \
        sorted(t.number for t in finished(study))
    for child in children:
        trial = study.trials[int(child.data.tags["trial_number"])]
        expected = "pruned" if trial.state == TrialState.PRUNED else "complete"
        assert child.data.tags["state"] == expected and child.info.status == "FINISHED"
        assert child.data.tags["sweep_role"] == "trial"
        # the trial number first, zero-padded, then its sampled values
        assert child.info.run_name.startswith(f"t{trial.number:03d} {trial.params['schedule']} ")
        assert child.data.tags["epochs_trained"] == str(trial.user_attrs.get("epochs_trained", 3))
        if expected == "pruned":
            assert child.data.tags["mlflow.note.content"].startswith(
                f"**Pruned** by the median pruner after epoch {trial.user_attrs['epochs_trained']}")
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id
        epochs = trial.user_attrs.get("epochs_trained", 3)
        history = client.get_metric_history(child.info.run_id, "val_acc")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, epochs + 1))
        assert len(client.get_metric_history(child.info.run_id, "batch_train_loss")) == 10 * epochs
        assert child.data.tags["threads"] == "1"  # 2 workers split the 2 cores
        assert not any(k.startswith(("tracking.", "train.threads", "data.root")) for k in child.data.params)


def test_the_parents_params_are_written_once_the_sweep_ends_not_when_an_early_trial_leads(
        two_worker_sweep, monkeypatch):
    """MLflow params cannot change: a refresh mid-sweep writes none (it once wrote trial 1's,
    the best at that moment, and the parent showed them as the sweep's answer); the final
    report writes the best trial's. Here on a second parent run of the finished study."""
    from dataclasses import replace

    from mnist_sweep.search.report import write_report
    from mnist_sweep.search.sweepfile import load_spec

    folder, _ = two_worker_sweep
    monkeypatch.chdir(folder)  # the sweep's relative stores
    client = MlflowClient("sqlite:///mlflow.db")
    study = load(folder, "momentum_decay")
    best = best_complete(study)
    assert best is not None
    best_run = client.get_run(best.user_attrs["mlflow_run_id"])
    parent = client.create_run(best_run.info.experiment_id, run_name="second look").info.run_id
    spec = replace(load_spec("momentum_decay", ["sweep.register_model=false"]), parent_run_id=parent)
    write_report(study, spec, spec.space(), plots=False)  # a refresh
    assert client.get_run(parent).data.params == {}
    assert client.get_run(parent).data.tags["best_trial"] == str(best.number)
    write_report(study, spec, spec.space(), plots=False, status="FINISHED")
    ended = client.get_run(parent)
    assert ended.data.params == best_run.data.params
    assert ended.data.tags["params_trial"] == str(best.number)


def test_parent_artifacts_are_valid_pngs_csv_and_the_sweep_file(two_worker_sweep):
    import matplotlib.image

    folder, _ = two_worker_sweep
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    parent = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
              if r.data.tags.get("sweep_role") == "parent"][0]
    local = Path(client.download_artifacts(parent.info.run_id, ""))
    pngs = sorted(p.name for p in (local / "plots").glob("*.png"))
    for name in ("optimization_history.png", "param_importances.png", "parallel_coordinate.png",
                 "top_trials_curves.png"):
        assert name in pngs
    assert any(name.startswith("contour_optim.momentum_vs_") for name in pngs), pngs
    for png in (local / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(png).shape[0] > 100
    assert (local / "sweep" / "momentum_decay.yaml").read_text().startswith("# The default sweep")
    assert "conditional" in (local / "sweep" / "resolved_space.yaml").read_text()
    csv = (local / "trials.csv").read_text().splitlines()
    assert len(csv) == 1 + len(load(folder, "momentum_decay").trials)


def test_a_designed_case_is_pruned_and_marked_so_in_optuna_and_mlflow(tmp_path, mnist_dir):
    sweep_file = tmp_path / "prune.yaml"
    sweep_file.write_text("""
sweep: {study_name: prune, n_trials: 4, sampler: random, pruner: median,
        pruner_args: {n_startup_trials: 2, n_warmup_steps: 0}}
params:
  optim.lr: choice(0.1, 0.09, 0.000001, 0.000002)
enqueue:  # two that learn, then two that cannot (enqueue skips exact duplicates)
  - {optim.lr: 0.1}
  - {optim.lr: 0.09}
  - {optim.lr: 0.000001}
  - {optim.lr: 0.000002}
""")
    out = sweep_cli(tmp_path, mnist_dir, "--sweep", str(sweep_file), "train.epochs=4")
    assert out.returncode == 0, out.stderr[-3000:]
    states = [t.state for t in load(tmp_path, "prune").trials]
    assert states == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED] * 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.state = 'pruned'")
    assert len(runs) == 2
    assert all(len(client.get_metric_history(r.info.run_id, "val_acc")) == 1 for r in runs)


def test_an_interrupted_sweep_resumes_to_exactly_n_trials(tmp_path, mnist_dir):
    args = ["--sweep", "momentum", "sweep.n_trials=4", "sweep.pruner=none", "train.epochs=10"]
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_sweep.sweep", *args, f"data.root={mnist_dir}", *TINY[:2]],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    storage = tmp_path / "optuna.db"

    def one_done_and_one_mid_way() -> bool:
        try:
            trials = load(tmp_path, "momentum").trials if storage.exists() else []
        except Exception:  # no study yet, or the sweep was stopped mid-write, holding the lock
            return False
        return any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) and any(
            t.state == TrialState.RUNNING and t.intermediate_values for t in trials)

    pressed = caught(process.pid, one_done_and_one_mid_way, process)
    if pressed:  # Ctrl-C to the stopped sweep: delivered when it goes on
        os.killpg(process.pid, signal.SIGINT)
        os.killpg(process.pid, signal.SIGCONT)
    assert pressed, "no trial seen mid-way after a finished one"
    _, err = finish(process, 120)
    assert process.returncode != 0 and "resume" in err
    before = load(tmp_path, "momentum")
    assert 1 <= len(finished(before)) < 4
    kept = {t.number: t.params for t in finished(before)}

    out = run_cli("mnist_sweep.sweep", *args, f"data.root={mnist_dir}", *TINY[:2], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    after = load(tmp_path, "momentum")
    assert len(finished(after)) == 4
    assert {t.number: t.params for t in finished(after) if t.number in kept} == kept
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len([r for r in runs if r.data.tags.get("sweep_role") == "parent"]) == 1  # reused
    assert not [r for r in runs if r.info.status == "RUNNING"]
    interrupted = failed(after)
    assert interrupted  # the trial that Ctrl-C stopped
    for trial in interrupted:  # FAIL in Optuna, KILLED in MLflow (if its run had started)
        if "mlflow_run_id" in trial.user_attrs:
            assert client.get_run(trial.user_attrs["mlflow_run_id"]).info.status == "KILLED"


def test_seed_note_enqueues_exactly_the_three_configurations(tmp_path, mnist_dir):
    out = sweep_cli(tmp_path, mnist_dir, "--sweep", "seed_note", "tracking.enabled=false")
    assert out.returncode == 0, out.stderr[-3000:]
    study = load(tmp_path, "seed_note")
    assert [t.params for t in study.trials] == [{"schedule": s} for s in ("none", "plateau", "step")]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert not (tmp_path / "mlflow.db").exists()


def test_show_prints_the_resolved_space_and_runs_nothing(tmp_path):
    out = run_cli("mnist_sweep.sweep", "--sweep", "momentum_decay", "--show",
                  "optim.weight_decay=tag(log,interval(1e-6,1e-3))", "sweep.n_trials=7", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "n_trials: 7" in out.stdout and "optim.weight_decay" in out.stdout
    assert "FloatDistribution" in out.stdout and "schedule.step_size" in out.stdout
    assert not (tmp_path / "optuna.db").exists()


def test_a_worker_killed_mid_trial_is_failed_at_once_and_its_trial_retried(tmp_path, mnist_dir):
    kill_a_worker_mid_trial(tmp_path, mnist_dir, f"sqlite:///{tmp_path / 'optuna.db'}",
                            f"sqlite:///{tmp_path / 'mlflow.db'}")


def kill_a_worker_mid_trial(tmp_path, mnist_dir, storage: str, tracking: str) -> None:
    """kill -9 of one of two workers: the study still ends with exactly n_trials finished trials,
    the killed trial is FAIL and retried, and its MLflow run does not stay RUNNING. The driver sees
    its worker die and fails the trial at once, not a heartbeat grace period (10 s here) later."""
    study_name = f"kill-{tmp_path.name}"
    args = ["--sweep", "momentum", f"sweep.study_name={study_name}", f"sweep.storage={storage}",
            f"tracking.tracking_uri={tracking}",
            "sweep.n_trials=4", "sweep.pruner=none", "sweep.workers=2",
            # grace 10 s: short for the test, long enough that a loaded machine's late heartbeat
            # is not taken for a dead worker
            "sweep.heartbeat_interval=1", "sweep.grace_period=10", "train.epochs=10"]
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_sweep.sweep", *args, f"data.root={mnist_dir}", *TINY[:2]],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim, deadline = None, time.time() + 120
    while victim is None and time.time() < deadline:  # a trial mid-way, and the worker running it
        time.sleep(0.3)
        try:
            trials = optuna.load_study(study_name=study_name, storage=storage).trials
            running = [t for t in trials if t.state == TrialState.RUNNING
                       and "mlflow_run_id" in t.user_attrs and "worker" in t.user_attrs]
        except Exception:
            continue
        if not running:
            continue
        # A kill must land mid-trial, not between trials: stop the worker, look again.
        pid, number = int(running[0].user_attrs["worker"].rsplit(":", 1)[1]), running[0].number
        victim = stopped_if_still(pid, lambda: next(
            (t for t in optuna.load_study(study_name=study_name, storage=storage).trials
             if t.number == number and t.state == TrialState.RUNNING), None))
        if victim:
            os.kill(pid, signal.SIGKILL)
    assert victim, "no trial was found mid-way"
    out, err = finish(process, 240)
    assert process.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name=study_name, storage=storage)
    done = finished(study)
    assert len(done) == 4 and len({t.number for t in done}) == 4
    killed = failed(study)
    assert [t.number for t in killed] == [victim.number], \
        [(t.number, t.state.name, t.system_attrs) for t in study.trials]
    retried = [t for t in done if t.system_attrs.get("failed_trial") == killed[0].number]
    assert len(retried) == 1 and retried[0].params == killed[0].params
    client = MlflowClient(tracking)
    killed_run = client.get_run(killed[0].user_attrs["mlflow_run_id"])
    assert killed_run.info.status == "FAILED" and killed_run.data.tags["state"] == "failed"
    assert killed_run.data.tags["fail_reason"] == "its worker process died (exit code -9)"
    assert f"trial {victim.number}: its worker process died (exit code -9); failed and retried now" in out + err
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.study_name = '{study_name}'")
    assert len(runs) == 5 + 1  # 4 finished + the killed one, and the parent
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_processes_creating_a_new_storage_at_once_all_open_it(tmp_path):
    """Workers (or a second `make sweep`) starting together on a fresh SQLite file race to
    create its schema; the losers open what the winner made instead of failing."""
    code = ("import optuna, sys; from mnist_sweep.search.study import open_storage; "
            "optuna.create_study(study_name='s', load_if_exists=True, "
            "storage=open_storage(sys.argv[1]))")
    for attempt in range(3):
        url = f"sqlite:///{tmp_path / f'race-{attempt}.db'}"
        processes = [subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE,
                                      text=True) for _ in range(4)]
        errors = [finish(p, 120)[1] for p in processes]
        assert [p.returncode for p in processes] == [0] * 4, errors
