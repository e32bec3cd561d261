"""Shared machinery of the sampling benchmarks: cached result cells, split over processes, and scoring.

A benchmark is a list of :class:`Cell` (a key, a cost estimate in network evaluations, a function that
returns a JSON-able dict). Each cell's result is cached as ``CACHE/<key>.json``, so a run that is
stopped continues where it was, and any number of processes (one CPU thread each) can work on the same
benchmarks at once: each claims a cell with a lock file before computing it. The process that finds
every cell done writes the tables; cells shared by two benchmarks (the same run, sampler, steps, noise)
are computed once.

Samples are drawn from noise seeded by ``(seed, batch index)``, the same for every sampler and step
count (common random numbers: differences between rows are the samplers', not the noise's).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from difflab.images import to_uint8


@dataclass(frozen=True)
class Cell:
    """One measurement: ``key`` (a file-name-safe id), ``cost`` (network evaluations, for the split)."""

    key: str
    cost: float
    compute: Callable[[], dict]


def _claim(lock: Path) -> bool:
    """Take ``lock`` for this process (False if a live process holds it; a dead holder's lock is taken over)."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
                os.kill(pid, 0)
                return False  # alive
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except PermissionError:
                return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def run_cells(cells: list[Cell], cache: Path) -> dict[str, dict] | None:
    """Compute the missing cells, longest first, skipping those another process is computing (a lock
    file per cell); return every result once all are cached, else None."""
    cache.mkdir(parents=True, exist_ok=True)
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ValueError("cell keys must be unique")
    for cell in sorted(cells, key=lambda c: (-c.cost, c.key)):
        path, lock = cache / f"{cell.key}.json", cache / f"{cell.key}.lock"
        if path.exists() or not _claim(lock):
            continue
        try:
            if path.exists():  # finished between the check and the claim
                continue
            t0 = time.time()
            result = {**cell.compute(), "seconds": round(time.time() - t0, 1)}
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            os.replace(tmp, path)
        finally:
            lock.unlink(missing_ok=True)
        print(f"{cell.key}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in result.items()), flush=True)
    missing = [k for k in keys if not (cache / f"{k}.json").exists()]
    if missing:
        print(f"{len(missing)} cells still being computed by other processes: {', '.join(missing[:6])}...")
        return None
    return {k: json.loads((cache / f"{k}.json").read_text()) for k in keys}


_RUNS: dict = {}


def load(run: str, var_type: str | None = None):
    """(cfg, denoiser) of a run folder with its default sampling EMA, loaded once per process;
    ``var_type`` swaps the reverse variance of a fixed-variance model (fixed_small <-> fixed_large)."""
    from difflab.build import load_run, load_run_config, resolve_ema
    from difflab.denoiser import Denoiser
    from difflab.prediction import Parameterization

    if run not in _RUNS:
        cfg = load_run_config(run)
        _RUNS[run] = load_run(run, ema=resolve_ema(cfg, None))[::2]
    cfg, den = _RUNS[run]
    if var_type is not None and var_type != den.parameterization.var_type:
        if "learned" in (var_type + den.parameterization.var_type):
            raise ValueError(f"{run}: cannot sample a {den.parameterization.var_type} model with {var_type}")
        den = Denoiser(den.net, den.process, Parameterization(den.parameterization.mean_type, var_type),
                       time_scale=den.time_scale)
    return cfg, den


def sample_cell(run: str, sampler: str, steps: int, *, n: int, batch: int, seed: int = 0, var_type=None,
                fn=None, **kwargs) -> Cell:
    """The FD cell of ``n`` samples of ``run`` with ``sampler`` (a difflab sampler name, or any name with
    ``fn``) over ``steps`` steps; keyed by everything that changes the samples."""
    from difflab.build import load_run_config
    from difflab.samplers import SAMPLERS

    if var_type == load_run_config(run).diffusion.var_type:
        var_type = None  # the model's own variance: the same cell as without an override
    extra = "".join(f"-{k}{v}" for k, v in sorted(kwargs.items()))
    key = f"{Path(run).name}-{sampler}{steps}{'-' + var_type if var_type else ''}{extra}-n{n}-b{batch}-s{seed}"

    def compute() -> dict:
        cfg, den = load(run, var_type)
        shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
        # clip_denoised: the sampler's own default unless kwargs say (run configs of older versions store
        # clip_denoised: true, which was then every sampler's default)
        x = draw(fn or SAMPLERS[sampler], den, shape, n, batch, seed, steps=steps, **kwargs)
        return score(x, cfg.data)

    return Cell(key, float(n * steps), compute)


def draw(fn, denoiser, shape: tuple[int, ...], n: int, batch: int, seed: int, device="cpu", labels=None,
         **kwargs) -> torch.Tensor:
    """n samples [n, *shape] from ``fn(denoiser, x_T, ...)``; batch k starts from noise seeded (seed, k)."""
    out = []
    for k, lo in enumerate(range(0, n, batch)):
        hi = min(n, lo + batch)
        g = torch.Generator(device).manual_seed(seed * 100_003 + k)
        x_T = torch.randn((hi - lo, *shape), generator=g, device=device)
        mk = {"y": labels[lo:hi].to(device)} if labels is not None else None
        out.append(fn(denoiser, x_T, generator=g, model_kwargs=mk, **kwargs).float().cpu())
    return torch.cat(out)


def score(x: torch.Tensor, data_cfg, labels=None) -> dict:
    """FD, precision and recall (and accuracy with labels) of samples in [-1, 1] against the MNIST-5k test split."""
    from difflab.eval.report import evaluate

    metrics = evaluate(to_uint8(x, data_cfg), labels.numpy() if labels is not None else None)
    return {k: metrics[k] for k in ("fd", "precision", "recall", "accuracy") if k in metrics}


def add_cell_arguments(p) -> None:
    """``--cache`` of every cell benchmark."""
    p.add_argument("--cache", metavar="DIR", help="cell cache folder (default: runs/cells/)")


def write_results(out: Path, stem: str, record: dict, header: list[str], rows: list[list[str]],
                  footer: str = "") -> None:
    """Write ``OUT/<stem>.json`` (``record``) and ``OUT/<stem>-table.md`` (a markdown table of ``rows``
    under ``header``, then ``footer``), and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    table = "\n".join(lines) + (f"\n\n{footer}" if footer else "") + "\n"
    (out / f"{stem}-table.md").write_text(table)
    print(table, end="")
