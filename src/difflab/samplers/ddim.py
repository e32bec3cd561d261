"""DDIM sampling and inversion (Song et al. 2021; guided by the score, ADM Alg. 2).

    sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1})
    x_{t-1} = sqrt(abar_{t-1}) x0^ + sqrt(1 - abar_{t-1} - sigma_t^2) eps^ + sigma_t z   (DDIM eq. 12)
with eps^ recomputed from the (clipped) x0^ and no noise at the last step. Inversion runs the
deterministic (eta = 0) update forwards: x_{t+1} = sqrt(abar_{t+1}) x0^ + sqrt(1 - abar_{t+1}) eps^.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from difflab.denoiser import Denoiser
from difflab.guidance import CondFn, condition_score
from difflab.process import predict_eps_from_x0
from difflab.samplers.common import initial_state, reverse_loop, step_noise

Tensor = torch.Tensor


def ddim_sample(
    denoiser: Denoiser,
    x_t: Tensor,
    t: Tensor,
    *,
    eta: float = 0.0,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    cond_fn: CondFn | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    model_kwargs: dict | None = None,
) -> dict[str, Tensor]:
    """One DDIM step x_t -> x_{t-1}. x_t: [N, C, ...], t: [N]. Returns ``sample`` and ``pred_xstart``."""
    if not 0 <= eta < float("inf"):  # nan fails every comparison
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    cond = model_kwargs or {}
    process = denoiser.process
    p = denoiser(x_t, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, **cond)
    if cond_fn is not None:
        p = condition_score(denoiser, cond_fn, p, x_t, t, **cond)
    eps = predict_eps_from_x0(process, x_t, t, p.pred_xstart)
    abar = process.extract("alphas_cumprod", t, x_t)
    abar_prev = process.extract("alphas_cumprod_prev", t, x_t)
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
    mean = p.pred_xstart * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
    if eta > 0 or noise is not None:
        if noise is None:
            noise = step_noise(x_t, generator)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        mean = mean + nonzero * sigma * noise
    return {"sample": mean, "pred_xstart": p.pred_xstart}


def ddim_reverse_sample(
    denoiser: Denoiser,
    x_t: Tensor,
    t: Tensor,
    *,
    clip_denoised: bool = False,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    model_kwargs: dict | None = None,
) -> dict[str, Tensor]:
    """One deterministic DDIM step forwards, x_t -> x_{t+1} (inversion). Returns ``sample``, ``pred_xstart``."""
    process = denoiser.process
    p = denoiser(x_t, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, **(model_kwargs or {}))
    eps = predict_eps_from_x0(process, x_t, t, p.pred_xstart)
    abar_next = process.extract("alphas_cumprod_next", t, x_t)
    sample = p.pred_xstart * torch.sqrt(abar_next) + torch.sqrt(1 - abar_next) * eps
    return {"sample": sample, "pred_xstart": p.pred_xstart}


def sample_ddim(
    denoiser: Denoiser,
    x_T: Tensor | Sequence[int],
    *,
    steps: str | int | Sequence[int] | None = None,
    eta: float = 0.0,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    cond_fn: CondFn | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    model_kwargs: dict | None = None,
    progress: bool = False,
    end: int = 0,
) -> Tensor:
    """Draw x_0 with DDIM from x_T (a tensor or a shape); ``steps`` respaces the process first; ``end = 1``
    stops at the noise level of the first kept step (:func:`difflab.augment.sample_truncated`)."""
    denoiser = denoiser.respace(steps)
    x = initial_state(x_T, generator)

    def step(x_t: Tensor, t: Tensor) -> dict[str, Tensor]:
        return ddim_sample(
            denoiser, x_t, t, eta=eta, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            generator=generator, model_kwargs=model_kwargs,
        )

    return reverse_loop(denoiser, x, step, callback, progress, end)


@torch.no_grad()
def ddim_invert(
    denoiser: Denoiser,
    x0: Tensor,
    *,
    steps: str | int | Sequence[int] | None = None,
    clip_denoised: bool = False,
    model_kwargs: dict | None = None,
) -> Tensor:
    """Encode an image into its DDIM latent x_T by running :func:`ddim_reverse_sample` for t = 0..T-1."""
    denoiser = denoiser.respace(steps)
    x = x0
    for step_index in range(denoiser.num_timesteps):
        t = torch.full((x.shape[0],), step_index, dtype=torch.long, device=x.device)
        x = ddim_reverse_sample(denoiser, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)["sample"]
    return x
