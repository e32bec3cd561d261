#!/usr/bin/env bash
# The embedded default, end to end in about MINUTES (default 10) on the CPU: train
# configs/mnist-default.yaml, draw a 64-image grid from the EMA, and score bits/dim on the MNIST-5k test split.
# Training gets MINUTES less SAMPLE_MINUTES (default 1.5: what sampling 64 images and scoring 100 digits
# took on a free 2-core machine, docs/results/mnist-default.md); a slower or busier machine takes longer
# for those two steps and so for the whole job.
#   bash benchmarks/mnist_default.sh [RUN_DIR] [MINUTES]
# Needs `pip install -e .[data]`. Writes RUN_DIR (default runs/mnist): checkpoints, metrics.jsonl,
# grid.png, samples.npz and nll.json. Results of one run: docs/results/mnist-default.md.
set -euo pipefail
RUN=${1:-runs/mnist}
MINUTES=${2:-10}
SAMPLE_MINUTES=${SAMPLE_MINUTES:-1.5}
TRAIN_MINUTES=$(python -c "print(max(float('$MINUTES') - float('$SAMPLE_MINUTES'), 0.1 * float('$MINUTES')))")
difflab train configs/mnist-default.yaml --out "$RUN" --max-minutes "$TRAIN_MINUTES"
difflab sample "$RUN" --n 64 --grid "$RUN/grid.png" --npz "$RUN/samples.npz"
# 100 test digits, the bound of the 100-step respaced process (all 1000 steps: drop --steps; ~10x slower)
difflab nll "$RUN" --n 100 --steps 100 | tee "$RUN/nll.json"
difflab info "$RUN"
echo "grid: $RUN/grid.png"
