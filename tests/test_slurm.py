"""sweep.launcher=slurm against a real SLURM (munge, slurmctld, slurmd from Debian, one node on
loopback with four fake GPUs: tests/slurm_cluster.py), the real PostgreSQL + PgBouncer + MLflow
server of the `servers` fixture, and synthetic MNIST: one array job of workers submitted, watched
and cancelled from a "login node" command, as a user on a cluster runs it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import (
    PG_PASSWORD,
    finish,
    needs_postgres,
    outside_the_test,
    run_cli,
    spawn,
    study_runs,
    wait_for,
)
from slurm_cluster import SlurmCluster, missing
from test_bad_input import assert_one_paragraph_error
from test_sweep import failed, finished

pytestmark = [
    pytest.mark.slow,
    needs_postgres,
    pytest.mark.skipif(missing() is not None, reason=str(missing())),
]


@pytest.fixture(scope="session")
def slurm():
    folder = Path(tempfile.mkdtemp(prefix="mnist-sweep-slurm-"))
    cluster = SlurmCluster(folder)
    outside_the_test(cluster.start)()  # daemons outlive the test that first asks for them
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        os.environ.pop("SLURM_CONF", None)


def slurm_args(servers, name: str, mnist_dir, n_trials: int, *more: str, storage: str = "",
               tracking: str = "", data: str = "") -> list[str]:
    return ["--sweep", "momentum", f"sweep.study_name={name}", "sweep.launcher=slurm",
            f"sweep.storage={storage or servers.storage_url}",
            f"tracking.tracking_uri={tracking or servers.tracking_url}",
            f"sweep.n_trials={n_trials}", "sweep.pruner=none", "sweep.register_model=false",
            "sweep.heartbeat_interval=1", "sweep.grace_period=6", "sweep.slurm.tasks=3",
            "sweep.slurm.cpus_per_task=1", "sweep.slurm.poll_seconds=1", "sweep.final_report=wait",
            f"data.root={data or mnist_dir}", "data.val_size=100", "train.batch_size=50",
            "train.epochs=4", *more]


def login_command(args: list[str], folder: Path) -> tuple[subprocess.Popen, Path]:
    """The command on the login node, its output in a file the test reads as it goes."""
    output = folder / "login.out"
    process = spawn(sys.executable, "-m", "mnist_sweep.sweep", *args, cwd=folder,
                    stdout=output.open("w"), stderr=subprocess.STDOUT)
    return process, output


def squeue(job: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%K %T"], capture_output=True,
                         text=True)
    return out.stdout.split("\n") if out.stdout.strip() else []


def job_of(output: Path) -> str:
    return wait_for(lambda: re.search(r"submitted array job (\d+)", output.read_text()).group(1),
                    "the array's submission")


def running_runs(client, name: str) -> dict[str, object]:
    """RUNNING trial runs by their array task id."""
    _, runs = study_runs(client, name)
    return {r.data.tags.get("slurm.array_task_id"): r for r in runs if r.info.status == "RUNNING"}


RUN_STATUS = {TrialState.COMPLETE: {"FINISHED"}, TrialState.PRUNED: {"FINISHED"},
              TrialState.FAIL: {"FAILED", "KILLED"}}


def test_an_array_sweeps_to_exactly_n_trials_through_a_kill_and_a_requeue(slurm, servers, mnist_dir,
                                                                           tmp_path):
    """3 tasks, each a worker on its own (fake) GPU. Mid-sweep, `scancel --signal=KILL` of task 0
    (its trial is failed by heartbeat and retried once by another task) and `scontrol requeue`
    of task 1 (it is stopped, its trial ends FAIL and its run KILLED, and it runs again and
    joins). The study still ends with exactly n_trials; nothing else failed; every trial's run
    records its job, task and node; the login command ends the parent once and leaves nothing
    in squeue. The password is neither on a command line nor in the batch script."""
    name, n_trials = f"slurm-{tmp_path.name[-10:]}", 10
    client = MlflowClient(servers.tracking_url)
    process, output = login_command(slurm_args(servers, name, mnist_dir, n_trials), tmp_path)
    job = job_of(output)
    started = time.time()
    runs = wait_for(lambda: (lambda r: r if {"0", "1", "2"} <= set(r) else None)(
        running_runs(client, name)), "a trial running in each of the 3 tasks")
    first_trial_after = time.time() - started
    script = subprocess.run(["scontrol", "write", "batch_script", job, "-"], capture_output=True,
                            text=True).stdout
    assert "exec " in script and PG_PASSWORD not in script and "sweep.storage=null" in script
    killed = int(runs["0"].data.tags["trial_number"])
    subprocess.run(["scancel", "--batch", "--signal=KILL", f"{job}_0"], check=True)
    requeued = int(runs["1"].data.tags["trial_number"])
    subprocess.run(["scontrol", "requeue", f"{job}_1"], check=True)
    wait_for(lambda: any("PENDING" in line for line in squeue(job)), "the requeued task pending")
    subprocess.run(["scontrol", "update", f"JobId={job}_1", "StartTime=now"], check=True)
    out, _ = finish(process, 400)
    text = output.read_text()
    assert process.returncode == 0, text[-4000:]
    elapsed = time.time() - started

    study = optuna.load_study(study_name=name, storage=servers.storage_url)
    trials = study.trials
    assert len(finished(study)) == n_trials
    by_number = {t.number: t for t in trials}
    assert by_number[killed].state == TrialState.FAIL and by_number[requeued].state == TrialState.FAIL
    assert by_number[requeued].user_attrs.get("interrupted")  # SIGTERM: a KILLED run, not retried
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].params == by_number[killed].params, (
        killed, requeued, [(t.number, t.state.name, t.system_attrs, t.user_attrs) for t in trials],
        text[-3000:])
    assert {t.number for t in failed(study)} == {killed, requeued}  # nothing else disturbed
    assert not squeue(job)

    parents, trial_runs = study_runs(client, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_trial = {int(r.data.tags["trial_number"]): r for r in trial_runs}
    assert set(by_trial) == {t.number for t in trials if t.number in by_trial}
    for number, run in by_trial.items():
        assert run.info.status in RUN_STATUS[by_number[number].state], (number, run.info.status)
        assert run.data.tags["slurm.array_job_id"] == job
        assert run.data.tags["slurm.array_task_id"] in {"0", "1", "2"}
        assert run.data.tags["slurm.node"] == "localhost"
    assert by_trial[requeued].info.status == "KILLED"
    # each task had its own GPU: the three trials running at once saw different devices
    assert len({r.data.tags["cuda_visible_devices"] for r in runs.values()}) == 3
    # the requeued task ran again (SLURM_RESTART_COUNT=1) and joined the study
    log = next((tmp_path / "slurm-logs").glob(f"*-{job}_1.out")).read_text()
    assert "restart 1)" in log and log.count(f"sweep {name}:") == 2, log[-3000:]
    assert re.search(r"array \d+: \d+ pending, \d+ running, \d+ done", text)
    assert "review the trials" in text
    print(f"\nSLURM: first trial running in all 3 tasks {first_trial_after:.1f} s after "
          f"submission; {n_trials} trials in {elapsed:.1f} s "
          f"({n_trials / elapsed * 60:.1f} trials/min with 3 tasks, a kill and a requeue)")


def test_no_wait_then_attach_then_ctrl_c_cancels_the_array_and_the_same_command_resumes(
        slurm, servers, mnist_dir, tmp_path):
    """`--no-wait` submits and returns; the same command attaches to the array still in squeue;
    Ctrl-C there cancels the array (its tasks end their trials, runs KILLED), leaves nothing in
    squeue, and the same command again submits a new array that completes the study."""
    name, n_trials = f"slurm-int-{tmp_path.name[-10:]}", 6
    client = MlflowClient(servers.tracking_url)
    args = slurm_args(servers, name, mnist_dir, n_trials)
    submitted = run_cli("mnist_sweep.sweep", "--no-wait", *args, cwd=tmp_path, timeout=120)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job = re.search(r"submitted array job (\d+)", submitted.stdout).group(1)
    assert f"squeue -j {job}" in submitted.stdout and "review the trials" in submitted.stdout
    assert squeue(job)
    process, output = login_command(args, tmp_path)
    wait_for(lambda: f"attached to its array job {job}" in output.read_text(), "the attach")
    wait_for(lambda: running_runs(client, name), "a trial running")
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C at the terminal
    finish(process, 200)
    assert process.returncode == 130, output.read_text()[-3000:]
    assert not squeue(job)  # the array is gone, its tasks ended their trials
    study = optuna.load_study(study_name=name, storage=servers.storage_url)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    _, runs = study_runs(client, name)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert "KILLED" in {r.info.status for r in runs}

    again = run_cli("mnist_sweep.sweep", *args, cwd=tmp_path, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:] + again.stdout[-3000:]
    study = optuna.load_study(study_name=name, storage=servers.storage_url)
    assert len(finished(study)) == n_trials
    parents, runs = study_runs(client, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert not [r for r in runs if r.info.status == "RUNNING"]


@pytest.mark.parametrize("case", ["partition", "sqlite", "tracking", "data", "sbatch"])
def test_a_bad_setting_is_refused_before_anything_is_submitted_or_made(case, slurm, servers,
                                                                       mnist_dir, tmp_path):
    name = f"slurm-bad-{case}-{tmp_path.name[-8:]}"
    env, more = None, {}
    expected = {
        "partition": ["SLURM refuses the array's batch script", "invalid partition",
                      "Nothing was submitted"],
        "sqlite": ["cannot be used with sweep.launcher=slurm", "SQLite"],
        "tracking": ["tracking.tracking_uri=sqlite:///", "tracking server"],
        "data": ["is not a folder here", "data.root="],
        "sbatch": ["needs sbatch on the PATH"],
    }[case]
    if case == "sqlite":
        more = {"storage": f"sqlite:///{tmp_path / 'optuna.db'}"}
    elif case == "tracking":
        more = {"tracking": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    elif case == "data":
        more = {"data": str(tmp_path / "absent")}
    elif case == "sbatch":
        env = {"PATH": "/nonexistent"}
    args = slurm_args(servers, name, mnist_dir, 3, *(["sweep.slurm.partition=nope"]
                                                     if case == "partition" else []), **more)
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    out = run_cli("mnist_sweep.sweep", *args, cwd=tmp_path, env=env, timeout=120)
    assert_one_paragraph_error(out, expected)
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before
    # PostgreSQL itself: a plain Optuna storage through PgBouncer's transaction pooling uses
    # prepared statements that another client's may collide with ("_pg3_0 already exists")
    names = [s.study_name for s in optuna.get_all_study_summaries(servers.direct_storage_url)]
    assert name not in names and not (tmp_path / "optuna.db").exists()
    assert PG_PASSWORD not in out.stdout + out.stderr
