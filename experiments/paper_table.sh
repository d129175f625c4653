#!/usr/bin/env bash
# One column of the paper's FedAvg table (method.md): every alpha x averaging x precision row,
# 3 seeds, 80 clients, 40% per round, 200 rounds, the paper's ConvNet, as Flower simulations.
#   bash experiments/paper_table.sh fmnist            # or cifar10, cifar100 (mnist works offline)
# Needs the dataset (downloaded by torchvision, or under DATA_ROOT) and, realistically, a GPU:
# GPU_SHARE=0.25 (the default) gives each simulated client a quarter of one GPU. Results go to
# outputs/sweeps/paper-<dataset>/ (summary.md, summary.csv, plots); rerunning skips finished runs.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=${1:?usage: paper_table.sh fmnist|cifar10|cifar100|mnist}
PY=${PYTHON:-.venv/bin/python}
FEDERATION="client-resources-num-cpus=${CLIENT_CPUS:-2} client-resources-num-gpus=${GPU_SHARE:-0.25}"
sweep() {
  "$PY" -m experiments.sweep --name "paper-$DATASET" --num-supernodes 80 \
    --federation-config "$FEDERATION" --base "preset=paper_$DATASET" "$@"
}
sweep --axis "partition.alpha=0.01,0.04,0.16" --axis "server.moving_average=0.9,0" \
  --axis "quantization=bfp8,bfp6,fp32" --axis "seed=${SEEDS:-0,1,2}" ${DRY_RUN:+--dry-run}
