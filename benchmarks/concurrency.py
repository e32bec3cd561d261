"""Two difflab commands on one machine: each alone, then both at once, under OpenMP wait policies.

Runs ``difflab train configs/mnist-default.yaml`` for ``--steps`` steps as real subprocesses and reads
their training speed (img/s over the logged steps after the first interval) from ``metrics.jsonl``:

- ``before``: ``OMP_WAIT_POLICY`` empty, which libgomp treats as unset (its default: idle threads spin);
- ``passive``: difflab's default since ``import difflab`` sets ``OMP_WAIT_POLICY=PASSIVE``;
- ``1 thread``: ``OMP_NUM_THREADS=1`` per command (the policy passive too).

Also prints the machine's bf16 verdict (difflab.hardware) and a float32 vs bf16 step rate, since the
``bf16: auto`` rule rests on it. Writes docs/results/concurrency.{json,md}.

    python benchmarks/concurrency.py [--steps 40]     # ~6 minutes on 2 cores; run it on an idle machine
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from difflab.hardware import native_bf16

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
CONFIG = ROOT / "configs" / "mnist-default.yaml"


def _command(out: Path, steps: int, bf16: str = "false") -> list[str]:
    return [sys.executable, "-m", "difflab", "train", str(CONFIG), "--out", str(out), "--max-steps", str(steps),
            "--quiet", "--set", "train.log_every=10", "--set", "train.save_every=100000",
            "--set", f"train.bf16={bf16}"]


def _rate(run: Path) -> float:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return statistics.median(x["img/s"] for x in lines[1:]) if len(lines) > 1 else lines[0]["img/s"]


def _launch(jobs: list[tuple[Path, dict[str, str], list[str]]]) -> list[dict]:
    """Start every job at once; wait; each job's img/s and wall seconds."""
    started = []
    for out, env_extra, cmd in jobs:
        env = {**os.environ, **env_extra}
        started.append((out, time.perf_counter(), subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                                                   stderr=subprocess.PIPE, text=True)))
    results = []
    for out, t0, proc in started:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{out}: exit {proc.returncode}: {err.strip()[-500:]}")
        results.append({"img/s": round(_rate(out), 1), "wall_s": round(time.perf_counter() - t0, 1)})
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    policies = {"before (libgomp default)": {"OMP_WAIT_POLICY": ""},
                "passive (difflab default)": {},
                "1 thread each": {"OMP_NUM_THREADS": "1"}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        k = 0

        def run(env: dict[str, str], n: int, bf16: str = "false") -> list[dict]:
            nonlocal k
            jobs = []
            for _ in range(n):
                k += 1
                out = Path(tmp) / f"r{k}"
                jobs.append((out, env, _command(out, args.steps, bf16)))
            return _launch(jobs)

        for name, env in policies.items():
            alone = run(env, 1)[0]
            pair = run(env, 2)
            rows.append({"policy": name, "alone": alone, "together": pair,
                         "share": round(statistics.mean(p["img/s"] for p in pair) / alone["img/s"], 3)})
            print(f"{name:28s} alone {alone['img/s']:6.1f} img/s   together "
                  f"{' / '.join(str(p['img/s']) for p in pair)} img/s   each gets {rows[-1]['share']:.2f} of alone",
                  flush=True)
        bf16_rate = run({}, 1, "true")[0]
    native, why = native_bf16("cpu")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    result = {"steps": args.steps, "rows": rows, "bf16_alone": bf16_rate, "native_bf16": native, "why": why,
              "machine": f"{cpu}, {os.cpu_count()} cores", "torch": torch.__version__,
              "date": dt.date.today().isoformat(),
              "command": f"python benchmarks/concurrency.py --steps {args.steps}"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "concurrency.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| OpenMP setting | alone img/s | both at once img/s (each) | each gets, of alone |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['alone']['img/s']} | "
                     f"{' / '.join(str(p['img/s']) for p in r['together'])} | {r['share']:.2f} |")
    (RESULTS / "concurrency-table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"bf16 alone: {bf16_rate['img/s']} img/s (native bf16: {native}; {why})")


if __name__ == "__main__":
    main()
