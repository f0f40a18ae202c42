"""A wheel installs anywhere: configs and sweep files travel as package data, the console scripts
work, and a tiny sweep runs from a folder far from the source tree, with the source tree off the
path."""

import os
import subprocess
import sys

from conftest import REPO

SOURCE = str(REPO / "src")  # an editable install puts it on the path: taken off below


def test_a_wheel_installed_elsewhere_runs_a_sweep_without_the_source_tree(tmp_path, mnist_dir):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "wheel"), str(REPO)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("mnist_sweep-*.whl"))
    target = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                                "--target", str(target), str(wheel)], capture_output=True, text=True,
                               timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The installed copy first on the path; the source tree (an editable install's src/) removed.
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONUNBUFFERED": "1"}
    env.pop("MNIST_SWEEP_CONF", None)
    where = subprocess.run([sys.executable, "-c", "import sys; sys.path[:] = [p for p in sys.path "
                            f"if not p.startswith({SOURCE!r})]; import mnist_sweep.base.hydra_config as c, "
                            "mnist_sweep.search.sweepfile as s; print(c.__file__, c.CONF_DIR, s.SWEEPS_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    assert all(part.startswith(str(target)) for part in where.stdout.split()), where.stdout
    # the console script of the wheel, run from another folder
    script = target / "bin" / "mnist-sweep"
    out = subprocess.run([sys.executable, "-c", "import sys, runpy; sys.path[:] = [p for p in sys.path "
                          f"if not p.startswith({SOURCE!r})]; sys.argv = {[str(script)]!r} + sys.argv[1:]; "
                          f"runpy.run_path({str(script)!r}, run_name='__main__')",
                          "--sweep", "momentum", "sweep.n_trials=2", "sweep.register_model=false",
                          f"data.root={mnist_dir}", "train.epochs=1", "train.batch_size=50",
                          "data.val_size=100", "train.progress=false"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "best trial #" in out.stdout
    assert (elsewhere / "optuna.db").exists() and (elsewhere / "mlflow.db").exists()
    assert {p.name for p in (target / "bin").iterdir()} >= {"mnist-train", "mnist-sweep", "mnist-server"}
