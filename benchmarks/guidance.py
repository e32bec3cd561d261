"""Guidance sweeps in miniature on MNIST-5k (PAPERS.md Sec. 8, item 4): classifier-free guidance (CFG
eq. 6) over w and classifier guidance (ADM Alg. 2, DDIM) over s, scored in difflab's MNIST features.

(a) CFG: ``configs/mnist-cfg.yaml`` (class-conditional, p_uncond = 0.2) trained for ``--max-minutes``
    by ``difflab train`` (skipped when the run folder already has a checkpoint).
(b) Classifier guidance: the unconditional model is the null-label half of the same network
    (eps(x_t, null), which CFG trains jointly; CFG's own eps_u) unless ``--uncond-run`` names a separately
    trained unconditional run of the same schedule and size; the noisy classifier is
    ``configs/mnist-classifier.yaml`` trained for ``--clf-minutes`` by ``difflab train``.

Every point draws ``--n`` samples with labels cycling 0..9 from the same seeds (the same x_T at every
scale), with ``--sampler`` at ``--steps`` steps, and scores conditional accuracy (difflab's MNIST
classifier), FD, precision and recall (k = 3) against the 1,000 mnist5k-test images; the FD floor of
``--n`` real train images is measured at the same n. Resumable: points already in the JSON are skipped.
Writes ``docs/results/guidance.{json,md}``, ``guidance_cfg.png``, ``guidance_cg.png`` (metrics vs
scale) and ``guidance_samples.png`` (one digit per class per scale).

    nice -n 5 python benchmarks/guidance.py --max-minutes 20 --clf-minutes 8
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"
METRICS = ("accuracy", "fd", "precision", "recall")
ALGORITHM = {"ddim": " (eta 0; classifier guidance by ADM Alg. 2)", "ancestral": " (classifier guidance by ADM Alg. 1)"}


class NullLabelNet(nn.Module):
    """A class-conditional CFG network called with the null label only: the unconditional model eps(x_t, null)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.null = net.config.num_classes
        self.config = dataclasses.replace(net.config, num_classes=None, class_null=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        return self.net(x, t, y=torch.full((x.shape[0],), self.null, dtype=torch.long, device=x.device))


def _update(path: Path, change) -> dict:
    """Read the JSON at ``path``, apply ``change(doc)``, write it back atomically; under a file lock, so
    that sweeps running in parallel processes (e.g. ``--s ''`` and ``--w ''``) merge their points."""
    import fcntl
    import hashlib
    import tempfile

    name = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    with open(Path(tempfile.gettempdir()) / f"difflab-guidance-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = json.loads(path.read_text()) if path.is_file() else {}
        change(doc)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(path)
    return doc


def _set_point(kind: str, key: str, result: dict):
    """The change that files one point's result under ``results[kind][key]``."""
    return lambda doc: doc["results"][kind].__setitem__(key, result)


def _train_if_needed(config: str, run: Path, minutes: float, done: bool) -> None:
    """``difflab train CONFIG --out RUN --max-minutes M`` unless ``done`` (niced: the CPU is shared)."""
    if done:
        return
    cmd = ["nice", "-n", "5", sys.executable, "-m", "difflab", "train", config, "--out", str(run),
           "--max-minutes", str(minutes), "--quiet"]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _cond_config(cfg):
    """The run config of the null-label half: the same network settings without classes."""
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, num_classes=None, class_null=False),
        data=dataclasses.replace(cfg.data, class_cond=False),
        diffusion=dataclasses.replace(cfg.diffusion, p_uncond=0.0),
        sample=dataclasses.replace(cfg.sample, guidance_scale=0.0))


