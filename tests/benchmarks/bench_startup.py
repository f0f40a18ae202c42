"""A short sweep's fixed cost, phase by phase, against the floor this machine sets (`import torch`).

    make bench-startup     (or: python tests/benchmarks/bench_startup.py [--against REV] [--runs N]
                            [--default-sweep])

In one run, on real MNIST (../shared/data/mnist), each measured --runs times (medians shown):
(0) the floor: `python -c "import torch"`, wall seconds.
(1) `make train` (2 epochs): when the first epoch's line appears. Target: <= 1.5x the floor.
(2) the 4 x 2 sweep as a person at a terminal runs it (`--sweep momentum sweep.n_trials=4
    train.epochs=2 sweep.pruner=none`, the report finished in the background, fresh folder):
    its phases from its output's timestamps: first line, driver ready (the "sweep ..." line),
    first epoch start, last trial complete, exit. Targets: fixed cost (wall minus the epochs'
    seconds) <= half the epochs' seconds; the first epoch no slower than the second by > 20 %;
    exit within 1 s of the last trial.
(3) with --default-sweep: the default sweep's search (momentum_decay, sweep.confirm.top=0: its
    confirmation trains 25 members at once, whose epochs overlap), wall minus the epochs'
    seconds (MLflow's epoch_seconds of every run). Target: <= 5 % of the wall.
Before and after, side by side: with --against REV (default ccaf8d6, main before this work; `none`
to skip) each measurement runs with that commit's code (a git worktree first on PYTHONPATH) and
then with this checkout's, interleaved. (Solo bookkeeping per trial: `make bench-bookkeeping`.)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BEFORE = "ccaf8d6"
EPOCH_LINE = re.compile(r"epoch (\d+)/\d+ .*\| ([0-9.]+)s \| ETA")


def timed_lines(command: list[str], cwd: Path, env: dict) -> tuple[list[tuple[float, str]], float]:
    """Run `command`; each line of its output (stdout and stderr) with the seconds since the
    start it appeared at, and the seconds at which the process exited (its background children
    may hold the pipe open longer: their lines are read until they end, the exit is the exit)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append((time.perf_counter() - started, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = process.wait()
    exited = time.perf_counter() - started
    reader.join(300)
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code}):\n" + "\n".join(text for _, text in lines[-40:]))
    return lines, exited


def environment(source: Path | None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))
    return env


def floor(source: Path | None) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, env=environment(source))
    return time.perf_counter() - started


def train(folder: Path, data: str, source: Path | None) -> dict:
    folder.mkdir(parents=True)
    lines, exited = timed_lines([sys.executable, "-m", "mnist_sweep.train", f"data.root={data}",
                                 "train.epochs=2"], folder, environment(source))
    first, seconds = next((t, float(m.group(2))) for t, line in lines if (m := EPOCH_LINE.search(line)))
    return {"first_line": lines[0][0], "first_epoch_line": first, "first_epoch": seconds,
            "before_training": first - seconds, "exit": exited}


def sweep_4x2(folder: Path, data: str, source: Path | None) -> dict:
    folder.mkdir(parents=True)
    lines, exited = timed_lines(
        [sys.executable, "-m", "mnist_sweep.sweep", "--sweep", "momentum", "sweep.n_trials=4",
         "train.epochs=2", "sweep.pruner=none", "sweep.final_report=background", f"data.root={data}"],
        folder, environment(source))
    epochs = [(t, int(m.group(1)), float(m.group(2))) for t, line in lines
              if (m := EPOCH_LINE.search(line))]
    ready = next(t for t, line in lines if line.startswith("sweep momentum:"))
    last_trial = max(t for t, line in lines if re.search(r"\] complete: ", line))
    training = sum(s for _, _, s in epochs)
    return {"first_line": lines[0][0], "driver_ready": ready,
            "first_epoch_start": epochs[0][0] - epochs[0][2], "last_trial": last_trial,
            "exit": exited, "epochs": training, "fixed": exited - training,
            "first_vs_second": epochs[0][2] / epochs[1][2]}


def default_sweep(folder: Path, data: str, source: Path | None) -> dict:
    from mlflow.tracking import MlflowClient

    folder.mkdir(parents=True)
    _, exited = timed_lines([sys.executable, "-m", "mnist_sweep.sweep", "--sweep", "momentum_decay",
                             "sweep.confirm.top=0", "sweep.quiet=true", "sweep.final_report=background", f"data.root={data}"],
                            folder, environment(source))
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = [r for r in client.search_runs(experiments, max_results=5000) if "trial_number" in r.data.tags]
    training = sum(m.value for r in runs for m in client.get_metric_history(r.info.run_id, "epoch_seconds"))
    return {"exit": exited, "epochs": training, "fixed": exited - training,
            "share": (exited - training) / exited}


