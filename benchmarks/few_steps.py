"""Few-step sampling quality of a trained run: FD per sampler and number of network evaluations (NFE).

For a run folder (``difflab train``), draws ``--n`` samples with every sampler at every step count,
all from the same noise x_T (common random numbers, so differences are the samplers'), and scores
them with difflab's MNIST-classifier FD against the MNIST-5k test split (``difflab.eval``). The
reference row is ancestral sampling over all T steps (the DDPM sampler, "the 1000-step FD").
The BENCHMARKS.md bar: DPM-Solver++ at 20 NFE within 5% of the reference FD, at 10 within 15%,
and never worse than diffusers' ``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``,
order 2, its default "linspace" timesteps) at the same NFE on the same model - that row is added
when diffusers is importable (the benchmark environment, see benchmarks/throughput.py).

    python benchmarks/few_steps.py --run runs/mnist-default
    python benchmarks/few_steps.py --run RUN --samplers dpmpp-2m,ddim,heun --nfe 10,20 --n 1000

Writes docs/results/few_steps.json and few_steps.md (``--out`` to change, ``--out ''`` for none).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from difflab.build import load_run, load_run_config, resolve_ema
from difflab.images import to_uint8
from difflab.samplers import SAMPLERS

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"


def steps_for_nfe(name: str, nfe: int) -> int:
    """Sampler steps that cost ``nfe`` network evaluations (Heun: 2K - 1 evaluations for K steps)."""
    return (nfe + 1) // 2 if name == "heun" else nfe


def diffusers_dpmpp_2m(denoiser, x_T: torch.Tensor, *, steps: int, model_kwargs=None, clip_denoised=True, **_):
    """diffusers' DPM-Solver++(2M) loop around a difflab denoiser's network (eps or v; learned variance split off)."""
    from diffusers import DPMSolverMultistepScheduler

    process, param = denoiser.process, denoiser.parameterization
    if param.mean_type not in ("eps", "v"):
        raise ValueError("diffusers' solver takes eps or v predictions")
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=process.num_timesteps, trained_betas=process.betas.numpy(),
        algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon" if param.mean_type == "eps"
        else "v_prediction", thresholding=False, lower_order_final=True, final_sigmas_type="zero",
    )
    sched.set_timesteps(steps, device=x_T.device)
    x = x_T
    c = x.shape[1]
    with torch.inference_mode():
        for t in sched.timesteps:
            tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
            out = denoiser.net(x, process.original_t(tt), **(model_kwargs or {})).to(x.dtype)[:, :c]
            x = sched.step(out, t, x).prev_sample
    x = x.clone()
    return x.clamp(-1, 1) if clip_denoised else x


def draw(fn, denoiser, cfg, n: int, batch: int, seed: int, device, labels, **kwargs) -> torch.Tensor:
    """n samples [n, C, S, S]; batch k starts from noise seeded (seed, k), the same for every sampler."""
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    out = []
    for k, lo in enumerate(range(0, n, batch)):
        hi = min(n, lo + batch)
        g = torch.Generator(device).manual_seed(seed * 100_003 + k)
        x_T = torch.randn((hi - lo, *shape), generator=g, device=device)
        mk = {"y": labels[lo:hi].to(device)} if labels is not None else None
        out.append(fn(denoiser, x_T, generator=g, model_kwargs=mk, **kwargs).float().cpu())
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, metavar="RUN", help="run folder written by difflab train")
    p.add_argument("--ema", default=None, help="EMA rate or 'model' (default: the run's sample EMA)")
    p.add_argument("--samplers", default="dpmpp-2m,ddim,euler,heun,diffusers-dpmpp-2m",
                   help=f"comma-separated among {', '.join(SAMPLERS)}, diffusers-dpmpp-2m")
    p.add_argument("--nfe", default="10,20", help="network evaluations per sample, comma-separated")
    p.add_argument("--reference", default="ancestral", help="sampler of the reference row, over all T steps")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(OUT), help="folder for few_steps.json / .md ('' = do not write)")
    args = p.parse_args(argv)

    from difflab.eval.report import evaluate

    names = [s.strip() for s in args.samplers.split(",") if s.strip()]
    samplers = {}
    for name in names:
        if name == "diffusers-dpmpp-2m":
            try:
                import diffusers  # noqa: F401
            except ImportError:
                print("diffusers is not installed here: skipping diffusers-dpmpp-2m", file=sys.stderr)
                continue
            samplers[name] = diffusers_dpmpp_2m
        else:
            samplers[name] = SAMPLERS[name]  # ValueError listing the valid names
    nfes = [int(v) for v in args.nfe.split(",")]
    if any(v < 1 for v in nfes) or args.n < 2 or args.batch < 1:
        p.error("--nfe values must be >= 1, --n >= 2 and --batch >= 1")

    cfg = load_run_config(args.run)
    cfg, _, denoiser = load_run(args.run, ema=resolve_ema(cfg, args.ema), device=args.device)
    num_classes = getattr(cfg.model, "num_classes", None)
    labels = torch.arange(args.n) % num_classes if num_classes else None
    clip = cfg.sample.clip_denoised

    def score(fn, **kwargs) -> dict:
        t0 = time.time()
        x = draw(fn, denoiser, cfg, args.n, args.batch, args.seed, args.device, labels, clip_denoised=clip, **kwargs)
        images = to_uint8(x, cfg.data)
        metrics = evaluate(images, labels.numpy() if labels is not None else None)
        return {**{k: metrics[k] for k in ("fd", "precision", "recall") if k in metrics}, "seconds": time.time() - t0}

    T = denoiser.num_timesteps
    rows = [{"sampler": args.reference, "nfe": T, "steps": T, **score(SAMPLERS[args.reference], steps=None)}]
    ref_fd = rows[0]["fd"]
    print(f"{args.reference} {T} NFE: FD {ref_fd:.3f}")
    done = set()
    for nfe in nfes:
        for name, fn in samplers.items():
            steps = steps_for_nfe(name, nfe)
            if (name, steps) in done:  # Heun reaches odd NFE only
                continue
            done.add((name, steps))
            row = {"sampler": name, "nfe": 2 * steps - 1 if name == "heun" else steps, "steps": steps,
                   **score(fn, steps=steps)}
            row["fd_vs_reference"] = row["fd"] / ref_fd
            rows.append(row)
            print(f"{name} {row['nfe']} NFE: FD {row['fd']:.3f} ({100 * (row['fd_vs_reference'] - 1):+.1f}%)")

    result = {
        "what": "FD (difflab MNIST-classifier features, vs MNIST-5k test) per sampler and NFE, same x_T",
        "run": str(args.run), "n": args.n, "rows": rows, "reference_fd": ref_fd,
        "command": " ".join(["python", "benchmarks/few_steps.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, {args.device}",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__},
        "date": datetime.date.today().isoformat(),
        "notes": "int steps for dpmpp-2m / euler / heun are uniform in log-SNR; ddim / ancestral use evenly "
                 "strided steps; diffusers-dpmpp-2m uses diffusers' default 'linspace' timesteps",
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "few_steps.json").write_text(json.dumps(result, indent=1) + "\n")
        lines = ["# Few-step sampling: FD per sampler and NFE", "",
                 f"Command: `{result['command']}`  ", f"Run: `{args.run}`; n = {args.n}; {result['date']}; "
                 f"{result['machine']}", "", "| sampler | NFE | FD | vs reference |", "|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['sampler']} | {r['nfe']} | {r['fd']:.3f} | "
                         f"{100 * (r['fd'] / ref_fd - 1):+.1f}% |")
        lines += ["", result["notes"], ""]
        (out / "few_steps.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
