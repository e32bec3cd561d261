"""Cascaded sampling (CDM, Ho et al. 2021, Fig. 1): a base model, then super-resolution stages, each
conditioned on the previous stage's images, with conditioning augmentation chosen at sampling.

A cascade is a composition of what exists: each stage is a run folder (``difflab train`` or
``difflab convert``) drawn with :func:`difflab.generate.draw_samples` (its own sampler, steps,
guidance and level s), so there is no sampling loop here. Between stages:

- **non-truncated** (default): the stage's x_0 goes to the next stage as images (uint8 levels: truncated,
  as guided-diffusion's upsamplers read their base model's ``.npz``; rounded to the nearest level for a
  text stage, as GLIDE's notebooks hand the base's samples on), which noises it to z_s ~ q(z_s | z_0) at its
  ``aug_level`` s with its own batch generators;
- **truncated** (``truncated: true`` on the next stage): this stage's chain stops at level s
  (:func:`difflab.augment.sample_truncated`) and its z_s is handed on unquantised (CDM's
  p(x) = integral p(x | z_s) p_lowres(z_s) dz_s). The level is in this stage's own steps, so the next
  stage's augmentation process must be this stage's noise process.

Stage k draws its noise from seed ``seed + k``: a cascade sampled in one command equals its stages
sampled one by one (``difflab sample RUN --low-res PREVIOUS.npz --seed SEED+k``; for a text stage up to
the half level between the ``.npz``'s truncation and GLIDE's rounding).

A cascade file (YAML; ``difflab sample CASCADE.yaml``)::

    n: 64            # images (default 16)
    batch: 64        # images per network call
    seed: 0
    label: all       # a class index or 'all' (class-conditional cascades)
    stages:
      - {run: runs/base-14, sampler: ddim, steps: 50, guidance: 1.0}
      - {run: runs/sr-14-28, sampler: ddim, steps: 25, aug_level: 100, truncated: false}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from difflab.config import ConfigError, from_dict, read_yaml

__all__ = ["StageConfig", "CascadeConfig", "Stage", "load_cascade", "is_cascade_file", "build_cascade",
           "sample_cascade"]


@dataclass(frozen=True)
class StageConfig:
    """One stage of a cascade: a run and how to draw from it (null = the run's own ``sample`` settings)."""

    # the stage's run folder (difflab train) or converted checkpoint folder (difflab convert)
    run: str
    # sampler name (difflab.samplers.SAMPLERS); a stage whose chain is truncated needs ancestral or ddim
    sampler: str | None = None
    # sampling steps: K or a respacing rule ("ddim50", "fast27")
    steps: int | str | None = None
    # DDIM eta
    eta: float | None = None
    # classifier-free guidance weight w (a stage trained with label dropout)
    guidance: float | None = None
    # a super-resolution stage: the level s of its low-res conditioning (0 = clean; null = sample.aug_level)
    aug_level: int | None = None
    # a super-resolution stage: take z_s from the previous stage's chain stopped at s (else its x_0, noised)
    truncated: bool = False
    # weights: an EMA rate of the run, or 'model' (null = the run's default)
    ema: str | None = None
    # network under bf16 autocast
    bf16: bool | None = None


@dataclass(frozen=True)
class CascadeConfig:
    """A cascade (see the module docstring)."""

    # the stages, base first
    stages: tuple[StageConfig, ...]
    # number of images
    n: int = 16
    # images per network call
    batch: int = 16
    # stage k draws from seed + k
    seed: int = 0
    # a class index or 'all' (labels cycling over the classes); null = all for class-conditional cascades
    label: Any = None

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError(("stages",), "must list at least one stage")
        for name, value in (("n", self.n), ("batch", self.batch)):
            if value < 1:
                raise ConfigError((name,), f"must be >= 1, got {value}")
        if self.seed < 0:
            raise ConfigError(("seed",), f"must be >= 0, got {self.seed}")
        if self.stages[0].truncated or self.stages[0].aug_level:
            raise ConfigError(("stages", "0"), "the base stage has no low-res input: no aug_level or truncated")


def yaml_top_level(path: str | os.PathLike) -> dict | None:
    """The top-level mapping of a readable ``.yaml`` / ``.yml`` file, else None (telling pipeline files apart)."""
    p = Path(path)
    if not p.is_file() or p.suffix.lower() not in (".yaml", ".yml"):
        return None
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def rooted(stage: Any, folder: Path) -> Any:
    """A stage mapping with its relative ``run`` taken from ``folder`` (a pipeline file's); others unchanged."""
    if isinstance(stage, dict) and "run" in stage and not Path(str(stage["run"])).is_absolute():
        return {**stage, "run": str(folder / str(stage["run"]))}
    return stage


def is_cascade_file(path: str | os.PathLike) -> bool:
    """True for a YAML file with a top-level ``stages`` list."""
    data = yaml_top_level(path)
    return data is not None and "stages" in data


def load_cascade(path: str | os.PathLike, **overrides: Any) -> CascadeConfig:
    """Read a cascade file; ``overrides`` (n, batch, seed, label) replace its values when not None.
    Run paths are relative to the file's folder unless absolute."""
    p = Path(path)
    try:
        data = read_yaml(p)
    except ConfigError as e:
        raise ValueError(f"not a readable cascade file: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        raise ValueError(f"{p}: a cascade file needs a 'stages' list")
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    stages = [rooted(stage, p.parent) for stage in data["stages"]]
    try:
        return from_dict(CascadeConfig, {**data, "stages": stages})
    except ConfigError as e:
        raise ConfigError(e.path, f"{e.problem} (in {p})") from None


@dataclass
class Stage:
    """A loaded stage: its settings, run config and denoiser."""

    spec: StageConfig
    cfg: Any
    denoiser: Any
    name: str = field(default="")


def build_cascade(cascade: CascadeConfig, device: str | torch.device = "cpu") -> list[Stage]:
    """Load every stage and check that they chain (ValueError naming the stage and the mismatch)."""
    from difflab.build import load_run, load_run_config, resolve_ema

    stages = []
    for k, spec in enumerate(cascade.stages):
        cfg = load_run_config(spec.run)
        cfg, _, denoiser = load_run(spec.run, ema=resolve_ema(cfg, spec.ema), device=device)
        stages.append(Stage(spec, cfg, denoiser, f"stage {k} ({spec.run})"))
    check_chain(stages, cascade.label)
    return stages


def check_chain(stages: list[Stage], label: Any) -> None:
    """Each stage takes the previous one's images: channels, sizes, the class label, the truncation level."""
    from difflab.generate import get_sampler

    for k, st in enumerate(stages):
        m, d = st.cfg.model, st.cfg.data
        low = getattr(m, "low_res_channels", 0)
        classes = getattr(m, "num_classes", None)
        if label is not None and str(label).strip().lower() != "all" and classes is None:
            raise ValueError(f"{st.name} is unconditional: it takes no class label (--label {label})")
        if k == 0:
            if low:
                raise ValueError(f"{st.name} is a super-resolution stage ({low} low-res channels); a cascade "
                                 "starts with a base model")
            continue
        prev = stages[k - 1]
        pm, pd = prev.cfg.model, prev.cfg.data
        if not low:
            raise ValueError(f"{st.name} takes no low-res input: it cannot follow {prev.name}")
        if low != pm.in_channels:
            raise ValueError(f"{st.name} takes {low}-channel low-res images but {prev.name} makes "
                             f"{pm.in_channels}-channel images")
        if d.sample_low_res_size != pd.sample_size:
            raise ValueError(f"{st.name} takes {d.sample_low_res_size}x{d.sample_low_res_size} low-res images but "
                             f"{prev.name} makes {pd.sample_size}x{pd.sample_size} images")
        prev_classes = getattr(pm, "num_classes", None)
        if classes is not None and prev_classes is not None and classes != prev_classes:
            raise ValueError(f"{st.name} has {classes} classes but {prev.name} has {prev_classes}")
        spec = st.spec
        if spec.truncated:
            level = spec.aug_level if spec.aug_level is not None else st.cfg.sample.aug_level
            a, pdiff = st.cfg.augment, prev.cfg.diffusion
            if not level:
                raise ValueError(f"{st.name}: truncated needs an aug_level s >= 1 (where {prev.name} stops)")
            if (a.schedule, a.steps) != (pdiff.schedule, pdiff.steps):
                raise ValueError(f"{st.name}: a truncated chain needs the augmentation process to be {prev.name}'s "
                                 f"noise process ({pdiff.schedule}/{pdiff.steps}); it is {a.schedule}/{a.steps}")
            name = prev.spec.sampler or prev.cfg.sample.sampler
            if name not in ("ancestral", "ddim"):
                get_sampler(name)
                raise ValueError(f"{prev.name}: its chain is truncated for {st.name}, which needs the ancestral or "
                                 f"ddim sampler, not {name!r}")


def sample_cascade(cascade: CascadeConfig, stages: list[Stage] | None = None, *, prompts=None,
                   distributed: bool = True, progress: bool = False,
                   callback=None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Every stage's samples, base first: ``[(x [n, C, S_k, S_k] in [-1, 1] (z_s for a stage whose chain
    was truncated), labels or None), ...]``; under torchrun each stage is sharded across the ranks.
    ``prompts`` (captions, cycled over the n samples) go to every text-conditional stage. ``callback``:
    :func:`~difflab.generate.draw_samples`'s, its dict with ``"stage"`` (k) and ``"stages"`` added."""
    from difflab.generate import draw_samples

    stages = build_cascade(cascade) if stages is None else stages
    out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    low_res = None
    for k, st in enumerate(stages):
        spec = st.spec
        nxt = stages[k + 1].spec if k + 1 < len(stages) else None
        truncate_at = 0
        if nxt is not None and nxt.truncated:
            truncate_at = nxt.aug_level if nxt.aug_level is not None else stages[k + 1].cfg.sample.aug_level
        x, labels = draw_samples(st.denoiser, st.cfg, n=cascade.n, sampler=spec.sampler, steps=spec.steps,
                                 eta=spec.eta, label=cascade.label if getattr(st.cfg.model, "num_classes", None)
                                 is not None else None, seed=cascade.seed + k, batch=cascade.batch,
                                 guidance_scale=spec.guidance, bf16=spec.bf16, low_res=low_res,
                                 aug_level=spec.aug_level, low_res_noised=spec.truncated, truncate_at=truncate_at,
                                 prompts=prompts if st.cfg.is_text else None, distributed=distributed,
                                 progress=progress, callback=_stage_callback(callback, k, len(stages)))
        out.append((x, labels))
        # handed on as images (uint8 levels, as the official upsamplers read them), or as z_s when truncated
        if nxt is not None:
            low_res = x if truncate_at else _as_images(x, rounded=stages[k + 1].cfg.is_text)
    return out


def _stage_callback(callback, k: int, stages: int):
    if callback is None:
        return None
    return lambda info: callback({**info, "stage": k, "stages": stages})


def _as_images(x: torch.Tensor, rounded: bool = False) -> torch.Tensor:
    """x in [-1, 1] through uint8 levels and back. Truncated to uint8, what a stage's ``.npz`` holds and
    guided-diffusion's super_res_sample.py reads; ``rounded`` to the nearest level for a text stage, as
    GLIDE's notebooks hand the base's samples to the upsampler (``((x + 1) * 127.5).round() / 127.5 - 1``)."""
    from difflab.data import float_to_uint8, uint8_to_float

    if rounded:
        return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
    u8 = float_to_uint8(x)
    return uint8_to_float(np.ascontiguousarray(u8))
