"""A sweep interrupted from outside: SIGTERM to the driver alone, a parent run deleted under it,
a worker killed in the window between creating its trial's run and recording the run's id.
Whatever happens, no MLflow run stays RUNNING and the study goes on where it stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import FAULT_INJECTION, finish, run_cli, spawn, study_runs
from conftest import wait_for
from test_sweep import TINY, failed, finished

def start(args: list[str], cwd, env: dict | None = None) -> subprocess.Popen:
    return spawn(sys.executable, "-m", "mnist_sweep.sweep", *args, cwd=cwd, env=env)


def test_sigterm_to_the_driver_alone_ends_every_run_killed(tmp_path, mnist_dir):
    """What Kubernetes and SLURM do: SIGTERM to the main process only. The driver passes it on;
    each worker ends its running trial's run KILLED, the parent run ends KILLED."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    process = start(["--sweep", "momentum", "sweep.n_trials=6", "sweep.workers=2",
                     "sweep.pruner=none", f"data.root={mnist_dir}", *TINY[:2], "train.epochs=200"],
                    tmp_path)
    running = wait_for(lambda: [t for t in optuna.load_study(study_name="momentum", storage=storage).trials
                                if t.state == TrialState.RUNNING and t.intermediate_values
                                and "mlflow_run_id" in t.user_attrs], "a trial mid-way")
    process.send_signal(signal.SIGTERM)  # the driver's pid only, not its process group
    out, err = finish(process, 120)
    assert process.returncode == 130, err[-3000:]
    assert "interrupted: the study is kept" in err and "Traceback" not in err
    for trial in running:  # its worker is gone, not orphaned to train on
        pid = int(trial.user_attrs["worker"].rsplit(":", 1)[1])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    study = optuna.load_study(study_name="momentum", storage=storage)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parents, children = study_runs(client, "momentum")
    assert parents[0].info.status == "KILLED"
    assert {r.info.status for r in children} == {"KILLED"}
    assert {r.data.tags["state"] for r in children} == {"killed"}


def test_a_failing_report_refresh_does_not_end_the_sweep(tmp_path, mnist_dir):
    """Someone deletes the parent run in the UI mid-sweep: refreshing its report fails (MLflow
    refuses to log to a deleted run); the trials go on to n_trials, with a warning."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    process = start(["--sweep", "momentum", "sweep.n_trials=4", "sweep.report_every=1",
                     "sweep.pruner=none", f"data.root={mnist_dir}", *TINY[:2], "train.epochs=3"],
                    tmp_path)
    parent_id = wait_for(lambda: optuna.load_study(study_name="momentum", storage=storage)
                         .user_attrs.get("mlflow_parent_run_id"), "the parent run")
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").delete_run(parent_id)
    out, err = finish(process, 300)
    assert process.returncode == 0, err[-3000:]
    assert "the parent run's report could not be written" in out + err
    assert len(finished(optuna.load_study(study_name="momentum", storage=storage))) == 4


@pytest.mark.parametrize("found_by", ["heartbeat", "the driver's last look"])
def test_a_worker_killed_between_creating_its_run_and_recording_it(found_by, tmp_path, mnist_dir):
    """The window: the trial's MLflow run exists, the trial does not know its id yet, and the
    worker dies (fault injection kills it right there). The run must not stay RUNNING: the
    resumed sweep finds it by the trial's tags, through Optuna's heartbeat callback, or, if
    that never saw the trial (it was failed by something else), at the driver's end."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = ["--sweep", "momentum", "sweep.n_trials=3", "sweep.pruner=none", "sweep.quiet=true",
            "sweep.heartbeat_interval=1", "sweep.grace_period=2", f"data.root={mnist_dir}",
            *TINY, "train.epochs=1"]
    killed = run_cli("mnist_sweep.sweep", *args, cwd=tmp_path,
                     env={"PYTHONPATH": FAULT_INJECTION, "MNIST_SWEEP_KILL_AT": "trial_run_created"})
    assert killed.returncode == -9  # one worker runs in the sweep's own process: all of it died
    study = optuna.load_study(study_name="momentum", storage=storage)
    (cut,) = study.trials
    assert cut.state == TrialState.RUNNING and "mlflow_run_id" not in cut.user_attrs
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (orphan,) = study_runs(client, "momentum")[1]
    assert orphan.info.status == "RUNNING" and orphan.data.tags["trial_number"] == "0"
    if found_by == "the driver's last look":  # failed without the callback seeing it (a
        # failure the trial recorded, so that no retry of it is awaited)
        study._storage.set_trial_user_attr(cut._trial_id, "fail_reason", "RuntimeError: elsewhere")
        study._storage.set_trial_state_values(cut._trial_id, TrialState.FAIL)
    time.sleep(3)  # past the grace period

    out = run_cli("mnist_sweep.sweep", *args, cwd=tmp_path)  # the same command, no fault
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="momentum", storage=storage)
    assert len(finished(study)) == 3 and [t.number for t in failed(study)] == [0]
    assert client.get_run(orphan.info.run_id).info.status == "FAILED"
    assert client.get_run(orphan.info.run_id).data.tags["state"] == "failed"
    parents, children = study_runs(client, "momentum")
    assert not [r for r in parents + children if r.info.status == "RUNNING"]


