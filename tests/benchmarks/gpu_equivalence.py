"""Each member of a mixed population (members joining and leaving, test_population's MEMBERS
and PASSES) against the same trial alone on this machine's device, in float32 with CUDA graphs
(on a GPU) and without: per member, the largest difference in batch losses, the first batch where
they part by more than 1e-5, and the largest weight difference. A diagnosis of float32 drift
(test_population.py checks the equivalence itself in float64); exit status 1 when a member parts
by more than 1e-2, a real difference rather than rounding.

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
from test_population import MEMBERS, MODELS, PASSES, alone, run_population  # noqa: E402


def main() -> int:
    from mnist_sweep.base.hydra_config import compose

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    device = os.environ.get("MNIST_SWEEP_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    data = make_synthetic_mnist(Path(tempfile.mkdtemp()) / "mnist")
    failed = False
    for model in MODELS:
        for graphs in ((True, False) if device.startswith("cuda") else (False,)):
            base = [f"data.root={data}", "tracking.enabled=false", *FAST, f"train.device={device}",
                    *MODELS[model], f"train.cuda_graphs={str(graphs).lower()}"]
            cfgs = {key: compose([*base, *overrides]) for key, overrides in MEMBERS.items()}
            epochs, weights, tests, order_at_join = run_population(cfgs, PASSES, no_shortcuts=graphs)
            for key, cfg in cfgs.items():
                solo = alone(cfg, order_at_join[key])
                diffs = [abs(a - b) for mine, theirs in zip(epochs[key], solo.epochs)
                         for a, b in zip(mine.batch_loss, theirs.batch_loss)]
                first = next((n for n, d in enumerate(diffs) if d > 1e-5), None)
                solo_weights = torch.nn.utils.parameters_to_vector(solo.model.parameters()).detach()
                weight = float((weights[key] - solo_weights).abs().max()) if key in tests else float("nan")
                bad = max(diffs) > 1e-2
                failed |= bad
                print(f"{model} graphs={graphs} member {key} ({' '.join(MEMBERS[key])}): max loss "
                      f"diff {max(diffs):.2e}, first batch past 1e-5: {first}, max weight diff "
                      f"{weight:.2e}{'  <-- parts' if bad else ''}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
