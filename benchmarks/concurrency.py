"""Two difflab commands on one machine: each alone, then both at once, under OpenMP wait policies.

Runs ``difflab train configs/mnist-default.yaml`` as real subprocesses and reads their training speed
(img/s, the median over the logged intervals after the first) from ``metrics.jsonl``: each setting alone,
then pairs in which a second command starts while the first trains (the first's speed meanwhile is timed
from its log lines as they appear). Settings: a fixed two threads with libgomp's spinning wait (``OMP_NUM_THREADS=2``:
difflab before), the same with passive waiting (``OMP_WAIT_POLICY=PASSIVE``), difflab's default (the thread
count follows the load: difflab/threads.py), and one thread per command (``OMP_NUM_THREADS=1``).

Also prints the machine's bf16 verdict (difflab.hardware) and a float32 vs bf16 step rate, since the
``bf16: auto`` rule rests on it. Writes docs/results/concurrency.{json,md}.

    python benchmarks/concurrency.py [--steps 40]     # ~6 minutes on 2 cores; run it on an idle machine
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from difflab.hardware import native_bf16
from throughput import cpu_name

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


def _lines(run: Path) -> int:
    f = run / "metrics.jsonl"
    return sum(1 for x in f.read_text().splitlines() if x.strip()) if f.is_file() else 0


def _popen(out: Path, env_extra: dict[str, str], steps: int, bf16: str = "false") -> subprocess.Popen:
    return subprocess.Popen(_command(out, steps, bf16), env={**os.environ, **env_extra}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _finish(out: Path, proc: subprocess.Popen) -> float:
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{out}: exit {proc.returncode}: {err.strip()[-500:]}")
    return round(_rate(out), 1)


def alone(tmp: Path, name: str, env: dict[str, str], steps: int, bf16: str = "false") -> float:
    out = tmp / name
    return _finish(out, _popen(out, env, steps, bf16))


def second_while_first_runs(tmp: Path, name: str, env_first: dict[str, str], env_second: dict[str, str],
                            steps: int) -> tuple[float, float]:
    """Start a long first command; once it trains, run a second one of ``steps`` steps. Returns the img/s of
    each while both ran (the first's from the log lines that appeared meanwhile, timed by polling)."""
    a, b = tmp / f"{name}-first", tmp / f"{name}-second"
    first = _popen(a, env_first, 100_000)
    while _lines(a) < 1:
        if first.poll() is not None:
            raise SystemExit(f"{a}: exit {first.returncode}: {first.stderr.read()[-500:]}")
        time.sleep(0.1)
    second = _popen(b, env_second, steps)
    marks = []  # (time, lines of the first's log) while the second runs
    while second.poll() is None:
        marks.append((time.perf_counter(), _lines(a)))
        time.sleep(0.05)
    first.terminate()
    first.wait()
    second_rate = _finish(b, second)
    changes = [(t, n) for (t, n), (_, prev) in zip(marks[1:], marks[:-1], strict=True) if n != prev]
    if len(changes) < 2:
        return float("nan"), second_rate
    (t0, n0), (t1, n1) = changes[0], changes[-1]
    return round((n1 - n0) * 10 * 32 / (t1 - t0), 1), second_rate  # log_every 10, batch 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    cores = str(os.cpu_count() or 1)
    spin = {"OMP_NUM_THREADS": cores}  # a fixed count: difflab's share_cores keeps out (difflab before it)
    passive = {"OMP_NUM_THREADS": cores, "OMP_WAIT_POLICY": "PASSIVE"}
    one = {"OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        solo = {"all cores, spinning wait (before)": alone(tmp, "spin", spin, args.steps),
                "all cores, passive wait": alone(tmp, "passive", passive, args.steps),
                "difflab default": alone(tmp, "default", {}, args.steps),
                "1 thread": alone(tmp, "one", one, args.steps)}
        print("alone:", solo, flush=True)
        scenarios = [("before: all cores each, spinning wait", spin, spin),
                     ("difflab default: threads follow the load", {}, {}),
                     ("all cores each, passive wait", passive, passive),
                     ("OMP_NUM_THREADS=1 each", one, one)]
        rows = []
        for k, (name, env_a, env_b) in enumerate(scenarios):
            first, second = second_while_first_runs(tmp, f"s{k}", env_a, env_b, args.steps)
            rows.append({"scenario": name, "first": first, "second": second})
            print(f"{name}: first {first} img/s, second {second} img/s", flush=True)
        bf16_rate = alone(tmp, "bf16", {}, 20, "true")  # emulated bf16 is slow: 20 steps say enough
    best = max(solo.values())
    native, why = native_bf16("cpu")
    cpu = cpu_name()
    result = {"steps": args.steps, "alone": solo, "together": rows, "bf16_alone": bf16_rate, "native_bf16": native,
              "why": why, "machine": f"{cpu}, {os.cpu_count()} cores", "torch": torch.__version__,
              "date": dt.date.today().isoformat(), "command": f"python benchmarks/concurrency.py --steps {args.steps}"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "concurrency.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| alone | img/s | of the fastest |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {v / best:.2f} |" for k, v in solo.items()]
    lines += ["", "| two commands, the second started while the first trains | first img/s | second img/s | "
              "each, of the fastest alone |", "|---|---|---|---|"]
    lines += [f"| {r['scenario']} | {r['first']} | {r['second']} | {r['first'] / best:.2f} / {r['second'] / best:.2f} |"
              for r in rows]
    lines += ["", f"bf16 autocast alone: {bf16_rate} img/s against {solo['difflab default']} in float32 "
                  f"(native bf16: {native}; {why})"]
    (RESULTS / "concurrency-table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
