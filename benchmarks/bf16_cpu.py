"""Does bf16 autocast on the CPU buy quality per minute? The same MNIST run in float32 and in bf16, side by side.

Trains ``configs/mnist-default.yaml`` twice for the same wall-clock budget, one CPU thread each, at the same
time (both see the same contention): once as it is, once with ``train.bf16=true`` (the network under bf16
autocast; weights, Adam, EMA and the loss in float32). Then reports, for each: optimiser steps done, the
training MSE averaged over the last 100 steps and over steps the two runs share, and the FD of 500 samples
(SDE-DPM-Solver++(2M), 20 network evaluations, the same noise) against MNIST-5k test, sampled in float32
and under bf16 autocast (``difflab sample --bf16``), with the seconds each sampling took.

    python benchmarks/bf16_cpu.py --minutes 8            # runs/bf16/{fp32,bf16}, then the table
Writes docs/results/bf16-cpu.json and bf16-cpu-table.md.
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
from difflab.samplers import SAMPLERS
from difflab.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path, minutes: float, bf16: bool) -> subprocess.Popen:
    """Start ``difflab train`` on one thread; its log goes to OUT.log."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "difflab", "train", str(ROOT / "configs" / "mnist-default.yaml"), "--out", str(out),
           "--max-minutes", str(minutes), "--quiet", "--set", f"train.bf16={'true' if bf16 else 'false'}",
           "--set", "train.log_every=1"]
    return subprocess.Popen(cmd, env=env, stdout=open(f"{out}.log", "w"), stderr=subprocess.STDOUT, cwd=ROOT)


def under_bf16(fn):
    """``fn`` with every network call under CPU bf16 autocast (what ``difflab sample --bf16`` does)."""

    def run(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(*args, **kwargs)

    return run


def mse_by_step(run: Path) -> dict[int, float]:
    return {r["step"]: r["mse"] for r in read_metrics(run / "metrics.jsonl")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/bf16", help="folder for the two runs")
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--skip-train", action="store_true", help="only evaluate existing runs")
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = p.parse_args(argv)
    runs = {"fp32": Path(args.runs) / "fp32", "bf16": Path(args.runs) / "bf16"}
    if not args.skip_train:
        Path(args.runs).mkdir(parents=True, exist_ok=True)
        procs = [train(run, args.minutes, name == "bf16") for name, run in runs.items()]
        if any(proc.wait() for proc in procs):
            raise SystemExit(f"a training run failed: see {args.runs}/*.log")
    torch.set_num_threads(1)
    sampler = "dpmpp-2m-sde"
    cells = {(name, sampling): sample_cell(str(run), sampler + ("-bf16" if sampling == "bf16" else ""), 20,
                                           n=args.n, batch=125,
                                           fn=under_bf16(SAMPLERS[sampler]) if sampling == "bf16" else None)
             for name, run in runs.items() for sampling in ("fp32", "bf16")}
    results = run_cells(list(cells.values()), Path(args.runs) / "cells")
    mse = {name: mse_by_step(run) for name, run in runs.items()}
    shared = sorted(set(mse["fp32"]) & set(mse["bf16"]))
    rows = {}
    for name in runs:
        steps = max(mse[name])
        rows[name] = {
            "steps": steps,
            "mse_last_100": float(np.mean([mse[name][s] for s in range(steps - 99, steps + 1) if s in mse[name]])),
            "mse_shared_steps": float(np.mean([mse[name][s] for s in shared])),
            **{f"fd_{sampling}_sampling": results[cells[name, sampling].key]["fd"] for sampling in ("fp32", "bf16")},
            **{f"seconds_{sampling}_sampling": results[cells[name, sampling].key]["seconds"]
               for sampling in ("fp32", "bf16")},
        }
    record = {
        "what": "configs/mnist-default.yaml trained for the same minutes in float32 and under CPU bf16 autocast",
        "command": " ".join(["python", "benchmarks/bf16_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 thread per run, both runs at once",
        "minutes": args.minutes, "n": args.n, "shared_steps": len(shared), "rows": rows,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
        "date": datetime.date.today().isoformat(),
    }
    write_results(Path(args.out), "bf16-cpu", record,
                  ["training precision", "steps in budget", "train MSE, last 100 steps",
                   f"train MSE, steps 1-{len(shared)}", f"FD (n={args.n}, {sampler} 20 NFE), fp32 sampling",
                   "bf16 sampling", "sampling seconds fp32 / bf16"],
                  [[name, str(r["steps"]), f"{r['mse_last_100']:.4f}", f"{r['mse_shared_steps']:.4f}",
                    f"{r['fd_fp32_sampling']:.3f}", f"{r['fd_bf16_sampling']:.3f}",
                    f"{r['seconds_fp32_sampling']:.1f} / {r['seconds_bf16_sampling']:.1f}"]
                   for name, r in rows.items()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
