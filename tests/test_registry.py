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
    # retrained on the CPU from the trial's config: the same seed, the same batches, the same model
    best = client.get_run(version.run_id)
    check = best.data.tags["model_check"]
    assert f"test_acc {best.data.metrics['test_acc']:.4f} (the trial's own: " \
           f"{best.data.metrics['test_acc']:.4f})" in check, check


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