def test_a_signal_during_a_store_call_waits_for_it_then_interrupts(tmp_path):
    """The race the SIGTERM test met on a loaded machine: the signal landed inside an epoch's
    store write, and the cleanup after it failed on the cut connection. Provoked here: the signal
    arrives in the middle of a shielded call (an epoch callback), which must run to its end
    before the interrupt, and a second signal must not cut what follows."""
    code = f"""
import os, signal, time
from mnist_sweep.base.interrupts import INTERRUPTS
INTERRUPTS.install()
log = open({str(tmp_path / 'log')!r}, "w")
def store_write():
    os.kill(os.getpid(), signal.SIGTERM)   # arrives mid-call
    time.sleep(0.2)
    log.write("write finished\\n"); log.flush()
try:
    with INTERRUPTS.allowed():
        INTERRUPTS.shielded(store_write)()
        log.write("training went on\\n")
except KeyboardInterrupt:
    log.write("interrupted\\n"); log.flush()
    os.kill(os.getpid(), signal.SIGINT)      # a second signal during the cleanup: ignored
    time.sleep(0.2)
    log.write("cleanup finished\\n")
try:
    with INTERRUPTS.allowed():               # training: interrupted at once (first signal only)
        time.sleep(0.1)
    log.write("done\\n")
except KeyboardInterrupt:
    log.write("interrupted twice\\n")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "log").read_text().splitlines() == [
        "write finished", "interrupted", "cleanup finished", "done"]


def test_a_signal_during_training_interrupts_at_once(tmp_path):
    code = """
import os, signal, threading, time
from mnist_sweep.base.interrupts import INTERRUPTS
INTERRUPTS.install()
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
started = time.time()
try:
    with INTERRUPTS.allowed():
        time.sleep(30)                     # stands for a long epoch
except KeyboardInterrupt:
    print(f"interrupted after {time.time() - started:.1f} s")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("interrupted after 0.")


# ----------------------------------------------------------------------------- population mode


def wait_for_line(output, text: str, process: subprocess.Popen, watchdog: float = 240) -> None:
    """Until `text` is in the process's output file; a failure if the process ends first (or
    has not printed it after `watchdog` seconds: a hang, not a slow machine)."""
    deadline = time.time() + watchdog
    while text not in output.read_text():
        assert process.poll() is None and time.time() < deadline, (
            f"{text!r} never came (exit code {process.returncode}):\n{output.read_text()[-3000:]}")
        time.sleep(0.05)


@pytest.mark.parametrize("signum, hold", [
    (signal.SIGINT, "writer_end"), (signal.SIGTERM, "writer_end"), (signal.SIGINT, "writer_start")],
    ids=["ctrl-c", "sigterm to the group", "ctrl-c in the writer's start-up"])
