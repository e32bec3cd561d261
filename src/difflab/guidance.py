"""Guidance of a denoiser by the gradient of a classifier's log-probability (ADM, Dhariwal & Nichol 2021).

``cond_fn(x_t, t, **cond)`` returns s * grad_{x_t} log p(y | x_t, t) (already times the scale s), with
``t`` the original process index. Two ways to use it (ADM Algorithms 1 and 2):
    condition_mean   ancestral sampling: mu <- mu + s Sigma grad                          (Alg. 1)
    condition_score  DDIM: eps <- eps - sqrt(1 - abar_t) s grad, then x0^ and mu from it  (Alg. 2)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.denoiser import Denoiser
from difflab.prediction import PMeanVar
from difflab.process import predict_eps_from_x0, predict_x0_from_eps, q_posterior_mean_variance

Tensor = torch.Tensor
CondFn = Callable[..., Tensor]


def condition_mean(denoiser: Denoiser, cond_fn: CondFn, p: PMeanVar, x_t: Tensor, t: Tensor, **cond) -> PMeanVar:
    """Shift the mean of p(x_{t-1}|x_t) by Sigma * cond_fn(x_t, t) (ADM Alg. 1). The gradient is taken at x_t."""
    gradient = cond_fn(x_t, denoiser.process.original_t(t), **cond)
    return p._replace(mean=p.mean + p.variance * gradient.to(p.mean.dtype))


def condition_score(denoiser: Denoiser, cond_fn: CondFn, p: PMeanVar, x_t: Tensor, t: Tensor, **cond) -> PMeanVar:
    """Shift the score: eps' = eps - sqrt(1 - abar_t) cond_fn(x_t, t); x0^ and the mean follow (ADM Alg. 2)."""
    process = denoiser.process
    gradient = cond_fn(x_t, process.original_t(t), **cond).to(x_t.dtype)
    eps = predict_eps_from_x0(process, x_t, t, p.pred_xstart)
    eps = eps - process.extract("sqrt_one_minus_alphas_cumprod", t, x_t) * gradient
    x0 = predict_x0_from_eps(process, x_t, t, eps)
    mean, _, _ = q_posterior_mean_variance(process, x0, x_t, t)
    return p._replace(mean=mean, pred_xstart=x0, eps=eps)
