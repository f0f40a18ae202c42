"""Kubernetes manifests (`--kubernetes`): rendered from the settings, loaded back as YAML and
checked; the two commands they run (`--create-only`, then `--join` workers) run here for real
against SQLite stores. Not applied to a cluster here (no Kubernetes on these machines)."""

from __future__ import annotations

import optuna
import yaml
from mlflow.tracking import MlflowClient

from conftest import run_cli, study_runs
from test_sweep import TINY, finished

SECRET = "pw-Kx7"


def test_the_manifests_are_a_create_job_and_an_indexed_job_of_gpu_workers(tmp_path):
    out = run_cli("mnist_sweep.sweep", "--kubernetes", "--sweep", "momentum_decay",
                  f"sweep.storage=postgresql://mnist:{SECRET}@pgbouncer:6432/optuna",
                  "tracking.tracking_uri=http://mlflow:5000", "sweep.kubernetes.workers=8",
                  "sweep.kubernetes.image=registry.lab/mnist-sweep:1.0", "train.epochs=5",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stdout + out.stderr
    create, workers = list(yaml.safe_load_all(out.stdout))
    assert (create["kind"], workers["kind"]) == ("Job", "Job")
    assert workers["spec"]["completionMode"] == "Indexed"
    assert workers["spec"]["completions"] == workers["spec"]["parallelism"] == 8
    pod = workers["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.lab/mnist-sweep:1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"][:5] == ["python", "-m", "mnist_sweep.sweep", "--join", "--sweep"]
    assert "train.epochs=5" in container["args"] and "sweep.workers=1" in container["args"]
    assert "sweep.confirm.top=0" in container["args"]  # the pods run the search alone
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SWEEP_STORAGE"] == "postgresql://mnist@pgbouncer:6432/optuna"  # no password
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    secret_dir = env["PGPASSWORD_FILE"].rsplit("/", 1)[0]  # the password: a Secret's file
    assert {"name": "pg-password", "mountPath": secret_dir, "readOnly": True} in container["volumeMounts"]
    assert {"name": "pg-password", "secret": {"secretName": "mnist-sweep-pg"}} in pod["volumes"]
    assert pod["restartPolicy"] == "OnFailure"  # a worker before the study exists retries
    assert "--create-only" in create["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "nvidia.com/gpu" not in create["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_a_sqlite_storage_is_refused_for_pods(tmp_path):
    out = run_cli("mnist_sweep.sweep", "--kubernetes", "--sweep", "momentum",
                  f"sweep.storage=sqlite:///{tmp_path / 'optuna.db'}", cwd=tmp_path)
    assert out.returncode != 0 and "cannot be used by pods" in out.stderr
    assert not (tmp_path / "optuna.db").exists()


def test_the_create_job_then_the_workers_commands_complete_the_study(tmp_path, mnist_dir):
    """What the two Jobs run, here: --create-only makes the study and the parent run and trains
    nothing; two workers that --join then complete it to exactly n_trials."""
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--sweep", "momentum", "sweep.study_name=k8s", "sweep.n_trials=3",
              f"sweep.storage={storage}", f"tracking.tracking_uri={tracking}",
              f"data.root={mnist_dir}", *TINY]
    created = run_cli("mnist_sweep.sweep", "--create-only", *common, cwd=tmp_path)
    assert created.returncode == 0, created.stderr[-2000:]
    study = optuna.load_study(study_name="k8s", storage=storage)
    assert len(study.trials) == 1 and study.trials[0].state == optuna.trial.TrialState.WAITING
    parents, runs = study_runs(MlflowClient(tracking), "k8s")
    assert len(parents) == 1 and not runs
    joined = run_cli("mnist_sweep.sweep", "--join", *common, "sweep.workers=2", cwd=tmp_path)
    assert joined.returncode == 0, joined.stderr[-2000:]
    assert len(finished(optuna.load_study(study_name="k8s", storage=storage))) == 3
    parents, runs = study_runs(MlflowClient(tracking), "k8s")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(runs) == 3
