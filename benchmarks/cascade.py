"""CDM's ablation in miniature (Ho et al. 2021; PAPERS.md Sec. 5): class-conditional MNIST-5k, a 14x14 base and a
14 -> 28 super-resolution stage against one 28x28 model, with and without conditioning augmentation.

(a) cascade vs single stage at equal training compute: the budget B minutes goes whole to the 28x28 model
    (configs/mnist-cascade-single28.yaml) and half / half to the base (configs/mnist-cascade-base14.yaml) and
    the noise-augmented SR stage (configs/mnist-cascade-sr14-28.yaml). Compute is counted in steps: each model's
    seconds per step are measured first in interleaved rounds on this machine, and each run trains for
    minutes * 60 / (s / step) steps, so the split does not depend on what else runs while it trains.
(b) the SR stage without augmentation, with Gaussian noise augmentation, and with blur augmentation
    (``--set augment.kind=none|noise|blur``, the same steps each), every one on the *base model's* samples.
(c) the level s swept after training, non-truncated (base x_0, noised to z_s) vs truncated (base chain
    stopped at s).

Every point draws ``--n`` samples with labels cycling 0..9 (stage k seeded ``seed + k``, so every SR variant and
level sees the same base samples) and scores conditional accuracy, FD, precision and recall (k = 3) in difflab's
MNIST features against the 1,000 mnist5k-test digits. Runs resume where they stopped (run folders under
``--work``); finished points are cached in the JSON. Writes docs/results/cascade.{json,md}, cascade-table.md,
cascade-sweep.png and cascade-grid.png.

    OMP_NUM_THREADS=1 python benchmarks/cascade.py --budget-minutes 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"
CONFIGS = {"base14": "mnist-cascade-base14.yaml", "sr": "mnist-cascade-sr14-28.yaml",
           "single28": "mnist-cascade-single28.yaml"}
SR_KINDS = ("none", "noise", "blur")
METRICS = ("accuracy", "fd", "precision", "recall")


def prepare_data(work: Path) -> Path:
    """MNIST-5k train digits area-downsampled 28 -> 14 (uint8, labels kept): the base model's data."""
    from difflab.data import float_to_uint8, load_mnist5k, uint8_to_float
    from difflab.images import save_npz

    path = work / "mnist5k-train-14.npz"
    if not path.is_file():
        images, labels = load_mnist5k("train")
        small = torch.nn.functional.interpolate(uint8_to_float(images[..., None]), size=14, mode="area")
        save_npz(float_to_uint8(small), labels, path)
    return path


def config(name: str, data14: Path, extra: list[str] = ()):
    from difflab.config import load_config

    over = [f"data.path={data14}"] if name == "base14" else []
    return load_config(ROOT / "configs" / CONFIGS[name], [*over, *extra])


