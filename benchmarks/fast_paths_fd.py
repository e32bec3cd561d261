"""Do the CPU fast paths change what training learns? The MNIST default trained with and without them.

Trains ``configs/mnist-default.yaml`` for the same number of steps six times, one thread each, at once:
``fast`` (the library as it is), ``plain`` (every fast path of benchmarks/fast_paths.py reverted to the
official formulation: float32 softmax / GroupNorm round trips, ``v @ weight^T``, the scaling of the scores,
two attention matmuls at every length, oneDNN 1x1 convolutions, and AdamW's per-tensor loop for the trainer's
fused AdamW) and ``sdpa`` (the library with SDPA's fused kernel at every attention length: the MNIST default's
only attention is at 7x7, below ``layers.CPU_SDPA_MIN_LENGTH``, so this checks that path's training too),
each with train.seed 0 and 1; fast against fast (and plain against plain) across the seeds is the noise of
training itself. The runs of one seed start from the same weights and batches; their float rounding differs,
so their trajectories part, and the question is whether they part further than two seeds do. Runs already in
the folder are kept and not trained again.
Reports the training MSE (mean over all steps, and over the last 100) and the FD of 500 samples each
(SDE-DPM-Solver++(2M), 20 network evaluations, the same noise) against MNIST-5k test, and once more for
``fast`` with other sampling noise (the noise of the FD estimate itself).

    python benchmarks/fast_paths_fd.py --steps 800      # runs/fast-paths/{fast,plain,sdpa}{,-seed1}, then the table
Writes docs/results/fast-paths-fd.json and fast-paths-fd-table.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from cells import run_cells, sample_cell, write_results
from difflab.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"fast": ("all fast paths", 0), "plain": ("all plain", 0), "fast-seed1": ("all fast paths", 1),
        "plain-seed1": ("all plain", 1), "sdpa": ("sdpa everywhere", 0), "sdpa-seed1": ("sdpa everywhere", 1)}


def train(out: Path, steps: int, variant: str, seed: int) -> subprocess.Popen:
    """``difflab train`` on one thread in a child that first installs ``variant`` (fast_paths.VARIANTS)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    args = [str(ROOT / "configs" / "mnist-default.yaml"), "--out", str(out), "--max-steps", str(steps), "--quiet",
            "--set", f"train.seed={seed}", "--set", "train.log_every=1", "--set", f"train.save_every={steps}"]
    code = ("import sys, fast_paths; fast_paths.use(fast_paths.VARIANTS[sys.argv[1]]); "
            "fast_paths.use_optimizer(sys.argv[1]); "
            "from difflab.cli import main; raise SystemExit(main(['train', *sys.argv[2:]]))")
    return subprocess.Popen([sys.executable, "-c", code, variant, *args], env=env, cwd=Path(__file__).parent,
                            stdout=open(f"{out}.log", "w"), stderr=subprocess.STDOUT)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/fast-paths", help="folder for the six runs")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--skip-train", action="store_true", help="only evaluate existing runs")
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = p.parse_args(argv)
    runs = {name: Path(args.runs).resolve() / name for name in RUNS}
    if not args.skip_train:
        Path(args.runs).mkdir(parents=True, exist_ok=True)
        procs = [train(runs[name], args.steps, variant, seed) for name, (variant, seed) in RUNS.items()
                 if not runs[name].exists()]
        if any(proc.wait() for proc in procs):
            raise SystemExit(f"a training run failed: see {args.runs}/*.log")
    torch.set_num_threads(1)
    cells = {name: sample_cell(str(run), "dpmpp-2m-sde", 20, n=args.n, batch=125) for name, run in runs.items()}
    resampled = sample_cell(str(runs["fast"]), "dpmpp-2m-sde", 20, n=args.n, batch=125, seed=1)
    results = run_cells([*cells.values(), resampled], Path(args.runs) / "cells")
    rows = {}
    for name, run in runs.items():
        mse = {r["step"]: r["mse"] for r in read_metrics(run / "metrics.jsonl")}
        last = max(mse)
        rows[name] = {"variant": RUNS[name][0], "seed": RUNS[name][1], "steps": last,
                      "mse_all_steps": float(np.mean(list(mse.values()))),
                      "mse_last_100": float(np.mean([mse[s] for s in range(last - 99, last + 1) if s in mse])),
                      "fd": results[cells[name].key]["fd"]}
    fd = {name: r["fd"] for name, r in rows.items()}
    record = {
        "what": "configs/mnist-default.yaml for a fixed number of steps with the CPU fast paths, without them, "
                "and with them under another training seed",
        "command": " ".join(["python", "benchmarks/fast_paths_fd.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 thread per run, the runs at once",
        "steps": args.steps, "n": args.n, "rows": rows,
        "fd_fast_minus_plain": [fd["fast"] - fd["plain"], fd["fast-seed1"] - fd["plain-seed1"]],
        "fd_sdpa_minus_plain": [fd["sdpa"] - fd["plain"], fd["sdpa-seed1"] - fd["plain-seed1"]],
        "fd_seed0_minus_seed1": [fd["fast"] - fd["fast-seed1"], fd["plain"] - fd["plain-seed1"]],
        "fd_fast_sampling_seed1": results[resampled.key]["fd"],
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
        "date": datetime.date.today().isoformat(),
    }
    footer = ("FD fast - plain, seed 0 and 1: " + ", ".join(f"{d:+.3f}" for d in record["fd_fast_minus_plain"])
              + "; sdpa - plain: " + ", ".join(f"{d:+.3f}" for d in record["fd_sdpa_minus_plain"])
              + "; seed 0 - seed 1, fast and plain (the noise of training): "
              + ", ".join(f"{d:+.3f}" for d in record["fd_seed0_minus_seed1"]) + "; fast with sampling seed 1: FD "
              f"{record['fd_fast_sampling_seed1']:.3f}, {fd['fast'] - record['fd_fast_sampling_seed1']:+.3f} "
              "(the noise of the FD estimate).")
    write_results(Path(args.out), "fast-paths-fd", record,
                  ["run", "paths", "train.seed", "steps", "train MSE, all steps", "train MSE, last 100 steps",
                   f"FD (n={args.n}, dpmpp-2m-sde 20 NFE)"],
                  [[name, r["variant"], str(r["seed"]), str(r["steps"]), f"{r['mse_all_steps']:.4f}",
                    f"{r['mse_last_100']:.4f}", f"{r['fd']:.3f}"] for name, r in rows.items()], footer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
