#!/usr/bin/env bash
# The GPU checks of population mode in one call on a lent GPU machine (its torch and Python; our
# pinned optuna / mlflow-skinny / hydra-core wheels carried in .whl/, real MNIST in .gpu/mnist):
#   1. the equivalence tests on the GPU (schedules, SGD, a member against the same trial alone),
#   2. make bench-population: one at a time vs populations of 4, 16, 64, the largest that fits,
#      and the default sweep with population=auto.
# Output: $OUT/log. Usage (repo root): bash tests/benchmarks/device_check.sh [largest sizes]
set -uo pipefail
REPO=$PWD
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT" /tmp/device-run
exec > >(tee "$OUT/log") 2>&1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$REPO/src:/tmp/site PYTHONUNBUFFERED=1 MNIST_SWEEP_DATA=$REPO/.gpu/mnist
python3 -c "import torch, optuna, mlflow, hydra; print('torch', torch.__version__, torch.cuda.get_device_name(), '| optuna', optuna.__version__, '| mlflow', mlflow.__version__)"
echo "== 1. equivalence on the GPU"
MNIST_SWEEP_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider \
    tests/test_population.py -k "alone or torchs or sgd or plateaus or own_seed" | tail -3
PYTHONPATH=$PYTHONPATH:$REPO/tests timeout 120 python3 tests/benchmarks/gpu_equivalence.py
GRAPHS=()  # members that part from their solo runs with CUDA graphs: bench without them
if grep -q "graphs=True.*<-- parts" "$OUT/log"; then GRAPHS=(--override train.cuda_graphs=false); fi
echo "== 2. bench-population ${GRAPHS[*]}"
cd /tmp/device-run
timeout 300 python3 "$REPO/tests/benchmarks/bench_population.py" --device cuda --epochs 3 \
    --sizes 4,16,64 --solo-trials 8 --largest "${1:-256}" --default-sweep --background-report \
    --compare-graphs "${GRAPHS[@]}"
echo "== done"
