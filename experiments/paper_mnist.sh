#!/usr/bin/env bash
# The MNIST sweep behind the README's results table (issue #4): 20 clients, 4 per round,
# 30 rounds, full local epochs, small CNN. Seeds run outermost, so an interrupted sweep has
# every setting at the seeds it reached; rerunning skips finished runs.
#   DATA_ROOT=../shared/data bash experiments/paper_mnist.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NAME=${SWEEP_NAME:-mnist-paper}
BASE="federation.num_clients=20 federation.num_rounds=30 federation.fraction_train=0.2"
sweep() { "$PY" -m experiments.sweep --name "$NAME" --num-supernodes 20 --base "$BASE" "$@"; }
for seed in ${SEEDS:-0 1 2}; do
  # no moving average, every precision, strong and mild skew
  sweep --axis "seed=$seed" --axis "partition.alpha=0.05,0.1" --axis "strategy=fedavg" \
    --axis "quantization=fp32,bfp8,bfp6,bfp4" --axis "server.moving_average=0"
  # the moving average with warm-up (the project default)
  sweep --axis "seed=$seed" --axis "partition.alpha=0.05" --axis "strategy=fedavg" \
    --axis "quantization=fp32,bfp8,bfp6,bfp4" --axis "server.moving_average=0.9" \
    --axis "server.moving_average_warmup=true"
  # the paper's moving average: lambda 0.9 from round 1, no warm-up
  sweep --axis "seed=$seed" --axis "partition.alpha=0.05" --axis "strategy=fedavg" \
    --axis "quantization=fp32,bfp8" --axis "server.moving_average=0.9" \
    --axis "server.moving_average_warmup=false"
  # FedProx (mu 0.01) with the default moving average
  sweep --axis "seed=$seed" --axis "partition.alpha=0.05" --axis "strategy=fedprox" \
    --axis "quantization=fp32,bfp8" --axis "server.moving_average=0.9" \
    --axis "server.moving_average_warmup=true"
done
