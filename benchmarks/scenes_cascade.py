"""The text-conditional scenes cascade 16 -> 32 -> 64 in miniature (CDM + GLIDE's text U-Net; BENCHMARKS.md scenes).

Trains the three stages of configs/scenes.cascade.yaml (configs/scenes-text16.yaml, scenes-sr16-32.yaml,
scenes-sr32-64.yaml) for ``--minutes`` each (resumable: a stage whose run folder holds a finished run is
kept), then samples the cascade on the benchmark prompt list (the captions of the 1,000 reference test
scenes) in one call of ``difflab.pipelines.cascade.sample_cascade`` and scores every stage's images at
their own resolution with the scene evaluator (attribute accuracy per attribute and all correct, binding,
FD / precision / recall in scene features against the 1,000 reference scenes at that resolution). The s
sweep (``--levels``) re-samples only the last stage, from the same 32x32 images.

    OMP_NUM_THREADS=1 python benchmarks/scenes_cascade.py --minutes 10 --levels 0 50 100 200

(the command of docs/results/scenes-cascade.md, run beside the peer benchmarks/imagen_scenes.py, one
thread each). Each stage trains for ``--minutes`` of its process's CPU time (``difflab train
--max-cpu-minutes``), as the peer does, so other work on the machine shrinks neither side's budget.
Writes docs/results/scenes-cascade.json, scenes-cascade-table.md and scenes-cascade-grid.png (--out-name).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"
STAGES = (("base16", "scenes-text16.yaml"), ("sr16-32", "scenes-sr16-32.yaml"), ("sr32-64", "scenes-sr32-64.yaml"))


def train_stage(work: Path, name: str, config: str, minutes: float) -> dict:
    """``difflab train`` for ``minutes`` (skipped when the run folder already holds a run); its info."""
    import resource

    from difflab.runinfo import run_info

    run = work / name
    cpu0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    if not (run / "config.yaml").is_file():
        cmd = [sys.executable, "-m", "difflab", "train", str(ROOT / "configs" / config), "--out", str(run),
               "--max-cpu-minutes", str(minutes), "--quiet"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    info = run_info(run)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    return {"run": str(run), "step": info.get("steps_done"), "minutes": round((time.perf_counter() - t0) / 60, 2),
            "cpu_minutes": round(cpu / 60, 2), "img_per_s": info.get("img_per_s")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=8.0, help="training CPU minutes per stage (process CPU time)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "scenes"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--base-steps", type=int, default=25)
    ap.add_argument("--sr-steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=2.0, help="the base stage's CFG w")
    ap.add_argument("--aug-level", type=int, default=100, help="the SR stages' s")
    ap.add_argument("--levels", type=int, nargs="*", default=[], help="an s sweep of the last stage")
    ap.add_argument("--out-name", default="scenes-cascade", help="docs/results/NAME.json, NAME-table.md, NAME-grid.png")
    args = ap.parse_args()
    from difflab.data.scenes import reference_captions
    from difflab.eval.scenes import evaluate_scenes
    from difflab.images import save_grid, to_uint8
    from difflab.pipelines.cascade import CascadeConfig, StageConfig, build_cascade, sample_cascade

    work = Path(args.work)
    trained = {name: train_stage(work, name, cfg, args.minutes) for name, cfg in STAGES}
    prompts = reference_captions()[: args.n]
    specs = [StageConfig(run=str(work / "base16"), sampler="ancestral", steps=args.base_steps, guidance=args.guidance),
             StageConfig(run=str(work / "sr16-32"), sampler="ancestral", steps=args.sr_steps, aug_level=args.aug_level),
             StageConfig(run=str(work / "sr32-64"), sampler="ancestral", steps=args.sr_steps, aug_level=args.aug_level)]
    cascade = CascadeConfig(stages=tuple(specs), n=args.n, batch=args.batch, seed=0)
    stages = build_cascade(cascade)
    t0 = time.perf_counter()
    results = sample_cascade(cascade, stages, prompts=prompts)
    seconds = time.perf_counter() - t0
    rows = []
    images = []
    for (name, _), st, (x, _) in zip(STAGES, stages, results, strict=True):
        u8 = to_uint8(x, st.cfg.data)
        images.append(u8)
        m = evaluate_scenes(u8, prompts)
        rows.append({"stage": name, "size": m["size"], **{k: m[k] for k in (
            "digit", "colour", "position", "all_correct", "binding", "fd", "precision", "recall")}})
        print(rows[-1], flush=True)
    sweep = []
    if args.levels:
        from difflab.generate import draw_samples

        last = stages[-1]
        low = torch.from_numpy(np.ascontiguousarray(images[1])).permute(0, 3, 1, 2).float() / 127.5 - 1
        for s in args.levels:
            x, _ = draw_samples(last.denoiser, last.cfg, n=args.n, sampler="ancestral", steps=args.sr_steps,
                                seed=2, batch=args.batch, low_res=low, aug_level=s, prompts=prompts)
            m = evaluate_scenes(to_uint8(x, last.cfg.data), prompts)
            sweep.append({"s": s, **{k: m[k] for k in ("all_correct", "fd", "precision", "recall")}})
            print(sweep[-1], flush=True)
    from difflab.data.scenes import reference_scenes

    # the floor: the 1,000 reference test scenes themselves scored against 1,000 train scenes
    floor = {size: evaluate_scenes(reference_scenes(size).images[size], reference_captions(),
                                   ref="scenes-train")["fd"] for size in (16, 32, 64)}
    OUT.mkdir(parents=True, exist_ok=True)
    grid = np.concatenate([img[:16] for img in images[2:]], axis=0)
    save_grid(grid, OUT / f"{args.out_name}-grid.png")
    result = {"trained": trained, "rows": rows, "sweep": sweep, "fd_floor": floor, "sampling_seconds": round(seconds),
              "args": vars(args), "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "date": datetime.date.today().isoformat(),
              "command": "python benchmarks/scenes_cascade.py " + " ".join(sys.argv[1:])}
    (OUT / f"{args.out_name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| stage | size | digit | colour | position | all correct | binding | FD | FD floor | precision "
             "| recall |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = "-" if r["binding"] is None else f"{r['binding']:.3f}"
        lines.append(f"| {r['stage']} | {r['size']} | {r['digit']:.3f} | {r['colour']:.3f} | {r['position']:.3f} | "
                     f"{r['all_correct']:.3f} | {b} | {r['fd']:.2f} | {floor[r['size']]:.2f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} |")
    (OUT / f"{args.out_name}-table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
