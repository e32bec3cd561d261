"""Ancestral sampling (DDPM Alg. 2; respaced, Improved DDPM sec. 4; guided, ADM Alg. 1).

x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I), with no noise at the last step (t = 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from difflab.denoiser import Denoiser
from difflab.guidance import CondFn, condition_mean
from difflab.samplers.common import initial_state, reverse_loop, step_noise

Tensor = torch.Tensor


def p_sample(
    denoiser: Denoiser,
    x_t: Tensor,
    t: Tensor,
    *,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    cond_fn: CondFn | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    model_kwargs: dict | None = None,
) -> dict[str, Tensor]:
    """One ancestral step x_t -> x_{t-1}. x_t: [N, C, ...], t: [N]. Returns ``sample`` and ``pred_xstart``."""
    cond = model_kwargs or {}
    p = denoiser(x_t, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, **cond)
    if cond_fn is not None:
        p = condition_mean(denoiser, cond_fn, p, x_t, t, **cond)
    if noise is None:
        noise = step_noise(x_t, generator)
    nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
    sample = p.mean + nonzero * torch.exp(0.5 * p.log_variance) * noise
    return {"sample": sample, "pred_xstart": p.pred_xstart}


def sample_ancestral(
    denoiser: Denoiser,
    x_T: Tensor | Sequence[int],
    *,
    steps: str | int | Sequence[int] | None = None,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    cond_fn: CondFn | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    model_kwargs: dict | None = None,
    progress: bool = False,
    end: int = 0,
) -> Tensor:
    """Draw x_0 by ancestral sampling from x_T (a tensor, or a shape to draw N(0, I) from ``generator``).

    ``steps`` respaces the process first (e.g. 250, "ddim50", "10,10,3,2,2", ``UseTimesteps([...])``;
    see ``Process.respace``).
    ``end = 1`` stops the chain at the noise level of the first kept step (a truncated chain:
    :func:`difflab.augment.sample_truncated`).
    """
    denoiser = denoiser.respace(steps)
    x = initial_state(x_T, generator)

    def step(x_t: Tensor, t: Tensor) -> dict[str, Tensor]:
        return p_sample(
            denoiser, x_t, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            generator=generator, model_kwargs=model_kwargs,
        )

    return reverse_loop(denoiser, x, step, callback, progress, end)
