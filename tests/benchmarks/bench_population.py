"""Population mode against one trial at a time, on the device this runs on (make bench-population).

    python tests/benchmarks/bench_population.py [--device auto] [--epochs 3] [--sizes 4,16,64]
                                                [--solo-trials 8] [--largest 256,1024]
                                                [--default-sweep]

(1) The same trials one at a time and as populations of K: configurations drawn once from the
    default sweep's space (random, seed 0), each trained --epochs epochs with no pruning, enqueued
    into a fresh study for every run, so that every run trains the same trials (a run of K
    trains 2K of them, one at a time --solo-trials). Per run, measured side by side in this one
    process (the data loaded once): wall time of the sweep, member-epochs per second and their
    ratio to one at a time, the time spent inside Optuna (the bookkeeper's calls, or the solo
    worker's) and inside MLflow (the run writer process's calls, or the solo worker's), as
    shares of the wall time, and how long training waited for the bookkeeper.
(2) The largest population that fits (--largest sizes, one generation each, until the device
    runs out of memory): member-epochs per second and the ratio.
(3) --default-sweep: the default sweep (momentum_decay: 60 trials x 15 epochs, TPE, median
    pruner) with sweep.population=auto: population size, wall time, best test accuracy.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import threading
import logging
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SPENT = {"optuna": 0.0, "mlflow": 0.0}


def timed(kind: str, function):
    """Count the time spent inside `function` (not from the heartbeat thread: it beats aside)."""
    @functools.wraps(function)
    def call(*args, **kwargs):
        if threading.current_thread().name == "heartbeat" or getattr(timed, "depth", 0):
            return function(*args, **kwargs)
        timed.depth = 1
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SPENT[kind] += time.perf_counter() - started
            timed.depth = 0
    return call


def instrument() -> None:
    """Time Optuna's and MLflow's entry points as our code calls them (in this process)."""
    import optuna
    from mlflow.tracking import MlflowClient

    for name in ("ask", "tell", "enqueue_trial", "get_trials"):
        setattr(optuna.Study, name, timed("optuna", getattr(optuna.Study, name)))
    for name in ("report", "should_prune", "suggest_float", "suggest_int", "suggest_categorical",
                 "set_user_attr"):
        setattr(optuna.Trial, name, timed("optuna", getattr(optuna.Trial, name)))
    for name in ("create_run", "log_batch", "log_text", "set_terminated", "set_tag", "log_metric",
                 "get_run", "search_runs"):
        setattr(MlflowClient, name, timed("mlflow", getattr(MlflowClient, name)))


def configurations(n: int, seed: int = 0) -> list[dict]:
    """n configurations of the default space, drawn at random once (the same for every run)."""
    import optuna

    from mnist_sweep.search.sweepfile import load_spec

    space = load_spec("momentum_decay", []).space()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        space.suggest(trial)
        out.append(dict(trial.params))
        study.tell(trial, 0.0)
    return out


REPORT = ["sweep.final_report=wait"]
OVERRIDES: list[str] = []


class PopulationFigures(logging.Handler):
    """The population worker's closing figures, which ride on its last log record."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict = {}

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "population_figures"):
            self.last = record.population_figures


