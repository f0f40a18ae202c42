"""One trial recorded in a real (temporary) SQLite MLflow store."""

import contextlib
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import FAST, run_cli
from mlflow.tracking import MlflowClient

from mnist_sweep.base.hydra_config import compose
from mnist_sweep.tracking.runs import fluent_target, open_tracker, redact_uri
from mnist_sweep.train import train_and_track
from mnist_sweep.trial.loop import run_trial

STEPS = 10  # 500 training images / batch 50


def only_run(store):
    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


def test_a_run_has_params_tags_curves_final_metrics_and_config(cfg_factory, store):
    result = train_and_track(cfg_factory("schedule=step", "schedule.step_size=5"))
    client, run = only_run(store)
    assert run.info.status == "FINISHED" and run.info.run_name
    params = run.data.params
    assert params["optim.momentum"] == "0.78" and params["schedule.step_size"] == "5"
    assert params["train.epochs"] == "2" and params["model.hidden"] == "[200, 200]"
    tags = run.data.tags
    assert tags["dataset"] == "mnist" and tags["model"] == "mlp" and tags["device"] == "cpu"
    assert tags["schedule"] == "step" and tags["torch_version"].startswith("2.")
    # What the review needs: a readable name, a role, MLflow's own context tags, no local noise.
    assert run.info.run_name == "mlp step lr=0.01 m=0.78"
    assert tags["sweep_role"] == "single" and tags["mlflow.user"] and tags["mlflow.source.name"]
    assert not any(k.startswith(("tracking.", "debug", "train.progress", "data.root", "train.device"))
                   for k in params), sorted(params)
    # The splits as MLflow datasets: the Dataset column and the run page show them.
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["testing", "training", "validation"]
    assert inputs["training"].name == "mnist/train" and inputs["testing"].name == "mnist/test"
    profile = json.loads(inputs["training"].profile)
    assert profile["num_images"] == 500 and profile["val_size"] == 100 and profile["split_seed"] == 0
    assert profile["known_as"] == "unknown (own data)" and len(profile["files_digest"]) == 64
    assert json.loads(inputs["validation"].profile)["num_images"] == 100

    def history(key):
        return client.get_metric_history(run.info.run_id, key)

    assert [m.step for m in history("batch_train_loss")] == list(range(2 * STEPS))
    # StepLR every 5 batches: the LR curve is drawn exactly by its change points.
    lr_points = {m.step: m.value for m in history("batch_lr")}
    assert sorted(lr_points) == [0, 4, 5, 9, 10, 14, 15, 19]
    assert lr_points[4] == 0.01 and lr_points[5] == pytest.approx(0.009)
    assert lr_points[19] == pytest.approx(0.01 * 0.9 ** 3)
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds"):
        assert [m.step for m in history(key)] == [1, 2], key
    assert run.data.metrics["test_acc"] == pytest.approx(result.test_acc)
    assert run.data.metrics["val_acc"] == pytest.approx(result.final_val_acc)
    config = client.download_artifacts(run.info.run_id, "config.yaml")
    assert "momentum: 0.78" in open(config).read()


