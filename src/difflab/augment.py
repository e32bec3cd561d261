"""Conditioning augmentation of a super-resolution stage's low-res input (CDM, Ho et al. 2021, Sec. 4.2).

Notation (code -> paper): ``z0`` = z_0, the low-res image a stage is conditioned on; ``s`` = the
augmentation level, an integer in 0..T of the *augmentation process* (the low-res model's own noise
process, ``Process`` with T steps); ``z_s`` = the augmented conditioning.

- **Gaussian noise** (:func:`noise_augment`): z_s = sqrt(abar_s) z_0 + sqrt(1 - abar_s) eps, with s = 0
  the clean z_0 and level s >= 1 the paper's step s (code index s - 1 of the process, whose
  ``q_sample`` at index 0 already adds noise). Training draws s per example; the SR network is told
  s through a second timestep embedding (:func:`level_embedding`, fed as the U-Net's ``cond``), so one
  trained model serves every s and s is chosen after training (a sweep).
- At sampling, **non-truncated**: run the low-res chain to z_0, then z_s ~ q(z_s | z_0)
  (:func:`noise_augment`); **truncated**: stop the low-res chain at step s and hand its z_s on
  (:func:`sample_truncated`), p(x) = integral p(x | z_s) p_lowres(z_s) dz_s.
- **Gaussian blur** (:func:`blur_augment`): training blurs a fraction of the examples with sigma from
  a range; sampling applies none.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from difflab.denoiser import Denoiser
from difflab.nn.layers import timestep_embedding
from difflab.process import Process, q_sample
from difflab.schedules import UseTimesteps, space_timesteps

Tensor = torch.Tensor

__all__ = ["noise_augment", "level_embedding", "blur_augment", "truncation_steps", "sample_truncated"]


def _levels(s: Tensor | int, n: int, T: int, device) -> Tensor:
    s = torch.as_tensor(s, dtype=torch.long, device=device).reshape(-1)
    s = s.expand(n) if s.numel() == 1 else s
    if s.shape != (n,):
        raise ValueError(f"augmentation levels must be one int or [N={n}], got shape {tuple(s.shape)}")
    if s.numel() and (int(s.min()) < 0 or int(s.max()) > T):
        raise ValueError(f"augmentation levels must lie in 0..{T} (0 = none), got {int(s.min())}..{int(s.max())}")
    return s


def noise_augment(z0: Tensor, s: Tensor | int, process: Process, noise: Tensor | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """z_s ~ q(z_s | z_0) of ``process`` at levels ``s`` (see the module docstring); s = 0 returns z_0.

    Args:
        z0: [N, C, h, w] low-res images in [-1, 1]; s: one int or [N] levels in 0..T.
        noise: [N, C, h, w] eps (drawn from ``generator`` when None).
    """
    s = _levels(s, z0.shape[0], process.num_timesteps, z0.device)
    if noise is None:
        dev = generator.device if generator is not None else z0.device
        noise = torch.randn(z0.shape, generator=generator, device=dev, dtype=z0.dtype).to(z0.device)
    noised = q_sample(process, z0, (s - 1).clamp_min(0), noise)
    keep = (s == 0).reshape(-1, *([1] * (z0.dim() - 1)))
    return torch.where(keep, z0, noised.to(z0.dtype))


def level_embedding(s: Tensor, dim: int) -> Tensor:
    """[N, dim] sinusoidal embedding of the levels s (the timestep embedding's rule, max period 10000):
    the SR U-Net's second timestep embedding, passed as its ``cond`` (``cond_dim = dim``)."""
    return timestep_embedding(s.float(), dim)


def _gaussian_kernel(sigma: float, device, dtype) -> Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def blur_augment(z: Tensor, sigma: Tensor) -> Tensor:
    """Each image blurred by a separable Gaussian of its own ``sigma`` [N] (pixels; 0 = unchanged),
    kernel radius ceil(3 sigma), reflect padding. z: [N, C, h, w]."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    if sigma.shape != (z.shape[0],) or bool((sigma < 0).any()):
        raise ValueError(f"blur sigma must be [N={z.shape[0]}] values >= 0, got {tuple(sigma.shape)}")
    out = z.clone()
    c = z.shape[1]
    for i, sg in enumerate(sigma.tolist()):
        if sg == 0:
            continue
        k = _gaussian_kernel(sg, z.device, z.dtype)
        r = (k.numel() - 1) // 2
        img = z[i : i + 1]
        pad_h, pad_w = min(r, img.shape[-2] - 1), min(r, img.shape[-1] - 1)
        if pad_w < r or pad_h < r:  # a kernel wider than the image: reflect what there is, then zero
            img = F.pad(img, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
            img = F.pad(img, (r - pad_w, r - pad_w, r - pad_h, r - pad_h))
        else:
            img = F.pad(img, (r, r, r, r), mode="reflect")
        img = F.conv2d(img, k.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        out[i : i + 1] = F.conv2d(img, k.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out


def truncation_steps(T: int, s: int, steps: str | int | None = None) -> UseTimesteps:
    """The kept original indices of a low-res chain of T steps truncated at level s >= 1: index s - 1
    (whose noise level is the paper's step s) and ``steps`` (a striding rule, None = all) spread over
    s..T-1, as explicit indices (:class:`~difflab.schedules.UseTimesteps`) for a sampler's ``steps``.
    A sampler run on them with ``end = 1`` returns z_s."""
    if not 1 <= s <= T - 1:
        raise ValueError(f"a truncated chain needs a level s in 1..{T - 1}, got {s} (s = 0: the full chain)")
    rest = range(s, T) if steps is None else [s + i for i in space_timesteps(T - s, steps)]
    return UseTimesteps([s - 1, *rest])


def sample_truncated(sampler: Callable[..., Tensor], denoiser: Denoiser, x_T: Tensor | Any, s: int, *,
                     steps: str | int | None = None, **kwargs: Any) -> Tensor:
    """z_s of the low-res model's chain stopped at level s (truncated conditioning augmentation);
    s = 0 is the whole chain (``sampler(denoiser, x_T, steps=steps)``). ``sampler`` is one of
    :data:`difflab.samplers.SAMPLERS` that takes ``end`` (ancestral, ddim)."""
    if s == 0:
        return sampler(denoiser, x_T, steps=steps, **kwargs)
    return sampler(denoiser, x_T, steps=truncation_steps(denoiser.num_timesteps, s, steps), end=1, **kwargs)
