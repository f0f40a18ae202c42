"""Load: many workers on one study, every trial recorded once (make bench-scale).

    python tests/benchmarks/bench_scale.py [--server-workers 8 --server-trials 200
                                            --local-workers 4 --local-trials 100]

Two loads, each one `python -m mnist_sweep.sweep` run as a user runs it, with tiny trials (1 epoch
on small synthetic MNIST-format files) so that the stores, not the training, take the load:
  - servers: N workers against PostgreSQL (Optuna RDB storage) + `mlflow server` backed by it,
    both started here on 127.0.0.1;
  - local:   N workers on the embedded default stores (sqlite:///optuna.db, sqlite:///mlflow.db).
Printed per load: trials, workers, errors, duplicates, wall time, and what the errors were.
`run_load` is also what tests/test_load.py asserts on.
"""

from __future__ import annotations

import argparse
import collections
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # conftest: the synthetic IDX writer the tests use
from conftest import study_runs  # noqa: E402

# Per trial: 1 epoch of 10 batches of 50 (500 train images), 100 validation images.
TINY_TRIAL = ["data.val_size=100", "train.batch_size=50", "train.epochs=1"]


def run_load(folder: Path, data_root: Path, workers: int, trials: int, storage: str,
             tracking: str, study_name: str | None = None) -> dict:
    """Run one sweep of `trials` tiny trials with `workers` workers; count what went wrong."""
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    study_name = study_name or f"load-{workers}x{trials}-{os.getpid()}"
    args = ["--sweep", "momentum", f"sweep.study_name={study_name}", f"sweep.storage={storage}",
            f"tracking.tracking_uri={tracking}", f"sweep.n_trials={trials}",
            f"sweep.workers={workers}", "sweep.pruner=none", "sweep.quiet=true",
            "sweep.report_every=50", f"data.root={data_root}", *TINY_TRIAL, "train.threads=1"]
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "mnist_sweep.sweep", *args], cwd=folder,
                         capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - started
    log = out.stdout + out.stderr

    study = optuna.load_study(study_name=study_name, storage=storage)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    excess = [t for t in study.trials if t.state == TrialState.FAIL and t.user_attrs.get("excess")]
    failed = [t for t in study.trials if t.state == TrialState.FAIL and not t.user_attrs.get("excess")]
    other = [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    numbers = collections.Counter(t.number for t in finished)

    _, children = study_runs(MlflowClient(tracking), study_name)
    runs_per_trial = collections.Counter(r.data.tags.get("trial_number") for r in children)
    missing = [t.number for t in finished if runs_per_trial[str(t.number)] == 0]
    duplicated_runs = [n for n, k in runs_per_trial.items() if k > 1]
    by_trial = {r.data.tags["trial_number"]: r for r in children}
    incomplete = [t.number for t in finished if str(t.number) in by_trial and (
        by_trial[str(t.number)].info.status != "FINISHED"
        or not {"val_acc", "test_acc", "batch_train_loss"} <= set(by_trial[str(t.number)].data.metrics))]
    locked = log.count("database is locked")
    tracebacks = log.count("Traceback")
    figures = {
        "trials": trials, "workers": workers, "finished": len(finished), "exit_code": out.returncode,
        "failed_trials": len(failed), "stuck_trials": len(other), "excess_slots": len(excess),
        "duplicate_trials": sum(k - 1 for k in numbers.values()),
        "child_runs": len(children), "trials_without_run": len(missing),
        "duplicate_runs": len(duplicated_runs), "runs_without_metrics": len(incomplete),
        "database_is_locked": locked, "tracebacks": tracebacks,
        "wall_s": round(wall, 1), "trials_per_min": round(len(finished) / wall * 60, 1),
    }
    figures["errors"] = (int(out.returncode != 0) + len(failed) + len(other) + len(missing)
                         + len(incomplete) + locked + tracebacks
                         + int(len(finished) != trials) + int(len(children) != len(finished)))
    figures["duplicates"] = figures["duplicate_trials"] + figures["duplicate_runs"]
    figures["log_tail"] = log[-2000:] if figures["errors"] else ""
    return figures


def show(name: str, f: dict) -> None:
    print(f"{name:8s} trials {f['finished']}/{f['trials']}  workers {f['workers']}  "
          f"errors {f['errors']}  duplicates {f['duplicates']}  wall {f['wall_s']} s  "
          f"({f['trials_per_min']} trials/min)", flush=True)
    print(f"         child runs {f['child_runs']}, trials without a run {f['trials_without_run']}, "
          f"runs without metrics {f['runs_without_metrics']}, failed trials {f['failed_trials']}, "
          f"stuck trials {f['stuck_trials']}, 'database is locked' {f['database_is_locked']}, "
          f"tracebacks {f['tracebacks']}, exit code {f['exit_code']}, excess slots opened and "
          f"closed untrained {f['excess_slots']}", flush=True)
    if f["log_tail"]:
        print(f["log_tail"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-workers", type=int, default=8)
    parser.add_argument("--server-trials", type=int, default=200)
    parser.add_argument("--local-workers", type=int, default=4)
    parser.add_argument("--local-trials", type=int, default=100)
    args = parser.parse_args()

    from conftest import make_synthetic_mnist
    from mnist_sweep.servers.local import LocalServers, free_port

    work = Path(tempfile.mkdtemp(prefix="mnist-sweep-bench-scale-"))
    work.chmod(0o755)  # PostgreSQL runs as another user and must reach its folder
    try:
        data = make_synthetic_mnist(work / "data")
        print(f"bench-scale on {os.cpu_count()} CPU cores; tiny trials: {' '.join(TINY_TRIAL)} "
              "on 600/200 synthetic images", flush=True)
        servers = LocalServers(work / "servers", secrets.token_urlsafe(12), free_port(),
                               free_port())
        servers.start()
        try:
            (work / "run-servers").mkdir()
            show("servers", run_load(work / "run-servers", data, args.server_workers,
                                     args.server_trials, servers.storage_url, servers.tracking_url))
        finally:
            servers.stop()
        local = work / "run-local"
        local.mkdir()
        show("local", run_load(local, data, args.local_workers, args.local_trials,
                               f"sqlite:///{local / 'optuna.db'}", f"sqlite:///{local / 'mlflow.db'}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