def _rel(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def _run_summary(run: Path) -> dict:
    """Steps, loss and parameters of a diffusion run (``difflab info``)."""
    from difflab.runinfo import run_info

    info = run_info(run)
    return {"run": _rel(run), "steps": info["steps_done"], "last_loss": info["last_loss"],
            "parameters": info["parameters"], "img_per_s": info["img_per_s"]}


def _floor(n: int, draws: int = 3) -> dict:
    """FD / precision / recall of n random real train images against mnist5k-test (mean, std over draws)."""
    from difflab.data import load_mnist5k
    from difflab.eval.report import evaluate

    x, y = load_mnist5k("train")
    rows = [evaluate(x[idx], y[idx]) for idx in
            (np.random.default_rng(seed).choice(len(y), n, replace=False) for seed in range(draws))]
    return {k: float(np.mean([r[k] for r in rows])) for k in (*METRICS, "is")} | {
        f"{k}_std": float(np.std([r[k] for r in rows])) for k in METRICS} | {"n": n, "draws": draws}


def _point(kind: str, scale: float, models: dict, args) -> tuple[dict, np.ndarray]:
    """Draw and score one point of a sweep; returns the metrics and the first 10 images (labels 0..9)."""
    from difflab.eval.report import evaluate
    from difflab.generate import draw_samples
    from difflab.images import to_uint8

    t0 = time.time()
    common = dict(n=args.n, sampler=args.sampler, steps=args.steps, label="all", seed=0, batch=args.batch,
                  distributed=False)
    if kind == "cfg":
        x, labels = draw_samples(models["cfg_denoiser"], models["cfg"], guidance_scale=scale, **common)
    else:
        x, labels = draw_samples(models["uncond_denoiser"], models["uncond_cfg"], classifier=models["classifier"],
                                 classifier_scale=scale, **common)
    images = to_uint8(x, models["cfg"].data)
    seconds = time.time() - t0
    result = evaluate(images, labels.numpy())
    result = {k: result[k] for k in (*METRICS, "is", "n")} | {"scale": scale, "sample_seconds": round(seconds, 1)}
    return result, images[:10]


def _load_models(args) -> dict:
    from difflab.build import build_denoiser, load_run, load_run_config, resolve_ema
    from difflab.train.classifier import load_classifier

    cfg, net, denoiser = load_run(args.cfg_run, ema=resolve_ema(load_run_config(args.cfg_run), None))
    models = {"cfg": cfg, "cfg_denoiser": denoiser, "classifier": load_classifier(args.clf_run)}
    if args.uncond_run is not None:
        ucfg, _, udenoiser = load_run(args.uncond_run, ema=resolve_ema(load_run_config(args.uncond_run), None))
        models.update(uncond_cfg=ucfg, uncond_denoiser=udenoiser)
    else:
        models.update(uncond_cfg=_cond_config(cfg), uncond_denoiser=build_denoiser(cfg, NullLabelNet(net)))
    return models


def _plot(results: dict, floor: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for kind, symbol, title in (("cfg", "w", "classifier-free guidance"), ("cg", "s", "classifier guidance")):
        rows = sorted(results[kind].values(), key=lambda r: r["scale"])
        if not rows:
            continue
        fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
        for ax, key in zip(axes, METRICS, strict=True):
            ax.plot([r["scale"] for r in rows], [r[key] for r in rows], "o-", label="samples")
            ax.axhline(floor[key], color="grey", ls="--", lw=1, label=f"real train, n={floor['n']}")
            ax.set_xlabel(f"{symbol}")
            ax.set_title(key + (" (log)" if key == "fd" else ""))
            if key == "fd":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"MNIST-5k, {title}: {rows[0]['n']} samples per point vs mnist5k-test")
        fig.tight_layout()
        fig.savefig(out / f"guidance_{kind}.png", dpi=90)
        plt.close(fig)


def _sample_figure(results: dict, grids: dict, out: Path) -> None:
    """One row of 10 digits (labels 0..9) per point, CFG left, CG right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [k for k in ("cfg", "cg") if any(f"{k}/{s}" in grids for s in results[k])]
    if not cols:
        return
    nrows = max(len(results[k]) for k in cols)
    fig, axes = plt.subplots(nrows, len(cols), figsize=(5 * len(cols), 0.6 * nrows + 0.6), squeeze=False)
    for j, kind in enumerate(cols):
        symbol = "w" if kind == "cfg" else "s"
        for i, key in enumerate(sorted(results[kind], key=float)):
            ax = axes[i, j]
            ax.axis("off")
            img = grids.get(f"{kind}/{key}")
            if img is not None:
                ax.imshow(np.concatenate(list(img[..., 0]), axis=1), cmap="gray", vmin=0, vmax=255)
                ax.set_title(f"{symbol} = {key}", fontsize=8, loc="left")
        for i in range(len(results[kind]), nrows):
            axes[i, j].axis("off")
    fig.tight_layout()
    fig.savefig(out / "guidance_samples.png", dpi=90)
    plt.close(fig)


def _fmt(x, std=None) -> str:
    return "-" if x is None else (f"{x:.3f}" if std is None else f"{x:.3f} ± {std:.3f}")


def _markdown(doc: dict, floor_link: str = "fd_floor.md") -> str:
    f = doc["fd_floor"]
    lines = ["# Guidance sweeps on MNIST-5k (miniature of ADM Fig./Tab. and CFG Tab. 1)", "",
             f"Samples: {doc['n']} per point, labels cycling 0..9, `{doc['sampler']}` with {doc['steps']} steps"
             f"{ALGORITHM.get(doc['sampler'], '')}"
             f", the same seeds at every scale; metrics in difflab's MNIST-classifier features against "
             f"the 1,000 mnist5k-test images (k = 3). FD depends on n: the floor below is measured at the same n.", "",
             f"**FD floor** ({f['n']} random real train images vs test, {f['draws']} draws): "
             f"FD {_fmt(f['fd'], f['fd_std'])}, "
             f"precision {_fmt(f['precision'], f['precision_std'])}, recall {_fmt(f['recall'], f['recall_std'])}, "
             f"accuracy {_fmt(f['accuracy'])} (the 1,000-sample floor is in [fd_floor.md]({floor_link})).", ""]
    for kind, title, symbol in (("cfg", "Classifier-free guidance (CFG eq. 6: (1+w) eps(x,y) - w eps(x,null))", "w"),
                                ("cg", "Classifier guidance (ADM: Alg. 1 mu + s Sigma g for ancestral, "
                                       "Alg. 2 eps - sqrt(1-abar) s g otherwise)", "s")):
        lines += [f"## {title}", "", f"| {symbol} | accuracy | FD | precision | recall | classifier IS | sampling s |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(doc["results"][kind].values(), key=lambda r: r["scale"]):
            lines.append(f"| {r['scale']:g} | {_fmt(r['accuracy'])} | {_fmt(r['fd'])} | {_fmt(r['precision'])} | "
                         f"{_fmt(r['recall'])} | {_fmt(r['is'])} | {r['sample_seconds']:.0f} |")
        lines += ["", f"![{kind}](guidance_{kind}.png)", ""]
    lines += ["![samples](guidance_samples.png)", "", "## Models", "",
              "Trained with `OMP_NUM_THREADS=1 nice -n 5 difflab train configs/mnist-cfg.yaml --out runs/mnist-cfg "
              f"--max-minutes {doc['models']['cfg']['max_minutes']:g}` and `OMP_NUM_THREADS=1 nice -n 5 difflab train "
              "configs/mnist-classifier.yaml --out runs/mnist-classifier --max-minutes "
              f"{doc['models']['classifier']['train_seconds'] / 60:.0f}` (what the script runs when a run is missing), "
              "wall-clock minutes on 2 cores shared with other jobs.", ""]
    for name, info in doc["models"].items():
        lines.append(f"- **{name}**: `{json.dumps(info)}`")
    commands = "; ".join(f"`{c}`" for c in doc["commands"])
    lines += ["", f"Commands: {commands}; {doc['machine']}; torch {doc['versions']['torch']}, "
              f"python {doc['versions']['python']}; {doc['date']}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cfg-run", type=Path, default=ROOT / "runs" / "mnist-cfg")
    p.add_argument("--clf-run", type=Path, default=ROOT / "runs" / "mnist-classifier")
    p.add_argument("--uncond-run", type=Path, default=None,
                   help="a separate unconditional run (default: the CFG run's null-label half)")
    p.add_argument("--max-minutes", type=float, default=20.0, help="CPU budget of the CFG model (if trained here)")
    p.add_argument("--clf-minutes", type=float, default=8.0, help="CPU budget of the classifier (if trained here)")
    p.add_argument("--w", default="0,0.5,1,2,4", help="CFG weights")
    p.add_argument("--s", default="0,1,2,4,8", help="classifier scales")
    p.add_argument("--n", type=int, default=200, help="samples per point")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--floor-draws", type=int, default=3, help="draws of real train images for the FD floor")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    from difflab.train.checkpoint import latest_checkpoint
    from difflab.train.classifier import CLASSIFIER_FILE

    _train_if_needed("configs/mnist-cfg.yaml", args.cfg_run, args.max_minutes,
                     args.cfg_run.is_dir() and latest_checkpoint(args.cfg_run) is not None)
    _train_if_needed("configs/mnist-classifier.yaml", args.clf_run, args.clf_minutes,
                     (args.clf_run / CLASSIFIER_FILE).is_file())

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "guidance.json"
    setup = {"n": args.n, "sampler": args.sampler, "steps": args.steps}

    def start(doc: dict) -> None:
        if any(doc.get(k) != v for k, v in setup.items()):
            doc.clear()  # another setup: start over
        doc.update(setup)
        doc.setdefault("results", {"cfg": {}, "cg": {}})

    doc = _update(path, start)
    grids_dir = args.cfg_run / "guidance_grids" / f"{args.sampler}{args.steps}_n{args.n}"
    grids_dir.mkdir(parents=True, exist_ok=True)
    models = _load_models(args)
    clf_acc = json.loads((args.clf_run / "accuracy_by_noise.json").read_text())
    summary = {
        "cfg": _run_summary(args.cfg_run) | {"config": "configs/mnist-cfg.yaml", "max_minutes": args.max_minutes},
        "unconditional": ({"null-label half of": "cfg"} if args.uncond_run is None else _run_summary(args.uncond_run)),
        "classifier": {"run": _rel(args.clf_run),
                       "config": "configs/mnist-classifier.yaml", "steps": clf_acc["steps"],
                       "train_seconds": clf_acc["train_seconds"],
                       "test_accuracy_by_t_band": [round(a, 3) for a in clf_acc["accuracy"]]},
    }
    doc = _update(path, lambda d: d.__setitem__("models", summary))
    if "fd_floor" not in doc:
        floor = _floor(args.n, args.floor_draws)
        doc = _update(path, lambda d: d.setdefault("fd_floor", floor))
    for kind, scales in (("cfg", args.w), ("cg", args.s)):
        for scale in (float(s) for s in scales.split(",") if s.strip()):
            key = f"{scale:g}"
            if key in doc["results"][kind]:
                continue
            result, first = _point(kind, scale, models, args)
            np.save(grids_dir / f"{kind}_{key}.npy", first)
            print(f"{kind} {key}: " + ", ".join(f"{k} {result[k]:.3f}" for k in (*METRICS, "is")), flush=True)
            doc = _update(path, _set_point(kind, key, result))
    command = "nice -n 5 python benchmarks/guidance.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    def finish(d: dict) -> None:
        d["commands"] = list(dict.fromkeys([*d.get("commands", []), command]))
        d.update(machine=f"{platform.machine()}, {torch.get_num_threads()} thread(s) per process, shared CPU",
                 versions={"python": sys.version.split()[0], "torch": torch.__version__},
                 date=datetime.date.today().isoformat())

    doc = _update(path, finish)
    grids = {f"{p.stem.split('_')[0]}/{p.stem.split('_', 1)[1]}": np.load(p) for p in grids_dir.glob("*.npy")}
    _plot(doc["results"], doc["fd_floor"], args.out)
    _sample_figure(doc["results"], grids, args.out)
    text = _markdown(doc, os.path.relpath(OUT / "fd_floor.md", args.out))
    (args.out / "guidance.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
