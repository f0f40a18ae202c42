"""Each member of a mixed population against the same trial alone on this machine's device, with
CUDA graphs (on a GPU) and without: per member, the largest difference in batch losses over two
epochs, the first batch where they part by more than 1e-5, and the largest weight difference.
Exit status 1 when a mode's members part (a diagnosis, where test_population.py only says no).

    MNIST_SWEEP_DEVICE=cuda python tests/benchmarks/gpu_equivalence.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from conftest import FAST, make_synthetic_mnist  # noqa: E402
from test_population import MIXED  # noqa: E402


def main() -> int:
    from mnist_sweep.cli import compose
    from mnist_sweep.population import Population
    from mnist_sweep.train import run_trial

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    device = os.environ.get("MNIST_SWEEP_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    data = make_synthetic_mnist(Path(tempfile.mkdtemp()) / "mnist")
    failed = False
    for model in ("mlp", "cnn"):
        for graphs in ((True, False) if device.startswith("cuda") else (False,)):
            base = [f"data.root={data}", "tracking.enabled=false", *FAST, f"train.device={device}",
                    f"model={model}", f"train.cuda_graphs={str(graphs).lower()}"]
            cfgs = [compose([*base, *overrides]) for overrides in MIXED]
            population = Population(cfgs[0])
            for i, cfg in enumerate(cfgs):
                population.join(i, cfg)
            epochs = [population.train_epoch() for _ in range(2)]
            used = population.graphs is not None
            for i, cfg in enumerate(cfgs):
                alone = run_trial(cfg)
                diffs = [abs(a - b) for e in range(2)
                         for a, b in zip(epochs[e][i].batch_loss, alone.epochs[e].batch_loss)]
                first = next((n for n, d in enumerate(diffs) if d > 1e-5), None)
                weights = torch.nn.utils.parameters_to_vector(alone.model.parameters())
                weight = float((population.model.flat[i].detach() - weights).abs().max())
                bad = first is not None and (model == "mlp" or max(diffs) > 2e-4)
                failed |= bad
                print(f"{model} graphs={used} member {i} ({' '.join(MIXED[i])}): max loss diff "
                      f"{max(diffs):.2e}, first batch past 1e-5: {first}, max weight diff "
                      f"{weight:.2e}{'  <-- parts' if bad else ''}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
