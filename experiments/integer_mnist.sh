#!/usr/bin/env bash
# Accuracy of the integer path (train.arithmetic=int8, one weight exponent per output channel)
# against the fake-quant path at the default 32-element weight blocks, and at per-channel
# weights (to tell the layout's effect from the arithmetic's): the MNIST table's strong-skew
# setting (20 clients, 4 a round, 30 rounds, alpha 0.05), 8 bits, the moving average, 3 seeds.
#   DATA_ROOT=../shared/data bash experiments/integer_mnist.sh
# Finished runs are archived in experiments/results/mnist-integer/ and skipped on a rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NAME=${SWEEP_NAME:-mnist-integer}
SEEDS=${SEEDS:-0 1 2}
BASE="federation.num_clients=20 federation.num_rounds=30 federation.fraction_train=0.2"
for seed in $SEEDS; do
  common=(--axis "seed=$seed" --axis "partition.alpha=0.05" --axis "quantization=bfp8")
  run() {
    "$PY" -m experiments.sweep --name "$NAME" --root "${SWEEP_ROOT:-outputs/sweeps}" \
      --archive "experiments/results/$NAME" --num-supernodes 20 --base "$BASE" "${common[@]}" "$@"
  }
  run --axis "quantization.weight_layout=block,channel" --axis "train.arithmetic=fake"
  run --axis "quantization.weight_layout=channel" --axis "train.arithmetic=int8"
done
