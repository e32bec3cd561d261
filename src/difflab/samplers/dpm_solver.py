"""DPM-Solver++(2M): the multistep second-order solver of the diffusion ODE in data prediction.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
Algorithm 2 (multistep, data prediction), as diffusers' ``DPMSolverMultistepScheduler`` runs it with
``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``solver_type="midpoint"``,
``final_sigmas_type="zero"``: the first step is first order (no history yet), the final jump to
sigma = 0 is first order (lower-order final step; the second-order formula is singular there).

Notation map (code -> paper), for the step s -> t (s the current step, t the next, lower one):
    alpha, sigma    alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)
    lam             lambda_t = log(alpha_t / sigma_t)                   (half log-SNR)
    h               h_i = lambda_t - lambda_s > 0
    x0, x0_prev     D_theta(x_s, s) and D_theta at the previous step s' (data predictions, x0^)
    r               r_i = h_{i-1} / h_i, with h_{i-1} = lambda_s - lambda_s'

First order (DPM-Solver++ eq. 9 with k = 1; it is DDIM with eta = 0):
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0
Second order multistep (Algorithm 2):
    D = (1 + 1 / (2 r)) x0 - 1 / (2 r) x0_prev
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D
K steps cost K network evaluations.

SDE-DPM-Solver++(2M) (``sde=True``; diffusers' ``algorithm_type="sde-dpmsolver++"``, k-diffusion's
``sample_dpmpp_2m_sde`` with eta = 1, midpoint) integrates the linear part of the reverse SDE exactly
and adds fresh noise z ~ N(0, I) each step:
    x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D + sigma_t sqrt(1 - e^{-2h}) z
Its first-order step is the DDPM posterior q(x_t | x_s, x0^) (DDIM with eta = 1): the x_s coefficient
is sqrt(abar_s / abar_t) (1 - abar_t) / (1 - abar_s) and the noise variance is beta~.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from difflab.denoiser import Denoiser
from difflab.guidance import CondFn
from difflab.samplers.common import initial_state, step_noise
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


def _lam(abar: float) -> float:
    """lambda = log(alpha / sigma) = 0.5 log(abar / (1 - abar)); +inf at abar = 1."""
    return math.inf if abar >= 1.0 else 0.5 * (math.log(abar) - math.log1p(-abar))


def dpmpp_2m_update(
    x_s: Tensor,
    x0: Tensor,
    x0_prev: Tensor | None,
    abar_s: float,
    abar_t: float,
    abar_prev: float | None,
    noise: Tensor | None = None,
) -> Tensor:
    """One DPM-Solver++ step x_s -> x_t ([N, C, ...]): second order from ``x0_prev`` at ``abar_prev``, else first.

    ``noise`` (z, shaped like x_s) makes it the SDE-DPM-Solver++ step; None is the ODE step.
    abar_t = 1 (sigma_t = 0) returns x0, the limit of the first-order update (of both).
    """
    if abar_t >= 1.0:
        return x0
    sigma_s, sigma_t, alpha_t = math.sqrt(1 - abar_s), math.sqrt(1 - abar_t), math.sqrt(abar_t)
    lam_s, lam_t = _lam(abar_s), _lam(abar_t)
    h = lam_t - lam_s
    if x0_prev is None:
        d = x0
    else:
        r = (lam_s - _lam(abar_prev)) / h
        d = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
    if noise is None:
        # -alpha_t (e^{-h} - 1), with expm1 for small h.
        return (sigma_t / sigma_s) * x_s + (-alpha_t * math.expm1(-h)) * d
    one_minus = -math.expm1(-2 * h)  # 1 - e^{-2h}
    return (sigma_t / sigma_s * math.exp(-h)) * x_s + (alpha_t * one_minus) * d + (
        sigma_t * math.sqrt(one_minus)) * noise


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x_T: Tensor | Sequence[int],
    *,
    steps: StepSpec = 20,
    order: int = 2,
    sde: bool = False,
    clip_denoised: bool = False,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    cond_fn: CondFn | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    model_kwargs: dict | None = None,
    progress: bool = False,
) -> Tensor:
    """Draw x_0 [N, C, ...] from x_T with DPM-Solver++(2M) (Lu et al. 2022, Alg. 2).

    Args:
        denoiser: any :class:`Denoiser` (eps, x0 or v; any variance type) or a wrapper with its interface;
            the solver reads x0^ (``pred_xstart``) only.
        x_T: [N, C, ...] initial noise, or a shape to draw N(0, I) from ``generator``.
        steps: which steps to visit (K steps = K network evaluations): an int K (= "timeK", diffusers'
            default "linspace" spacing), any respacing string ("ddim20", "20"), ``UseTimesteps([...])``, or a solver
            spacing "timeK" / "logsnrK" (uniform in log-SNR) / "karrasK" (see :mod:`difflab.samplers.spacing`);
            ``None`` visits every step of the denoiser's process.
        order: 2 (DPM-Solver++(2M)) or 1 (DPM-Solver++(1) = DDIM with eta = 0).
        sde: SDE-DPM-Solver++(2M): fresh noise from ``generator`` every step (order 1: DDIM with eta = 1).
        clip_denoised: clip x0^ to [-1, 1]. Off by default, as in Lu et al.'s code and diffusers (without
            ``thresholding``): on MNIST clipping made every step count slightly worse (docs/results/few_steps.md).
        cond_fn: classifier guidance, applied to the score (ADM Alg. 2) before x0^ is read.
        callback: receives ``{"i", "t", "x", "pred_xstart"}`` after each step.
        model_kwargs: conditioning passed to the network (e.g. ``y``).
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    denoiser = respace_for_solver(denoiser, steps, default="time")
    x = initial_state(x_T, generator)
    abars = abar_schedule(denoiser)
    K = denoiser.num_timesteps
    x0_prev = None
    with grad_mode(cond_fn):
        for i in progress_bar(K, progress, "DPM-Solver++(2M)"):
            step = K - 1 - i
            p = denoise(
                denoiser, x, step_tensor(x, step), clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                cond_fn=cond_fn, model_kwargs=model_kwargs,
            )
            x0 = p.pred_xstart
            use_prev = x0_prev if order == 2 else None
            noise = step_noise(x, generator) if sde and abars[i + 1] < 1.0 else None
            x = dpmpp_2m_update(x, x0, use_prev, abars[i], abars[i + 1], abars[i - 1] if i > 0 else None, noise)
            x0_prev = x0
            report(callback, i, step, x, x0)
    return release(x)


def sample_dpmpp_2m_sde(denoiser: Denoiser, x_T: Tensor | Sequence[int], **kwargs: Any) -> Tensor:
    """SDE-DPM-Solver++(2M): :func:`sample_dpmpp_2m` with ``sde=True`` (same arguments)."""
    return sample_dpmpp_2m(denoiser, x_T, sde=True, **kwargs)