def test_a_failing_trial_ends_its_run_failed(cfg_factory, store):
    cfg = cfg_factory()
    tracker = open_tracker(cfg.tracking)

    def boom(epoch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        with tracker.trial_run(cfg, device="cpu") as run:
            run_trial(cfg, [run.log_epoch, boom])
    _, run = only_run(store)
    assert run.info.status == "FAILED"
    assert len(run.data.metrics) > 0  # the first epoch was recorded before the failure


def test_ctrl_c_ends_its_run_killed(cfg_factory, store):
    cfg = cfg_factory()
    tracker = open_tracker(cfg.tracking)

    def ctrl_c(epoch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with tracker.trial_run(cfg, device="cpu") as run:
            run_trial(cfg, [run.log_epoch, ctrl_c])
    assert only_run(store)[1].info.status == "KILLED"


@pytest.mark.parametrize("stop", ["exception", "ctrl-c"])
def test_make_train_ends_its_written_run_failed_or_killed_after_its_epochs(stop, cfg_factory,
                                                                         store, monkeypatch):
    """`make train`'s run is made and written by a writer process (run_writer.SingleRun): what
    the trial measured before it stopped is in the run, which ends as trial_run would end it."""
    import mnist_sweep.trial.results as results

    class Stop:
        def __init__(self, prefix=""):
            pass

        def __call__(self, epoch):
            if epoch.epoch == 2:
                raise RuntimeError("boom") if stop == "exception" else KeyboardInterrupt

    monkeypatch.setattr(results, "EpochProgress", Stop)  # the command's own callback, stopping it
    with pytest.raises(RuntimeError if stop == "exception" else KeyboardInterrupt):
        train_and_track(cfg_factory("train.epochs=3", "train.progress=true"))
    client, run = only_run(store)
    assert run.info.status == ("FAILED" if stop == "exception" else "KILLED")
    # epoch 2 stopped in the progress line, before the run's callback: epoch 1 is the last logged
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]
    assert "test_acc" not in run.data.metrics
    if stop == "exception":
        assert run.data.tags["fail_reason"] == "RuntimeError: boom"


def test_make_train_whose_writer_dies_mid_training_fails_and_leaves_no_run_running(
        cfg_factory, store, monkeypatch):
    """The writer process killed (-9, out of memory) while the trial trains: the command does not
    claim success, and the run it had made is ended FAILED with the reason."""
    import multiprocessing
    import signal

    import mnist_sweep.trial.results as results
    from mnist_sweep.base.errors import TrackingError

    class KillWriter:
        def __init__(self, prefix=""):
            pass

        def __call__(self, epoch):
            if epoch.epoch == 2:  # the run exists (epoch 1 waited for it)
                writer, = [p for p in multiprocessing.active_children() if p.name == "mlflow-writer"]
                os.kill(writer.pid, signal.SIGKILL)
                writer.join()

    monkeypatch.setattr(results, "EpochProgress", KillWriter)
    with pytest.raises(TrackingError, match="exit code -9"):
        train_and_track(cfg_factory("train.epochs=3", "train.progress=true"))
    _, run = only_run(store)
    assert run.info.status == "FAILED"
    assert run.data.tags["fail_reason"].startswith("its MLflow writer process died")


def test_make_train_trains_without_importing_mlflow(mnist_dir, tmp_path):
    """MLflow (1-4 s of imports, its store's first open, the run's creation) is the writer
    process's, torch the training process's: the command's own process imports neither, and
    its run is complete all the same, with the figures the trial trained in-process gets. The
    training process, forked before Hydra's job existed, gets the config as the job resolves it
    (${hydra:runtime.cwd} exists only there)."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "data").symlink_to(mnist_dir)
    code = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print('mlflow imported:', 'mlflow' in sys.modules, flush=True))\n"
        "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, flush=True))\n"
        "sys.argv = ['train', 'data.root=${hydra:runtime.cwd}/data', "
        f"'tracking.tracking_uri={store}', "
        f"*{FAST!r}]\n"
        "runpy.run_module('mnist_sweep.train', run_name='__main__')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mlflow imported: False" in out.stdout, out.stdout
    assert "torch imported: False" in out.stdout, out.stdout
    client, run = only_run(store)
    assert run.info.status == "FINISHED" and run.info.run_id in out.stderr + out.stdout
    assert {"test_acc", "val_acc", "batch_train_loss"} <= set(run.data.metrics)
    assert len(run.inputs.dataset_inputs) == 3 and run.data.tags["mlflow.user"]
    assert run.data.tags["torch_version"] and run.data.tags["threads"] == "1"
    cfg = compose([f"data.root={mnist_dir}", "tracking.enabled=false", *FAST])
    here = run_trial(cfg)
    assert run.data.metrics["test_acc"] == here.test_acc
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == [
        e.train_loss for e in here.epochs]


def test_make_train_that_diverges_says_so_and_its_run_keeps_the_epoch_it_trained(mnist_dir, tmp_path):
    """A loss that turns NaN: the command says why in one paragraph and exits non-zero; the
    epoch that diverged is printed and recorded (its seconds, its NaN loss, its batch curve),
    as a sweep's trial and a population's member record it, and the run ends FAILED."""
    import math

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_cli("mnist_sweep.train", f"data.root={mnist_dir}", f"tracking.tracking_uri={store}",
                  *FAST, "train.progress=true", "optim.lr=1000000.0", cwd=tmp_path,
                  timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "diverged" in out.stderr and "epoch 1/" in out.stdout + out.stderr
    client, run = only_run(store)
    assert run.info.status == "FAILED" and "TrainingDiverged" in run.data.tags["fail_reason"]
    assert run.data.metrics["epoch_seconds"] > 0 and math.isnan(run.data.metrics["train_loss"])
    assert len(client.get_metric_history(run.info.run_id, "batch_train_loss")) > 1


def test_make_train_interrupted_mid_training_ends_its_run_killed_and_leaves_no_process(
        mnist_dir, tmp_path):
    """Ctrl-C at a terminal (SIGINT to the command's process group) while the trial trains in
    its training process: the command exits 130 at once, its run ends KILLED with the epochs
    it had, and neither the training process nor the writer is left behind."""
    import signal
    import time

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    output = tmp_path / "out.txt"
    with output.open("w") as out:
        command = subprocess.Popen(
            [sys.executable, "-m", "mnist_sweep.train", f"data.root={mnist_dir}",
             f"tracking.tracking_uri={store}", *FAST, "train.epochs=5000", "train.progress=true"],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 240
            while not re.search(r"epoch +2/5000", output.read_text()):
                assert command.poll() is None and time.time() < deadline, output.read_text()
                time.sleep(0.05)
            os.killpg(command.pid, signal.SIGINT)
            assert command.wait(60) == 130, output.read_text()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(command.pid, signal.SIGKILL)
    time.sleep(0.5)  # (a child that outlived the command would still be in the group)
    with pytest.raises(ProcessLookupError):
        os.killpg(command.pid, 0)
    client, run = only_run(store)
    assert run.info.status == "KILLED"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 2


def test_log_model_stores_a_loadable_model(cfg_factory, store):
    import mlflow.pytorch
    import torch

    uri_before = os.environ.get("MLFLOW_TRACKING_URI")
    train_and_track(cfg_factory("tracking.log_model=true", "train.epochs=1"))
    assert os.environ.get("MLFLOW_TRACKING_URI") == uri_before
    _, run = only_run(store)
    with fluent_target(store, run.info.experiment_id):
        models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                             output_format="list")
        assert len(models) == 1 and models[0].source_run_id == run.info.run_id
        model = mlflow.pytorch.load_model(models[0].model_uri)
    assert os.environ.get("MLFLOW_TRACKING_URI") == uri_before  # nothing leaks to subprocesses
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_tracking_disabled_writes_no_store(cfg_factory, tmp_path):
    train_and_track(cfg_factory("tracking.enabled=false", "train.epochs=1"))
    assert not (tmp_path / "mlflow.db").exists()


def test_lr_change_points_keep_the_curve_exact():
    from mnist_sweep.tracking.runs import lr_change_points

    lrs = [1.0] * 4 + [0.5] * 3 + [0.25]
    kept = lr_change_points(lrs)
    assert kept == [0, 3, 4, 6, 7]
    # the LR at any batch is the value at the last kept index at or before it
    assert all(lrs[max(k for k in kept if k <= i)] == lrs[i] for i in range(len(lrs)))
    assert lr_change_points([0.1, 0.2, 0.3]) == [0, 1, 2] and lr_change_points([]) == []


def test_passwords_are_redacted():
    assert redact_uri("postgresql://bob:s3cret@db:5432/mlflow") == "postgresql://bob:***@db:5432/mlflow"
    assert redact_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_not_sqlite_refuses_other_files_but_not_a_database_being_created(tmp_path):
    """A text file where a database should be is refused; an empty file is what another process
    creating the same new database leaves for a moment (CI saw workers race on it)."""
    import sqlite3

    from mnist_sweep.tracking.runs import not_sqlite

    (tmp_path / "notes.db").write_text("my notes")
    (tmp_path / "new.db").write_bytes(b"")
    sqlite3.connect(tmp_path / "real.db").execute("create table t (x)").connection.commit()
    assert not_sqlite(tmp_path / "notes.db")
    assert not not_sqlite(tmp_path / "new.db") and not not_sqlite(tmp_path / "real.db")
    assert not not_sqlite(tmp_path / "missing.db")


# Study names that MLflow's filter grammar can carry (with the right quotes), and those it cannot.
ODD_NAMES = ["it's", 'say "hi"', "two words", "Grüße ñ 日本", "x' or tags.sweep_role = 'trial",
             "a\\b", "''", "tab\tand\nnewline"]
UNCARRIABLE = ["both ' and \"", "ends in a backslash\\"]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_runs_tagged_finds_a_study_name_with_quotes_spaces_or_non_ascii(store, name):
    """The stale and orphan runs of a study are found by its name, whatever characters the
    name has (before: a `'` broke the filter, and such runs were never ended)."""
    from mnist_sweep.tracking.runs import MlflowTracker

    tracker = MlflowTracker(store, "odd names")
    mine = tracker.start_run("mine", tags={"study_name": name, "sweep_role": "trial"})
    other = tracker.start_run("other", tags={"study_name": name + "x", "sweep_role": "trial"})
    tracker.client.set_terminated(other, "FINISHED")
    assert tracker.runs_tagged({"study_name": name}) == [mine]
    assert tracker.runs_tagged({"study_name": name, "sweep_role": "trial"}, status="RUNNING") == [mine]
    assert tracker.runs_tagged({"study_name": name + "x"}, status="FINISHED") == [other]
    assert tracker.runs_tagged({"study_name": name}, status="FINISHED") == []


@pytest.mark.parametrize("name", ODD_NAMES)
def test_the_deep_links_filter_finds_the_studys_trials(store, name):
    """The runs page's searchFilter (what the UI sends to the server's search) parses and finds
    the study's trials, and only them."""
    import urllib.parse

    from mnist_sweep.tracking.review import trials_view

    client = MlflowClient(store)
    experiment = client.create_experiment("odd names")
    trial = client.create_run(experiment, tags={"study_name": name, "sweep_role": "trial"})
    client.create_run(experiment, tags={"study_name": name, "sweep_role": "parent"})
    client.create_run(experiment, tags={"study_name": "other", "sweep_role": "trial"})
    query = urllib.parse.parse_qs(trials_view(experiment, name, "val_acc", True).split("?", 1)[1])
    found = client.search_runs([experiment], query["searchFilter"][0])
    assert [r.info.run_id for r in found] == [trial.info.run_id]


@pytest.mark.parametrize("name", UNCARRIABLE)
def test_a_value_no_filter_can_carry_is_refused_with_a_clear_error(name):
    """A name with both kinds of quotes, or ending in a backslash: MLflow's grammar has no
    escapes (a value is what lies between its quotes), so such a name is refused, naming it."""
    from mnist_sweep.base.errors import ConfigError
    from mnist_sweep.tracking.filters import check_filter_value, filter_value

    with pytest.raises(ConfigError) as refused:
        check_filter_value(name, "sweep.study_name")
    message = str(refused.value)
    assert f"sweep.study_name={name!r} is not allowed" in message
    assert "MLflow" in message and "backslash" in message
    with pytest.raises(ConfigError):
        filter_value(name, "sweep.study_name")
    for fine in ODD_NAMES:
        check_filter_value(fine, "sweep.study_name")
