"""The study's MLflow parent run: ended once, when the study is done, by whichever driver sees it
done first (a claim in the Optuna store); left RUNNING by a driver stopped while others still
train; ended by the driver itself when its report process died; and the best trial named by one
rule (study.ranked_complete) on the console, the parent run and the registry.

Real stores (Optuna SQLite or PostgreSQL, MLflow SQLite), real sweep processes, synthetic MNIST."""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import (
    finish,
    needs_postgres,
    run_cli,
    spawn,
    sqlite_free,
    stopped_if_still,
    study_runs,
)
from conftest import test_processes as processes_of_the_test
from conftest import wait_for
from test_sweep import TINY, finished

SPEC_KEYS = ["data.val_size=100", "train.batch_size=50"]


def driver(tmp_path: Path, mnist_dir: Path, *args: str):
    """`make sweep` of the momentum study in a process of its own (one worker, in the driver)."""
    return spawn(
        sys.executable,
        "-m",
        "mnist_sweep.sweep",
        "--sweep",
        "momentum",
        "sweep.pruner=none",
        f"data.root={mnist_dir}",
        *SPEC_KEYS,
        *args,
        cwd=tmp_path,
    )


def the_parent(tmp_path: Path, study_name: str = "momentum"):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = study_runs(client, study_name)[0]
    return client, parent


def parent_endings(tmp_path: Path, study_name: str = "momentum") -> list[str]:
    """The claims on the parent's end in the Optuna store (study system attributes)."""
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    attributes = study._storage.get_study_system_attrs(study._study_id)
    return [key for key in attributes if key.startswith("parent_run_ended:")]


# ----------------------------------------------------------------------------- the report process


