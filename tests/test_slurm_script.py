"""sweep.launcher=slurm without a cluster: the batch script `make sweep-show` prints (what sbatch
gets: no URL, no password), and settings refused before anything is made. The real cluster's
tests are in test_slurm.py (slow tier)."""

from __future__ import annotations

import pytest

from conftest import run_cli
from test_bad_input import assert_one_paragraph_error

SECRET = "pw-Zq9"
STORAGE = f"sweep.storage=postgresql://mnist:{SECRET}@db.cluster:6432/optuna"


def test_sweep_show_prints_the_batch_script_with_no_password(tmp_path):
    out = run_cli("mnist_sweep.sweep", "--show", "--sweep", "momentum", "sweep.launcher=slurm",
                  STORAGE, "tracking.tracking_uri=http://mlflow.cluster:5000",
                  "sweep.slurm.tasks=8", "sweep.slurm.max_running=2", "sweep.slurm.partition=gpu",
                  "sweep.slurm.time=2:00:00", "sweep.slurm.gpus_per_task=1",
                  "sweep.slurm.sbatch=['--constraint=a100']",
                  "sweep.slurm.setup=[module load cuda/12.4]", "train.epochs=3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    script = out.stdout.split("(sbatch):\n", 1)[1]
    for line in ("#SBATCH --array=0-7%2", "#SBATCH --partition=gpu", "#SBATCH --time=2:00:00",
                 "#SBATCH --gres=gpu:1", "#SBATCH --constraint=a100", "#SBATCH --requeue",
                 "module load cuda/12.4", f"#SBATCH --chdir={tmp_path.resolve()}"):
        assert line in script, (line, script)
    last = script.strip().splitlines()[-1]
    assert last.startswith("exec ") and "--join" in last and "sweep.launcher=local" in last
    assert "train.epochs=3" in last and "postgresql" not in last
    # the storage from the task's environment (SWEEP_STORAGE), even where the file names one
    assert "sweep.storage=null" in last and "tracking.tracking_uri=http://mlflow.cluster:5000" in last
    assert SECRET not in out.stdout + out.stderr


@pytest.mark.parametrize("override, expected", [
    ("sweep.launcher=kubernetes", ["sweep.launcher='kubernetes' is unknown", "local", "slurm"]),
    ("sweep.slurm.tasks=0", ["sweep.slurm.tasks=0 is not allowed", "integer >= 1"]),
    ("sweep.slurm.gpu=1", ["unknown setting(s) gpu", "gpus_per_task"]),
    ("sweep.slurm.partition='a b'", ["sweep.slurm.partition='a b' is not allowed"]),
    ("sweep.slurm.setup=module load cuda", ["sweep.slurm.setup='module load cuda' is not allowed",
                                            "a list of single lines"]),
    ("sweep.slurm.sbatch=['--clusters=b']", ["--clusters=b", "could not be watched or cancelled"]),
])
def test_a_bad_slurm_setting_is_refused_with_what_is_allowed(override, expected, tmp_path):
    out = run_cli("mnist_sweep.sweep", "--sweep", "momentum", "sweep.launcher=slurm", STORAGE,
                  override, cwd=tmp_path)
    assert_one_paragraph_error(out, expected)
    assert not list(tmp_path.iterdir())  # nothing made


def test_kubernetes_manifests_carry_no_password_in_the_url_nor_its_query(tmp_path):
    out = run_cli("mnist_sweep.sweep", "--kubernetes", "--sweep", "momentum",
                  f"sweep.storage='postgresql://mnist@pgb:6432/optuna?password={SECRET}&sslmode=require'",
                  "tracking.tracking_uri=http://mlflow:5000", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stdout + out.stderr and "sslmode=require" in out.stdout
