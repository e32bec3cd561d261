#!/usr/bin/env bash
# The embedded default, end to end: train configs/mnist-default.yaml for MINUTES (default 10) on the
# CPU, draw a 64-image grid from the EMA, and score bits/dim on the MNIST-5k test split.
#   bash benchmarks/mnist_default.sh [RUN_DIR] [MINUTES]
# Needs `pip install -e .[data]`. Writes RUN_DIR (default runs/mnist): checkpoints, metrics.jsonl,
# grid.png, samples.npz and nll.json. Results of one run: docs/results/mnist-default.md.
set -euo pipefail
RUN=${1:-runs/mnist}
MINUTES=${2:-10}
difflab train configs/mnist-default.yaml --out "$RUN" --max-minutes "$MINUTES"
difflab sample "$RUN" --n 64 --grid "$RUN/grid.png" --npz "$RUN/samples.npz"
# 100 test digits, the bound of the 100-step respaced process (all 1000 steps: drop --steps; ~10x slower)
difflab nll "$RUN" --n 100 --steps 100 | tee "$RUN/nll.json"
difflab info "$RUN"
echo "grid: $RUN/grid.png"
