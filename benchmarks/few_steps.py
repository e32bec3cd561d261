"""Few-step sampling quality of a trained run: FD per sampler and number of network evaluations (NFE).

For a run folder (``difflab train``), draws ``--n`` samples with every sampler at every step count,
all from the same noise x_T (common random numbers, so differences are the samplers'), and scores
them with difflab's MNIST-classifier FD against the MNIST-5k test split (``difflab.eval``). The
reference row is ancestral sampling over all T steps (the DDPM sampler, "the 1000-step FD").
The BENCHMARKS.md bar: DPM-Solver++ at 20 NFE within 5% of the reference FD, at 10 within 15%,
and never worse than diffusers' ``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``,
order 2, its default "linspace" timesteps) at the same NFE on the same model - that row is added
when diffusers is importable (the benchmark environment, see benchmarks/throughput.py).

Cells are cached and can be shared between processes (benchmarks/cells.py); the reference cell is the
same as sampling_steps.py's learned-variance K=1000 cell, so it is computed once. The diffusers row
needs the benchmark environment, so run the cells there:

    OMP_NUM_THREADS=1 /work/benchenv/bin/python benchmarks/few_steps.py --run runs/ablation/cosine-hybrid
    python benchmarks/few_steps.py --run RUN --samplers dpmpp-2m,ddim,heun --nfe 10,20 --n 1000

Writes docs/results/few_steps.json and few_steps-table.md (``--out`` to change, ``--out ''`` for none).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from cells import add_cell_arguments, run_cells, sample_cell, write_results
from difflab.build import load_run_config
from difflab.samplers import SAMPLERS
from difflab.samplers.common import step_noise

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"


def with_spacing(fn, spacing: str):
    """``fn`` with its int ``steps`` K turned into the solver spacing ``f"{spacing}{K}"`` (e.g. "time20")."""

    def run(denoiser, x_T, *, steps: int, **kwargs):
        return fn(denoiser, x_T, steps=f"{spacing}{steps}", **kwargs)

    return run


def diffusers_dpmpp_2m(denoiser, x_T: torch.Tensor, *, steps: int, model_kwargs=None, clip_denoised=True,
                       generator=None, sde: bool = False, **_):
    """diffusers' DPM-Solver++(2M) loop around a difflab denoiser's network (eps or v; learned variance split off).

    ``sde=True`` runs its ``algorithm_type="sde-dpmsolver++"`` with the step noise drawn exactly as difflab's
    ``dpmpp-2m-sde`` draws it from ``generator`` (none at the final jump to sigma = 0), so that the two
    implementations can be compared sample for sample.
    """
    from diffusers import DPMSolverMultistepScheduler

    process, param = denoiser.process, denoiser.parameterization
    if param.mean_type not in ("eps", "v"):
        raise ValueError("diffusers' solver takes eps or v predictions")
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=process.num_timesteps, trained_betas=process.betas.numpy(),
        algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++", solver_order=2,
        prediction_type="epsilon" if param.mean_type == "eps" else "v_prediction", thresholding=False,
        lower_order_final=True, final_sigmas_type="zero",
    )
    sched.set_timesteps(steps, device=x_T.device)
    x = x_T
    c = x.shape[1]
    last = len(sched.timesteps) - 1
    with torch.inference_mode():
        for i, t in enumerate(sched.timesteps):
            tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
            out = denoiser.net(x, denoiser.network_t(tt), **(model_kwargs or {})).to(x.dtype)[:, :c]
            noise = None
            if sde:
                noise = torch.zeros_like(x) if i == last else step_noise(x, generator)
            x = sched.step(out, t, x, variance_noise=noise).prev_sample
    x = x.clone()
    return x.clamp(-1, 1) if clip_denoised else x


SPACINGS = ("logsnr", "time", "karras")


def parse_row(name: str) -> tuple[str, str | None, bool | None]:
    """A row name -> (sampler, spacing suffix or None, clip_denoised or None = the sampler's default).

    "dpmpp-2m-sde-logsnr-clip" -> ("dpmpp-2m-sde", "logsnr", True); "ddim" -> ("ddim", None, None).
    """
    clip = None
    for suffix, value in (("-noclip", False), ("-clip", True)):
        if name.endswith(suffix):
            name, clip = name.removesuffix(suffix), value
    head, _, tail = name.rpartition("-")
    if head and tail in SPACINGS:
        return head, tail, clip
    return name, None, clip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/ablation/cosine-hybrid", metavar="RUN",
                   help="run folder written by difflab train")
    p.add_argument("--samplers",
                   default="dpmpp-2m,dpmpp-2m-clip,dpmpp-2m-logsnr,dpmpp-2m-sde,dpmpp-2m-sde-clip,dpmpp-2m-sde-logsnr,"
                   "ddim,ancestral,diffusers-dpmpp-2m,diffusers-dpmpp-2m-sde",
                   help=f"comma-separated among {', '.join(SAMPLERS)}, diffusers-dpmpp-2m, diffusers-dpmpp-2m-sde, "
                   "each optionally with a solver spacing suffix (-logsnr, -time, -karras), e.g. dpmpp-2m-logsnr, "
                   "and/or -clip / -noclip (x0^ clipped to [-1, 1] or not; default: the sampler's own)")
    p.add_argument("--nfe", default="5,10,20,50", help="network evaluations per sample, comma-separated")
    p.add_argument("--reference", default="ancestral", help="sampler of the reference row, over all T steps")
    p.add_argument("--reference-steps", type=int, default=None, metavar="K",
                   help="steps of the reference row (default: all T); e.g. a cheaper reference for spacing checks")
    p.add_argument("--ode-limit", type=int, default=200, metavar="K",
                   help="also DDIM (eta 0) with K steps: the probability-flow ODE solved finely, the limit the ODE "
                   "solvers converge to (0 = no such row)")
    p.add_argument("--n", type=int, default=250)
    p.add_argument("--batch", type=int, default=125)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT), help="folder for few_steps.json / .md ('' = do not write)")
    add_cell_arguments(p)
    args = p.parse_args(argv)

    names = [s.strip() for s in args.samplers.split(",") if s.strip()]
    fns, clips = {}, {}
    for name in names:
        base, spacing, clips[name] = parse_row(name)
        if base.startswith("diffusers-"):
            if base not in ("diffusers-dpmpp-2m", "diffusers-dpmpp-2m-sde") or spacing:
                p.error(f"unknown row {name!r}; valid diffusers rows: diffusers-dpmpp-2m, diffusers-dpmpp-2m-sde")
            try:
                import diffusers  # noqa: F401
            except ImportError:
                print(f"diffusers is not installed here: skipping {name}", file=sys.stderr)
                continue
            fns[name] = functools.partial(diffusers_dpmpp_2m, sde=base.endswith("-sde"))
        else:
            fn = SAMPLERS[base]  # ValueError listing the valid names
            fns[name] = with_spacing(fn, spacing) if spacing else fn
    nfes = [int(v) for v in args.nfe.split(",")]
    if any(v < 1 for v in nfes) or args.n < 2 or args.batch < 1:
        p.error("--nfe values must be >= 1, --n >= 2 and --batch >= 1")

    T = load_run_config(args.run).diffusion.steps
    common = {"n": args.n, "batch": args.batch, "seed": args.seed}
    K_ref = args.reference_steps or T
    grid = [(args.reference, K_ref, K_ref)] + ([("ddim", args.ode_limit, args.ode_limit)] if args.ode_limit else [])
    for nfe in nfes:
        for name in fns:
            heun = parse_row(name)[0] == "heun"
            steps = (nfe + 1) // 2 if heun else nfe  # Heun: 2K - 1 evaluations for K steps
            row = (name, 2 * steps - 1 if heun else steps, steps)
            if row not in grid:  # Heun reaches odd NFE only
                grid.append(row)
    cells = [sample_cell(args.run, name, steps, fn=fns.get(name), **common,
                         **({} if clips.get(name) is None else {"clip_denoised": clips[name]}))
             for name, _, steps in grid]
    results = run_cells(cells, Path(args.cache or ROOT / "runs" / "cells"))
    if results is None:
        return 0
    ref_fd = results[cells[0].key]["fd"]
    ode_fd = results[cells[1].key]["fd"] if args.ode_limit else None
    rows = []
    for (name, nfe, steps), cell in zip(grid, cells, strict=True):
        r = results[cell.key]
        rows.append({"sampler": name, "nfe": nfe, "steps": steps, **{k: r[k] for k in ("fd", "precision", "recall")},
                     "seconds": r["seconds"], "fd_vs_reference": r["fd"] / ref_fd,
                     "fd_vs_ode_limit": r["fd"] / ode_fd if ode_fd else None})
        print(f"{name} {nfe} NFE: FD {r['fd']:.3f} ({100 * (r['fd'] / ref_fd - 1):+.1f}%)")

    result = {
        "what": "FD (difflab MNIST-classifier features, vs MNIST-5k test) per sampler and NFE, same x_T",
        "run": str(args.run), "n": args.n, "rows": rows, "reference_fd": ref_fd, "ode_limit_fd": ode_fd,
        "command": " ".join(["python", "benchmarks/few_steps.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 thread per process, cpu",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__},
        "date": datetime.date.today().isoformat(),
        "notes": "int steps: dpmpp-2m(-sde) 'timeK' (diffusers' default 'linspace'), no x0 clipping; euler / heun "
                 "uniform in log-SNR; ddim / ancestral evenly strided steps with clipping; diffusers rows: "
                 "DPMSolverMultistepScheduler (dpmsolver++ / sde-dpmsolver++, order 2, linspace, no thresholding)",
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_results(out, "few_steps", result,
                      ["sampler", "NFE", "FD", f"vs {args.reference} {K_ref}", "vs ODE limit", "precision", "recall"],
                      [[r["sampler"], str(r["nfe"]), f"{r['fd']:.3f}", f"{100 * (r['fd'] / ref_fd - 1):+.1f}%",
                        f"{100 * (r['fd_vs_ode_limit'] - 1):+.1f}%" if ode_fd else "-",
                        f"{r['precision']:.3f}", f"{r['recall']:.3f}"] for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
