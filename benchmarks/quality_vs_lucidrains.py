"""Quality per CPU budget (BENCHMARKS.md): difflab's MNIST FD against lucidrains' denoising-diffusion-pytorch
trained for the same wall-clock time on the same machine and data, both scored by difflab's own code.

The peer's row comes from benchmarks/lucidrains_mnist.py (its JSON); difflab's row samples ``--n`` images
from a difflab run with the same number of network evaluations per image as the peer's sampler (50)
and scores them the same way. The bar: difflab's FD at most 0.7x the peer's.

    OMP_NUM_THREADS=1 /work/benchenv/bin/python benchmarks/lucidrains_mnist.py --minutes 24 --threads 1
    OMP_NUM_THREADS=1 python benchmarks/quality_vs_lucidrains.py --run runs/mnist-uncond-v

Writes docs/results/quality-vs-lucidrains.json, quality-vs-lucidrains-table.md and a grid of 64 of the
peer's samples (quality-lucidrains-grid.png); difflab's grid of the same kind:

    difflab sample runs/mnist-uncond-v --n 64 --steps 50 --grid docs/results/quality-difflab-grid.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from cells import add_cell_arguments, run_cells, sample_cell, write_results
from difflab.runinfo import run_info

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/mnist-uncond-v", help="difflab run trained for the same budget")
    p.add_argument("--peer", default="runs/lucidrains-mnist/result.json", help="lucidrains_mnist.py's JSON")
    p.add_argument("--sampler", default="ancestral")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch", type=int, default=125)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT))
    add_cell_arguments(p)
    args = p.parse_args(argv)
    cell = sample_cell(args.run, args.sampler, args.steps, n=args.n, batch=args.batch, seed=args.seed)
    results = run_cells([cell], Path(args.cache or ROOT / "runs" / "cells"))
    if results is None or not args.out:
        return 0
    ours = results[cell.key]
    peer = json.loads(Path(args.peer).read_text())
    rows = [
        {"library": "difflab", "run": args.run, "train_steps": run_info(args.run)["steps_done"],
         "sampler": f"{args.sampler}, {args.steps} steps", **{k: ours[k] for k in ("fd", "precision", "recall")}},
        {"library": "denoising-diffusion-pytorch", "run": args.peer, "train_steps": peer["steps"],
         "sampler": "its DDIM, 50 steps", **{k: peer[k] for k in ("fd", "precision", "recall")}},
    ]
    ratio = ours["fd"] / peer["fd"]
    record = {"what": "FD after the same CPU budget, difflab vs lucidrains, n samples vs the MNIST-5k test split",
              "rows": rows, "fd_ratio": ratio, "target": "<= 0.7", "n": args.n, "peer_record": peer,
              "command": " ".join(["python", "benchmarks/quality_vs_lucidrains.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "date": datetime.date.today().isoformat()}
    out = Path(args.out)
    write_results(out, "quality-vs-lucidrains", record,
                  ["library", "train steps", "sampler", "FD", "precision", "recall"],
                  [[r["library"], str(r["train_steps"]), r["sampler"], f"{r['fd']:.3f}", f"{r['precision']:.3f}",
                    f"{r['recall']:.3f}"] for r in rows],
                  footer=f"FD ratio difflab / lucidrains: {ratio:.2f} (target <= 0.7)")
    peer_npz = Path(peer["npz"])
    if peer_npz.is_file():  # the first 64 of the peer's scored samples, beside difflab's grid
        from difflab.data import load_npz
        from difflab.images import save_grid

        save_grid(load_npz(peer_npz)[0][:64], out / "quality-lucidrains-grid.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
