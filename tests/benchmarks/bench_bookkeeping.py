"""Bookkeeping at the speed of training: what a trial costs outside its epochs, solo and in
populations, with training made negligible, on this machine's disk and on a disk whose fsyncs
take SLOW_FSYNC_MS (15 ms: the lent GPU machines' disks).

    make bench-bookkeeping    (python tests/benchmarks/bench_bookkeeping.py [--sizes 1,16,64,256]
                               [--epochs 3] [--fsync-ms 15] [--max-trials 256] [--skip-profile]
                               [--against REV])

Before and after, side by side: with --against REV (default 1182783, main before the bookkeeping
work; `none` to skip) each size runs first with that commit's code (a git worktree put first on
PYTHONPATH), then with this checkout's, on the same data and machine.

Training made negligible: an MLP 784-16-16-10 on 800 synthetic training images (4 batches of
200), 200 validation and 200 test images: an epoch of 64 members takes a few milliseconds, so
what the sweep spends is what its stores, sampler, configs and report cost. No pruning, the
embedded SQLite stores (optuna.db, mlflow.db), one worker, `sweep.population` = the size (1: a
trial at a time). Each size runs
  - on the plain disk, counting each process's committed transactions by database (Optuna,
    MLflow) and kind (write: inserted, updated or deleted; read) with a probe loaded at
    interpreter start (bookkeeping_probe/sitecustomize.py);
  - with every fsync slowed to SLOW_FSYNC_MS by ../shared/tools/slow-fsync (LD_PRELOAD);
  - under strace, counting fsync/fdatasync calls by database file;
  - under py-spy (all processes, 100 Hz): CPU ms a trial by part.
Printed: trials/s (finished trials over the span from the first trial's start to the last one's
end) and the command's wall time; commits and fsyncs a trial; CPU ms a trial by part; for solo
trials, the seconds a trial spends outside its epochs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
from conftest import synthetic_images, write_idx  # noqa: E402

PROBE = HERE / "bookkeeping_probe"
BEFORE = "1182783"  # main before the bookkeeping work (issue 16)
SHIM_SOURCE = REPO.parent / "shared" / "tools" / "slow-fsync" / "slow_fsync.c"
NEGLIGIBLE = ["model.hidden=[16,16]", "data.val_size=200", "train.batch_size=200",
              "train.progress=false", "train.device=cpu", "sweep.pruner=none", "sweep.quiet=true",
              "sweep.register_model=false", "sweep.sampler=tpe"]
# Where a sampled stack's CPU goes: the first rule that matches, from the innermost frame out.
PARTS = [
    ("report", None),  # the report process, whatever it runs
    ("sampler", re.compile(r"optuna/samplers/")),
    # py-spy's frames read "function (file:line)"
    ("storage writes", re.compile(r"^_?(set|create|record|delete|update|enqueue|tell|report)\w* "
                                  r"\((optuna/storages/|mnist_sweep/study)")),
    ("storage reads", re.compile(r"optuna/storages/")),
    ("MLflow", re.compile(r"mlflow/")),
    ("Hydra compose", re.compile(r"(hydra|omegaconf)/")),
    ("training", re.compile(r"mnist_sweep/(train|population|stacked|member_schedules)\.py|torch/")),
    ("start-up (imports)", re.compile(r"<frozen importlib")),
]


def make_data(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", 1000), ("t10k", 200)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", synthetic_images(labels, rng))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return folder


def sweep_command(data: Path, size: int, trials: int, epochs: int) -> list[str]:
    return [sys.executable, "-m", "mnist_sweep.sweep", "--sweep", "momentum_decay",
            f"sweep.study_name=bk{size}", f"sweep.n_trials={trials}", f"sweep.population={size}",
            f"train.epochs={epochs}", f"data.root={data}", *NEGLIGIBLE]


def run(folder: Path, command: list[str], env: dict | None = None, prefix: list[str] = ()) -> float:
    folder.mkdir(parents=True)
    started = time.perf_counter()
    out = subprocess.run([*prefix, *command], cwd=folder, capture_output=True, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed in {folder}:\n{out.stderr[-3000:]}")
    return time.perf_counter() - started


def study_figures(folder: Path, name: str) -> dict:
    """Finished trials, their span, and (tracked) the epoch seconds of each trial."""
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    epochs = sum(m.value for t in done if "mlflow_run_id" in t.user_attrs
                 for m in client.get_metric_history(t.user_attrs["mlflow_run_id"], "epoch_seconds"))
    return {"trials": len(done), "span": span, "epoch_seconds": epochs}


def commits(folder: Path) -> dict[str, int]:
    total: collections.Counter = collections.Counter()
    for path in folder.glob("*.json"):
        total.update(json.loads(path.read_text().strip() or "{}"))
    return dict(total)


def fsyncs(trace: Path) -> dict[str, int]:
    """fsync/fdatasync calls in an strace log (-y: the file behind each descriptor), by store."""
    counts: collections.Counter = collections.Counter()
    for line in trace.read_text().splitlines():
        match = re.search(r"f(?:data)?sync\(\d+<([^>]*)>", line)
        if match:
            name = Path(match.group(1)).name
            # a store's file or journal; else the folder (synced as a journal is made or deleted)
            counts["optuna" if name.startswith("optuna") else "mlflow" if name.startswith("mlflow")
                   else "folder"] += 1
    return dict(counts)


def cpu_parts(raw: Path, rate: int) -> dict[str, float]:
    """CPU seconds by part from py-spy's raw (collapsed) stacks of all processes."""
    seconds: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        part = "other"
        if "mnist_sweep.search.report" in stack.split(";", 1)[0] or "report.py" in stack and "serve" in stack:
            part = "report"
        else:
            frames = stack.split(";")
            for name, pattern in PARTS[1:]:
                if any(pattern.search(frame) for frame in reversed(frames)):
                    part = name
                    break
        seconds[part] += int(count) / rate
    return dict(seconds)


