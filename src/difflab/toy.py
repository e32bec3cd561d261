"""Isotropic Gaussian mixtures, whose noisy marginals, optimal denoisers and class posteriors are closed form.

Data x_0 ~ sum_k pi_k N(mu_k, s_k^2 I) in D dimensions. Under q, x_t = a x_0 + b eps with
a = sqrt(abar_t), b = sqrt(1 - abar_t), so x_t ~ sum_k pi_k N(a mu_k, (a^2 s_k^2 + b^2) I) and

    E[x_0 | x_t] = sum_k r_k(x_t) (mu_k + a s_k^2 / (a^2 s_k^2 + b^2) (x_t - a mu_k)),
    r_k(x_t)     = p(k | x_t) (the exact class posterior, for guidance tests),

which is the minimiser of every L_simple parameterization. Used by the tests to check samplers,
likelihoods and guidance against truth. Points are shaped [N, D, 1, 1] to look like images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from difflab.process import Process

Tensor = torch.Tensor


class GaussianMixture:
    """A mixture of isotropic Gaussians in D dimensions (float64).

    Args:
        means: [K, D] component means; stds: [K] component standard deviations; weights: [K] mixture weights.
    """

    def __init__(self, means: Sequence, stds: Sequence[float], weights: Sequence[float]):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() == 1:
            self.means = self.means[:, None]
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        w = torch.as_tensor(weights, dtype=torch.float64)
        K = self.means.shape[0]
        if self.stds.shape != (K,) or w.shape != (K,):
            raise ValueError(f"means, stds and weights must describe the same {K} components")
        if (self.stds <= 0).any() or (w < 0).any() or w.sum() <= 0:
            raise ValueError("stds must be > 0 and weights >= 0 with a positive sum")
        self.weights = w / w.sum()
        self.dim = self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n points [n, D, 1, 1] and their component labels [n]."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[k] + self.stds[k, None] * z
        return x[:, :, None, None], k

    def _component_log_probs(self, x: Tensor, a: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
        """log pi_k N(x; a mu_k, (a^2 s_k^2 + b^2) I) [N, K] and the variances [N, K]."""
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        var = a[:, None] ** 2 * self.stds[None] ** 2 + b2[:, None]
        d2 = ((x[:, None, :] - a[:, None, None] * self.means[None]) ** 2).sum(-1)
        logp = torch.log(self.weights)[None] - 0.5 * d2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return logp, var

    def log_prob(self, x: Tensor) -> Tensor:
        """Density log p(x_0) [N] of points [N, D, ...] (natural log)."""
        ones = torch.ones(x.shape[0], dtype=torch.float64)
        logp, _ = self._component_log_probs(x, ones, torch.zeros_like(ones))
        return torch.logsumexp(logp, dim=1)

    def class_log_posterior(self, x_t: Tensor, abar: Tensor) -> Tensor:
        """log p(k | x_t) [N, K] for x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps, abar: [N]."""
        logp, _ = self._component_log_probs(x_t, abar.sqrt(), 1 - abar)
        return torch.log_softmax(logp, dim=1)

    def posterior_moments(self, x_t: Tensor, abar: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """E[x_0 | x_t] [N, D, 1, 1] and the per-dimension average of Var[x_0 | x_t] [N].

        Given component ``labels`` [N], the moments are those of p(x_0 | x_t, k).
        """
        a, b2 = abar.sqrt(), 1 - abar
        logp, var = self._component_log_probs(x_t, a, b2)
        flat = x_t.reshape(x_t.shape[0], -1).to(torch.float64)
        gain = a[:, None] * self.stds[None] ** 2 / var  # [N, K]
        per_k = self.means[None] + gain[..., None] * (flat[:, None, :] - a[:, None, None] * self.means[None])
        var_k = self.stds[None] ** 2 * b2[:, None] / var  # Var[x_0 | x_t, k] per dimension, [N, K]
        if labels is None:
            r = torch.softmax(logp, dim=1)
        else:
            r = torch.nn.functional.one_hot(labels, self.means.shape[0]).to(torch.float64)
        mean = (r[..., None] * per_k).sum(1)
        second = (r * (var_k + (per_k**2).mean(-1))).sum(1)
        variance = second - (mean**2).mean(-1)
        return mean.reshape(x_t.shape), variance.clamp(min=0)

    def posterior_mean(self, x_t: Tensor, abar: Tensor, labels: Tensor | None = None) -> Tensor:
        """E[x_0 | x_t] [N, D, 1, 1] (or E[x_0 | x_t, k] given component ``labels`` [N])."""
        return self.posterior_moments(x_t, abar, labels)[0].to(x_t.dtype)

    def eps_net(self, process: Process, optimal_variance: bool = False):
        """The optimal eps-prediction "network" ``net(x_t, t, y=None)`` (t: original indices).

        ``y`` (component labels [N]) makes it the optimal class-conditional network. With
        ``optimal_variance`` it also outputs, as a second half of channels, the log of the variance
        that matches the true reverse q(x_{t-1} | x_t) of ``process`` (use var_type "learned"):
        beta~_t + coef1_t^2 Var[x_0 | x_t] (moment matching, as in Analytic-DPM, Bao et al. 2022).
        The process given must then be the one sampled (respaced or not).
        """
        local = {int(o): i for i, o in enumerate(process.timestep_map.tolist())}
        # abar of every original index: the respaced process keeps abar at its kept steps.
        full_alphas_cumprod = {int(o): process.alphas_cumprod[i] for o, i in local.items()}

        def net(x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
            steps = t.cpu().tolist()
            abar = torch.stack([full_alphas_cumprod[s] for s in steps]).to(torch.float64)
            x0, var_x0 = self.posterior_moments(x_t, abar, y)
            shape = (-1,) + (1,) * (x_t.dim() - 1)
            eps = (x_t.to(torch.float64) - abar.sqrt().reshape(shape) * x0) / (1 - abar).sqrt().reshape(shape)
            if not optimal_variance:
                return eps.to(x_t.dtype)
            idx = torch.tensor([local[s] for s in steps])
            reverse_var = process.posterior_variance[idx] + process.posterior_mean_coef1[idx] ** 2 * var_x0
            log_var = torch.log(reverse_var).reshape(shape).expand_as(eps)
            return torch.cat([eps, log_var], dim=1).to(x_t.dtype)

        return net
