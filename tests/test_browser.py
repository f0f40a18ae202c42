"""Slow tier: a real browser (headless Chromium, Debian's chromium and chromium-driver) opens the
deep link a sweep prints against a real `mlflow ui`, and finds what a reviewer needs: the best
trial first, the parent's description, the datasets of a trial. Screenshots go to tmp_path."""

import importlib.util
import re
import shutil

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, run_cli
from mnist_sweep.tracking.review import run_view

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("chromedriver") is None,
                                 reason="no chromedriver: apt-get install chromium chromium-driver")]

_spec = importlib.util.spec_from_file_location("readme_images", REPO / "docs" / "readme_images.py")
screens = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(screens)


def test_the_printed_deep_link_shows_the_best_trial_first_the_description_and_datasets(tmp_path, mnist_dir):
    (tmp_path / "review.yaml").write_text("""
sweep: {study_name: review, n_trials: 4, sampler: random, pruner: none}
params:
  optim.lr: choice(0.1, 0.01, 0.0001, 0.000001)
enqueue:  # four trials that end far apart: no tie for the first row
  - {optim.lr: 0.0001}
  - {optim.lr: 0.1}
  - {optim.lr: 0.000001}
  - {optim.lr: 0.01}
""")
    out = run_cli("mnist_sweep.sweep", "--sweep", str(tmp_path / "review.yaml"), f"data.root={mnist_dir}",
                  "train.epochs=2", "train.batch_size=50", "data.val_size=100", "train.progress=false",
                  cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    link = re.search(r"review the trials, best first, in MLflow.*?: (\S+)", out.stdout).group(1)
    study = optuna.load_study(study_name="review", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    best = client.get_run(study.best_trial.user_attrs["mlflow_run_id"])
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    with screens.mlflow_ui(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path) as base, \
            screens.chromium() as driver:
        driver.get(link.replace("http://127.0.0.1:5000", base))  # the UI's port here is a free one
        screens.wait_for_text(driver, "4 matching runs")
        names = screens.wait_for_rows(driver, 4)  # the count shows before the rows do
        driver.save_screenshot(str(tmp_path / "trials.png"))
        assert len(names) == 4 and names[0] == best.info.run_name, names  # best first, parent not listed
        body = driver.find_element("tag name", "body").text
        assert "mnist/train" in body  # the Dataset column
        driver.get(f"{base}/{run_view(best.info.experiment_id, parent_id)}")
        screens.wait_for_text(driver, f"Best: trial {study.best_trial.number}")
        driver.save_screenshot(str(tmp_path / "parent.png"))
        body = driver.find_element("tag name", "body").text
        assert "Description" in body and f"{best.info.run_name}" in body
        driver.get(f"{base}/{run_view(best.info.experiment_id, best.info.run_id)}")
        screens.wait_for_text(driver, "mnist/train")  # the trial's datasets: train (+ val, test)
        driver.save_screenshot(str(tmp_path / "trial.png"))
        assert "Training" in driver.find_element("tag name", "body").text
