"""Slow tier: the real MNIST beside the repo (../shared/data/mnist). `make test-full`."""

import pytest
from mlflow.tracking import MlflowClient

from conftest import SHARED_MNIST, run_cli

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SHARED_MNIST.exists(), reason=f"no real MNIST at {SHARED_MNIST}")]


def test_one_real_epoch_from_the_command_line_beats_90_percent(tmp_path):
    out = run_cli("mnist_sweep.train", f"data.root={SHARED_MNIST}", "train.epochs=1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_acc"] > 0.90
    assert len(client.get_metric_history(run.info.run_id, "batch_train_loss")) == 275  # 55000/200
    assert "test accuracy" in out.stderr + out.stdout
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert '"known_as": "mnist"' in inputs["training"].profile


def test_mnist_files_named_as_fashion_mnist_are_refused(tmp_path):
    """The four file names are the same for both datasets: the content says which it is."""
    out = run_cli("mnist_sweep.train", "data=fashion_mnist", f"data.root={SHARED_MNIST}",
                  "data.download=false", "train.epochs=1", cwd=tmp_path)
    assert out.returncode != 0
    assert "are mnist's" in out.stderr and "use data=mnist" in out.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
