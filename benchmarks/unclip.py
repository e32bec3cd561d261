"""unCLIP's claims in miniature (unCLIP Sec. 5; PAPERS.md Sec. 7): CLIP, prior and decoder trained on the captioned
MNIST scenes at 16x16 for stated CPU minutes, against the GLIDE model (configs/scenes-text16.yaml) trained for the
same total CPU minutes, and DALLE2-pytorch's prior + decoder on the same CLIP (benchmarks/dalle2_scenes.py).

- CLIP: configs/scenes-unclip-clip16.yaml for ``--clip-minutes``; prior: scenes-unclip-prior16.yaml for
  ``--prior-minutes``; decoder: scenes-unclip-decoder16.yaml for ``--decoder-minutes`` (one thread each, process
  CPU time: ``difflab train --max-cpu-minutes``).
- GLIDE: the GLIDE issue's base run (``--glide-base``, runs/scenes/base16: ``--glide-base-minutes`` 8) copied and
  resumed to the unCLIP total, clip + prior + decoder minutes (its checkpoint continues bit-identically). A run
  folder in ``--work`` that holds done.txt is taken as trained (for larger budgets: resume the runs by hand, write
  done.txt, and give the minutes they had).
- Samples: ``--n`` images for the first ``--captions`` benchmark prompts (each caption n / captions times, for the
  diversity per caption), the same seed, matched guidance: GLIDE's CFG w and the decoder's w equal (``--w``),
  the prior at its own w (``--prior-w``) with best-of-2; ancestral ``--steps`` for both image models, the prior by
  DDIM 64. Scored by the scene evaluator (digit / colour / position, all correct, binding on two-object captions,
  FD, diversity per caption).
- The prior: mean cos(z_prior, z_true) of its embeddings to the true image embeddings of the prompts' reference
  scenes, against cos(z_t, z_true) of the caption's own text embedding, and retrieval (is the embedding closer to
  its own scene than to the others' among the distinct captions), with and without best-of-2.
- The peer (``--peer``, benchmarks/dalle2_scenes.py's result.json): difflab measured by the peer's protocol
  (``peer_protocol``: the captions of reference scenes 0..n-1 as prompts, the prior unguided with best-of-2, the
  decoder at the peer's w) and the ratios (``peer`` in unclip.json).
- ``--prior-w`` is part of a point's key: a rerun with another prior w adds its unCLIP points beside the others.
- Variations: ``--variations`` reference scenes, 4 variations each at every eta of ``--etas`` (DDIM inversion, then
  DDIM with eta): attribute accuracy of the variations against the source caption, and their mean pixel distance
  to the source.

    python benchmarks/unclip.py --n 300 --captions 100
Writes docs/results/unclip.json, unclip-table.md, unclip-tradeoff.png, unclip-samples.png, unclip-variations.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"
KEYS = ("digit", "colour", "position", "all_correct", "binding", "fd", "precision", "recall", "diversity")


def train(config: str, out: Path, cpu_minutes: float, sets: tuple[str, ...] = (), resume: bool = False):
    """``difflab train`` on one thread unless ``out`` holds a finished run; returns the process (not waited)."""
    if (out / "done.txt").is_file():
        return None
    if resume:
        cmd = [sys.executable, "-m", "difflab", "train", "--resume", str(out)]
    else:
        cmd = [sys.executable, "-m", "difflab", "train", str(ROOT / "configs" / config), "--out", str(out)]
    cmd += ["--max-cpu-minutes", str(cpu_minutes), "--quiet", *[a for s in sets for a in ("--set", s)]]
    print("+", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait(*procs) -> None:
    for out, p in procs:
        if p is not None:
            if p.wait() != 0:
                raise SystemExit(f"training {out} failed")
            (out / "done.txt").write_text("trained\n")


def prior_metrics(pipe, prompts: list[str], best_of: int, w: float) -> dict:
    """cos(prior, true) and retrieval among the distinct prompts' reference scenes, for one prior setting."""
    from difflab.data.scenes import reference_scenes

    ref = reference_scenes(16)
    first = {}
    for i, c in enumerate(ref.captions):
        first.setdefault(c, i)
    captions = [c for c in dict.fromkeys(prompts)]
    x = torch.from_numpy(ref.images[16][[first[c] for c in captions]]).permute(0, 3, 1, 2).float() / 127.5 - 1
    e = pipe.embedder
    z_true = e.unit(e.image(x)).cpu()
    z_prior = e.unit(pipe.prior_embeddings(captions, seed=0, best_of=best_of, guidance=w)).cpu()
    z_text = e.unit(e.text(captions)[0]).cpu()

    def scores(z):
        sim = z @ z_true.t()  # [captions, scenes]
        return float(sim.diagonal().mean()), float((sim.argmax(1) == torch.arange(len(z))).float().mean())

    (cp, rp), (ct, rt) = scores(z_prior), scores(z_text)
    return {"best_of": best_of, "prior_w": w, "captions": len(captions), "cos_prior_true": round(cp, 4),
            "cos_text_true": round(ct, 4), "retrieval_prior": round(rp, 4), "retrieval_text": round(rt, 4)}