def test_a_population_interrupted_ends_every_run_as_a_solo_sweep_does(signum, hold, tmp_path,
                                                                       mnist_dir):
    """Ctrl-C (SIGINT to the terminal's process group) or SIGTERM to the whole group (SLURM's
    scancel, a container runtime) while a population of 4 trains: its MLflow writer process gets
    the signal too, and must not die of it with its queue unwritten. Fault injection holds the
    writer so that the signal finds work queued (MNIST_SWEEP_HOLD_AT): the ends of the first 4
    members, which completed (writer_end), or everything, the writer still in its start-up
    (writer_start). Every run must end: the completed members FINISHED with their test metrics,
    the members interrupted mid-epoch KILLED (their trials FAIL, interrupted), as a solo sweep's.
    Before, the writer died of the signal: the completed members' runs ended FINISHED without
    test_acc (by the driver's last look), the interrupted ones FAILED, not KILLED."""
    epochs, gate, output = 6, tmp_path / "gate", tmp_path / "stdout.log"
    with output.open("w") as stdout:
        process = spawn(sys.executable, "-m", "mnist_sweep.sweep", "--sweep", "momentum",
                        "sweep.n_trials=12", "sweep.population=4", "sweep.pruner=none",
                        "sweep.register_model=false", f"data.root={mnist_dir}", "data.val_size=100",
                        "train.batch_size=10", f"train.epochs={epochs}", cwd=tmp_path, stdout=stdout,
                        env={"PYTHONPATH": FAULT_INJECTION, "MNIST_SWEEP_HOLD_AT": hold,
                             "MNIST_SWEEP_GATE": str(gate)})
    try:  # the first 4 members trained all their epochs and were told COMPLETE; 4 more train
        wait_for_line(output, f"population epoch {epochs + 2}:", process)
        os.killpg(process.pid, signum)
        wait_for_line(output, "interrupted: the population's trials are FAIL", process)
    finally:
        gate.touch()  # the writer goes on (if it is still there)
    _, err = finish(process, 300)
    assert process.returncode == 130, err[-3000:]
    study = optuna.load_study(study_name="momentum", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    interrupted = [t for t in study.trials
                   if t.state == TrialState.FAIL and t.user_attrs.get("interrupted")]
    assert len(complete) >= 4 and interrupted
    assert len(complete) + len(interrupted) == len(study.trials)  # none RUNNING, none else
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,), children = study_runs(client, "momentum")
    assert parent.info.status == "KILLED"
    runs = {int(r.data.tags["trial_number"]): r for r in children}
    assert sorted(runs) == [t.number for t in study.trials]
    seen = {t.number: (runs[t.number].info.status, runs[t.number].data.tags.get("state"),
                       runs[t.number].data.metrics.get("test_acc")) for t in study.trials}
    expected = {t.number: ("FINISHED", "complete", pytest.approx(t.user_attrs["test_acc"]))
                for t in complete}
    expected |= {t.number: ("KILLED", "killed", None) for t in interrupted}
    assert seen == expected
    if hold == "writer_end":  # (a writer killed in its start-up prints its KeyboardInterrupt)
        assert "Traceback" not in err, err[-3000:]


def test_a_population_writer_whose_worker_was_killed_writes_what_it_got_then_exits(tmp_path,
                                                                                   mnist_dir):
    """kill -9 of a population's worker while its MLflow writer process is behind, the worker's
    last request cut midway in the pipe between them (fault injection holds the writer at a run's
    end, MNIST_SWEEP_HOLD_AT=writer_end, until the pipe is full). The writer ignores SIGINT and
    SIGTERM, so it must see for itself that its worker is gone: it writes the requests that
    reached it whole (the run ends KILLED), then exits. Before, it waited forever for the rest of
    the cut request: it held the pipe's write end itself, so the pipe never ended."""
    gate, output, errors = tmp_path / "gate", tmp_path / "stdout.log", tmp_path / "stderr.log"
    code = f"""
import fcntl, os, signal, struct, termios, time
import torch
from omegaconf import OmegaConf
from mnist_sweep.base.hydra_config import compose
from mnist_sweep.tracking.run_writer import RunWriter
from mnist_sweep.tracking.runs import open_tracker
cfg = compose(["tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "data.root={mnist_dir}"])
run_id, description = open_tracker(cfg.tracking).create(cfg, torch.device("cpu"), "t000")
writer = RunWriter(OmegaConf.to_yaml(cfg.tracking))
writer.start(0, run_id, description)
writer.end(0, "KILLED", {{"state": "killed"}})   # held at the gate
writer.epoch(1, "x" * 1_000_000)                 # (no run's) more than the pipe holds
pipe = writer.requests._reader.fileno()
half = fcntl.fcntl(pipe, fcntl.F_GETPIPE_SZ) // 2  # more than the start and end hold
while struct.unpack("i", fcntl.ioctl(pipe, termios.FIONREAD, b"0000"))[0] < half:
    time.sleep(0.05)                             # until the epoch is in the pipe, cut midway
print(writer.process.pid, run_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    with output.open("w") as stdout, errors.open("w") as stderr:  # files: the writer outlives
        worker = spawn(sys.executable, "-c", code, cwd=tmp_path, stdout=stdout, stderr=stderr,
                       env={"PYTHONPATH": FAULT_INJECTION, "MNIST_SWEEP_HOLD_AT": "writer_end",
                            "MNIST_SWEEP_GATE": str(gate)})
    finish(worker, 120)
    assert worker.returncode == -signal.SIGKILL, errors.read_text()[-3000:]
    pid, run_id = output.read_text().split()
    gate.touch()
    deadline = time.time() + 60  # a watchdog: a writer still there then is stuck
    while not ended(int(pid)) and time.time() < deadline:
        time.sleep(0.1)
    if not ended(int(pid)):
        os.kill(int(pid), signal.SIGUSR1)  # its stack, into the stderr it shares with the worker
        time.sleep(2)
        raise AssertionError(f"the writer {pid} did not exit after its worker died:\n"
                             f"{errors.read_text()[-5000:]}")
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert (run.info.status, run.data.tags.get("state")) == ("KILLED", "killed")


def ended(pid: int) -> bool:
    """Whether the process is gone (or a zombie nobody reaps: its parent died)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
