#!/usr/bin/env bash
# Improved DDPM's ablation in miniature (Nichol & Dhariwal 2021, Tables 1-2): {linear, cosine} x
# {L_simple, L_hybrid, L_vlb + importance sampling} on MNIST-5k, each trained MINUTES (default 8) on ONE
# CPU thread, two runs at a time on a 2-core machine (both lanes see the same contention).
# The base is configs/mnist-default.yaml (v-prediction; see docs/results/iddpm-ablation.md for why not eps).
#   bash benchmarks/iddpm_ablation_train.sh [OUT_DIR] [MINUTES]
# Then: python benchmarks/iddpm_ablation.py --runs OUT_DIR
set -euo pipefail
OUT=${1:-runs/ablation}
MINUTES=${2:-8}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT"
train() {  # NAME SCHEDULE LOSS
  local name=$1 schedule=$2 loss=$3
  local var=learned_range sampler=uniform sigma=true
  case $loss in
    simple) loss=mse; var=fixed_large; sigma=false ;;  # the official default for L_simple: sigma^2 = beta
    hybrid) ;;
    vlb) loss=kl; sampler=loss_second_moment ;;
  esac
  difflab train configs/mnist-default.yaml --out "$OUT/$name" --max-minutes "$MINUTES" --quiet \
    --set diffusion.schedule="$schedule" --set diffusion.loss_type="$loss" --set diffusion.var_type="$var" \
    --set diffusion.timestep_sampler="$sampler" --set model.learn_sigma="$sigma" > "$OUT/$name.log" 2>&1
}
for loss in simple hybrid vlb; do
  train "linear-$loss" linear "$loss" &
  train "cosine-$loss" cosine "$loss" &
  wait
done