def wait_for_background_reports(folder: Path) -> None:
    """The report finished in the background must not compete with the next measurement."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    for _ in range(600):
        parents = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                     "tags.sweep_role = 'parent'")
        if parents and all(p.info.status != "RUNNING" for p in parents):
            return
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("MNIST_SWEEP_DATA", str(REPO.parent / "shared/data/mnist")))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--against", default=BEFORE, help="the commit to compare with (none: skip)")
    parser.add_argument("--default-sweep", action="store_true", help="also (3): ~5 min a run")
    args = parser.parse_args()
    args.data = str(Path(args.data).resolve())  # the runs start in folders of their own
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    codes: list[tuple[str, Path | None]] = [("now", None)]
    if args.against != "none":
        old = work / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.against],
                       check=True, capture_output=True)
        codes.insert(0, (f"before ({args.against})", old / "src"))
    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "?")
    print(f"scratch {work}, data {args.data}, {os.cpu_count()} cores, {cpu}", flush=True)
    results: dict[str, dict[str, list[dict]]] = {label: {} for label, _ in codes}
    try:
        for i in range(args.runs):
            for label, source in codes:
                got = results[label]
                got.setdefault("floor", []).append({"floor": floor(source)})
                got.setdefault("train", []).append(train(work / f"train-{label[:6]}-{i}", args.data, source))
                folder = work / f"sweep-{label[:6]}-{i}"
                got.setdefault("sweep", []).append(sweep_4x2(folder, args.data, source))
                wait_for_background_reports(folder)
                if args.default_sweep and i == 0:
                    folder = work / f"default-{label[:6]}"
                    got["default"] = [default_sweep(folder, args.data, source)]
                    wait_for_background_reports(folder)
                print(f"  run {i} {label}: {got['sweep'][-1]}", flush=True)
    finally:
        if args.against != "none":
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / "before")],
                           capture_output=True)
    report(results)


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report(results: dict[str, dict[str, list[dict]]]) -> None:
    labels = list(results)
    print("\n| seconds (median) | " + " | ".join(labels) + " | target |")
    print("|---|" + "---|" * (len(labels) + 1))

    def row(name: str, part: str, key: str, target: str = "", fmt: str = "{:.2f}") -> None:
        values = [fmt.format(median(results[lab][part], key)) if part in results[lab] else "" for lab in labels]
        print(f"| {name} | " + " | ".join(values) + f" | {target} |")

    def over_floor(name: str, key: str, target: str = "") -> None:
        """make train's `key` divided by the floor of its own run, as a row."""
        for label in labels:
            floor_s = median(results[label]["floor"], "floor")
            results[label][f"{key}/floor"] = [{"r": t[key] / floor_s} for t in results[label]["train"]]
        row(name, f"{key}/floor", "r", target, "{:.2f}x")

    row("floor: `import torch`", "floor", "floor")
    row("make train: first line", "train", "first_line")
    row("make train: first epoch's line", "train", "first_epoch_line")
    over_floor("make train: first epoch's line / floor", "first_epoch_line", "<= 1.5x")
    row("make train: the first epoch's own seconds", "train", "first_epoch")
    row("make train: before training (first epoch's line - its seconds)", "train", "before_training")
    over_floor("make train: before training / floor", "before_training")
    row("make train: exit", "train", "exit")
    row("4x2 sweep: first line", "sweep", "first_line")
    row("4x2 sweep: driver ready", "sweep", "driver_ready")
    row("4x2 sweep: first epoch starts", "sweep", "first_epoch_start")
    row("4x2 sweep: last trial complete", "sweep", "last_trial")
    row("4x2 sweep: exit", "sweep", "exit")
    row("4x2 sweep: epochs' seconds", "sweep", "epochs")
    row("4x2 sweep: fixed cost (exit - epochs)", "sweep", "fixed")
    for label in labels:
        results[label]["sweep_ratios"] = [
            {"fixed": s["fixed"] / s["epochs"], "after_last": s["exit"] - s["last_trial"]}
            for s in results[label]["sweep"]]
    row("4x2 sweep: fixed cost / epochs", "sweep_ratios", "fixed", "<= 0.5x", "{:.2f}x")
    row("4x2 sweep: first epoch / second", "sweep", "first_vs_second", "<= 1.2x", "{:.2f}x")
    row("4x2 sweep: exit after the last trial", "sweep_ratios", "after_last", "<= 1 s")
    if any("default" in results[label] for label in labels):
        row("default sweep: wall", "default", "exit", "", "{:.0f}")
        row("default sweep: epochs' seconds", "default", "epochs", "", "{:.0f}")
        row("default sweep: (wall - epochs) / wall", "default", "share", "<= 5 %", "{:.1%}")


if __name__ == "__main__":
    main()