def peer_protocol(pipe, n: int, w: float) -> dict:
    """difflab measured as benchmarks/dalle2_scenes.py measures the peer: the prompts are the captions of reference
    scenes 0..n-1; the prior unguided, best-of-2 (and 1); cos to each prompt's own scene's z_i and top-1 retrieval
    among the n scenes (a hit if the nearest has the prompt's caption); the images from the best-of-2 embeddings
    with the decoder at w, scored by the scene evaluator."""
    from difflab.data.scenes import reference_captions, reference_scenes
    from difflab.eval.scenes import evaluate_scenes
    from difflab.images import to_uint8

    prompts = reference_captions()[:n]
    ref = reference_scenes(16)
    x = torch.from_numpy(ref.images[16][:n]).permute(0, 3, 1, 2).float() / 127.5 - 1
    e = pipe.embedder
    z_true = e.unit(e.image(x)).cpu()
    same = torch.tensor([[a == b for b in prompts] for a in prompts])

    def scores(z):
        sims = e.unit(z).cpu() @ z_true.t()
        hit = same[torch.arange(len(z)), sims.argmax(1)]
        return {"cos_true": round(float(sims.diagonal().mean()), 4),
                "retrieval_top1": round(float(hit.float().mean()), 4)}

    rows = {f"best_of_{k}": pipe.prior_embeddings(prompts, seed=0, best_of=k, guidance=0.0) for k in (2, 1)}
    images = pipe.decode(rows["best_of_2"], prompts, seed=0, guidance=w)
    m = evaluate_scenes(to_uint8(images, pipe.decoder.cfg.data), prompts)
    prior = {k: scores(z) for k, z in rows.items()}
    prior["text_embedding"] = scores(e.text(prompts)[0])
    keys = ("digit", "colour", "position", "all_correct", "binding", "colour_swaps", "fd", "precision", "recall",
            "diversity")
    return {"n": n, "prior_w": 0.0, "w": w, "prior": prior, "row": {k: m[k] for k in keys}}


