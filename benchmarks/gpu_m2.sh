#!/usr/bin/env bash
# The second milestone's networks in bf16 on one CUDA GPU, one benchmarks/gpu_bench.py row each (training img/s,
# MFU against the card's dense bf16 peak, sampling img/s): GLIDE's 64px text U-Net (glide/base, 385M), Karlo's
# 900M decoder (karlo/decoder) and its 1B prior (karlo/prior, on [N, 768] embeddings). About 2 minutes each.
#
#   bash benchmarks/gpu_m2.sh              # eager
#   bash benchmarks/gpu_m2.sh --compile    # torch.compile (adds compilation time per row)
#
# Extra arguments go to every gpu_bench.py call; the JSON lands in docs/results/gpu/gpu-<preset>-bf16.json.
# To test on a CPU: python benchmarks/gpu_bench.py --device cpu --preset karlo/prior --set xf_layers=1 ...
# (tests/test_bench_scripts.py runs each kind so).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
mkdir -p docs/results/gpu
for row in "glide/base 32" "karlo/decoder 16" "karlo/prior 256"; do
  preset="${row% *}"
  batch="${row#* }"
  timeout 170 "$PYTHON" benchmarks/gpu_bench.py --preset "$preset" --device cuda --dtype bf16 \
    --batch "$batch" --steps 10 --warmup 3 --sample-batch "$batch" --sample-steps 10 \
    --json "docs/results/gpu/gpu-${preset//\//-}-bf16.json" "$@" || echo "row $preset failed or timed out"
done
