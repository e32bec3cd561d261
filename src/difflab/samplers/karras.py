"""Euler and Heun solvers of the probability-flow ODE in Karras et al.'s (2022) sigma parameterization.

k-diffusion's ``sample_euler`` / ``sample_heun`` (deterministic: s_churn = 0) on a discrete VP
process: with sigma_t = sqrt((1 - abar_t) / abar_t) and the scaled state x~ = x_t / sqrt(abar_t)
(so x_t = x~ / sqrt(1 + sigma^2), k-diffusion's ``c_in``), the ODE is (Karras et al. 2022 eq. 3)

    dx~ / dsigma = (x~ - D(x~; sigma)) / sigma = eps^,      D = x0^ the denoiser's data prediction.

Euler (Alg. 1 without the second-order correction):  x~' = x~ + (sigma' - sigma) d,  d = (x~ - x0^) / sigma.
Heun (Karras et al. 2022 Alg. 1): an Euler step to sigma', a second evaluation there, then the
trapezoid x~' = x~ + (sigma' - sigma) (d + d') / 2; the last step, to sigma = 0, is plain Euler.

Notation map (code -> paper): ``sig`` sigma_i, ``xs`` x~ (x_i of Alg. 1), ``d`` d_i, ``d2`` d'_i.

Choices for the discrete model (documented in :mod:`difflab.samplers.spacing`): the sigmas are
those of kept discrete steps (any ``steps`` spec, including Karras' rho = 7 spacing "karrasK",
rounded to the nearest step in log sigma), so the network is always called at integer original
timesteps; k-diffusion instead calls it at a fractional t interpolated in log sigma. x_T is the VP
state (N(0, I)), so the first x~ is x_T / sqrt(abar_{T-1}); k-diffusion starts from
N(0, sigma_max^2), i.e. x_T ~ N(0, 1 - abar_{T-1}) - the same up to 1 - abar_{T-1} ~ 1.
Euler with data prediction is exactly DDIM with eta = 0 (d = eps^); K Euler steps cost K network
evaluations, K Heun steps 2K - 1.

Heun needs steps whose sigma ratio is moderate: the trapezoid error of a step is (sigma' - sigma) (d' - d) / 2,
so a first step from the top of a discrete schedule (sigma_max ~ 2e4 for the cosine schedule, whose
last beta is clipped to 0.999; ~157 for the linear one) to a far lower sigma multiplies a small change
of eps^ by sigma_max. Uniform log-SNR steps (the default) keep every ratio equal; evenly strided steps
on the cosine schedule do not (measured on a 2-D mixture: 10 Heun steps, std error 10x).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from difflab.denoiser import Denoiser
from difflab.guidance import CondFn
from difflab.samplers.common import initial_state
from difflab.samplers.spacing import (
    StepSpec,
    abar_schedule,
    denoise,
    grad_mode,
    progress_bar,
    release,
    report,
    respace_for_solver,
    step_tensor,
)

Tensor = torch.Tensor


def _sigma(abar: float) -> float:
    """Karras noise level sqrt((1 - abar) / abar); 0 at abar = 1."""
    return math.sqrt((1.0 - abar) / abar)


def _karras_sample(
    heun: bool,
    denoiser: Denoiser,
    x_T: Tensor | Sequence[int],
    *,
    steps: StepSpec,
    clip_denoised: bool,
    denoised_fn: Callable[[Tensor], Tensor] | None,
    cond_fn: CondFn | None,
    generator: torch.Generator | None,
    callback: Callable[[dict[str, Any]], None] | None,
    model_kwargs: dict | None,
    progress: bool,
) -> Tensor:
    denoiser = respace_for_solver(denoiser, steps)
    x = initial_state(x_T, generator)
    abars = abar_schedule(denoiser)
    K = denoiser.num_timesteps

    def x0_at(xs: Tensor, step: int, abar: float) -> Tensor:
        # The network sees the VP state x_t = sqrt(abar) x~ (k-diffusion's c_in scaling).
        p = denoise(
            denoiser, xs * math.sqrt(abar), step_tensor(xs, step), clip_denoised=clip_denoised,
            denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs,
        )
        return p.pred_xstart

    with grad_mode(cond_fn):
        xs = x / math.sqrt(abars[0])
        for i in progress_bar(K, progress, "Heun" if heun else "Euler"):
            step = K - 1 - i
            sig, sig_next = _sigma(abars[i]), _sigma(abars[i + 1])
            x0 = x0_at(xs, step, abars[i])
            d = (xs - x0) / sig
            x_euler = xs + (sig_next - sig) * d
            if heun and sig_next > 0:
                d2 = (x_euler - x0_at(x_euler, step - 1, abars[i + 1])) / sig_next
                xs = xs + (sig_next - sig) * 0.5 * (d + d2)
            else:
                xs = x_euler
            # x~ at sigma = 0 is x_0 itself; report the VP state elsewhere, like the other samplers.
            report(callback, i, step, xs * math.sqrt(abars[i + 1]), x0)
    return release(xs)


def sample_euler(
    denoiser: Denoiser,
    x_T: Tensor | Sequence[int],
    *,
    steps: StepSpec = 20,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    cond_fn: CondFn | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    model_kwargs: dict | None = None,
    progress: bool = False,
) -> Tensor:
    """Draw x_0 [N, C, ...] from x_T with Euler steps in sigma (k-diffusion ``sample_euler``, s_churn = 0).

    ``steps``: the specs of :func:`~difflab.samplers.dpm_solver.sample_dpmpp_2m`, but an int K means "logsnrK"
    (uniform in log-SNR); K evaluations.
    Other arguments as for :func:`~difflab.samplers.ddim.sample_ddim`; ``cond_fn`` guides the score.
    """
    return _karras_sample(
        False, denoiser, x_T, steps=steps, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
        generator=generator, callback=callback, model_kwargs=model_kwargs, progress=progress,
    )


def sample_heun(
    denoiser: Denoiser,
    x_T: Tensor | Sequence[int],
    *,
    steps: StepSpec = 10,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    cond_fn: CondFn | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    model_kwargs: dict | None = None,
    progress: bool = False,
) -> Tensor:
    """Draw x_0 [N, C, ...] from x_T with Heun's method in sigma (Karras et al. 2022 Alg. 1, k-diffusion
    ``sample_heun`` with s_churn = 0). K steps cost 2K - 1 network evaluations (the last step is Euler).

    Arguments as for :func:`sample_euler`.
    """
    return _karras_sample(
        True, denoiser, x_T, steps=steps, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
        generator=generator, callback=callback, model_kwargs=model_kwargs, progress=progress,
    )