def _plot(points: list[dict], variations: list[dict], peer: list[tuple[str, dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    lines = sorted({(p["model"], p.get("prior_w")) for p in points}, key=str)
    for (model, prior_w), marker in zip(lines, ("o-", "s-", "D-", "v-"), strict=False):
        name = model if prior_w is None else f"{model}, prior w={prior_w:g}"
        rows = sorted((p for p in points if (p["model"], p.get("prior_w")) == (model, prior_w)),
                      key=lambda p: p["w"])
        axes[0].plot([p["fd"] for p in rows], [p["all_correct"] for p in rows], marker, label=name)
        axes[1].plot([p["diversity"] for p in rows], [p["all_correct"] for p in rows], marker, label=name)
        for p in rows:
            axes[0].annotate(f"w={p['w']:g}", (p["fd"], p["all_correct"]), fontsize=7)
    for (name, row), marker in zip(peer, ("^", "v"), strict=False):  # on the peer's prompts: FD only compares
        axes[0].plot([row["fd"]], [row["all_correct"]], marker, label=name)
    axes[0].set(xlabel="FD (lower = better)", ylabel="all attributes correct", title="fidelity vs caption")
    axes[1].set(xlabel="diversity per caption (higher = more)", ylabel="all attributes correct",
                title="diversity vs caption")
    rows = sorted(variations, key=lambda v: v["eta"])
    axes[2].plot([v["eta"] for v in rows], [v["pixel_distance"] for v in rows], "o-", label="pixel distance")
    axes[2].plot([v["eta"] for v in rows], [v["digit"] for v in rows], "s-", label="digit kept")
    axes[2].plot([v["eta"] for v in rows], [v["colour"] for v in rows], "^-", label="colour kept")
    axes[2].set(xlabel="DDIM eta", title="variations")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "unclip"))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--clip-minutes", type=float, default=4.0)
    ap.add_argument("--prior-minutes", type=float, default=4.0)
    ap.add_argument("--decoder-minutes", type=float, default=8.0)
    ap.add_argument("--glide-base", default=str(ROOT / "runs" / "scenes" / "base16"),
                    help="the GLIDE issue's base run (8 CPU minutes), resumed to the unCLIP total")
    ap.add_argument("--glide-base-minutes", type=float, default=8.0)
    ap.add_argument("--peer", default=str(ROOT / "runs" / "dalle2-scenes" / "result.json"),
                    help="benchmarks/dalle2_scenes.py's result.json (skipped when absent)")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--captions", type=int, default=100)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=150)
    ap.add_argument("--w", type=float, nargs="*", default=[2.0], help="guidance w of GLIDE and of the decoder")
    ap.add_argument("--prior-w", type=float, default=1.0)
    ap.add_argument("--variations", type=int, default=25)
    ap.add_argument("--etas", type=float, nargs="*", default=[0.0, 0.5, 1.0])
    args = ap.parse_args()
    from difflab.build import load_run
    from difflab.data.scenes import reference_captions, reference_scenes
    from difflab.eval.scenes import evaluate_scenes
    from difflab.generate import draw_samples
    from difflab.images import save_grid, to_uint8
    from difflab.pipelines.cascade import StageConfig
    from difflab.pipelines.unclip import UnCLIP, UnCLIPConfig

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    clip = work / "clip16"
    wait((clip, train("scenes-unclip-clip16.yaml", clip, args.clip_minutes)))
    total = args.clip_minutes + args.prior_minutes + args.decoder_minutes
    glide = work / "glide16"
    if not glide.exists():
        shutil.copytree(args.glide_base, glide)
    sets = (f"clip.run={clip}",)
    wait((work / "prior16", train("scenes-unclip-prior16.yaml", work / "prior16", args.prior_minutes, sets)),
         (work / "decoder16", train("scenes-unclip-decoder16.yaml", work / "decoder16", args.decoder_minutes, sets)))
    wait((glide, train("", glide, total - args.glide_base_minutes, resume=True)))
    train_seconds = time.perf_counter() - t0

    prompts = reference_captions()[: args.captions]
    captions = [prompts[i % len(prompts)] for i in range(args.n)]
    path = out / "unclip.json"
    result = json.loads(path.read_text()) if path.is_file() else {"points": [], "prior": [], "variations": []}
    spec = UnCLIPConfig(prior=StageConfig(run=str(work / "prior16"), guidance=args.prior_w),
                        decoder=StageConfig(run=str(work / "decoder16"), sampler="ancestral", steps=args.steps),
                        n=args.n, batch=args.batch, seed=0)
    pipe = UnCLIP(spec)
    gcfg, _, gden = load_run(glide)
    for w in args.w:
        for model in ("unclip", "glide"):
            prior_w = args.prior_w if model == "unclip" else None
            if any(p["model"] == model and p["w"] == w and p.get("prior_w") == prior_w for p in result["points"]):
                continue
            t1 = time.perf_counter()
            if model == "unclip":
                e_i = pipe.prior_embeddings(captions, seed=0)
                x = pipe.decode(e_i, captions, seed=0, guidance=w)
                u8 = to_uint8(x, pipe.decoder.cfg.data)
            else:
                x, _ = draw_samples(gden, gcfg, n=args.n, sampler="ancestral", steps=args.steps, seed=0,
                                    batch=args.batch, prompts=prompts, guidance_scale=w)
                u8 = to_uint8(x, gcfg.data)
            m = evaluate_scenes(u8, captions)
            point = {"model": model, "w": w, "prior_w": prior_w, **{k: m[k] for k in KEYS},
                     "seconds": round(time.perf_counter() - t1, 1)}
            rows = [i + len(prompts) * r for r in range(3) for i in range(10) if i + len(prompts) * r < len(u8)]
            tag = f"{model}_{w:g}" if prior_w in (None, 1.0) else f"{model}_{w:g}_prior{prior_w:g}"
            np.save(work / f"first10_{tag}.npy", u8[rows])  # prompts 0..9, their first 3 samples
            result["points"].append(point)
            print(point, flush=True)
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1) + "\n")
    if not result["prior"]:
        result["prior"] = [prior_metrics(pipe, prompts, k, w) for w in dict.fromkeys((0.0, args.prior_w))
                           for k in (1, 2)]
        print(result["prior"], flush=True)
    if not result["variations"]:
        ref = reference_scenes(16)
        src = torch.from_numpy(ref.images[16][: args.variations]).permute(0, 3, 1, 2).float() / 127.5 - 1
        vcaps = ref.captions[: args.variations]
        rows = []
        for eta in args.etas:
            xs = [pipe.vary(src[i : i + 1], 4, eta=eta, seed=i) for i in range(len(src))]
            x = torch.cat(xs)
            u8 = to_uint8(x, pipe.decoder.cfg.data)
            m = evaluate_scenes(u8, [c for c in vcaps for _ in range(4)])
            dist = float((x.clamp(-1, 1) - src.repeat_interleave(4, 0)).abs().mean())
            rows.append({"eta": eta, "pixel_distance": round(dist, 4), "digit": m["digit"], "colour": m["colour"],
                         "all_correct": m["all_correct"]})
            np.save(work / f"variations_eta{eta:g}.npy", u8[: 4 * 6])
            print(rows[-1], flush=True)
        result["variations"] = rows
    peer = json.loads(Path(args.peer).read_text()) if Path(args.peer).is_file() else None
    result.update({"args": vars(args), "train_seconds": round(train_seconds), "cpu_minutes": {
        "clip": args.clip_minutes, "prior": args.prior_minutes, "decoder": args.decoder_minutes, "glide": total},
        "clip_accuracy": json.loads((clip / "clip_accuracy.json").read_text()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": datetime.date.today().isoformat(), "command": "python benchmarks/unclip.py " + " ".join(sys.argv[1:])})
    if peer is not None and "peer_protocol" not in result:
        result["peer_protocol"] = peer_protocol(pipe, peer["args"]["n"], peer["args"]["cond_scale"] - 1)
        print(result["peer_protocol"], flush=True)
    if peer is not None:
        ours, theirs = result["peer_protocol"], peer
        result["peer"] = {"fd_ratio": round(ours["row"]["fd"] / theirs["row"]["fd"], 3),
                          **{k: [ours["row"][k], theirs["row"][k]] for k in
                             ("fd", "digit", "colour", "position", "all_correct", "colour_swaps", "diversity")},
                          **{f"prior_{k}": [ours["prior"][k], theirs["prior"][k]] for k in
                             ("best_of_2", "best_of_1", "text_embedding")},
                          "peer_result": peer}
    path.write_text(json.dumps(result, indent=1) + "\n")
    pts = sorted(result["points"], key=lambda p: (p["model"], str(p.get("prior_w")), p["w"]))
    lines = ["| model | prior w | w | digit | colour | position | all correct | binding | FD | diversity |",
             "|" + "---|" * 10]
    for p in pts:
        b = "-" if p["binding"] is None else f"{p['binding']:.3f}"
        pw = "-" if p["model"] == "glide" else f"{p.get('prior_w', 1.0):g}"
        lines.append(f"| {p['model']} | {pw} | {p['w']:g} | {p['digit']:.3f} | {p['colour']:.3f} | "
                     f"{p['position']:.3f} | {p['all_correct']:.3f} | {b} | {p['fd']:.1f} | {p['diversity']:.3f} |")
    (out / "unclip-table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    side = [] if peer is None else [("DALLE2-pytorch (peer's prompts)", peer["row"]),
                                    ("unCLIP, prior w=0, w=2 (peer's prompts)", result["peer_protocol"]["row"])]
    _plot(result["points"], result["variations"], side, out / "unclip-tradeoff.png")
    grids = [np.load(f) for f in sorted(work.glob("first10_*.npy"))]
    if grids:
        save_grid(np.concatenate(grids), out / "unclip-samples.png", nrow=10, scale=4)
    var = [np.load(work / f"variations_eta{eta:g}.npy") for eta in args.etas if
           (work / f"variations_eta{eta:g}.npy").is_file()]
    if var:
        save_grid(np.concatenate(var), out / "unclip-variations.png", nrow=8, scale=4)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
