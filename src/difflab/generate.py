"""Drawing images from a trained denoiser with a run's sample settings (``difflab sample``).

Images are drawn in batches; batch k uses noise from a generator seeded with (seed, k), so the
samples do not depend on the number of processes: under ``torchrun`` the batches are dealt out
round-robin to the ranks and gathered back in order (:func:`~difflab.train.distributed.all_gather_uneven`).
Class-conditional runs draw label ``label`` for every image, or labels 0, 1, ..., K-1, 0, ...
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np
import torch

from difflab.config import Config
from difflab.denoiser import Denoiser
from difflab.train import distributed as dist_utils


def sampler_names() -> list[str]:
    """The sampler names ``difflab sample --sampler`` takes."""
    return list(_registry())


def _registry() -> dict[str, Callable]:
    try:
        from difflab.samplers import SAMPLERS
    except ImportError:  # an older tree without the registry
        from difflab.samplers import sample_ancestral, sample_ddim

        return {"ancestral": sample_ancestral, "ddim": sample_ddim}
    return dict(SAMPLERS)


def get_sampler(name: str) -> Callable:
    """The sampler function called ``name``; ValueError listing the valid names otherwise."""
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(registry)}")
    return registry[name]


def _batch_seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _labels(cfg: Config, n: int, label: int | None) -> torch.Tensor | None:
    num_classes = getattr(cfg.model, "num_classes", None)
    if num_classes is None:
        if label is not None:
            raise ValueError("--label needs a class-conditional run (this model is unconditional)")
        return None
    if label is not None and not 0 <= label < num_classes:
        raise ValueError(f"label must be in 0..{num_classes - 1}, got {label}")
    if label is not None:
        return torch.full((n,), int(label), dtype=torch.long)
    return torch.arange(n, dtype=torch.long) % num_classes


def _guided(denoiser: Denoiser, cfg: Config) -> Denoiser:
    if cfg.sample.guidance_scale <= 0:
        return denoiser
    from difflab.guidance import classifier_free_denoiser

    return classifier_free_denoiser(denoiser, cfg.sample.guidance_scale)


def draw_samples(
    denoiser: Denoiser,
    cfg: Config,
    *,
    n: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    label: int | None = None,
    seed: int | None = None,
    batch: int | None = None,
    distributed: bool = True,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` samples ``[n, C, S, S]`` (float32, CPU, in [-1, 1]) and their labels (None if unconditional).

    Every argument left ``None`` takes the run's ``sample`` section. ``steps`` respaces the process
    (ancestral / DDIM) or sets the solver's step count; ``eta`` applies to samplers that take it.
    With ``distributed`` and an initialised process group, the batches are split across ranks and
    every rank returns all ``n`` samples.
    """
    sc = cfg.sample
    n = sc.n if n is None else n
    batch = sc.batch if batch is None else batch
    seed = sc.seed if seed is None else seed
    name = sc.sampler if sampler is None else sampler
    for what, value in (("n", n), ("batch", batch)):
        if value < 1:
            raise ValueError(f"{what} must be >= 1, got {value}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    fn = get_sampler(name)
    steps = sc.steps if steps is None else steps
    if steps is not None and not 1 <= steps <= cfg.diffusion.steps:
        raise ValueError(f"steps must be in [1, {cfg.diffusion.steps}] (diffusion.steps), got {steps}")
    kwargs = {"clip_denoised": sc.clip_denoised}
    if steps is not None:
        kwargs["steps"] = steps
    if "eta" in inspect.signature(fn).parameters:
        kwargs["eta"] = sc.eta if eta is None else eta
    elif eta is not None:
        raise ValueError(f"sampler {name!r} takes no eta")
    labels = _labels(cfg, n, label)
    denoiser = _guided(denoiser, cfg)
    param = next(iter(getattr(denoiser.net, "parameters", lambda: iter([torch.empty(0)]))()), torch.empty(0))
    device = param.device
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    rank, world = (dist_utils.get_rank(), dist_utils.get_world_size()) if distributed else (0, 1)
    mine = []
    for k in range(rank, -(-n // batch), world):
        lo, hi = k * batch, min(n, (k + 1) * batch)
        g = torch.Generator(device).manual_seed(_batch_seed(seed, k))
        x_T = torch.randn((hi - lo, *shape), generator=g, device=device)
        model_kwargs = {"y": labels[lo:hi].to(device)} if labels is not None else None
        x = fn(denoiser, x_T, generator=g, model_kwargs=model_kwargs, progress=progress, **kwargs)
        mine.append((k, x.float().cpu()))
    return _gather(mine, n, shape, world), labels


def _gather(mine: list[tuple[int, torch.Tensor]], n: int, shape: tuple[int, ...], world: int) -> torch.Tensor:
    """Every rank's batches back in batch order (single process: just concatenated)."""
    local = torch.cat([x for _, x in mine]) if mine else torch.empty((0, *shape))
    if world == 1:
        return local
    ids = torch.cat([torch.full((len(x),), k, dtype=torch.long) for k, x in mine]) if mine else torch.empty(0).long()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    xs = dist_utils.all_gather_uneven(local.to(device)).cpu()
    ks = dist_utils.all_gather_uneven(ids.to(device)).cpu()
    order = torch.argsort(ks, stable=True)
    return xs[order][:n]


def sample_run(
    run_dir,
    *,
    n: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    label: int | None = None,
    seed: int | None = None,
    batch: int | None = None,
    grid=None,
    npz=None,
    ema: str | float | None = None,
    checkpoint=None,
    progress: bool = False,
) -> list:
    """``difflab sample``: load a run, draw samples (split across ranks under torchrun), and write a
    PNG grid and/or an ``.npz`` at the data's native size (rank 0). Returns the paths written.

    Without ``grid`` and ``npz`` both are written to ``RUN/samples/<sampler>_<n>.{png,npz}``.
    """
    from pathlib import Path

    from difflab.build import load_run, load_run_config, resolve_ema
    from difflab.images import save_grid, save_npz, to_uint8

    info = dist_utils.init_distributed()
    cfg = load_run_config(run_dir)
    name = sampler or cfg.sample.sampler
    get_sampler(name)  # a bad name is an error before any work
    for path, suffix in ((grid, ".png"), (npz, ".npz")):
        if path is not None and Path(path).suffix.lower() != suffix:
            raise ValueError(f"{path}: expected a {suffix} file name")
    cfg, _, denoiser = load_run(run_dir, ema=resolve_ema(cfg, ema), checkpoint=checkpoint, device=info.device)
    x, labels = draw_samples(denoiser, cfg, n=n, sampler=name, steps=steps, eta=eta, label=label, seed=seed,
                             batch=batch, progress=progress and info.rank == 0)
    if info.rank != 0:
        return []
    if grid is None and npz is None:
        stem = Path(run_dir) / "samples" / f"{name}_{len(x)}"
        grid, npz = stem.with_suffix(".png"), stem.with_suffix(".npz")
    images = to_uint8(x, cfg.data)
    written = []
    if grid is not None:
        save_grid(images, grid)
        written.append(Path(grid))
    if npz is not None:
        save_npz(images, labels.numpy() if labels is not None else None, npz)
        written.append(Path(npz))
    return written
