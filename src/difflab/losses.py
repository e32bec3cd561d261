"""Training objectives: L_simple, the variational bound terms in bits/dim, L_hybrid, pure KL.

Notation (code -> paper):
    vb_terms_bpd(t > 0)   L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) / ln 2     (DDPM eq. 5)
    vb_terms_bpd(t = 0)   L_0 = -log p(x_0 | x_1) / ln 2, discretized Gaussian decoder   (DDPM eq. 13)
    loss_type "mse"       L_simple (DDPM eq. 14), plus the VLB term for learned variances (unscaled)
    loss_type "hybrid"    L_simple + lambda L_vlb, lambda = 0.001: the VLB term times T/1000 with a
                          stop-gradient on the mean (Improved DDPM eq. 16; code "rescaled_mse")
    loss_type "kl"        L_t alone (the t-th VLB term);  "rescaled_kl": L_t * T, an estimate of L_vlb
All per-example values are means over every pixel dimension ("bits/dim"), shape [N].
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from difflab.denoiser import Denoiser
from difflab.prediction import PMeanVar
from difflab.process import q_posterior_mean_variance, q_sample

Tensor = torch.Tensor
LossType = Literal["mse", "hybrid", "kl", "rescaled_kl"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
LN2 = math.log(2.0)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch: [N, ...] -> [N]."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats.

    = 0.5 (-1 + logvar2 - logvar1 + e^{logvar1 - logvar2} + (mean1 - mean2)^2 e^{-logvar2}).
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The official tanh approximation of Phi(x): 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def exact_standard_normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) through erf; an option of the decoder (the official bits/dim use the tanh form)."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(
    x: Tensor, means: Tensor, log_scales: Tensor, *, exact_cdf: bool = False
) -> Tensor:
    """log p(x) per element for 8-bit data in [-1, 1] under N(means, e^{2 log_scales}) (DDPM eq. 13).

    Each value owns the bin [x - 1/255, x + 1/255]; the bins at -1 and +1 extend to -inf / +inf.
    Probabilities are clamped at 1e-12 before the log, as in the official code. [N, ...] -> [N, ...].
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}"
        )
    cdf = exact_standard_normal_cdf if exact_cdf else approx_standard_normal_cdf
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_from_p(denoiser: Denoiser, p: PMeanVar, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """The VLB term at steps t [N] in bits/dim, given p(x_{t-1} | x_t): KL for t > 0, decoder NLL at t = 0."""
    true_mean, _, true_log_var = q_posterior_mean_variance(denoiser.process, x0, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_var, p.mean, p.log_variance)) / LN2
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance)) / LN2
    return torch.where(t == 0, nll, kl)


def vb_terms_bpd(
    denoiser: Denoiser,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
) -> dict[str, Tensor]:
    """The t-th VLB term in bits/dim ([N]) and the x0 prediction (official ``_vb_terms_bpd``)."""
    p = denoiser(x_t, t, clip_denoised=clip_denoised, **(model_kwargs or {}))
    return {"output": vb_terms_from_p(denoiser, p, x0, x_t, t), "pred_xstart": p.pred_xstart}


def training_losses(
    denoiser: Denoiser,
    x0: Tensor,
    t: Tensor,
    *,
    loss_type: LossType = "mse",
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    model_kwargs: dict | None = None,
) -> dict[str, Tensor]:
    """Per-example training losses at steps t (official ``training_losses``).

    Args:
        x0: [N, C, H, W] data in [-1, 1]; t: [N] steps of ``denoiser.process``; noise: eps, drawn if None.
    Returns a dict of [N] tensors: ``loss``, and ``mse`` / ``vb`` where they enter it.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid choices: {', '.join(LOSS_TYPES)}")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    cond = model_kwargs or {}
    process, param = denoiser.process, denoiser.parameterization
    x_t = q_sample(process, x0, t, noise)
    if loss_type in ("kl", "rescaled_kl"):
        p = denoiser(x_t, t, clip_denoised=False, **cond)
        loss = vb_terms_from_p(denoiser, p, x0, x_t, t)
        if loss_type == "rescaled_kl":
            loss = loss * process.num_timesteps
        return {"loss": loss}

    out = denoiser.model_output(x_t, t, **cond)
    terms: dict[str, Tensor] = {}
    if param.learned_variance:
        # The VLB term trains only the variance: the mean prediction is detached (Improved DDPM sec. 3.1).
        pred, var_values = param.split(out, x0.shape[1])
        frozen = torch.cat([pred.detach(), var_values], dim=1)
        p = param.p_mean_variance(process, frozen, x_t, t, clip_denoised=False)
        terms["vb"] = vb_terms_from_p(denoiser, p, x0, x_t, t)
        if loss_type == "hybrid":
            # lambda = 0.001 at T = 1000: the term is scaled by T / 1000 (official rescale_learned_sigmas).
            terms["vb"] = terms["vb"] * (process.num_timesteps / 1000.0)
        pred_mean = pred
    else:
        pred_mean = out
    target = param.target(process, x0, noise, t)
    if target.shape != pred_mean.shape:
        raise ValueError(f"model output {tuple(pred_mean.shape)} does not match the target {tuple(target.shape)}")
    terms["mse"] = mean_flat((target - pred_mean) ** 2)
    terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
    return terms

