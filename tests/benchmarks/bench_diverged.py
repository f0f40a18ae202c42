"""Diverged trials and the sampler, side by side: the same study (a space with a diverging
region, the same TPE seed, the same data) with diverged trials told to Optuna as FAIL
(sweep.diverged=fail, as before 2026-11-30: samplers ignore FAIL trials) and as pruned at the
epoch they diverged with NaN there (sweep.diverged=prune, the default: TPE ranks them below every
trial that reached that epoch). The prune run goes to n_trials; the fail run is stopped once it
has started as many trials. Prints the share of diverged trials per block of 20 trials (by trial
number), in all, and the best validation accuracy of each.

    make bench-diverged   (python tests/benchmarks/bench_diverged.py [--trials 80] [--epochs 2]
                           [--data DIR] [--lr-max 5.0])
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[2]
BLOCK = 20

SPACE = """
sweep: {{study_name: diverging, n_trials: {trials}, sampler: tpe, pruner: median, seed: 0}}
params:
  optim.lr: tag(log, interval(0.005, {lr_max}))
  optim.momentum: interval(0.0, 0.99)
fixed:
  train.epochs: {epochs}
"""


def diverged(trial) -> bool:
    return "diverged" in trial.user_attrs or "TrainingDiverged" in trial.user_attrs.get("fail_reason", "")


def run(folder: Path, sweep_file: Path, data: str, mode: str,
        stop_at: int | None = None) -> tuple[optuna.Study, float]:
    """The sweep to its n_trials, or stopped (SIGTERM: trials end KILLED) once `stop_at` trials
    were started: with FAIL trials invisible, TPE may draw from the diverging region forever
    (n_trials counts finished trials only: one run here drew 1,106 FAIL for 12 finished)."""
    folder.mkdir(parents=True)
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "mnist_sweep.sweep", "--sweep", str(sweep_file),
                                f"sweep.diverged={mode}", "sweep.quiet=true", "tracking.enabled=false",
                                f"data.root={data}"], cwd=folder, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    storage, study = f"sqlite:///{folder / 'optuna.db'}", None
    while process.poll() is None:
        time.sleep(1)
        if stop_at is None or not (folder / "optuna.db").exists():
            continue
        try:
            study = study or optuna.load_study(study_name="diverging", storage=storage)
            if len(study.get_trials(deepcopy=False)) >= stop_at:
                process.terminate()
        except Exception:  # not made yet, or locked by a writer: look again
            pass
    _, err = process.communicate()
    if process.returncode not in (0, 130):
        raise SystemExit(f"the sweep with sweep.diverged={mode} failed:\n{err[-3000:]}")
    wall = time.perf_counter() - started
    return optuna.load_study(study_name="diverging", storage=storage), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=80, help="n_trials of each study")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr-max", type=float, default=5.0, help="top of the log-uniform lr range")
    default_data = REPO.parent / "shared" / "data" / "mnist"
    parser.add_argument("--data", default=os.environ.get("MNIST_SWEEP_DATA") or str(default_data))
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-diverged-"))
    sweep_file = folder / "diverging.yaml"
    sweep_file.write_text(SPACE.format(trials=args.trials, lr_max=args.lr_max, epochs=args.epochs))
    print(f"space: optim.lr log-uniform in [0.005, {args.lr_max}], optim.momentum in [0, 0.99]; "
          f"TPE seed 0, median pruner, {args.trials} finished trials of {args.epochs} epochs; "
          f"data {args.data}", flush=True)
    results = {"prune": run(folder / "prune", sweep_file, args.data, "prune")}
    started = len(results["prune"][0].trials)  # the same number of trials for the other
    results["fail"] = run(folder / "fail", sweep_file, args.data, "fail", stop_at=started)
    blocks = min(len(study.trials) for study, _ in results.values()) // BLOCK
    print("\n| sweep.diverged | " + " | ".join(f"trials {b * BLOCK}-{b * BLOCK + BLOCK - 1}"
                                              for b in range(blocks))
          + " | all trials | best val_acc | wall |")
    print("|---" * (blocks + 4) + "|")
    for mode in ("fail", "prune"):
        study, wall = results[mode]
        trials = study.trials[:blocks * BLOCK]
        shares = [sum(diverged(t) for t in trials[b * BLOCK:(b + 1) * BLOCK]) / BLOCK
                  for b in range(blocks)]
        total = sum(diverged(t) for t in trials)
        best = max((t.value for t in trials if t.state == TrialState.COMPLETE), default=float("nan"))
        print(f"| {mode} | " + " | ".join(f"{share:.0%}" for share in shares)
              + f" | {total}/{len(trials)} ({total / len(trials):.0%}) | {best:.4f} | {wall:.0f} s |")
    print(f"\n(trials {blocks * BLOCK} and later are left out of the table; the fail run was "
          f"stopped once it had started as many trials as the prune run: {started})")


if __name__ == "__main__":
    main()
