"""Which discrete steps a few-step ODE solver visits, and the loop helpers those solvers share.

Every solver here works on the *discrete* process of the denoiser: it keeps a subset S of its
steps (exactly as respacing does, Improved DDPM sec. 4), evaluates the network only at the kept
original indices, and ends with a jump to abar = 1 (sigma = 0), where the state is the last x0
estimate. The step rule ``steps`` is what :meth:`Process.respace` takes (an int K, "K",
"a,b,c", "ddimK", "fast27", or explicit indices ``UseTimesteps([...])``) plus three solver spacings; a bare
int K means "timeK" for DPM-Solver++ and "logsnrK" for Euler / Heun (:func:`respace_for_solver`):

    "logsnrK"    K steps uniform in lambda = log(alpha / sigma) between the last and the first step,
                 each rounded to the step of nearest lambda (DPM-Solver's "logSNR" skip type,
                 Lu et al. 2022 sec. 3.3)
    "timeK"      round(linspace(0, T-1, K+1))[1:]: diffusers' default ``timestep_spacing="linspace"``
                 (the first step at T-1, no network call at step 0)
    "karrasK"    sigma_i = (sigma_max^(1/rho) + i/(K-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
                 rho = 7 (Karras et al. 2022 eq. 5), each rounded to the step of nearest log sigma

Rounding to the nearest discrete step keeps the network at the integer timesteps it was trained
on (the denoiser contract), instead of k-diffusion's fractional t interpolated in log sigma; the
solvers then use the exact abar of the steps they visit. Rounding can merge neighbouring points
at large K (they are de-duplicated, so fewer than K steps may remain).

Notation: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) (VP, DPM-Solver), lambda_t = log(alpha_t /
sigma_t) (half log-SNR), and the Karras / EDM noise level sigma^K_t = sigma_t / alpha_t = sqrt((1-abar)/abar).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from difflab.denoiser import Denoiser
from difflab.guidance import CondFn, condition_score
from difflab.prediction import PMeanVar
from difflab.process import Process
from difflab.schedules import UseTimesteps
from difflab.threads import share_cores

Tensor = torch.Tensor
StepSpec = str | int | Sequence[int] | None

_SOLVER_SPEC = re.compile(r"^(logsnr|time|karras)(\d+)$")


def _nearest(values: np.ndarray, targets: np.ndarray) -> UseTimesteps:
    """Indices of the entries of increasing ``values`` [T] nearest to each of ``targets`` [K], sorted, unique."""
    idx = np.clip(np.searchsorted(values, targets), 1, len(values) - 1)
    left_closer = np.abs(targets - values[idx - 1]) <= np.abs(values[idx] - targets)
    return UseTimesteps(sorted({int(i) for i in np.where(left_closer, idx - 1, idx)}))


def solver_timesteps(process: Process, steps: StepSpec) -> StepSpec:
    """Resolve a solver spacing ("logsnrK", "timeK", "karrasK") into kept step indices of ``process``.

    Any other spec is returned unchanged for :meth:`Process.respace` (which validates it).
    Returns sorted indices in [0, T) as :class:`~difflab.schedules.UseTimesteps`, or the spec itself.
    """
    if not isinstance(steps, str):
        return steps
    m = _SOLVER_SPEC.match(steps.strip())
    if m is None:
        return steps
    kind, K = m.group(1), int(m.group(2))
    T = process.num_timesteps
    if not 1 <= K <= T:
        raise ValueError(f"bad step spec {steps!r}: the number of steps must lie in 1..{T} (the process has {T})")
    abar = process.alphas_cumprod.numpy()
    if kind == "time":
        return UseTimesteps(sorted({int(round(s)) for s in np.linspace(0, T - 1, K + 1)[1:]}))
    if K == 1:
        return UseTimesteps([T - 1])
    if kind == "logsnr":
        lam = 0.5 * (np.log(abar) - np.log1p(-abar))  # decreasing in t
        targets = np.linspace(lam[-1], lam[0], K)
        return _nearest(-lam, -targets)  # -lambda increases with t
    log_sigma = 0.5 * (np.log1p(-abar) - np.log(abar))  # increasing in t
    rho = 7.0
    lo, hi = math.exp(log_sigma[0]) ** (1 / rho), math.exp(log_sigma[-1]) ** (1 / rho)
    targets = np.log(np.linspace(lo, hi, K) ** rho)
    return _nearest(log_sigma, targets)


def respace_for_solver(denoiser: Denoiser, steps: StepSpec, default: str = "logsnr") -> Denoiser:
    """``denoiser`` respaced to the solver steps (see :func:`solver_timesteps`); ``None`` keeps every step.

    A bare int K means ``f"{default}{K}"``: "timeK" for DPM-Solver++ (diffusers' default; on MNIST
    models of both schedules it beat "logsnrK" at 5, 10 and 20 NFE, docs/results/few_steps.md),
    "logsnrK" for Euler / Heun (equal sigma ratios per step, which Heun's trapezoid needs). Evenly
    strided steps from 0 ("K", "ddimK", the ancestral / DDIM rule) make DPM-Solver++(2M) worse than
    DDIM on the linear schedule, because the log-SNR gaps near t = 0 grow so fast that the multistep
    ratio r_i is far from 1; "timeK" never visits step 0 and jumps from ~T/K straight to x0^.
    """
    if steps is None:
        return denoiser
    if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        steps = f"{default}{int(steps)}"
    return denoiser.respace(solver_timesteps(denoiser.process, steps))


def grad_mode(cond_fn: CondFn | None):
    """``torch.inference_mode()`` when nothing needs gradients, else ``torch.no_grad()``.

    Classifier guidance takes grad_{x_t} log p(y | x_t) inside ``cond_fn`` (under ``torch.enable_grad()``),
    which inference tensors cannot feed: they cannot be saved for backward.
    """
    return torch.no_grad() if cond_fn is not None else torch.inference_mode()


def release(x: Tensor) -> Tensor:
    """An ordinary tensor with x's values: inference tensors reject in-place updates and autograd outside
    ``inference_mode``, which callers of a sampler may well do with its samples (one copy per sample call)."""
    return x.clone() if x.is_inference() else x


def denoise(
    denoiser: Denoiser,
    x_t: Tensor,
    t: Tensor,
    *,
    clip_denoised: bool,
    denoised_fn: Callable[[Tensor], Tensor] | None,
    cond_fn: CondFn | None,
    model_kwargs: dict | None,
) -> PMeanVar:
    """The denoiser's prediction at steps ``t`` [N], score-guided by ``cond_fn`` (ADM Alg. 2) when given.

    Solvers read ``.pred_xstart`` (x0^, [N, C, ...]) and ``.eps`` from it, so they work for every
    parameterization and variance type and for any wrapper that keeps the Denoiser interface.
    """
    cond = model_kwargs or {}
    p = denoiser(x_t, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, **cond)
    if cond_fn is not None:
        p = condition_score(denoiser, cond_fn, p, x_t, t, **cond)
    return p


def abar_schedule(denoiser: Denoiser) -> list[float]:
    """abar of the solver's steps, in visiting order (T-1, ..., 0), then 1.0 for the final jump to x0."""
    abar = denoiser.process.alphas_cumprod.tolist()
    return abar[::-1] + [1.0]


def progress_bar(n: int, progress: bool, desc: str):
    """range(n), wrapped in tqdm when ``progress``; each step first fits the thread count to the machine's
    load (:func:`difflab.threads.share_cores`)."""
    steps = range(n)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc, leave=False)
    for i in steps:
        share_cores()
        yield i


def step_tensor(x: Tensor, index: int) -> Tensor:
    """A [N] int64 tensor filled with step ``index`` on x's device."""
    return torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)


def report(callback: Callable[[dict[str, Any]], None] | None, i: int, t: int, x: Tensor, x0: Tensor) -> None:
    """Hand ``{"i", "t", "x", "pred_xstart"}`` to ``callback`` (the same keys as the other samplers)."""
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "pred_xstart": x0})


__all__ = ["solver_timesteps", "respace_for_solver", "grad_mode", "release", "denoise", "abar_schedule"]