def run(folder: Path, name: str, trials: list[dict], epochs: int, population: int, device: str,
        data: str, extra: tuple = ()) -> dict:
    """One sweep in this process over exactly `trials`; its figures."""
    from mnist_sweep.search.driver import run_sweep
    from mnist_sweep.search.sweepfile import load_spec

    spec = load_spec("momentum_decay", [
        f"sweep.study_name={name}", f"sweep.n_trials={len(trials)}", "sweep.pruner=none",
        "sweep.quiet=true", "sweep.report_every=100000", *REPORT,
        f"sweep.population={population}", f"sweep.storage=sqlite:///{folder / 'optuna.db'}",
        f"tracking.tracking_uri=sqlite:///{folder / 'mlflow.db'}", f"train.epochs={epochs}",
        f"train.device={device}", f"data.root={data}", *OVERRIDES, *extra])
    spec.enqueue = trials
    SPENT.update(optuna=0.0, mlflow=0.0)
    figures = PopulationFigures()
    logging.getLogger("mnist_sweep").addHandler(figures)
    try:
        started = time.perf_counter()
        study = run_sweep(spec)
        total = time.perf_counter() - started
    finally:
        logging.getLogger("mnist_sweep").removeHandler(figures)
    done = [t for t in study.trials if t.state.is_finished() and t.value is not None]
    # The rate counts from the first trial's start to the last one's end: what a sweep of any
    # length spends per trial (a sweep's fixed start-up and final report are measured apart,
    # by make bench-sweep, and are the same for both modes).
    wall = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    stats = figures.last
    return {"wall": wall, "total": total, "member_epochs": len(done) * epochs, "trials": len(done),
            "epoch_seconds": stats.get("epoch_seconds", []),
            "optuna": stats.get("optuna_seconds", SPENT["optuna"]),
            "mlflow": stats.get("mlflow_seconds", SPENT["mlflow"]),
            "waited": stats.get("waited_seconds", 0.0) / stats.get("loop_seconds", 1) * wall,
            "best_test": max((t.user_attrs.get("test_acc", 0) for t in done), default=0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("MNIST_SWEEP_DATA", str(REPO.parent / "shared/data/mnist")))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sizes", default="4,16,64")
    parser.add_argument("--solo-trials", type=int, default=8)
    parser.add_argument("--override", action="append", default=[],
                        help="a trial override for every run, e.g. train.cuda_graphs=false")
    parser.add_argument("--compare-graphs", action="store_true",
                        help="also run the largest of --sizes without CUDA graphs")
    parser.add_argument("--background-report", action="store_true",
                        help="write each run's final report in the background (not timed anyway)")
    parser.add_argument("--largest", default="", help="population sizes to try for (2), e.g. 256,1024")
    parser.add_argument("--default-sweep", action="store_true", help="also run (3)")
    args = parser.parse_args()
    OVERRIDES.extend(args.override)
    if args.background_report:
        REPORT[:] = ["sweep.final_report=background"]

    import torch

    from mnist_sweep.trial.validation import resolve_device

    device = str(resolve_device(args.device))
    instrument()
    sizes = [int(k) for k in args.sizes.split(",") if k]
    pool = configurations(max([args.solo_trials, *[2 * k for k in sizes]]))
    folder = Path(tempfile.mkdtemp(prefix="bench-population-"))
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}; {args.epochs} epochs a trial, no pruning; "
          f"real MNIST from {args.data}\n", flush=True)
    rows = []
    run(folder, "warm-up", pool[:1], 1, 1, device, args.data)  # imports, data, caches: once
    solo = run(folder, "solo", pool[:args.solo_trials], args.epochs, 1, device, args.data)
    for label, k in [("one at a time", 1), *[(f"population {k}", k) for k in sizes]]:
        figures = solo if k == 1 else run(folder, f"pop{k}", pool[:2 * k], args.epochs, k, device, args.data)
        rows.append((label, figures))
        print_row(label, figures, solo)
    if args.compare_graphs and device.startswith("cuda"):
        k = sizes[-1]
        figures = run(folder, f"eager{k}", pool[:2 * k], args.epochs, k, device, args.data,
                      ("train.cuda_graphs=false",))
        print_row(f"pop {k}, no graphs", figures, solo)
    if args.largest:
        print("\n(2) the largest population that fits (one generation)")
        for k in [int(x) for x in args.largest.split(",") if x]:
            try:
                more = configurations(k, seed=1)
                figures = run(folder, f"large{k}", more, args.epochs, k, device, args.data)
            except Exception as error:  # out of memory: the previous one was the largest
                print(f"population {k}: does not fit ({type(error).__name__}: {str(error)[:120]})")
                break
            print_row(f"population {k}", figures, solo)
            if device.startswith("cuda"):
                print(f"    peak device memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if args.default_sweep:
        from mnist_sweep.search.driver import run_sweep
        from mnist_sweep.search.sweepfile import load_spec

        print("\n(3) the default sweep with population mode (momentum_decay, sweep.population=auto)")
        spec = load_spec("momentum_decay", [
            "sweep.quiet=true", "sweep.population=auto", *REPORT,
            f"sweep.storage=sqlite:///{folder / 'default.db'}",
            f"tracking.tracking_uri=sqlite:///{folder / 'mlflow.db'}", f"train.device={device}",
            f"data.root={args.data}"])
        from mnist_sweep.base.hydra_config import compose
        from mnist_sweep.search.worker_process import resolve_population

        size = resolve_population("auto", compose(spec.fixed), spec.settings["n_trials"])
        started = time.perf_counter()
        study = run_sweep(spec)
        wall = time.perf_counter() - started
        best = study.best_trial
        pruned = sum(t.state.name == "PRUNED" for t in study.trials)
        print(f"population {size}: {wall:.1f} s for {spec.settings['n_trials']} trials "
              f"({pruned} pruned); best trial #{best.number}: val {best.value:.4f}, "
              f"test {best.user_attrs.get('test_acc', float('nan')):.4f} | {best.params}")
    print(f"\n(stores in {folder})")


def print_row(label: str, f: dict, solo: dict) -> None:
    rate = f["member_epochs"] / f["wall"]
    ratio = rate / (solo["member_epochs"] / solo["wall"])
    print(f"{label:>18}: {f['trials']:4d} trials, {f['wall']:7.1f} s ({f['total']:.1f} s with the "
          f"sweep's start and report), {rate:8.2f} member-epochs/s, "
          f"{ratio:6.2f}x | inside Optuna {100 * f['optuna'] / f['wall']:5.1f} %, inside MLflow "
          f"{100 * f['mlflow'] / f['wall']:5.1f} %, training waited {100 * f['waited'] / f['wall']:4.1f} %"
          + (f" | epochs {min(f['epoch_seconds']):.3f}-{max(f['epoch_seconds']):.3f} s"
             if f["epoch_seconds"] else ""), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
