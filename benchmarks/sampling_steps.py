"""Improved DDPM's sampling-steps study in miniature (Nichol & Dhariwal 2021, Sec. 4 and Fig. 8).

FD (difflab's MNIST-classifier features, vs the MNIST-5k test split) against the number of sampling
steps K, for a model trained with L_hybrid and learned variance (respaced ancestral sampling, Sec. 4),
a model trained with L_simple sampled with either fixed variance (sigma^2 = beta~ "fixed small",
sigma^2 = beta "fixed large"), and DDIM (eta = 0) on the L_simple model. Every row starts from the same
noise (cells.py). The paper's claim: with learned variances, 50-100 steps get close to the full-T FD,
while fixed variances degrade quickly below ~100 steps; DDIM is better than both below ~50 steps.

    bash benchmarks/iddpm_ablation_train.sh runs/ablation      # trains the two models (and four more)
    OMP_NUM_THREADS=1 python benchmarks/sampling_steps.py &   # two processes, one core each,
    OMP_NUM_THREADS=1 python benchmarks/sampling_steps.py; wait  # share the cells (benchmarks/cells.py)
    python benchmarks/sampling_steps.py                        # the table and the plot

Writes docs/results/sampling-steps.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import torch

from cells import add_cell_arguments, run_cells, sample_cell, write_results

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"
ROWS = {  # name -> (which model, sampler, variance override, label)
    "learned": ("learned", "ancestral", None, "L_hybrid, learned sigma (ancestral)"),
    "fixed_small": ("fixed", "ancestral", "fixed_small", "L_simple, sigma^2 = beta~ (ancestral)"),
    "fixed_large": ("fixed", "ancestral", "fixed_large", "L_simple, sigma^2 = beta (ancestral)"),
    "ddim": ("fixed", "ddim", None, "L_simple, DDIM eta = 0"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--learned", default="runs/ablation/cosine-hybrid", help="run trained with L_hybrid")
    p.add_argument("--fixed", default="runs/ablation/cosine-simple", help="run trained with L_simple")
    p.add_argument("--ks", default="10,25,50,100,250,1000", help="sampling steps, comma-separated")
    p.add_argument("--n", type=int, default=250)
    p.add_argument("--batch", type=int, default=125)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT))
    add_cell_arguments(p)
    args = p.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    runs = {"learned": args.learned, "fixed": args.fixed}
    grid = [(row, k) for row in ROWS for k in ks]
    cells = []
    for row, k in grid:
        model, sampler, var, _ = ROWS[row]
        extra = {"eta": 0.0} if sampler == "ddim" else {}
        cells.append(sample_cell(runs[model], sampler, k, n=args.n, batch=args.batch, seed=args.seed,
                                 var_type=var, **extra))
    results = run_cells(cells, Path(args.cache or ROOT / "runs" / "cells"))
    if results is None or not args.out:
        return 0

    table = {row: {k: results[c.key] for (r, k), c in zip(grid, cells, strict=True) if r == row} for row in ROWS}
    command = " ".join(["python", "benchmarks/sampling_steps.py", *(argv if argv is not None else sys.argv[1:])])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "what": "FD vs sampling steps K (MNIST-classifier features, vs MNIST-5k test), same x_T in every cell",
        "runs": runs, "n": args.n, "ks": ks, "rows": {ROWS[r][3]: {str(k): v for k, v in t.items()}
                                                     for r, t in table.items()},
        "command": command, "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 thread per process",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
    }
    write_results(out, "sampling-steps", record, ["row", *(f"K={k}" for k in ks)],
                  [[ROWS[row][3], *(f"{t[k]['fd']:.3f}" for k in ks)] for row, t in table.items()])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row, t in table.items():
        ax.plot(ks, [t[k]["fd"] for k in ks], marker="o", label=ROWS[row][3])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps K")
    ax.set_ylabel(f"FD (MNIST classifier, n={args.n})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "sampling-steps.png", dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
