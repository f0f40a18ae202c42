"""Benchmark of one trial on real MNIST, all figures measured side by side in one run.

    make bench            (or: python tests/benchmarks/bench_trial.py [--epochs N] [--data DIR])

(a) a pytorch/examples-style epoch: torchvision MNIST + DataLoader + ToTensor/Normalize, batch 200
(b) our epoch: device-resident tensors, seeded randperm batches
(c) the floor: the same forward/backward GEMMs on random tensors, nothing else
(d) a whole trial with MLflow tracking on (SQLite) vs off
Prints seconds, a/b, b/c, the tracking overhead in % and the peak RSS. Targets on a 2-core CPU:
a/b >= 10, b/c <= 1.5, overhead <= 3 %, peak RSS <= 1.5 GB.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mnist_sweep.trial import data
from mnist_sweep.base.hydra_config import compose
from mnist_sweep.trial.models import MLP
from mnist_sweep.train import train_and_track
from mnist_sweep.trial.loop import run_trial

REPO = Path(__file__).resolve().parents[2]
BATCH = 200


def examples_style_epoch(root: Path) -> float:
    """pytorch/examples mnist/main.py's loop, with the seed MLP and the seed optimizer."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    dataset = datasets.MNIST(str(root), train=True, download=True, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True)
    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.78)
    model.train()
    started = time.perf_counter()
    for batch_idx, (x, y) in enumerate(loader):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if batch_idx % 10 == 0:
            loss.item()  # the example logs every 10 batches
    return time.perf_counter() - started


