"""Steps per second of the whole training loop (``Trainer.train_step``: data, draws, loss, backward, clip,
AdamW, EMAs) on the MNIST default run, for two source trees timed in interleaved rounds.

``benchmarks/throughput.py`` times the network alone; this times the loop around it, which is what a
refactor of the trainer can slow down. Each round runs one fresh process per tree (``PYTHONPATH=TREE/src``)
that builds ``configs/mnist-default.yaml`` in a temp run folder, takes ``--warmup`` steps, then times
``--steps`` steps; rounds alternate A B A B ..., and the median round of each is reported, so load from
other processes hits both alike. ``--before REV`` checks the revision out into a temporary git worktree.

    python benchmarks/trainer_step.py --before 21a7251 --rounds 5 --threads 2

Writes docs/results/trainer-step.json and trainer-step.md (``--name`` for another stem).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from throughput import paired_ratio

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"

CHILD = r"""
import sys, tempfile, time, torch
import difflab
print(difflab.__file__)
from difflab.config import load_config
from difflab.train.trainer import Trainer
cfg = load_config(sys.argv[1], sys.argv[2:])
with tempfile.TemporaryDirectory() as run:
    tr = Trainer(cfg, run, quiet=True)
    tr.net.train()
    warm, steps = int(cfg.train.log_every), int(cfg.train.max_steps)
    for _ in range(warm):
        tr.train_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.train_step()
    print(steps / (time.perf_counter() - t0))
"""


def time_tree(tree: Path, args) -> float:
    """Steps/s of one fresh process on ``tree``'s source."""
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), OMP_NUM_THREADS=str(args.threads))
    # the child reads warm-up and timed steps from log_every / max_steps (any version's config has them)
    cmd = [sys.executable, "-c", CHILD, str(ROOT / "configs" / "mnist-default.yaml"),
           f"train.log_every={args.warmup}", f"train.max_steps={args.steps}", *args.set]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree, check=False)
    if p.returncode:
        raise SystemExit(f"{tree}: {p.stderr[-2000:]}")
    lines = p.stdout.strip().splitlines()
    if not Path(lines[0]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the child imported difflab from {lines[0]}, not from {tree}")
    return float(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="git revision of the 'before' tree")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="config override for both trees")
    ap.add_argument("--name", default="trainer-step", help="stem of the record in docs/results (NAME.json, NAME.md)")
    ap.add_argument("--title", default="The training loop before and after the one-trainer refactor")
    args = ap.parse_args()
    rev = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            times: dict[str, list[float]] = {"before": [], "after": []}
            for r in range(args.rounds):
                for name, tree in (("before", before), ("after", ROOT)):
                    times[name].append(time_tree(tree, args))
                print(f"round {r + 1}: before {times['before'][-1]:.3f} steps/s, after {times['after'][-1]:.3f}",
                      flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = paired_ratio(times["after"], times["before"])
    result = {
        "command": "python benchmarks/trainer_step.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} cores, {platform.processor()}",
        "torch": __import__("torch").__version__, "before": rev, "after": head, "threads": args.threads,
        "steps_per_s": times, "median": med, "ratio_after_over_before": med["after"] / med["before"],
        "paired_ratio_median_q1_q3": paired,
        "batch": 32, "config": "configs/mnist-default.yaml",
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# {args.title}", "",
             f"`{result['command']}` ({result['date']}, {result['machine']}, torch {result['torch']}, "
             f"{args.threads} threads): `Trainer.train_step` on configs/mnist-default.yaml (batch 32), "
             f"{args.rounds} interleaved rounds of {args.steps} steps after {args.warmup}, one fresh process each.",
             "", "| tree | median steps/s | img/s | rounds |", "|---|---|---|---|"]
    for name, label in (("before", rev), ("after", head)):
        rounds = ", ".join(f"{v:.3f}" for v in times[name])
        lines.append(f"| {name} ({label}) | {med[name]:.3f} | {32 * med[name]:.1f} | {rounds} |")
    lines += ["", f"after / before: **{result['ratio_after_over_before']:.3f}** (medians); per-round ratio median "
              f"{paired[0]:.3f}, quartiles {paired[1]:.3f}-{paired[2]:.3f}", ""]
    (OUT / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