def slow_fsync_library(work: Path) -> Path | None:
    if not SHIM_SOURCE.exists():
        return None
    library = work / "slow_fsync.so"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(library), str(SHIM_SOURCE), "-ldl"],
                   check=True)
    return library


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,16,64,256")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--fsync-ms", type=int, default=15)
    parser.add_argument("--max-trials", type=int, default=256)
    parser.add_argument("--skip-profile", action="store_true", help="no strace or py-spy runs")
    parser.add_argument("--against", default=BEFORE, help="the commit to compare with (none: skip)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-bookkeeping-"))
    data = make_data(work / "data")
    shim = slow_fsync_library(work)
    codes = [("now", None)]
    if args.against != "none":
        old = work / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.against],
                       check=True, capture_output=True)
        codes.insert(0, (f"before ({args.against})", old / "src"))
    rows = []
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            for code, source in codes:
                rows.append(measure(work, data, shim, size, code, source, args))
    finally:
        if args.against != "none":
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / "before")],
                           capture_output=True)
    report(rows, args)


def measure(work: Path, data: Path, shim: Path | None, size: int, code: str, source: Path | None,
            args) -> dict:
    """One size with one version of the code (source: its src/ folder, first on the path)."""
    trials = 16 if size == 1 else min(2 * size, args.max_trials)
    command = sweep_command(data, size, trials, args.epochs)
    if ((source or REPO / "src") / "mnist_sweep" / "search" / "confirm.py").exists():
        command.append("sweep.confirm.top=0")  # the search's bookkeeping alone, as before
    name = f"bk{size}"
    label = ("solo" if size == 1 else f"K={size}") + f" {code}"
    work = work / code.split()[0]
    work.mkdir(exist_ok=True)
    path = [str(PROBE), str(source) if source else None, os.environ.get("PYTHONPATH")]
    row = {"size": label, "trials": trials}
    for disk in ("plain", "slow"):
        if disk == "slow" and shim is None:
            continue
        folder = work / f"{label}-{disk}"
        counts = work / f"{label}-{disk}-commits"
        counts.mkdir()
        env = {"PYTHONPATH": os.pathsep.join(filter(None, path)),
               "MNIST_SWEEP_COMMIT_COUNTS": str(counts)}
        if disk == "slow":
            env.update(LD_PRELOAD=str(shim), SLOW_FSYNC_MS=str(args.fsync_ms))
        wall = run(folder, command, env)
        figures = study_figures(folder, name)
        row[disk] = {"wall": wall, **figures, "commits": commits(counts)}
        print(f"{label} {disk}: {figures['trials']} trials in {wall:.1f} s "
              f"({figures['trials'] / figures['span']:.2f} trials/s)", flush=True)
    if not args.skip_profile:
        trace = work / f"{label}-strace.log"
        code_path = {"PYTHONPATH": os.pathsep.join(filter(None, path[1:]))} if source else {}  # no probe
        run(work / f"{label}-strace", command, env=code_path,
            prefix=["strace", "-f", "-qq", "-y", "--seccomp-bpf", "-e", "trace=fsync,fdatasync",
                    "-o", str(trace)])
        row["fsyncs"] = fsyncs(trace)
        raw, rate = work / f"{label}-pyspy.txt", 100
        run(work / f"{label}-pyspy", command, env=code_path, prefix=[
            str(Path(sys.executable).parent / "py-spy"), "record", "--subprocesses",
            "--nonblocking", "--format", "raw", "--rate", str(rate), "-o", str(raw), "--"])
        row["cpu"] = cpu_parts(raw, rate)
    print(json.dumps(row), flush=True)
    return row