def test_a_conditional_under_a_numeric_choice_ends_the_parent_finished_with_its_report(
    tmp_path, mnist_dir
):
    """The spec reached the report process as JSON, which turned the option 0.9 into "0.9": the
    report process died building the space, and the parent stayed RUNNING for ever, with no
    report, while the sweep exited 0."""
    (tmp_path / "numeric.yaml").write_text("""
sweep: {study_name: numeric, n_trials: 3, sampler: random, pruner: none}
params:
  optim.momentum: choice(0.5, 0.9)
conditional:
  optim.momentum:
    0.9:
      optim.lr: interval(0.01, 0.1)
enqueue:
  - {optim.momentum: 0.9, optim.lr: 0.05}
""")
    out = run_cli(
        "mnist_sweep.sweep",
        "--sweep",
        str(tmp_path / "numeric.yaml"),
        f"data.root={mnist_dir}",
        *TINY,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    client, parent = the_parent(tmp_path, "numeric")
    assert parent.info.status == "FINISHED", out.stderr[-3000:]
    assert "best_trial" in parent.data.tags
    assert "trials.csv" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "Traceback" not in out.stderr


def test_a_report_process_that_dies_leaves_the_driver_to_end_the_parent(tmp_path, mnist_dir):
    """The report process killed mid-sweep (out of memory, say): the driver ends the parent run
    itself, with the sweep's status, and says that the report is missing."""
    process = driver(tmp_path, mnist_dir, "sweep.n_trials=3", "train.epochs=8")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    wait_for(
        lambda: optuna.load_study(study_name="momentum", storage=storage).user_attrs.get(
            "mlflow_parent_run_id"
        ),
        "the parent run",
    )
    (report,) = wait_for(
        lambda: [
            pid
            for pid in processes_of_the_test()
            if b"mnist_sweep.search.report" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ],
        "the report process",
    )
    os.kill(report, signal.SIGKILL)
    out, err = finish(process, 300)
    assert process.returncode == 0, err[-3000:]
    _, parent = the_parent(tmp_path)
    assert parent.info.status == "FINISHED"
    assert "the report process ended" in out + err


# ----------------------------------------------------------------------------- many drivers


def test_two_drivers_on_one_study_end_the_parent_once_and_register_one_model(tmp_path, mnist_dir):
    """Two copies of the same `make sweep` (a cluster array): both see the study done at the same
    moment; one ends the parent (one final report: one sweep_trials_finished point) and registers
    one model version. The same command on the complete study leaves the parent alone; raising
    sweep.n_trials sets it RUNNING again, and that completion ends it once more."""
    args = ["train.epochs=4", "sweep.report_every=100", "sweep.register_model=auto"]
    processes = [driver(tmp_path, mnist_dir, "sweep.n_trials=6", *args) for _ in range(2)]
    outputs = [finish(p, 300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    study = optuna.load_study(study_name="momentum", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(finished(study)) == 6
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # both trained
    client, parent = the_parent(tmp_path)
    assert parent.info.status == "FINISHED"
    run_id = parent.info.run_id
    assert len(client.get_metric_history(run_id, "sweep_trials_finished")) == 1
    assert len(client.search_model_versions("name = 'momentum'")) == 1
    assert len(parent_endings(tmp_path)) == 1

    for n_trials, reports in ((6, 1), (7, 2)):
        out = run_cli(
            "mnist_sweep.sweep",
            "--sweep",
            "momentum",
            "sweep.pruner=none",
            f"sweep.n_trials={n_trials}",
            f"data.root={mnist_dir}",
            *SPEC_KEYS,
            *args,
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        client, parent = the_parent(tmp_path)
        assert parent.info.status == "FINISHED"
        assert len(client.get_metric_history(run_id, "sweep_trials_finished")) == reports
        assert len(parent_endings(tmp_path)) == 1


def test_a_driver_stopped_while_another_trains_leaves_the_parent_running_for_it(
    tmp_path, mnist_dir
):
    """SIGTERM to one of two drivers (a pre-emption) while the other has a trial running: the
    stopped one ends its own trial, leaves the parent RUNNING; the other finishes the study and
    ends the parent FINISHED, with one model version."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = ["sweep.n_trials=3", "train.epochs=30", "sweep.register_model=auto"]
    first, second = driver(tmp_path, mnist_dir, *args), driver(tmp_path, mnist_dir, *args)
    host_pid = {p.pid: p for p in (first, second)}

    def both_mid_trial():
        trials = optuna.load_study(study_name="momentum", storage=storage).trials
        running = {
            int(t.user_attrs["worker"].rsplit(":", 1)[1]): t.number
            for t in trials
            if t.state == TrialState.RUNNING and t.intermediate_values and "worker" in t.user_attrs
        }
        return running if set(running) == set(host_pid) else None

    def still_running(number):
        # ... and the stopped driver holds no store's write lock, which the other needs to end
        return lambda: sqlite_free(tmp_path / "optuna.db", tmp_path / "mlflow.db") and [
            t
            for t in optuna.load_study(study_name="momentum", storage=storage).trials
            if t.number == number and t.state == TrialState.RUNNING
        ]

    stopped = None
    while stopped is None:  # the other driver held (SIGSTOP) in the middle of its trial
        running = wait_for(both_mid_trial, "a trial of each driver mid-way")
        stopped = stopped_if_still(second.pid, still_running(running[second.pid]), group=True)
    first.send_signal(signal.SIGTERM)  # the driver's pid alone, as Kubernetes and SLURM do
    _, err = finish(first, 120)
    assert first.returncode == 130, err[-3000:]
    _, parent = the_parent(tmp_path)
    assert parent.info.status == "RUNNING"  # the other driver's trial still runs
    assert parent_endings(tmp_path) == []
    os.killpg(second.pid, signal.SIGCONT)
    _, err = finish(second, 300)
    assert second.returncode == 0, err[-3000:]
    client, parent = the_parent(tmp_path)
    assert parent.info.status == "FINISHED"
    assert len(client.search_model_versions("name = 'momentum'")) == 1
    assert len(parent_endings(tmp_path)) == 1


# ----------------------------------------------------------------------------- the claim itself


def _claim_at_once(url: str, name: str, run_id: str, start_at: float) -> None:
    """One process's claim; its exit code says whether it won (0) or lost (3)."""
    from mnist_sweep.search.study import claim_parent_ending, open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(url))
    time.sleep(max(start_at - time.time(), 0))
    sys.exit(0 if claim_parent_ending(study, run_id, "FINISHED") else 3)


def claims_race(url: str) -> None:
    from mnist_sweep.search.study import claim_parent_ending, open_storage, release_parent_ending

    name = f"claims-{uuid.uuid4().hex}"  # the servers' database is shared by the session
    study = optuna.create_study(study_name=name, storage=open_storage(url))
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 8  # after the spawned processes have imported and opened the study
    processes = [
        ctx.Process(target=_claim_at_once, args=(url, name, "run-a", start_at)) for _ in range(4)
    ]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=120)
    assert sorted(p.exitcode for p in processes) == [0, 3, 3, 3]
    assert not claim_parent_ending(study, "run-a", "FINISHED")
    # A retried claim whose first attempt did commit (its reply lost) is ours: the same token.
    assert claim_parent_ending(study, "run-b", "KILLED", token="t1")
    assert claim_parent_ending(study, "run-b", "KILLED", token="t1")
    assert not claim_parent_ending(study, "run-b", "KILLED", token="t2")
    # the study's completion supersedes an early stop's end (KILLED), once
    assert claim_parent_ending(study, "run-b", "FINISHED", token="t3")
    assert not claim_parent_ending(study, "run-b", "FINISHED", token="t4")
    # set back to RUNNING (a resume with more trials): its next completion ends it again
    release_parent_ending(study, "run-b")
    assert claim_parent_ending(study, "run-b", "FINISHED", token="t4")


def test_processes_claiming_the_parents_end_at_once_on_sqlite_one_wins(tmp_path):
    claims_race(f"sqlite:///{tmp_path / 'claims.db'}")


@needs_postgres
def test_processes_claiming_the_parents_end_at_once_on_postgresql_one_wins(servers):
    claims_race(servers.storage_url)


# ----------------------------------------------------------------------------- ties


@pytest.mark.parametrize("beside", ["ties alone", "an infinite value"])
def test_equal_values_name_the_lower_trial_everywhere(beside, tmp_path, capsys):
    """Trials 1 and 2 tie for the best value: the console (summary and progress line), the
    parent run's best_trial, the registered model and the seed table all name trial 1. A value
    that is not finite (stored by an older version) is no result: it is never the best."""
    import torch
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from mnist_sweep.base.hydra_config import compose
    from mnist_sweep.search.driver import Progress, summarize
    from mnist_sweep.search.report import write_report
    from mnist_sweep.search.study import open_study
    from mnist_sweep.search.sweepfile import load_spec
    from mnist_sweep.seed_table import best_of_study
    from mnist_sweep.tracking.runs import log_torch_model

    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = load_spec(
        "momentum",
        [
            f"sweep.storage={storage}",
            f"tracking.tracking_uri={tracking}",
            "sweep.register_model=ties",
        ],
    )
    study, _ = open_study(spec, spec.space(), compose(spec.fixed), create=True)
    client = MlflowClient(tracking)
    experiment = client.create_experiment("ties")
    spec = replace(spec, parent_run_id=client.create_run(experiment).info.run_id)
    values = [0.5, 0.9, 0.9] + ([math.inf] if beside == "an infinite value" else [])
    for number, value in enumerate(values):
        run_id = client.create_run(experiment, tags={"trial_number": str(number)}).info.run_id
        log_torch_model(
            client, run_id, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
        )
        client.set_terminated(run_id)
        study.add_trial(
            create_trial(
                params={"optim.momentum": 0.1 * (number + 1)},
                distributions={"optim.momentum": FloatDistribution(0.0, 0.99)},
                value=value,
                user_attrs={"mlflow_run_id": run_id},
            )
        )

    summarize(study, spec)
    assert "best trial #1:" in capsys.readouterr().out
    assert "(#1)" in Progress(spec, study).line()
    write_report(study, spec, spec.space(), plots=False, status="FINISHED")
    assert client.get_run(spec.parent_run_id).data.tags["best_trial"] == "1"
    assert client.get_model_version_by_alias("ties", "champion").tags["trial_number"] == "1"
    best = best_of_study("momentum", storage)
    assert best is not None and best.number == 1


@pytest.mark.parametrize("claimed", ["an hour ago", "a moment ago"])
def test_a_finished_study_whose_parent_was_claimed_and_never_ended_is_ended_by_the_next_command(
        claimed, tmp_path, mnist_dir):
    """The driver that won the claim on the parent's end died (or lost the tracking server)
    before ending the run: the study is complete, its parent RUNNING, the claim held. Before,
    every later command found the claim taken and the parent stayed RUNNING for ever. Now a
    command that finds such a claim older than 10 minutes drops it and ends the parent itself;
    a recent claim is left to its owner, which may be writing the final report."""
    args = ("sweep.n_trials=2", *TINY, "sweep.register_model=false")
    out = run_cli("mnist_sweep.sweep", "--sweep", "momentum", "sweep.pruner=none",
                  f"data.root={mnist_dir}", *SPEC_KEYS, *args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    client, parent = the_parent(tmp_path)
    run_id = parent.info.run_id
    client.update_run(run_id, status="RUNNING")  # never ended by the claim's winner
    study = optuna.load_study(study_name="momentum", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    at = time.time() - (3600 if claimed == "an hour ago" else 5)
    study._storage.set_study_system_attr(
        study._study_id, f"parent_run_ended:{run_id}", {"by": "gone:1:x", "status": "FINISHED", "at": at})
    again = run_cli("mnist_sweep.sweep", "--sweep", "momentum", "sweep.pruner=none",
                    f"data.root={mnist_dir}", *SPEC_KEYS, *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    _, parent = the_parent(tmp_path)
    assert parent.info.status == ("FINISHED" if claimed == "an hour ago" else "RUNNING")
    assert len(parent_endings(tmp_path)) == 1


def test_a_dead_hosts_running_trial_does_not_hold_the_parent_open(tmp_path):
    """A driver stopped early while the study's only other RUNNING trial belongs to a host that
    died (no heartbeat for a grace period): that trial is failed (and retried) first, and this
    driver, the last one alive, ends the parent with its own status. Before, the dead trial
    counted as another driver's and the parent stayed RUNNING until someone resumed."""
    from mnist_sweep.search.driver import parent_ending
    from mnist_sweep.search.study import open_study
    from mnist_sweep.search.sweepfile import check_space, load_spec

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    spec = load_spec("momentum", [f"sweep.storage={url}", "sweep.heartbeat_interval=1",
                                  "sweep.grace_period=2", "tracking.enabled=false"])
    study, _ = open_study(spec, spec.space(), check_space(spec, spec.space()), create=True)
    elsewhere = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=2)
    dead = elsewhere.create_new_trial(study._study_id)
    elsewhere.record_heartbeat(dead)  # it beat once, then its host died
    time.sleep(3)
    spec = replace(spec, parent_run_id=uuid.uuid4().hex)
    assert parent_ending(study, spec, "KILLED") == "KILLED"
    assert study._storage.get_trial(dead).state == TrialState.FAIL
