"""Bits/dim of a run on a data split (``difflab nll``): the exact VLB of Improved DDPM, averaged.

For each image, :func:`difflab.likelihood.calc_bpd_loop` gives L_T (prior) + sum_{t>0} L_{t-1}
(the KL terms) + L_0 (the discretised decoder); this module averages them over the first ``n``
images of a split. Built-in sources default to their test split (MNIST-5k: the 1,000 test digits).
``steps`` K < T evaluates the bound of the respaced K-step process, a looser (larger) bound that
costs K instead of T network calls per image. Batch k draws its noise from a generator seeded with
(seed, k); under ``torchrun`` batches are dealt out to the ranks and gathered back.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from difflab.build import module_device
from difflab.config import Config
from difflab.data import build_dataset
from difflab.denoiser import Denoiser
from difflab.likelihood import calc_bpd_loop
from difflab.train import distributed as dist_utils

BUILTIN_SOURCES = ("mnist5k", "digits")


def eval_dataset(cfg: Config, split: str | None = None):
    """The dataset to score: ``split`` of a built-in source (default ``test``); a folder or .npz is
    one set (a ``split`` other than ``all`` is an error). No flips."""
    data = cfg.data
    if data.source in BUILTIN_SOURCES:
        split = split or "test"
    elif split not in (None, "all"):
        raise ValueError(f"--split {split!r} does not apply to data.source {data.source!r} (one set); omit it")
    return build_dataset(dataclasses.replace(data, split=split, random_flip=False), seed=0)


@torch.no_grad()
def evaluate_bpd(
    denoiser: Denoiser,
    cfg: Config,
    *,
    split: str | None = None,
    n: int | None = None,
    steps: int | None = None,
    batch: int = 100,
    seed: int = 0,
    distributed: bool = True,
    progress: bool = False,
) -> dict:
    """Mean bits/dim over the first ``n`` images (default: all) of ``split``, with its terms.

    Returns ``{"bpd", "bpd_stderr", "prior_bpd", "vb_bpd" (sum of the KL terms), "decoder_bpd",
    "n", "split", "steps", "dims"}``; every rank returns the same numbers.
    """
    ds = eval_dataset(cfg, split)
    n = len(ds) if n is None else n
    if not 1 <= n <= len(ds):
        raise ValueError(f"n must be in [1, {len(ds)}] (images in the split), got {n}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if steps is not None and not 1 <= steps <= cfg.diffusion.steps:
        raise ValueError(f"steps must be in [1, {cfg.diffusion.steps}] (diffusion.steps), got {steps}")
    den = denoiser.respace(steps) if steps is not None and steps < cfg.diffusion.steps else denoiser
    device = module_device(den.net)
    rank, world = (dist_utils.get_rank(), dist_utils.get_world_size()) if distributed else (0, 1)
    rows = []
    num_batches = -(-n // batch)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_batches * den.num_timesteps, desc="bits/dim", leave=False)
    for k in range(rank, num_batches, world):
        idx = np.arange(k * batch, min(n, (k + 1) * batch))
        x0, y = ds.get_batch(idx)
        g = torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))
        kwargs = {"y": y.to(device)} if getattr(cfg.model, "num_classes", None) is not None else None
        out = calc_bpd_loop(den, x0.to(device), model_kwargs=kwargs, generator=g,
                            callback=(lambda i, total: bar.update(1)) if bar is not None else None)
        rows.append(torch.stack([out["total_bpd"], out["prior_bpd"], out["vb"][:, :-1].sum(1), out["vb"][:, -1]],
                                dim=1).double().cpu())
    if bar is not None:
        bar.close()
    local = torch.cat(rows) if rows else torch.empty((0, 4), dtype=torch.float64)
    if world > 1:
        local = dist_utils.all_gather_uneven(local)
    total, prior, vb, decoder = local.mean(0).tolist()
    stderr = float(local[:, 0].std() / math.sqrt(len(local))) if len(local) > 1 else float("nan")
    c, h, w = ds.get_batch([0])[0].shape[1:]
    return {"bpd": total, "bpd_stderr": stderr, "prior_bpd": prior, "vb_bpd": vb, "decoder_bpd": decoder,
            "n": int(len(local)), "split": split or ("test" if cfg.data.source in BUILTIN_SOURCES else "all"),
            "steps": den.num_timesteps, "dims": int(c * h * w)}


def nll_run(
    run_dir,
    *,
    split: str | None = None,
    n: int | None = None,
    steps: int | None = None,
    batch: int = 100,
    seed: int = 0,
    ema: str | float | None = None,
    checkpoint=None,
    progress: bool = False,
) -> dict | None:
    """``difflab nll``: load a run (default: its sampling EMA) and :func:`evaluate_bpd`; the result
    (with the run folder and the weights used) on rank 0, None on the other ranks."""
    from difflab.build import load_run, load_run_config, resolve_ema

    info = dist_utils.init_distributed()
    cfg = load_run_config(run_dir)
    rate = resolve_ema(cfg, ema)
    cfg, _, denoiser = load_run(run_dir, ema=rate, checkpoint=checkpoint, device=info.device)
    result = evaluate_bpd(denoiser, cfg, split=split, n=n, steps=steps, batch=batch, seed=seed, progress=progress)
    if info.rank != 0:
        return None
    return {**result, "run": str(run_dir), "weights": "model" if rate is None else f"ema_{rate}"}
