"""Improved DDPM's ablation in miniature (Nichol & Dhariwal 2021, Tables 1-2): test bits/dim and FD of
{linear, cosine} x {L_simple, L_hybrid, L_vlb + importance sampling}, trained by
benchmarks/iddpm_ablation_train.sh for the same CPU budget each.

bits/dim: the full-T VLB (prior + 999 KL terms + decoder) of the first ``--bpd-n`` MNIST-5k test digits,
the same digits and the same noise for every model (paired: differences are less noisy than each
value's standard error says). FD: ``--n`` samples by respaced ancestral sampling over ``--steps``
steps from the same x_T for every model, against the test split (difflab MNIST-classifier features).

    OMP_NUM_THREADS=1 python benchmarks/iddpm_ablation.py &   # two processes, one core each,
    OMP_NUM_THREADS=1 python benchmarks/iddpm_ablation.py; wait  # share the cells (benchmarks/cells.py)
    python benchmarks/iddpm_ablation.py                                    # the table

Writes docs/results/iddpm-ablation.json and iddpm-ablation-table.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import torch

from cells import Cell, add_cell_arguments, load, run_cells, sample_cell, write_results
from difflab.runinfo import run_info

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"
MODELS = [f"{s}-{loss}" for s in ("linear", "cosine") for loss in ("simple", "hybrid", "vlb")]
LOSS_NAMES = {"simple": "L_simple", "hybrid": "L_hybrid", "vlb": "L_vlb (importance sampling)"}


def bpd_cell(run: str, n: int, batch: int, seed: int) -> Cell:
    """Full-T bits/dim of the first n test digits."""
    from difflab.bpd import evaluate_bpd

    def compute() -> dict:
        cfg, den = load(run)
        r = evaluate_bpd(den, cfg, split="test", n=n, batch=batch, seed=seed, distributed=False)
        return {k: r[k] for k in ("bpd", "bpd_stderr", "prior_bpd", "vb_bpd", "decoder_bpd", "n", "steps")}

    return Cell(f"{Path(run).name}-bpd-n{n}-s{seed}", float(n * 1000), compute)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/ablation", help="folder with the six run folders")
    p.add_argument("--n", type=int, default=250, help="samples for FD")
    p.add_argument("--steps", type=int, default=250, help="ancestral sampling steps for FD")
    p.add_argument("--batch", type=int, default=125)
    p.add_argument("--bpd-n", type=int, default=50, help="test digits for bits/dim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT))
    add_cell_arguments(p)
    args = p.parse_args(argv)
    runs = {m: str(Path(args.runs) / m) for m in MODELS}
    cells = {}
    for m, run in runs.items():
        cells[m, "fd"] = sample_cell(run, "ancestral", args.steps, n=args.n, batch=args.batch, seed=args.seed)
        cells[m, "bpd"] = bpd_cell(run, args.bpd_n, min(args.bpd_n, 100), args.seed)
    results = run_cells(list(cells.values()), Path(args.cache or ROOT / "runs" / "cells"))
    if results is None or not args.out:
        return 0

    rows = []
    for m, run in runs.items():
        schedule, loss = m.split("-")
        rows.append({"model": m, "schedule": schedule, "loss": LOSS_NAMES[loss],
                     "train_steps": run_info(run)["steps_done"],
                     **{k if k.startswith("bpd") else f"bpd_{k}": v for k, v in results[cells[m, "bpd"].key].items()
                        if k != "seconds"},
                     **{k: v for k, v in results[cells[m, "fd"].key].items() if k != "seconds"}})
    command = " ".join(["python", "benchmarks/iddpm_ablation.py", *(argv if argv is not None else sys.argv[1:])])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"what": "Improved DDPM ablation on MNIST-5k: test bits/dim (full T) and FD", "rows": rows,
              "fd_n": args.n, "fd_steps": args.steps, "bpd_n": args.bpd_n, "command": command,
              "date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 thread per process",
              "versions": {"python": sys.version.split()[0], "torch": torch.__version__}}
    write_results(out, "iddpm-ablation", record,
                  ["schedule", "objective", "train steps", "test bits/dim (± s.e.)", "FD", "precision", "recall"],
                  [[r["schedule"], r["loss"], str(r["train_steps"]), f"{r['bpd']:.3f} ± {r['bpd_stderr']:.3f}",
                    f"{r['fd']:.3f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}"] for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
