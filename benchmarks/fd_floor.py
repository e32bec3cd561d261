"""The FD floor of MNIST-5k: real train images against the real test split, in MNIST-classifier features.

Two disjoint sets of real digits are not at FD 0; every FD table of generated samples should show
this floor beside it. Measured pairs (reference = the 1,000 test images, k = 3):

* ``train-1000``: 1,000 train images, class-balanced (the first 100 of each class in the train split)
* ``train-1000-random``: 1,000 train images drawn at random (seeds 0..4), mean and std
* ``train-4000``: the whole train split
* ``test-self``: the test split against itself (FD 0, precision = recall = 1: a sanity check)

Writes ``docs/results/fd_floor.json`` and ``docs/results/fd_floor.md``.

    python benchmarks/fd_floor.py
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from difflab.data import load_mnist5k
from difflab.eval.report import evaluate

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"


def main() -> int:
    t0 = time.time()
    x_train, y_train = load_mnist5k("train")
    x_test, y_test = load_mnist5k("test")
    balanced = np.concatenate([np.flatnonzero(y_train == c)[:100] for c in range(10)])
    rows = {}
    rows["train-1000"] = evaluate(x_train[balanced], y_train[balanced], ref="mnist5k-test")
    randoms = []
    for seed in range(5):
        idx = np.random.default_rng(seed).choice(len(y_train), 1000, replace=False)
        randoms.append(evaluate(x_train[idx], y_train[idx], ref="mnist5k-test"))
    rows["train-1000-random"] = {
        key: float(np.mean([r[key] for r in randoms])) for key in ("fd", "precision", "recall", "is", "accuracy")
    } | {f"{key}_std": float(np.std([r[key] for r in randoms])) for key in ("fd", "precision", "recall")} | {
        "n": 1000, "n_ref": 1000, "seeds": list(range(5))}
    rows["train-4000"] = evaluate(x_train, y_train, ref="mnist5k-test")
    rows["test-self"] = evaluate(x_test, y_test, ref="mnist5k-test")

    result = {
        "what": "FD floor of MNIST-5k in difflab's MNIST-classifier features (reference: mnist5k-test)",
        "rows": rows,
        "command": "python benchmarks/fd_floor.py",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__},
        "date": datetime.date.today().isoformat(),
        "seconds": round(time.time() - t0, 1),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fd_floor.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| samples (vs 1,000 mnist5k-test) | n | FD | precision | recall | classifier IS | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        fd = f"{r['fd']:.3f}" + (f" ± {r['fd_std']:.3f}" if "fd_std" in r else "")
        p = f"{r['precision']:.3f}" + (f" ± {r['precision_std']:.3f}" if "precision_std" in r else "")
        rc = f"{r['recall']:.3f}" + (f" ± {r['recall_std']:.3f}" if "recall_std" in r else "")
        lines.append(f"| {name} | {r['n']} | {fd} | {p} | {rc} | {r['is']:.3f} | {r['accuracy']:.4f} |")
    table = "\n".join(lines)
    (OUT / "fd_floor.md").write_text(
        f"# MNIST-5k FD floor\n\n{table}\n\nCommand: `{result['command']}`; {result['machine']}; "
        f"torch {torch.__version__}; {result['date']}.\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
