"""Peer row of "quality per CPU budget": lucidrains' denoising-diffusion-pytorch on MNIST-5k, scored by difflab.

Trains the peer for a fixed wall-clock budget on the MNIST-5k train split (4,000 digits, the
canonical split of :func:`difflab.data.load_mnist5k`), draws samples from its EMA model with its own
``sample()`` and scores them with difflab's metric code (``difflab.eval.report.evaluate`` against
``mnist5k-test``: FD, improved precision / recall (k=3) and the classifier IS, in the features of
difflab's MNIST classifier). The difflab side of the comparison is trained for the same minutes on
the same machine; the target (``/work/shared/BENCHMARKS.md``) is difflab FD <= 0.7x this FD.

The peer as configured (denoising-diffusion-pytorch 2.3.4):

* ``Unet(dim=32, dim_mults=(1, 2, 4), channels=1)``; its other defaults: no self-conditioning, no
  learned variance, sinusoidal time embedding, dropout 0, linear attention in the outer two stages
  and full attention (4 heads x 32) in the innermost stage and the middle, no flash attention.
  28x28 input needs no padding (the Unet downsamples twice: 28 -> 14 -> 7).
* ``GaussianDiffusion(model, image_size=28, timesteps=1000, sampling_timesteps=50,
  objective='pred_noise')``; its other defaults: ``beta_schedule='sigmoid'``, ``ddim_sampling_eta=0``
  (deterministic DDIM, x0 clipped to [-1, 1] at every step), ``auto_normalize=True`` (it takes images
  in [0, 1], maps them to [-1, 1] inside and ``sample()`` returns [0, 1]), ``offset_noise_strength=0``,
  ``min_snr_loss_weight=False`` (so a plain unweighted noise MSE), ``immiscible=False``.
* ``torch.optim.Adam(lr=2e-4)`` with torch's default betas (0.9, 0.999), no gradient clipping;
  batch 64 drawn from a seeded random permutation of the train split per epoch (incomplete last
  batch dropped). Note: lucidrains' own ``Trainer`` (not used here) would use betas (0.9, 0.99),
  clip the gradient norm at 1.0 and update the EMA every 10 steps.
* EMA: ``ema_pytorch.EMA(diffusion, beta=0.995, update_after_step=100, update_every=1)``, updated after
  every optimiser step; ema-pytorch warms its decay up as ``1 - (1 + k)^(-2/3)`` (k = steps past 100),
  capped at 0.995, so in a run of a few hundred steps the effective decay stays below 0.995.
* Training: a plain loop (``loss = diffusion(batch); loss.backward(); opt.step(); opt.zero_grad();
  ema.update()``) with ``torch.set_num_threads(--threads)``; the clock is checked before every step and
  training stops once ``--minutes`` have passed (model construction and data loading are not counted).
* Sampling: ``--n`` samples from the EMA model, in batches of ``--batch``, after ``torch.manual_seed(--seed)``;
  converted to uint8 as ``round(x * 255)``.

Writes ``--npz`` (``arr_0`` uint8 (N, 28, 28, 1), plus scalars ``steps``, ``seconds``, ``params``) and
``--json`` (steps, img/s, params, minutes, threads, FD / precision / recall / IS, versions, date,
command), and prints a one-line summary. The real run (2 CPU cores, one training thread):

    OMP_NUM_THREADS=1 /work/benchenv/bin/python benchmarks/lucidrains_mnist.py --minutes 24 --threads 1

The peer is installed only in the benchmark environment (``pip install denoising-diffusion-pytorch``,
which brings ema-pytorch; or ``pip install -e .[bench]``), never as a runtime dependency of difflab.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from difflab.data import load_mnist5k
from difflab.eval.report import evaluate

TRAIN_BATCH = 64
LR = 2e-4
EMA_DECAY = 0.995
EMA_AFTER = 100


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _no_bar(iterable, *args, **kwargs):
    return iterable


def _import_peer():
    try:
        import denoising_diffusion_pytorch.denoising_diffusion_pytorch as peer
        from ema_pytorch import EMA
    except ImportError as e:
        raise SystemExit(
            f"{e}\nthe peer lives in the benchmark environment only: pip install denoising-diffusion-pytorch "
            "(or run with /work/benchenv/bin/python)"
        ) from e
    # Its sampling loops draw a tqdm bar per sample() call (no switch for it; TQDM_DISABLE is read when
    # tqdm is imported, which torch has already done): silence the bar only, nothing else changes.
    peer.tqdm = _no_bar
    return peer.Unet, peer.GaussianDiffusion, EMA


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--minutes", type=float, default=20.0, help="wall-clock training budget (default 20)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--n", type=int, default=1000, help="samples to draw and score (default 1000)")
    p.add_argument("--batch", type=int, default=250, help="samples per sample() call (default 250)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, batches, noise and sampling (default 0)")
    p.add_argument("--npz", type=Path, default=Path("runs/lucidrains-mnist/samples.npz"),
                   help="samples out (default runs/lucidrains-mnist/samples.npz)")
    p.add_argument("--json", type=Path, default=Path("runs/lucidrains-mnist/result.json"),
                   help="result out (default runs/lucidrains-mnist/result.json)")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.threads < 1 or args.n < 2 or args.batch < 1:
        p.error("need --minutes > 0, --threads >= 1, --n >= 2 (FD needs two samples), --batch >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Unet, GaussianDiffusion, EMA = _import_peer()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # Data: the canonical MNIST-5k train split, in [0, 1] (the peer normalises to [-1, 1] itself).
    images, _ = load_mnist5k("train")
    data = torch.from_numpy(images).float().div_(255.0).unsqueeze(1).contiguous()  # (4000, 1, 28, 28)
    n_data = len(data)
    if n_data < TRAIN_BATCH:
        raise SystemExit(f"train split has {n_data} images, fewer than a batch of {TRAIN_BATCH}")
    gen = torch.Generator().manual_seed(args.seed)

    model = Unet(dim=32, dim_mults=(1, 2, 4), channels=1)
    diffusion = GaussianDiffusion(model, image_size=28, timesteps=1000, sampling_timesteps=50,
                                  objective="pred_noise")
    params = sum(p.numel() for p in diffusion.parameters())
    opt = torch.optim.Adam(diffusion.parameters(), lr=LR)
    ema = EMA(diffusion, beta=EMA_DECAY, update_after_step=EMA_AFTER, update_every=1)
    diffusion.train()

    budget = args.minutes * 60.0
    print(f"lucidrains Unet+GaussianDiffusion: {params / 1e6:.3f}M params; training {args.minutes:g} min on "
          f"{args.threads} thread(s), batch {TRAIN_BATCH}, {n_data} train images", flush=True)
    steps, epoch, pos, perm = 0, 0, n_data, None
    losses: list[float] = []
    t0 = time.perf_counter()
    next_report = 60.0
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget:
            break
        if elapsed >= next_report:
            recent = losses[-50:]
            print(f"  {elapsed / 60:5.1f} min  step {steps:6d}  {steps / elapsed:.3f} steps/s  "
                  f"loss(last {len(recent)}) {np.mean(recent):.4f}", flush=True)
            next_report += 60.0
        if pos + TRAIN_BATCH > n_data:  # new epoch: fresh permutation, incomplete tail dropped
            perm = torch.randperm(n_data, generator=gen)
            pos = 0
            epoch += 1
        batch = data[perm[pos : pos + TRAIN_BATCH]]
        pos += TRAIN_BATCH
        loss = diffusion(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update()
        losses.append(loss.item())
        steps += 1
    train_seconds = time.perf_counter() - t0
    if steps == 0:
        raise SystemExit("no training step finished within the budget")

    # Samples from the EMA model with the peer's own sample() (DDIM, 50 steps, eta 0), fixed seed.
    sampler = ema.ema_model.eval()
    torch.manual_seed(args.seed)
    t1 = time.perf_counter()
    chunks = []
    for start in range(0, args.n, args.batch):
        x = sampler.sample(batch_size=min(args.batch, args.n - start))  # (b, 1, 28, 28) in [0, 1]
        chunks.append(x.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
    samples = torch.cat(chunks).numpy()  # (N, 28, 28, 1) uint8
    sample_seconds = time.perf_counter() - t1

    args.npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.npz, arr_0=samples, steps=np.int64(steps), seconds=np.float64(train_seconds),
             params=np.int64(params))

    t2 = time.perf_counter()
    scores = evaluate(samples, ref="mnist5k-test")
    eval_seconds = time.perf_counter() - t2

    result = {
        "what": "lucidrains denoising-diffusion-pytorch on MNIST-5k train, fixed wall-clock budget, "
                "scored by difflab.eval.report.evaluate against mnist5k-test (quality-per-CPU-budget peer row)",
        "peer": {
            "unet": "Unet(dim=32, dim_mults=(1, 2, 4), channels=1)",
            "diffusion": "GaussianDiffusion(image_size=28, timesteps=1000, sampling_timesteps=50, "
                         "objective='pred_noise'); defaults: beta_schedule='sigmoid', ddim_sampling_eta=0, "
                         "auto_normalize=True, offset_noise_strength=0, min_snr_loss_weight=False",
            "optimizer": f"Adam(lr={LR}, betas=(0.9, 0.999)), no grad clipping",
            "batch": TRAIN_BATCH,
            "ema": f"ema_pytorch.EMA(beta={EMA_DECAY}, update_after_step={EMA_AFTER}, update_every=1)",
            "sampler": "ema_model.sample(): DDIM, 50 steps, eta 0",
        },
        "minutes": args.minutes,
        "threads": args.threads,
        "seed": args.seed,
        "steps": steps,
        "epochs_started": epoch,
        "train_seconds": round(train_seconds, 2),
        "steps_per_s": round(steps / train_seconds, 4),
        "img_per_s": round(steps * TRAIN_BATCH / train_seconds, 3),
        "params": params,
        "final_loss_mean_last50": float(np.mean(losses[-50:])),
        "n": int(len(samples)),
        "sample_batch": args.batch,
        "sample_seconds": round(sample_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "fd": scores["fd"],
        "precision": scores["precision"],
        "recall": scores["recall"],
        "is": scores["is"],
        "eval": scores,
        "npz": str(args.npz),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": np.__version__,
            "denoising-diffusion-pytorch": _version("denoising-diffusion-pytorch"),
            "ema-pytorch": _version("ema-pytorch"),
            "difflab": _version("difflab"),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpu_count": os.cpu_count(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "torch_threads": torch.get_num_threads(),
        },
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(
            ([f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ else [])
            + [shlex.quote(sys.executable), *map(shlex.quote, sys.argv)]
        ),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")

    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"lucidrains-mnist: {steps} steps in {train_seconds / 60:.2f} min ({result['steps_per_s']:.3f} steps/s, "
          f"{result['img_per_s']:.1f} img/s, {args.threads} thread(s), {params / 1e6:.2f}M params); "
          f"n={len(samples)} FD {fmt(scores['fd'])} precision {fmt(scores['precision'])} "
          f"recall {fmt(scores['recall'])} IS {fmt(scores['is'])} -> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
