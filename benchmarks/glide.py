"""GLIDE's guidance comparison in miniature (GLIDE Sec. 4-5; PAPERS.md Sec. 6): classifier-free guidance on
text against CLIP guidance by a noised CLIP, on the captioned MNIST scenes at 16x16.

- The text model: configs/scenes-text16.yaml (GLIDE's text U-Net, 20% of captions dropped), by default the
  base stage of benchmarks/scenes_cascade.py (``--base``), else trained here for ``--base-minutes`` of CPU.
- The guiding CLIP: configs/scenes-clip16.yaml (GLIDE's noised CLIP: a ViT conditioned on t in place of the
  class token, trained contrastively on noised train scenes) for ``--clip-minutes`` of CPU.
- The judging CLIP: the same config from another seed on other scenes (``train.seed=1``,
  ``data.scene_seed=1``): a CLIP that did not guide, for the CLIP score GLIDE warns is gamed by the guide.
  Both CLIPs train at once, one thread each.

Each point draws ``--n`` samples for the first ``--captions`` benchmark prompts (each caption n / captions
times: the diversity per caption needs repeats) from the same seed, ancestral with ``--steps`` steps, and is
scored by the scene evaluator (difflab.eval.scenes: digit / colour / position accuracy, all correct, binding on
two-object captions, FD / precision / recall in scene features against the 1,000 reference scenes, diversity
per caption) and by both CLIPs at t = 0 (CLIP score = 100 * mean cos(z_i, z_t) with the sample's own caption).
The sweeps: CFG w over ``--cfg`` (GLIDE's s = 1 + w), CLIP guidance s over ``--clip`` (on the unguided text
model, as GLIDE's clip_guided notebook). Resumable: points already in the JSON are kept.

    python benchmarks/glide.py --clip-minutes 5 --n 500
Writes docs/results/glide.json, glide-table.md, glide-tradeoff.png, glide-samples.{png,txt}.
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
KEYS = ("digit", "colour", "position", "all_correct", "binding", "fd", "precision", "recall", "diversity")


def train(config: str, out: Path, cpu_minutes: float, sets: tuple[str, ...] = (), wait: bool = True):
    """``difflab train`` (one thread) unless ``out`` already holds a run; the process, or None."""
    if (out / "config.yaml").is_file():
        return None
    cmd = [sys.executable, "-m", "difflab", "train", str(ROOT / "configs" / config), "--out", str(out),
           "--max-cpu-minutes", str(cpu_minutes), "--quiet", *[a for s in sets for a in ("--set", s)]]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if wait:
        if proc.wait() != 0:
            raise SystemExit(f"training {out} failed")
        return None
    return proc


def clip_score(clip, images_u8: np.ndarray, captions: list[str]) -> float:
    """100 * mean cos(z_i(x_0, t = 0), z_t) of each image with its own caption."""
    from difflab.clip_guidance import clip_text_embeddings

    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 127.5 - 1
    sims = []
    with torch.no_grad():
        for lo in range(0, len(x), 250):
            z_i = clip.image_embeddings(x[lo:lo + 250], torch.zeros(len(x[lo:lo + 250]), dtype=torch.long))
            z_t = clip_text_embeddings(clip, captions[lo:lo + 250])
            sims.append((z_i * z_t).sum(-1))
    return float(100 * torch.cat(sims).mean())


def _plot(points: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for kind, marker in (("cfg", "o-"), ("clip", "s-")):
        rows = sorted((p for p in points if p["kind"] == kind or p["scale"] == 0), key=lambda p: p["scale"])
        label = "CFG (w)" if kind == "cfg" else "CLIP guidance (s)"
        fd = [p["fd"] for p in rows]
        axes[0].plot(fd, [p["all_correct"] for p in rows], marker, label=label)
        axes[1].plot([p["diversity"] for p in rows], [p["all_correct"] for p in rows], marker, label=label)
        axes[2].plot([p["clip_judge"] for p in rows], [p["clip_guide"] for p in rows], marker, label=label)
        for p in rows:
            axes[0].annotate(f"{p['scale']:g}", (p["fd"], p["all_correct"]), fontsize=7)
    axes[0].set(xlabel="FD (lower = better)", ylabel="all attributes correct", title="fidelity vs caption")
    axes[1].set(xlabel="diversity per caption", ylabel="all attributes correct", title="diversity vs caption")
    axes[2].set(xlabel="CLIP score, judging CLIP", ylabel="CLIP score, guiding CLIP", title="the guide is gamed")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "glide"))
    ap.add_argument("--out", default=str(OUT), help="where the results go")
    ap.add_argument("--base", default=str(ROOT / "runs" / "scenes" / "base16"), help="the text model's run")
    ap.add_argument("--base-minutes", type=float, default=8.0, help="CPU minutes if --base must be trained")
    ap.add_argument("--clip-minutes", type=float, default=5.0, help="CPU minutes of each noised CLIP")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--captions", type=int, default=100)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--cfg", type=float, nargs="*", default=[0.0, 0.5, 1.0, 2.0, 3.0, 5.0])
    ap.add_argument("--clip", type=float, nargs="*", default=[0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
    args = ap.parse_args()
    from difflab.build import load_run
    from difflab.clip_guidance import load_noised_clip
    from difflab.data.scenes import reference_captions
    from difflab.eval.scenes import evaluate_scenes
    from difflab.generate import draw_samples
    from difflab.images import save_grid, to_uint8

    work, base, out = Path(args.work), Path(args.base), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train("scenes-text16.yaml", base, args.base_minutes)
    procs = [train("scenes-clip16.yaml", work / "clip-guide", args.clip_minutes, wait=False),
             train("scenes-clip16.yaml", work / "clip-judge", args.clip_minutes,
                   ("train.seed=1", "data.scene_seed=1"), wait=False)]
    for p in procs:
        if p is not None and p.wait() != 0:
            raise SystemExit("training a noised CLIP failed")
    train_seconds = time.perf_counter() - t0
    guide, judge = load_noised_clip(work / "clip-guide"), load_noised_clip(work / "clip-judge")
    cfg, _, denoiser = load_run(base)
    prompts = reference_captions()[: args.captions]
    captions = [prompts[i % len(prompts)] for i in range(args.n)]
    path = out / "glide.json"
    result = json.loads(path.read_text()) if path.is_file() else {"points": []}
    done = {(p["kind"], p["scale"]) for p in result["points"]}
    todo = [("cfg", w) for w in args.cfg] + [("clip", s) for s in args.clip]
    grids = {}
    for kind, scale in todo:
        if (kind, scale) in done:
            continue
        t1 = time.perf_counter()
        kw = {"guidance_scale": scale} if kind == "cfg" else {"guidance_scale": 0.0, "clip": guide,
                                                                "clip_scale": scale}
        x, _ = draw_samples(denoiser, cfg, n=args.n, sampler="ancestral", steps=args.steps, seed=0,
                            batch=args.batch, prompts=prompts, **kw)
        u8 = to_uint8(x, cfg.data)
        m = evaluate_scenes(u8, captions)
        point = {"kind": kind, "scale": scale, **{k: m[k] for k in KEYS},
                 "clip_guide": clip_score(guide, u8, captions), "clip_judge": clip_score(judge, u8, captions),
                 "seconds": round(time.perf_counter() - t1, 1)}
        result["points"].append(point)
        np.save(work / f"first10_{kind}_{scale:g}.npy", u8[:10])  # for the grid of every point, across calls
        print(point, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    clip_acc = {name: json.loads((work / name / "clip_accuracy.json").read_text())
                for name in ("clip-guide", "clip-judge") if (work / name / "clip_accuracy.json").is_file()}
    result.update({"base": str(base), "clip_accuracy": clip_acc, "args": vars(args),
                   "train_seconds": round(train_seconds),
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                   "date": datetime.date.today().isoformat(),
                   "command": "python benchmarks/glide.py " + " ".join(sys.argv[1:])})
    path.write_text(json.dumps(result, indent=1) + "\n")
    pts = sorted(result["points"], key=lambda p: (p["kind"], p["scale"]))
    lines = ["| guidance | scale | digit | colour | position | all correct | binding | FD | precision | recall "
             "| diversity | CLIP score (guide) | CLIP score (judge) |", "|" + "---|" * 13]
    for p in pts:
        b = "-" if p["binding"] is None else f"{p['binding']:.3f}"
        lines.append(f"| {'CFG w' if p['kind'] == 'cfg' else 'CLIP s'} | {p['scale']:g} | {p['digit']:.3f} | "
                     f"{p['colour']:.3f} | {p['position']:.3f} | {p['all_correct']:.3f} | {b} | {p['fd']:.2f} | "
                     f"{p['precision']:.3f} | {p['recall']:.3f} | {p['diversity']:.3f} | {p['clip_guide']:.2f} | "
                     f"{p['clip_judge']:.2f} |")
    (out / "glide-table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(result["points"], out / "glide-tradeoff.png")
    for p in pts:
        f = work / f"first10_{p['kind']}_{p['scale']:g}.npy"
        if f.is_file():
            grids[(p["kind"], p["scale"])] = np.load(f)
    if grids:  # rows: each point's first 10 samples (captions 0..9)
        save_grid(np.concatenate(list(grids.values())), out / "glide-samples.png", nrow=10, scale=4)
        (out / "glide-samples.txt").write_text("\n".join(f"row {i}: {k} {s:g}" for i, (k, s) in enumerate(grids))
                                               + "\ncaptions: " + " | ".join(prompts[:10]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