def gemm_floor_epoch(n_images: int) -> float:
    """The GEMMs autograd runs for the seed MLP, with nn.Linear's layouts, on random tensors:
    forward addmm(b, x, W.T) per layer; backward dW = dy.T @ x per layer and dx = dy @ W for the
    two upper layers (the input needs no gradient). Nothing else: no activations, loss, optimizer,
    batching or bookkeeping."""
    g = torch.Generator().manual_seed(0)
    sizes = [(784, 200), (200, 200), (200, 10)]
    weights = [torch.randn(n_out, n_in, generator=g) for n_in, n_out in sizes]
    biases = [torch.randn(n_out, generator=g) for _, n_out in sizes]
    x = torch.randn(BATCH, 784, generator=g)
    d_out = torch.randn(BATCH, 10, generator=g)
    started = time.perf_counter()
    for _ in range(-(-n_images // BATCH)):
        h1 = torch.addmm(biases[0], x, weights[0].t())
        h2 = torch.addmm(biases[1], h1, weights[1].t())
        torch.addmm(biases[2], h2, weights[2].t())
        d_w3 = d_out.t().mm(h2)
        d_h2 = d_out.mm(weights[2])
        d_w2 = d_h2.t().mm(h1)
        d_h1 = d_h2.mm(weights[1])
        d_w1 = d_h1.t().mm(x)
    return time.perf_counter() - started


def time_tracking_calls() -> list[float]:
    """Wrap every MLflow-touching step of a tracked trial with a timer; returns the list the
    durations go to (the wall-time difference on vs off is noisy on a shared 2-core machine)."""
    import functools

    from mnist_sweep.tracking import runs as tracking

    spent: list[float] = []

    def timed(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            started = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent.append(time.perf_counter() - started)
        return wrapper

    for owner, name in ((tracking.MlflowTracker, "__init__"), (tracking.MlflowTracker, "start_run"),
                        (tracking.TrialRun, "log_epoch"), (tracking.TrialRun, "log_result"),
                        (tracking.TrialRun, "flush")):
        setattr(owner, name, timed(getattr(owner, name)))
    import mlflow.tracking

    for name in ("log_text", "set_terminated"):
        setattr(mlflow.tracking.MlflowClient, name, timed(getattr(mlflow.tracking.MlflowClient, name)))
    return spent


def torchvision_root(mnist_dir: Path, scratch: Path) -> Path:
    """A torchvision-layout copy (root/MNIST/raw/*.gz), which MNIST(download=True) verifies by MD5
    and extracts without network."""
    raw = scratch / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for f in mnist_dir.glob("*.gz"):
        shutil.copy(f, raw / f.name)
    return scratch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("MNIST_SWEEP_DATA", REPO.parent / "shared/data/mnist"))
    parser.add_argument("--epochs", type=int, default=10, help="epochs per measured trial in (d)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of (a), (b), (c) and (d)")
    args = parser.parse_args()
    mnist_dir = Path(args.data)
    if data.locate(mnist_dir, "mnist") is None:
        raise SystemExit(f"no MNIST files under {mnist_dir}; pass --data DIR")
    scratch = Path(tempfile.mkdtemp(prefix="mnist-bench-"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, data {mnist_dir}")

    # (b) and (c) alternate, one epoch each, so that machine drift hits both alike.
    ours_cfg = compose([f"data.root={mnist_dir}", "data.val_size=0", "tracking.enabled=false",
                        "train.epochs=1", "train.progress=false", "train.device=cpu"])
    run_trial(ours_cfg)  # warm-up; also decodes the data once for every trial of this process
    ours_epochs, floor = [], []
    for _ in range(args.repeats + 2):
        ours_epochs.append(run_trial(ours_cfg).epochs[0].seconds)
        floor.append(gemm_floor_epoch(60000))
    root = torchvision_root(mnist_dir, scratch)
    examples_style_epoch(root)  # warm-up: first PIL/loader use
    examples = [examples_style_epoch(root) for _ in range(args.repeats)]
    a, b, c = statistics.median(examples), statistics.median(ours_epochs), statistics.median(floor)

    store = f"sqlite:///{scratch / 'mlflow.db'}"
    trial = [f"data.root={mnist_dir}", f"train.epochs={args.epochs}", "train.progress=false",
             "train.device=cpu", f"tracking.tracking_uri={store}"]
    started = time.perf_counter()
    train_and_track(compose([*trial, "train.epochs=1"]))  # creates the store (one-time schema setup)
    store_setup = time.perf_counter() - started
    in_tracking = time_tracking_calls()
    variants = {"on": ["tracking.enabled=true"], "on, every 2nd batch point":
                ["tracking.enabled=true", "tracking.batch_curve_every=2"], "off": ["tracking.enabled=false"]}
    wall = {name: [] for name in variants}
    inside = {name: [] for name in variants}
    for _ in range(args.repeats):  # alternate, so that drift hits every variant alike
        for name, overrides in variants.items():
            in_tracking.clear()
            started = time.perf_counter()
            train_and_track(compose([*trial, *overrides]))
            wall[name].append(time.perf_counter() - started)
            inside[name].append(sum(in_tracking))
    t_off = statistics.median(wall["off"])
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2

    print("\n| figure | seconds | target |\n|---|---|---|")
    print(f"| (a) pytorch/examples-style epoch (DataLoader + transforms) | {a:.3f} | |")
    print(f"| (b) our epoch (device-resident tensors) | {b:.3f} | |")
    print(f"| (c) GEMM floor (same forward/backward matmuls, random data) | {c:.3f} | |")
    for name in variants:
        print(f"| (d) trial of {args.epochs} epochs, tracking {name} | "
              f"{statistics.median(wall[name]):.3f} | |")
    for name in list(variants)[:2]:
        print(f"| (d) time inside MLflow calls, tracking {name} | "
              f"{statistics.median(inside[name]):.3f} | |")
    print(f"| one-time store creation + 1-epoch trial | {store_setup:.3f} | |")
    print("\n| ratio | value | target |\n|---|---|---|")
    print(f"| a/b | {a / b:.1f}x | >= 10 |")
    print(f"| b/c | {b / c:.2f} | <= 1.5 |")
    for name in list(variants)[:2]:
        t_on = statistics.median(wall[name])
        print(f"| tracking {name}: overhead, wall time vs off | {100 * (t_on - t_off) / t_off:.1f} % | <= 3 % |")
        print(f"| tracking {name}: overhead, time inside MLflow calls / trial off | "
              f"{100 * statistics.median(inside[name]) / t_off:.1f} % | <= 3 % |")
    print(f"| peak RSS | {rss_gb:.2f} GB | <= 1.5 GB |")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