def seconds_per_step(cfgs: dict, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per training step of each config, timed in interleaved rounds (A B C A B C ...)."""
    from difflab.train.trainer import Trainer

    times: dict[str, list[float]] = {k: [] for k in cfgs}
    for _ in range(rounds):
        for name, cfg in cfgs.items():
            with tempfile.TemporaryDirectory() as run:
                tr = Trainer(cfg, run, quiet=True)
                tr.net.train()
                for _ in range(3):
                    tr.train_step()
                t0 = time.perf_counter()
                for _ in range(steps):
                    tr.train_step()
                times[name].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def train(cfg, run: Path, steps: int) -> None:
    from difflab.train.checkpoint import latest_checkpoint
    from difflab.train.trainer import Trainer

    resume = latest_checkpoint(run) is not None
    if resume and int(latest_checkpoint(run).name.split("_")[1]) >= steps:
        return
    print(f"training {run.name} to step {steps}", flush=True)
    Trainer(cfg, run, resume=resume, quiet=True).train(max_steps=steps)


def score(x: torch.Tensor, labels: torch.Tensor, data_cfg) -> dict:
    from difflab.eval.report import evaluate
    from difflab.images import to_uint8

    m = evaluate(to_uint8(x, data_cfg), labels.numpy(), ref="mnist5k-test", features="mnist", distributed=False)
    return {k: float(m[k]) for k in METRICS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-minutes", type=float, default=8.0, help="training compute of each arm (a)")
    ap.add_argument("--n", type=int, default=1000, help="samples per point")
    ap.add_argument("--steps", type=int, default=50, help="ancestral sampling steps of every stage")
    ap.add_argument("--levels", default="0,50,100,200,400", help="the s sweep (c)")
    ap.add_argument("--timing-rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "cascade")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default docs/results)")
    args = ap.parse_args()
    global OUT
    OUT = args.out or OUT
    OUT.mkdir(parents=True, exist_ok=True)
    from difflab.build import load_run
    from difflab.generate import draw_samples

    args.work.mkdir(parents=True, exist_ok=True)
    data14 = prepare_data(args.work)
    record_path = OUT / "cascade.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    cfgs = {"base14": config("base14", data14), "sr": config("sr", data14), "single28": config("single28", data14)}
    if "seconds_per_step" not in record:
        record["seconds_per_step"] = seconds_per_step(cfgs, args.timing_rounds, 20)
    sps = record["seconds_per_step"]
    budget = 60.0 * args.budget_minutes
    steps = {"single28": int(budget / sps["single28"]), "base14": int(budget / 2 / sps["base14"]),
             "sr": int(budget / 2 / sps["sr"])}
    record.update(budget_minutes=args.budget_minutes, train_steps=steps, n=args.n, sample_steps=args.steps)
    print(f"seconds/step {sps}; steps {steps}", flush=True)

    train(cfgs["single28"], args.work / "single28", steps["single28"])
    train(cfgs["base14"], args.work / "base14", steps["base14"])
    for kind in SR_KINDS:
        train(config("sr", data14, [f"augment.kind={kind}"] + ([] if kind == "noise" else ["model.cond_dim=null"])),
              args.work / f"sr-{kind}", steps["sr"])

    load = {name: load_run(args.work / name, ema=0.995) for name in
            ["single28", "base14", *[f"sr-{k}" for k in SR_KINDS]]}
    points = record.setdefault("points", {})
    samples: dict[str, torch.Tensor] = {}

    def draw(name, seed, **kw):
        cfg, _, den = load[name]
        return draw_samples(den, cfg, n=args.n, sampler="ancestral", steps=args.steps, seed=seed, batch=250,
                            distributed=False, **kw)

    def point(key, make):
        if key not in points:
            t0 = time.perf_counter()
            x, labels, data_cfg = make()
            points[key] = {**score(x, labels, data_cfg), "seconds": round(time.perf_counter() - t0, 1)}
            samples[key] = x
            print(key, points[key], flush=True)
            record_path.write_text(json.dumps(record, indent=1) + "\n")
        return points[key]

    from difflab.pipelines.cascade import CascadeConfig, Stage, StageConfig, check_chain, sample_cascade

    def single():
        x, y = draw("single28", args.seed)
        return x, y, load["single28"][0].data

    def cascade(kind, s, truncated=False):
        """The two-stage cascade through difflab.pipelines.cascade (base seeded seed, SR seed + 1)."""
        def make():
            specs = (StageConfig(run=str(args.work / "base14"), sampler="ancestral", steps=args.steps),
                     StageConfig(run=str(args.work / f"sr-{kind}"), sampler="ancestral", steps=args.steps,
                                 aug_level=s, truncated=truncated))
            stages = [Stage(spec, load[Path(spec.run).name][0], load[Path(spec.run).name][2]) for spec in specs]
            check_chain(stages, "all")
            c = CascadeConfig(stages=specs, n=args.n, batch=250, seed=args.seed, label="all")
            (_, _), (x, y) = sample_cascade(c, stages, distributed=False)
            return x, y, load[f"sr-{kind}"][0].data
        return make

    point("single28", single)
    levels = [int(v) for v in args.levels.split(",")]
    for s in levels:
        point(f"sr-noise/s{s}", cascade("noise", s))
        if s:
            point(f"sr-noise/s{s}/truncated", cascade("noise", s, truncated=True))
    point("sr-none", cascade("none", 0))
    point("sr-blur", cascade("blur", 0))
    best = min(levels, key=lambda s: points[f"sr-noise/s{s}"]["fd"])
    record.update(best_level=best, command="python benchmarks/cascade.py " + " ".join(sys.argv[1:]),
                  date=datetime.date.today().isoformat(), machine=f"{os.cpu_count()} cores, {platform.processor()}",
                  torch=torch.__version__, threads=torch.get_num_threads())
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    write_tables(record, levels)
    plot_sweep(record, levels)
    if samples:
        grid(samples, best)


def _row(name: str, p: dict) -> list[str]:
    return [name, f"{p['fd']:.2f}", f"{p['precision']:.3f}", f"{p['recall']:.3f}", f"{p['accuracy']:.3f}"]


def write_tables(record: dict, levels: list[int]) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cells import write_results

    p, best = record["points"], record["best_level"]
    rows = [_row("(a) single 28x28 model", p["single28"]),
            _row(f"(a) cascade 14 -> 28, noise aug., s = {best}", p[f"sr-noise/s{best}"]),
            _row("(b) SR without augmentation", p["sr-none"]),
            _row(f"(b) SR with noise augmentation, s = {best}", p[f"sr-noise/s{best}"]),
            _row("(b) SR with blur augmentation", p["sr-blur"])]
    for s in levels:
        rows.append(_row(f"(c) s = {s}, non-truncated", p[f"sr-noise/s{s}"]))
        if s:
            rows.append(_row(f"(c) s = {s}, truncated", p[f"sr-noise/s{s}/truncated"]))
    steps = record["train_steps"]
    footer = (f"n = {record['n']} samples per row, labels cycling 0..9, ancestral {record['sample_steps']} steps per "
              f"stage; training compute {record['budget_minutes']} min per arm: single {steps['single28']} steps, "
              f"base {steps['base14']} + SR {steps['sr']} steps (s/step {record['seconds_per_step']}). "
              f"`{record['command']}`, {record['date']}, {record['machine']}, torch {record['torch']}.")
    write_results(OUT, "cascade", record, ["what", "FD", "precision", "recall", "accuracy"], rows, footer)


def plot_sweep(record: dict, levels: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = record["points"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric in zip(axes, ("fd", "accuracy"), strict=True):
        ax.plot(levels, [p[f"sr-noise/s{s}"][metric] for s in levels], "o-", label="non-truncated")
        ax.plot(levels[1:], [p[f"sr-noise/s{s}/truncated"][metric] for s in levels[1:]], "s--", label="truncated")
        for key, style, name in (("sr-none", ":", "no augmentation"), ("sr-blur", "-.", "blur"),
                                 ("single28", "-", "single 28x28 model")):
            ax.axhline(p[key][metric], ls=style, color="grey", lw=1)
            ax.text(levels[-1], p[key][metric], name, fontsize=7, ha="right", va="bottom")
        ax.set_xlabel("augmentation level s")
        ax.set_ylabel({"fd": "FD (MNIST features)", "accuracy": "conditional accuracy"}[metric])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "cascade-sweep.png", dpi=110)


def grid(samples: dict, best: int) -> None:
    from PIL import Image

    from difflab.data import float_to_uint8
    from difflab.images import make_grid

    rows = [k for k in ("single28", "sr-none", f"sr-noise/s{best}", "sr-blur") if k in samples]
    tiles = [make_grid(float_to_uint8(samples[k][:20]), nrow=20) for k in rows]
    img = np.concatenate(tiles, axis=0)
    Image.fromarray(img[..., 0]).resize((img.shape[1] * 2, img.shape[0] * 2), Image.NEAREST).save(
        OUT / "cascade-grid.png")
    (OUT / "cascade-grid.txt").write_text("rows, top to bottom: " + ", ".join(rows) + "\n")


if __name__ == "__main__":
    main()
