"""Exact variational bound on -log p(x_0) in bits/dim (Improved DDPM sec. 3.1, official ``calc_bpd_loop``).

bits/dim = L_T + sum_{t=2}^{T} L_{t-1} + L_0, each term the per-dimension mean in nats over ln 2:
    prior_bpd  L_T = KL(q(x_T|x_0) || N(0, I))
    vb[:, t]   L_{t}: the KL term of step t > 0, the discretized decoder NLL at t = 0
Works on full or respaced processes (a respaced process gives a looser bound over its own steps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from difflab.denoiser import Denoiser
from difflab.losses import LN2, mean_flat, normal_kl, vb_terms_from_p
from difflab.process import predict_eps_from_x0, q_mean_variance, q_sample
from difflab.threads import share_cores

Tensor = torch.Tensor


def prior_bpd(denoiser: Denoiser, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, [N]; ~1e-5 for the usual schedules."""
    T = denoiser.num_timesteps
    t = torch.full((x0.shape[0],), T - 1, dtype=torch.long, device=x0.device)
    mean, _, log_var = q_mean_variance(denoiser.process, x0, t)
    zeros = torch.zeros_like(mean)
    return mean_flat(normal_kl(mean, log_var, zeros, zeros)) / LN2


@torch.no_grad()
def calc_bpd_loop(
    denoiser: Denoiser,
    x0: Tensor,
    *,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
    noises: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> dict[str, Tensor]:
    """Every term of the bound for a batch x0 [N, C, H, W] in [-1, 1] (on the 256-level grid).

    The loop runs t = T-1 down to 0, drawing x_t ~ q(x_t | x_0) with ``noises[k]`` for the k-th
    evaluated step when given (else from ``generator``). Returns [N] ``total_bpd`` and ``prior_bpd``,
    and [N, T] ``vb``, ``xstart_mse`` and ``mse`` (eps MSE) with column k holding step T-1-k (the
    loop order of the official code: ``vb[:, -1]`` is the decoder term).
    """
    T = denoiser.num_timesteps
    if noises is not None and len(noises) != T:
        raise ValueError(f"need one noise tensor per step: got {len(noises)}, expected {T}")
    vb, xstart_mse, mse = [], [], []
    for k, step in enumerate(range(T - 1, -1, -1)):
        share_cores()
        t = torch.full((x0.shape[0],), step, dtype=torch.long, device=x0.device)
        if noises is not None:
            noise = noises[k]
        else:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = q_sample(denoiser.process, x0, t, noise)
        p = denoiser(x_t, t, clip_denoised=clip_denoised, **(model_kwargs or {}))
        vb.append(vb_terms_from_p(denoiser, p, x0, x_t, t))
        xstart_mse.append(mean_flat((p.pred_xstart - x0) ** 2))
        eps = predict_eps_from_x0(denoiser.process, x_t, t, p.pred_xstart)
        mse.append(mean_flat((eps - noise) ** 2))
        if callback is not None:
            callback(k + 1, T)
    vb_t = torch.stack(vb, dim=1)
    prior = prior_bpd(denoiser, x0)
    return {
        "total_bpd": vb_t.sum(dim=1) + prior,
        "prior_bpd": prior,
        "vb": vb_t,
        "xstart_mse": torch.stack(xstart_mse, dim=1),
        "mse": torch.stack(mse, dim=1),
    }
