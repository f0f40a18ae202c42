"""The best trial's model in MLflow's registry (alias champion), served by `mlflow models predict`."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import SHARED_MNIST, run_cli

TINY = ["train.epochs=1", "train.batch_size=50", "data.val_size=100", "train.progress=false"]


def test_the_best_trials_model_is_registered_as_champion(tmp_path, mnist_dir):
    out = run_cli("mnist_sweep.sweep", "--sweep", "momentum", "sweep.n_trials=3", "sweep.pruner=none",
                  "sweep.register_model=mnist-champion", f"data.root={mnist_dir}", *TINY, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version_by_alias("mnist-champion", "champion")
    parent = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
              if r.data.tags.get("sweep_role") == "parent"][0]
    assert version.run_id == parent.data.tags["best_run_id"]
    assert parent.data.tags["registered_model"] == "models:/mnist-champion@champion"
    assert "models:/mnist-champion@champion" in parent.data.tags["mlflow.note.content"]
    # not trained again: the trial saved its weights from memory as it led; one MLflow model,
    # built from them at the end for the final best (not one per trial that led on the way)
    best = client.get_run(version.run_id)
    assert "model_check" not in best.data.tags
    assert "champion/state_dict.pt" in {
        f.path for f in client.list_artifacts(best.info.run_id, "champion")}
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        models = mlflow.search_logged_models(experiment_ids=[best.info.experiment_id],
                                             output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    assert [m.source_run_id for m in models] == [best.info.run_id]
    assert_the_model_is_the_trials(client, "models:/mnist-champion@champion", best, tmp_path)


def assert_the_model_is_the_trials(client, uri: str, run, folder, images_apart: int = 0) -> None:
    """The registered model, loaded back as MLflow serves it (pyfunc), scores the trial's own
    test accuracy on its test set (a population's member: within `images_apart` images, its
    stacked evaluation summing in another order, which may tip a near-tie)."""
    import mlflow.pyfunc
    from omegaconf import OmegaConf

    from mnist_sweep.trial.data import load_splits

    cfg = OmegaConf.load(client.download_artifacts(run.info.run_id, "config.yaml", str(folder)))
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(uri)
    finally:
        mlflow.set_tracking_uri(None)
    test = load_splits(cfg.data, torch_device()).test
    logits = np.asarray(model.predict(test.images.numpy()))
    accuracy = float((logits.argmax(1) == test.labels.numpy()).mean())
    assert abs(accuracy - run.data.metrics["test_acc"]) <= images_apart / len(test)


def test_a_population_member_that_leads_logs_its_model_and_is_registered(tmp_path, mnist_dir):
    out = run_cli("mnist_sweep.sweep", "--sweep", "momentum", "sweep.n_trials=4", "sweep.pruner=none",
                  "sweep.population=2", "sweep.register_model=pop-champion", f"data.root={mnist_dir}",
                  *TINY, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version_by_alias("pop-champion", "champion")
    best = client.get_run(version.run_id)
    assert "model_check" not in best.data.tags and best.data.tags["population_size"] == "2"
    assert_the_model_is_the_trials(client, "models:/pop-champion@champion", best, tmp_path, images_apart=1)


def torch_device():
    import torch

    return torch.device("cpu")


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_MNIST.exists(), reason=f"no real MNIST at {SHARED_MNIST}")
def test_mlflow_models_predict_serves_the_champion_on_real_mnist_images(tmp_path):
    out = run_cli("mnist_sweep.sweep", "--sweep", "momentum", "sweep.n_trials=2", "sweep.pruner=none",
                  "sweep.register_model=auto", f"data.root={SHARED_MNIST}", "train.epochs=1", "train.progress=false", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    with gzip.open(SHARED_MNIST / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:8]
    with gzip.open(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:8]
    x = ((images / 255.0 - 0.1307) / 0.3081).astype(np.float32)  # what the trial's data config does
    (tmp_path / "input.json").write_text(json.dumps({"inputs": x.tolist()}))
    served = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "models", "predict", "-m", "models:/momentum@champion", "--env-manager", "local",
         "-i", "input.json", "-t", "json", "-o", "predictions.json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert served.returncode == 0, served.stderr[-3000:]
    predictions = json.loads((tmp_path / "predictions.json").read_text())["predictions"]
    logits = np.array(predictions)
    assert logits.shape == (8, 10)
    assert (logits.argmax(1) == labels).mean() >= 0.75  # one epoch: ~93 % on the test set


def test_a_best_run_without_a_logged_model_is_trained_again_and_logged(cfg_factory, store):
    """The fallback for a best run that logged no model: its own config.yaml passes the check,
    the retrained model is logged into the run and scores the trial's test accuracy."""
    from mnist_sweep.tracking.registry import retrain_and_log
    from mnist_sweep.train import train_and_track

    train_and_track(cfg_factory("train.epochs=1", "schedule=step"))
    client = MlflowClient(store)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    uri = retrain_and_log(client, run)
    assert uri.startswith("models:/")
    check = client.get_run(run.info.run_id).data.tags["model_check"]
    assert f"test_acc {run.data.metrics['test_acc']:.4f} (the trial's own: " in check  # same weights