def report(rows: list[dict], args) -> None:
    print(f"\n| {'size':6} | trials | plain disk: trials/s (wall s) | fsync {args.fsync_ms} ms: "
          "trials/s (wall s) | commits a trial: Optuna w/r, MLflow w/r | fsyncs a trial: Optuna, MLflow, "
          "folder (all) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cells = []
        for disk in ("plain", "slow"):
            f = row.get(disk)
            cells.append(f"{f['trials'] / f['span']:.2f} ({f['wall']:.0f})" if f else "–")
        c, n = row["plain"]["commits"], row["plain"]["trials"]
        commit_cell = (f"{c.get('optuna write', 0) / n:.1f} / {c.get('optuna read', 0) / n:.1f}, "
                       f"{c.get('mlflow write', 0) / n:.1f} / {c.get('mlflow read', 0) / n:.1f}")
        f = row.get("fsyncs")
        fsync_cell = (f"{f.get('optuna', 0) / n:.1f}, {f.get('mlflow', 0) / n:.1f}, "
                      f"{f.get('folder', 0) / n:.1f} ({sum(f.values()) / n:.1f})") if f is not None else "–"
        print(f"| {row['size']} | {n} | {cells[0]} | {cells[1]} | {commit_cell} | {fsync_cell} |")
    parts = [name for name, _ in PARTS] + ["other"]
    if any("cpu" in row for row in rows):
        print("\nCPU ms a trial by part (py-spy, all processes, plain disk):\n")
        print("| size | " + " | ".join(parts) + " |")
        print("|---" * (len(parts) + 1) + "|")
        for row in rows:
            if "cpu" in row:
                n = row["plain"]["trials"]
                print(f"| {row['size']} | " + " | ".join(f"{row['cpu'].get(p, 0) * 1000 / n:.0f}"
                                                      for p in parts) + " |")
    for solo in (row for row in rows if row["size"].startswith("solo")):
        for disk in ("plain", "slow"):
            f = solo.get(disk)
            if f:
                outside = (f["span"] - f["epoch_seconds"]) / f["trials"]
                print(f"\n{solo['size']}, {disk} disk: {outside:.3f} s a trial outside its epochs "
                      f"(span {f['span']:.1f} s, epochs {f['epoch_seconds']:.1f} s, {f['trials']} trials)")


if __name__ == "__main__":
    main()
