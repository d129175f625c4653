#!/usr/bin/env bash
# The MNIST sweep behind the README's results table: 20 clients, 4 per round, 30 rounds, one
# full local epoch, small CNN, balanced Dirichlet label skew (alpha 0.05: strong, 0.1: milder).
#   DATA_ROOT=../shared/data bash experiments/paper_mnist.sh
# Every low-precision setting runs with float32 Adam moments (the paper's choice) and with the
# 8-bit low-bit optimizer state (quantization.state_format=lowbit), with and without the
# server's moving average. Seeds run outermost, so an interrupted sweep has every setting at
# each seed it reached; rerunning skips finished runs, including those archived (committed) in
# experiments/results/$NAME/, where the summary goes. PARTS="fp32state lowbit" picks parts.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NAME=${SWEEP_NAME:-mnist-table}
SEEDS=${SEEDS:-0 1 2}
PARTS=${PARTS:-fp32state lowbit}
ROOT=${SWEEP_ROOT:-outputs/sweeps}
BASE="federation.num_clients=20 federation.num_rounds=30 federation.fraction_train=0.2"
sweep() {
  "$PY" -m experiments.sweep --name "$NAME" --root "$ROOT" --archive "experiments/results/$NAME" \
    --num-supernodes 20 --base "$BASE" "$@"
}
for seed in $SEEDS; do
  for alpha in 0.05 0.1; do
    common=(--axis "seed=$seed" --axis "partition.alpha=$alpha" --axis "strategy=fedavg")
    if [[ " $PARTS " == *" fp32state "* ]]; then
      # float32 training, and low precision with float32 optimizer state
      sweep "${common[@]}" --axis "quantization=fp32" \
        --axis "server.moving_average=0,0.9" --axis "server.moving_average_warmup=true"
      sweep "${common[@]}" --axis "quantization=bfp8,bfp6,bfp4" \
        --axis "quantization.state_format=lowbit" --axis "quantization.state_bits=32" \
        --axis "server.moving_average=0,0.9" --axis "server.moving_average_warmup=true"
    fi
    if [[ " $PARTS " == *" lowbit "* ]]; then
      # low precision with the 8-bit low-bit optimizer state
      sweep "${common[@]}" --axis "quantization=bfp8,bfp6,bfp4" \
        --axis "quantization.state_format=lowbit" --axis "quantization.state_bits=8" \
        --axis "server.moving_average=0,0.9" --axis "server.moving_average_warmup=true"
    fi
  done
  # strong skew: the paper's moving average (lambda 0.9 from round 1, no warm-up), and FedProx
  common=(--axis "seed=$seed" --axis "partition.alpha=0.05")
  if [[ " $PARTS " == *" fp32state "* ]]; then
    sweep "${common[@]}" --axis "strategy=fedavg" --axis "quantization=fp32" \
      --axis "server.moving_average=0.9" --axis "server.moving_average_warmup=false"
    sweep "${common[@]}" --axis "strategy=fedprox" --axis "quantization=fp32" \
      --axis "server.moving_average=0.9" --axis "server.moving_average_warmup=true"
  fi
  if [[ " $PARTS " == *" lowbit "* ]]; then
    sweep "${common[@]}" --axis "strategy=fedavg" --axis "quantization=bfp8" \
      --axis "quantization.state_format=lowbit" --axis "quantization.state_bits=8" \
      --axis "server.moving_average=0.9" --axis "server.moving_average_warmup=false"
    sweep "${common[@]}" --axis "strategy=fedprox" --axis "quantization=bfp8" \
      --axis "quantization.state_format=lowbit" --axis "quantization.state_bits=8" \
      --axis "server.moving_average=0.9" --axis "server.moving_average_warmup=true"
  fi
done
