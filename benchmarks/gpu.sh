#!/usr/bin/env bash
# ADM-64 (guided-diffusion/64x64_diffusion, 296M parameters) in bf16 on one CUDA GPU: training img/s,
# model FLOP utilisation against the card's dense bf16 peak, and sampling img/s. Under 5 minutes.
#
#   bash benchmarks/gpu.sh                      # eager
#   bash benchmarks/gpu.sh --compile            # torch.compile (adds ~1-2 minutes of compilation)
#   bash benchmarks/gpu.sh --peak-tflops 989    # a card missing from the table in gpu_bench.py
#
# Extra arguments go to benchmarks/gpu_bench.py (see --help); the JSON lands in docs/results/gpu.json.
# To test the script on a CPU: python benchmarks/gpu_bench.py --device cpu --preset mnist-tiny --steps 2
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
mkdir -p docs/results
timeout 290 "$PYTHON" benchmarks/gpu_bench.py \
  --preset guided-diffusion/64x64_diffusion --device cuda --dtype bf16 \
  --batch 32 --steps 20 --warmup 3 --sample-batch 64 --sample-steps 20 \
  --json docs/results/gpu.json "$@"
