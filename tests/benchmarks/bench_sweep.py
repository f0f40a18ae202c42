"""Benchmark of the sweep on real MNIST, all figures from one run on the same data and budget.

    make bench-sweep      (or: python tests/benchmarks/bench_sweep.py [--trials N] [--epochs N])

(1) the same study (default space, TPE seed 0) with the median pruner, with hyperband and with
    no pruning: epochs trained, wall time, best validation accuracy.
    Target: >= 40 % fewer epochs, best within 0.3 points.
(2) 1 vs 2 workers on 2 cores, no pruning, the same trials: trials per minute. Target >= 1.6x.
(3) per-trial overhead outside training (sampling, composing, MLflow runs, storage): a trial's
    wall time (Optuna's start..complete) minus its epochs' time. Target <= 0.5 s and <= 5 %.
(4) the fixed cost of a sweep: `make sweep SWEEP=momentum ARGS="sweep.n_trials=4 train.epochs=2
    sweep.pruner=none"` as a person at a terminal runs it (sweep.final_report=background), in a
    fresh folder: wall time minus training time (the epochs' seconds), the first epoch's start
    after launch, the end after the last trial. Target: fixed cost <= 3 s. And as a script runs
    it (output not a terminal: sweep.final_report=auto waits for the report). Target: <= 4 s.
    With --lightning-hydra-template DIR (a clone with its requirements installed, MNIST under
    DIR/data/MNIST/raw), its own Optuna sweep of the same budget (hparams_search=mnist_optuna,
    4 trials x 2 epochs) runs between ours: the walls side by side.

    python tests/benchmarks/bench_sweep.py --fixed-cost-only     (just (4), a few times)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[2]


def run_sweep(folder: Path, data: str, *overrides: str) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "mnist_sweep.sweep", "--sweep", "momentum_decay",
                          "sweep.quiet=true", "sweep.report_every=1000", f"data.root={data}",
                          "sweep.seed=0", *overrides],
                         cwd=folder, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"sweep failed in {folder}:\n{out.stderr[-3000:]}")
    return time.perf_counter() - started


def study_of(folder: Path, name: str = "momentum_decay") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")


def finished(study):
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def epochs_trained(study) -> int:
    return sum(t.user_attrs.get("epochs_trained", len(t.intermediate_values)) for t in finished(study))


def best_val(study) -> float:
    return max(t.value for t in study.trials if t.state == TrialState.COMPLETE)


def trial_overheads(folder: Path, study) -> list[tuple[float, float]]:
    """(overhead seconds, trial seconds) per complete trial."""
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    out = []
    for t in study.trials:
        if t.state != TrialState.COMPLETE:
            continue
        wall = (t.datetime_complete - t.datetime_start).total_seconds()
        epochs = sum(m.value for m in client.get_metric_history(t.user_attrs["mlflow_run_id"], "epoch_seconds"))
        out.append((wall - epochs, wall))
    return out


def trials_per_minute(study) -> float:
    done = finished(study)
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return 60 * len(done) / span


def fixed_cost(folder: Path, data: str, final_report: str = "background") -> dict:
    """One 4 x 2 sweep in a fresh folder, timed from the outside; where the time went.
    final_report: background (a person at a terminal) or auto (a script: it waits)."""
    folder.mkdir(parents=True)
    log = open(folder / "sweep.log", "w")  # not a pipe: the background report holds no pipe open
    started = time.time()
    process = subprocess.Popen([sys.executable, "-m", "mnist_sweep.sweep", "--sweep", "momentum",
                                "sweep.n_trials=4", "train.epochs=2", "sweep.pruner=none",
                                "sweep.quiet=true", f"sweep.final_report={final_report}",
                                f"data.root={data}"], cwd=folder, stdout=log, stderr=log)
    code = process.wait()  # what the person at the terminal waits for
    ended = time.time()
    if code != 0:
        raise SystemExit(f"sweep failed in {folder}:\n{(folder / 'sweep.log').read_text()[-3000:]}")
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    # The background report (plots; the champion model, trained again) must finish before the
    # next run, or the two compete for the cores: the parent run ends when it is written.
    for _ in range(240):
        parents = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                     "tags.sweep_role = 'parent'")
        if parents and parents[0].info.status != "RUNNING":
            break
        time.sleep(0.5)
    runs = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
            if "trial_number" in r.data.tags]
    epochs = [m for r in runs for m in client.get_metric_history(r.info.run_id, "epoch_seconds")]
    first = min(epochs, key=lambda m: m.timestamp)  # logged as the first epoch ended
    last_trial = max(t.datetime_complete for t in study_of(folder, "momentum").trials).timestamp()
    training = sum(m.value for m in epochs)
    return {"mode": "terminal" if final_report == "background" else "script",
            "wall": ended - started, "training": training, "fixed": ended - started - training,
            "first_epoch": first.timestamp / 1000 - first.value - started,
            "after_last": ended - last_trial}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("MNIST_SWEEP_DATA", str(REPO.parent / "shared/data/mnist")))
    parser.add_argument("--trials", type=int, default=24, help="trials per study in (1)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per trial in (1)")
    parser.add_argument("--worker-trials", type=int, default=10, help="trials per run in (2)")
    parser.add_argument("--fixed-cost-only", action="store_true", help="only (4), three times")
    parser.add_argument("--lightning-hydra-template", metavar="DIR", help="its sweep beside (4)")
    parser.add_argument("--lightning-python", default=None,
                        help="the interpreter with its requirements (default: DIR/../.venv/bin/python)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    print(f"scratch {root}, data {args.data}, {os.cpu_count()} cores", flush=True)
    if args.fixed_cost_only:
        print_fixed_costs(fixed_costs(root, args))
        return

    # (1) pruning
    budget = [f"sweep.n_trials={args.trials}", f"train.epochs={args.epochs}"]
    rows = {}
    for pruner in ("none", "median", "hyperband", "successive_halving"):
        wall = run_sweep(root / f"prune-{pruner}", args.data, *budget, f"sweep.pruner={pruner}")
        study = study_of(root / f"prune-{pruner}")
        rows[pruner] = (epochs_trained(study), wall, best_val(study),
                        sum(t.state == TrialState.PRUNED for t in study.trials))
        print(f"  pruner {pruner}: {rows[pruner]}", flush=True)

    # (2) workers: the same trials (no pruning, short), 1 worker with 2 threads vs 2 with 1 each
    same = [f"sweep.n_trials={args.worker_trials}", "train.epochs=3", "sweep.pruner=none"]
    rates, walls, overheads = {}, {}, []
    for workers in (1, 2):
        folder = root / f"workers-{workers}"
        walls[workers] = run_sweep(folder, args.data, *same, f"sweep.workers={workers}")
        study = study_of(folder)
        rates[workers] = trials_per_minute(study)
        overheads += trial_overheads(folder, study)
        print(f"  workers {workers}: {rates[workers]:.1f} trials/min, wall {walls[workers]:.1f} s", flush=True)

    base = rows["none"]
    print(f"\n(1) pruning, {args.trials} trials x {args.epochs} epochs, TPE seed 0")
    print("| pruner | epochs trained | fewer epochs | pruned trials | wall s | best val_acc | vs none |")
    print("|---|---|---|---|---|---|---|")
    for pruner, (epochs, wall, best, pruned) in rows.items():
        print(f"| {pruner} | {epochs} | {100 * (1 - epochs / base[0]):.0f} % | {pruned} | {wall:.0f} | "
              f"{100 * best:.2f} % | {100 * (best - base[2]):+.2f} points |")
    print(f"\n(2) workers on {os.cpu_count()} cores, {args.worker_trials} trials x 3 epochs, no pruning")
    print("| workers | trials/min (first start..last end) | sweep wall s (incl. start-up) |")
    print("|---|---|---|")
    for workers in (1, 2):
        print(f"| {workers} | {rates[workers]:.1f} | {walls[workers]:.1f} |")
    print(f"| ratio 2/1 | {rates[2] / rates[1]:.2f}x (target >= 1.6x) | |")
    long_trials = trial_overheads(root / "prune-none", study_of(root / "prune-none"))
    print("\n(3) per-trial overhead outside training (trial wall time minus its epochs)")
    print("| trials | n | median seconds (target <= 0.5) | median share of a trial (target <= 5 %) | max seconds |")
    print("|---|---|---|---|---|")
    for label, rows_ in ((f"{args.epochs} epochs, 1 worker", long_trials), ("3 epochs, 1 and 2 workers", overheads)):
        print(f"| {label} | {len(rows_)} | {statistics.median(o for o, _ in rows_):.3f} | "
              f"{100 * statistics.median(o / w for o, w in rows_):.1f} % | {max(o for o, _ in rows_):.3f} |")
    print("(the max is a worker's first trial, which also decodes the data and moves it to the device)")
    print_fixed_costs(fixed_costs(root, args))


def fixed_costs(root: Path, args) -> list[dict]:
    """(4): ours at a terminal and from a script, three times each, lightning-hydra-template's
    sweep between them when given."""
    costs = []
    for i in range(3):
        costs.append(fixed_cost(root / f"terminal-{i}", args.data, "background"))
        costs.append(fixed_cost(root / f"script-{i}", args.data, "auto"))
        if args.lightning_hydra_template and i < 2:
            costs.append(lightning_sweep(Path(args.lightning_hydra_template), args.lightning_python))
        print(f"  {costs[-1]}", flush=True)
    return costs


def lightning_sweep(repo: Path, python: str | None) -> dict:
    """lightning-hydra-template's Optuna sweep (Hydra's Optuna sweeper), same budget: wall time.
    (torch >= 2.6 loads checkpoints weights-only; its test step loads a pickled model: allowed
    by the environment variable torch provides for that.)"""
    python = python or str(repo.parent / ".venv" / "bin" / "python")
    started = time.time()
    out = subprocess.run([python, "src/train.py", "-m", "hparams_search=mnist_optuna",
                          "hydra.sweeper.n_trials=4", "trainer.max_epochs=2", "trainer=cpu"],
                         cwd=repo, capture_output=True, text=True,
                         env={**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    if out.returncode != 0:
        raise SystemExit(f"lightning-hydra-template's sweep failed:\n{out.stderr[-3000:]}")
    return {"mode": "lightning-hydra-template", "wall": time.time() - started}


def print_fixed_costs(costs: list[dict]) -> None:
    print("\n(4) fixed cost of a 4 x 2 sweep (momentum, fresh folder; terminal: report in the "
          "background; script: waits for it)")
    print("| run | wall s | training s | fixed cost s (target <= 3 / 4) | first epoch starts at s | ends after the last trial s |")
    print("|---|---|---|---|---|---|")
    for c in costs:
        if c["mode"] == "lightning-hydra-template":
            print(f"| {c['mode']} | {c['wall']:.1f} | | | | |")
        else:
            print(f"| {c['mode']} | {c['wall']:.1f} | {c['training']:.1f} | {c['fixed']:.1f} | "
                  f"{c['first_epoch']:.1f} | {c['after_last']:.2f} |")
    theirs = [c["wall"] for c in costs if c["mode"] == "lightning-hydra-template"]
    for mode in ("terminal", "script"):
        ours = [c for c in costs if c["mode"] == mode]
        line = (f"{mode}: fixed cost median {statistics.median(c['fixed'] for c in ours):.1f} s, "
                f"wall median {statistics.median(c['wall'] for c in ours):.1f} s")
        if theirs:
            line += (f"; lightning-hydra-template {statistics.median(theirs):.1f} s: "
                     f"{statistics.median(theirs) / statistics.median(c['wall'] for c in ours):.1f}x ours")
        print(line)


if __name__ == "__main__":
    main()
