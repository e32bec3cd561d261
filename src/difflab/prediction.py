"""From raw network output to p(x_{t-1} | x_t): (eps, x0, mean, variance) for every parameterization.

Mean types (what the network predicts): ``eps`` (DDPM eq. 11), ``x0`` (Improved DDPM "start_x"),
``v`` (Salimans & Ho 2022). In all three the model mean is the posterior mean at the predicted x0,
mu_theta(x_t, t) = mu~_t(x0^, x_t) (DDPM eq. 7, 11).

Variance types:
    fixed_small     sigma_t^2 = beta~_t                                 (DDPM sec. 3.2)
    fixed_large     sigma_t^2 = beta_t, with beta~_2 at t = 0 (official code)
    learned         log sigma_t^2 = network output
    learned_range   log sigma_t^2 = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1)/2
                    (Improved DDPM eq. 15 with v in [-1, 1] mapped to [0, 1] as the code does)
Learned variances make the network output 2C channels: the mean prediction first, then v.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch

from difflab.process import (
    Process,
    get_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_posterior_mean_variance,
)

Tensor = torch.Tensor
MeanType = Literal["eps", "x0", "v"]
VarType = Literal["fixed_small", "fixed_large", "learned", "learned_range"]
MEAN_TYPES: tuple[str, ...] = get_args(MeanType)
VAR_TYPES: tuple[str, ...] = get_args(VarType)


class PMeanVar(NamedTuple):
    """p_theta(x_{t-1} | x_t) and the predictions behind it; every tensor is [N, C, ...]."""

    mean: Tensor
    variance: Tensor
    log_variance: Tensor
    pred_xstart: Tensor
    eps: Tensor
    model_output: Tensor


@dataclass(frozen=True)
class Parameterization:
    """What a network predicts: ``mean_type`` (eps | x0 | v) and ``var_type`` (see module doc)."""

    mean_type: MeanType = "eps"
    var_type: VarType = "fixed_small"

    def __post_init__(self):
        if self.mean_type not in MEAN_TYPES:
            raise ValueError(f"unknown mean_type {self.mean_type!r}; valid choices: {', '.join(MEAN_TYPES)}")
        if self.var_type not in VAR_TYPES:
            raise ValueError(f"unknown var_type {self.var_type!r}; valid choices: {', '.join(VAR_TYPES)}")

    @property
    def learned_variance(self) -> bool:
        return self.var_type in ("learned", "learned_range")

    def out_channels(self, channels: int) -> int:
        """Number of network output channels for images with ``channels`` channels."""
        return 2 * channels if self.learned_variance else channels

    def split(self, model_output: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
        """Split raw output [N, C or 2C, ...] into (mean prediction [N, C, ...], variance values or None)."""
        want = self.out_channels(channels)
        if model_output.dim() < 2 or model_output.shape[1] != want:
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)}; expected {want} channels for "
                f"{channels}-channel data with var_type={self.var_type!r}"
            )
        if self.learned_variance:
            pred, var_values = torch.split(model_output, channels, dim=1)
            return pred, var_values
        return model_output, None

    def variance(self, process: Process, var_values: Tensor | None, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(variance, log_variance) of p(x_{t-1} | x_t), each [N, C, ...]."""
        if self.var_type == "learned":
            return torch.exp(var_values), var_values
        if self.var_type == "learned_range":
            min_log = process.extract("posterior_log_variance_clipped", t, x_t)
            max_log = process.extract("log_betas", t, x_t)  # log in float64, then cast (official)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            return torch.exp(log_variance), log_variance
        name = "posterior_variance" if self.var_type == "fixed_small" else "large_variance"
        variance = process.extract(name, t, x_t).expand_as(x_t)
        name = "posterior_log_variance_clipped" if self.var_type == "fixed_small" else "large_log_variance"
        log_variance = process.extract(name, t, x_t).expand_as(x_t)
        return variance, log_variance

    def pred_x0(self, process: Process, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The network's x0 estimate from its mean prediction [N, C, ...]."""
        if self.mean_type == "eps":
            return predict_x0_from_eps(process, x_t, t, pred)
        if self.mean_type == "v":
            return predict_x0_from_v(process, x_t, t, pred)
        return pred

    def target(self, process: Process, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Regression target of L_simple for this mean type: eps, x0 or v."""
        if self.mean_type == "eps":
            return eps
        if self.mean_type == "x0":
            return x0
        return get_v(process, x0, eps, t)

    def p_mean_variance(
        self,
        process: Process,
        model_output: Tensor,
        x_t: Tensor,
        t: Tensor,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> PMeanVar:
        """p_theta(x_{t-1} | x_t) from raw network output (Improved DDPM sec. 2).

        x0^ is clipped to [-1, 1] when ``clip_denoised`` (sampling only) and passed through
        ``denoised_fn`` if given; the mean is mu~_t(x0^, x_t). eps is recomputed from the processed x0^.
        """
        pred, var_values = self.split(model_output, x_t.shape[1])
        variance, log_variance = self.variance(process, var_values, x_t, t)
        x0 = self.pred_x0(process, pred, x_t, t)
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = q_posterior_mean_variance(process, x0, x_t, t)
        if self.mean_type == "eps" and not clip_denoised and denoised_fn is None:
            eps = pred
        else:
            eps = predict_eps_from_x0(process, x_t, t, x0)
        return PMeanVar(mean, variance, log_variance, x0, eps, model_output)
