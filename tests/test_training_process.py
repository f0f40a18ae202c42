"""A one-worker sweep trains in a process of its own (trial/process.py), forked as the command
starts, so that torch's import and the data's reading overlap the driver's MLflow and Optuna
start-up: what it trains is what run_trial trains here, a callback that raises stops the trial
after that epoch, errors and divergence come back with their reasons, a killed training process
fails its trial only, and the driver never imports torch."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import spawn, study_runs, wait_for
from mnist_sweep.base.errors import RaisedElsewhere, failure_reason
from mnist_sweep.trial.loop import run_trial
from mnist_sweep.trial.process import LocalTraining, TrainingProcess
from mnist_sweep.trial.results import TrainingDiverged
from test_sweep import TINY, load


@pytest.fixture()
def training():
    process = TrainingProcess()
    yield process
    process.close()


def test_a_trial_trained_there_is_the_trial_trained_here(cfg_factory, training, tmp_path):
    cfg = cfg_factory("tracking.enabled=false", "train.threads=1", "train.epochs=2",
                      "schedule=step")
    here = run_trial(cfg)
    seen = []
    there = training.run(cfg, [seen.append])
    assert there.model is None  # it stays there: save_weights
    assert seen == there.epochs
    assert [(e.batch_loss, e.batch_lr, e.val_loss, e.val_acc, e.lr) for e in there.epochs] == [
        (e.batch_loss, e.batch_lr, e.val_loss, e.val_acc, e.lr) for e in here.epochs]
    assert (there.test_loss, there.test_correct) == (here.test_loss, here.test_correct)
    training.save_weights(str(tmp_path / "weights.pt"))
    saved = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert saved.keys() == here.model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in here.model.state_dict().items())


def test_files_named_while_it_imports_torch_are_read_meanwhile_and_calls_get_their_replies(
        cfg_factory, training):
    """`make train` starts its training process before its config is known, then names the
    data: the files are read while torch imports there (a read message, which gets no reply),
    one named again after the import is handled by the loop, and each call after them gets its
    own reply; the trial then trains as here, and the files are not read again for the next."""
    from mnist_sweep.trial.files import reads_ahead
    from mnist_sweep.trial.process import prepared_device

    cfg = cfg_factory("tracking.enabled=false", "train.threads=1", "train.epochs=1")
    training.read_ahead(cfg.data)
    assert len(training.call(reads_ahead)) == 4  # read from the first message, not taken yet
    training.read_ahead(cfg.data)  # (already there: nothing more to read)
    assert training.call(prepared_device, cfg) == "cpu"
    assert training.call(reads_ahead) == []  # taken by the trial's data
    assert training.run(cfg, []).test_acc == run_trial(cfg).test_acc
    training.read_ahead(cfg.data)  # a second trial's (`make train -m`): decoded already, not read
    assert training.call(reads_ahead) == []
    training.begin(cfg)
    training.read_ahead(cfg.data)  # while a trial trains: no answer to its epoch, no stop
    assert len(training.follow([]).epochs) == 1
    bad = cfg_factory("tracking.enabled=false", f"data.root=/tmp/{'x' * 300}")
    training.read_ahead(bad.data)  # cannot even look there: its trial says so, not a dead process
    with pytest.raises(RaisedElsewhere, match="File name too long"):
        training.call(prepared_device, bad)
    assert training.call(prepared_device, cfg) == "cpu"


def test_a_callback_that_raises_stops_the_trial_after_that_epoch(cfg_factory, training):
    cfg = cfg_factory("tracking.enabled=false", "train.epochs=3")

    class Halt(Exception):
        pass

    def halt_after_the_second(epoch) -> None:
        if epoch.epoch == 2:
            raise Halt()

    seen = []
    with pytest.raises(Halt):
        training.run(cfg, [seen.append, halt_after_the_second])
    assert [e.epoch for e in seen] == [1, 2]
    pid = training.process.pid
    assert len(training.run(cfg, []).epochs) == 3  # the same process, free again
    assert training.process.pid == pid


def test_an_epoch_is_recorded_while_the_next_one_trains(cfg_factory, training):
    """The records (MLflow's curves) of epoch 1 run after the go: epoch 2's result arrives while
    they still run (waiting for it there would wait forever if training waited for them)."""
    cfg = cfg_factory("tracking.enabled=false", "train.epochs=3")
    decided, next_epoch_arrived = [], []

    def record(epoch) -> None:
        if epoch.epoch == 1:
            next_epoch_arrived.append(training.connection.poll(120))

    result = training.run(cfg, [decided.append], [record])
    assert next_epoch_arrived == [True]
    assert [e.epoch for e in decided] == [1, 2, 3] and len(result.epochs) == 3


def test_a_begun_trial_trains_before_it_is_followed_and_a_cancelled_one_is_stopped(
    cfg_factory, training
):
    """A trial begun trains at once: its first epoch arrives while the worker, not following it
    yet, creates its MLflow run. One cancelled (its run could not be created) is stopped,
    whether it had sent an epoch or not, and the next trial runs in step: its own epochs."""
    cfg = cfg_factory("tracking.enabled=false", "train.epochs=3")
    training.begin(cfg)
    assert training.connection.poll(120)  # epoch 1, sent before anyone followed
    seen = []
    assert len(training.follow([seen.append]).epochs) == 3
    assert [e.epoch for e in seen] == [1, 2, 3]
    training.begin(cfg)
    assert training.connection.poll(120)
    training.cancel()
    training.begin(cfg)
    training.cancel()  # before its first epoch
    seen = []
    two = cfg_factory("tracking.enabled=false", "train.epochs=2", "optim.lr=0.05")
    result = training.run(two, [seen.append])
    assert [e.epoch for e in seen] == [1, 2] and len(result.epochs) == 2
    assert [e.train_loss for e in result.epochs] == [e.train_loss for e in run_trial(two).epochs]


@pytest.mark.parametrize("where", ["there", "here"])
def test_the_epoch_that_stops_a_trial_is_recorded_and_a_failed_record_fails_it(
    cfg_factory, training, where
):
    """Pruned after epoch 2: epoch 2 is recorded too (in the training process and in-process
    alike). A record that raises stops the trial and its error is raised, even when the
    decision was to stop (the epoch's record is incomplete: the trial fails)."""
    runner = training if where == "there" else LocalTraining()
    cfg = cfg_factory("tracking.enabled=false", "train.epochs=4")

    class Halt(Exception):
        pass

    class WriteFailed(Exception):
        pass

    def halt_after_the_second(epoch) -> None:
        if epoch.epoch == 2:
            raise Halt()

    recorded = []
    with pytest.raises(Halt):
        runner.run(cfg, [halt_after_the_second], [lambda epoch: recorded.append(epoch.epoch)])
    assert recorded == [1, 2]

    def write_fails_at(n):
        def record(epoch) -> None:
            if epoch.epoch == n:
                raise WriteFailed()
        return record

    with pytest.raises(WriteFailed):
        runner.run(cfg, [halt_after_the_second], [write_fails_at(2)])
    decided = []
    with pytest.raises(WriteFailed):
        runner.run(cfg, [decided.append], [write_fails_at(1)])
    assert [e.epoch for e in decided] == [1]  # epoch 2 trained meanwhile is not reported
    with pytest.raises(WriteFailed):  # the last epoch's: its stop comes after the trial's end
        runner.run(cfg, [], [write_fails_at(4)])
    again = runner.run(cfg, [])  # free again, and in step: this trial's answers, not a stale one
    assert len(again.epochs) == 4 and again.test_size > 0


def test_it_trains_on_while_the_worker_decides_and_a_stop_stops_it_mid_epoch(
    cfg_factory, training
):
    """While the worker decides on epoch 1, the process trains epoch 2 (its CPU time grows; it
    would wait in the pipe, at none, before). Told to stop then, it stops mid-epoch: epoch 2 is
    never sent, the trial's result is "stopped", and the next trial runs."""
    cfg = cfg_factory("tracking.enabled=false", "train.epochs=3", "train.batch_size=1",
                      "model=cnn")  # an epoch of ~500 steps: many ticks of CPU

    def cpu_ticks() -> int:
        fields = open(f"/proc/{training.process.pid}/stat").read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    class Halt(Exception):
        pass

    seen, grew = [], []

    def decide(epoch) -> None:
        seen.append(epoch.epoch)
        if epoch.epoch == 1:
            start = cpu_ticks()
            grew.append(wait_for(lambda: cpu_ticks() - start >= 3,
                                 "it to train while the worker decides", timeout=60, every=0.01))
            raise Halt()

    with pytest.raises(Halt):
        training.run(cfg, [decide])
    assert grew == [True] and seen == [1]
    assert len(training.run(cfg_factory("tracking.enabled=false"), []).epochs) == 2


def test_divergence_and_errors_come_back_with_their_reasons(cfg_factory, training):
    with pytest.raises(TrainingDiverged) as diverged:
        training.run(cfg_factory("tracking.enabled=false", "optim.lr=1000000.0"), [])
    assert diverged.value.epoch == 1 and "diverged" in str(diverged.value)
    record = diverged.value.record  # the epoch it trained comes back with it, to be recorded
    assert record.epoch == 1 and record.seconds > 0 and len(record.batch_loss) > 0
    huge = cfg_factory("tracking.enabled=false", "model=cnn", "model.hidden=400000000")
    with pytest.raises(RaisedElsewhere) as refused:
        training.run(huge, [])
    try:
        run_trial(huge)
    except Exception as error:  # what the same trial raises here
        assert failure_reason(refused.value) == failure_reason(error)
    assert "can't allocate memory" in failure_reason(refused.value)


def test_a_killed_training_process_fails_its_trial_and_the_next_one_starts_another(
        cfg_factory, training):
    cfg = cfg_factory("tracking.enabled=false", "train.epochs=3")
    first = training.process.pid

    def kill_it(epoch) -> None:
        os.kill(first, signal.SIGKILL)

    with pytest.raises(RaisedElsewhere) as died:
        training.run(cfg, [kill_it])
    assert failure_reason(died.value) == (
        "TrainingProcessDied: the training process exited with code -9")
    assert len(training.run(cfg, []).epochs) == 3
    assert training.process.pid != first


DRIVER = """
import atexit, sys
atexit.register(lambda: print("torch in the driver:", "torch" in sys.modules))
from mnist_sweep.sweep import main
main(sys.argv[1:])
"""


def test_a_one_worker_sweep_trains_in_its_own_process_and_its_driver_never_imports_torch(
        tmp_path, mnist_dir):
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, "--sweep", "momentum", "sweep.n_trials=3",
         "sweep.pruner=none", f"data.root={mnist_dir}", *TINY],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch in the driver: False" in out.stdout
    study = load(tmp_path, "momentum")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, children = study_runs(client, "momentum")
    assert len(children) == 3
    for run in children:  # what the training process measured, recorded by the driver
        tags = run.data.tags
        assert tags["torch_version"] == str(torch.__version__) and tags["device"] == "cpu"
        assert tags["threads"] == str(os.cpu_count())
        assert {i.tags[0].value for i in run.inputs.dataset_inputs} == {"training", "validation", "testing"}
        assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 3
    best = study.best_trial.user_attrs["mlflow_run_id"]
    champion_files = [f.path for f in client.list_artifacts(best, "champion")]
    assert champion_files, "the best trial's weights, saved by the training process"


def test_the_training_process_ends_with_its_worker_killed_mid_trial(tmp_path, cfg_factory):
    """kill -9 of the worker (the driver): its training process must not train on alone."""
    cfg = cfg_factory("tracking.enabled=false", "train.epochs=1000")
    cfg_path = tmp_path / "cfg.yaml"
    from omegaconf import OmegaConf

    OmegaConf.save(cfg, cfg_path)
    code = f"""
import sys
from omegaconf import OmegaConf
from mnist_sweep.trial.process import LocalTraining, TrainingProcess
training = TrainingProcess()
def show(epoch):
    print(training.process.pid, flush=True)
training.run(OmegaConf.load({str(cfg_path)!r}), [show])
"""
    worker = spawn(sys.executable, "-c", code, cwd=tmp_path)
    child = int(worker.stdout.readline())  # after its first epoch: it trains on
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(30)
    wait_for(lambda: not alive(child), "the training process's end", timeout=30)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="a PID namespace needs unshare as root")
def test_a_one_worker_sweep_whose_driver_is_pid_1_trains(tmp_path, mnist_dir):
    """In a container the command is PID 1 (docker/entrypoint.sh execs it; Kubernetes' pods):
    its training process must not take its parent's pid for a dead parent's."""
    out = subprocess.run(
        ["unshare", "--pid", "--fork", sys.executable, "-m", "mnist_sweep.sweep", "--sweep",
         "momentum", "sweep.n_trials=2", "sweep.pruner=none", "sweep.register_model=false",
         "tracking.enabled=false", f"data.root={mnist_dir}", *TINY],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [t.state for t in load(tmp_path, "momentum").trials] == [TrialState.COMPLETE] * 2
