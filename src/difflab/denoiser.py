"""The denoiser contract: a network, the process it runs on, and how to read its output.

Every sampler, loss, likelihood and guidance wrapper takes a :class:`Denoiser`. Calling it with a
state ``x_t`` [N, C, H, W] and step indices ``t`` [N] of *its* process returns p(x_{t-1} | x_t)
as a :class:`~difflab.prediction.PMeanVar`. The network itself is called as
``net(x_t, timestep_map[t], **cond)``: it always sees indices of the original process, so a
respaced denoiser (:meth:`Denoiser.respace`) reuses the same network unchanged. With ``time_scale``
it sees ``timestep_map[t] * time_scale`` instead (floats): improved-diffusion's ``rescale_timesteps``,
which feeds its networks t * 1000 / T whatever T is (its unconditional 4000-step checkpoints need it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from difflab.prediction import Parameterization, PMeanVar
from difflab.process import Process

Tensor = torch.Tensor


class Denoiser:
    """A network wrapped with its process and parameterization.

    Args:
        net: callable ``net(x_t, t, **cond) -> raw output`` ([N, C or 2C, ...]); ``t`` original indices.
        process: the (possibly respaced) :class:`~difflab.process.Process`.
        parameterization: what the network predicts (eps | x0 | v, and the variance type).
        time_scale: None (the network sees integer original indices), or the factor they are multiplied
            by (float32) before the network sees them: 1000 / T for improved-diffusion's ``rescale_timesteps``.
    """

    def __init__(self, net: Callable[..., Tensor], process: Process, parameterization: Parameterization,
                 *, time_scale: float | None = None):
        self.net = net
        self.process = process
        self.parameterization = parameterization
        self.time_scale = time_scale

    @property
    def num_timesteps(self) -> int:
        return self.process.num_timesteps

    def respace(self, spec) -> Denoiser:
        """The same network on a respaced process (see :meth:`Process.respace`); ``None`` keeps all steps."""
        if spec is None:
            return self
        return type(self)(self.net, self.process.respace(spec), self.parameterization, time_scale=self.time_scale)

    def with_net(self, net: Callable[..., Tensor]) -> Denoiser:
        """The same process, parameterization and time scale around another network (e.g. a guidance wrapper)."""
        return type(self)(net, self.process, self.parameterization, time_scale=self.time_scale)

    def network_t(self, t: Tensor) -> Tensor:
        """What the network is called with at steps ``t`` [N] of this process: original indices, scaled by
        ``time_scale`` when set (official ``_WrappedModel``: ``timestep_map[t] * 1000 / T`` as floats)."""
        orig = self.process.original_t(t)
        return orig if self.time_scale is None else orig.float() * self.time_scale

    def model_output(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """Raw network output at steps ``t`` of this process. x_t: [N, C, ...], t: [N] int64."""
        self.process.check_t(t)
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"timesteps must have shape ({x_t.shape[0]},), got {tuple(t.shape)}")
        out = self.net(x_t, self.network_t(t), **cond)
        return out.to(x_t.dtype)

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor,
        *,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        **cond: Any,
    ) -> PMeanVar:
        """p_theta(x_{t-1} | x_t) at steps ``t`` of this process (official ``p_mean_variance``)."""
        out = self.model_output(x_t, t, **cond)
        return self.parameterization.p_mean_variance(self.process, out, x_t, t, clip_denoised, denoised_fn)


def p_mean_variance(
    denoiser: Denoiser,
    x_t: Tensor,
    t: Tensor,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    model_kwargs: dict | None = None,
) -> PMeanVar:
    """Official-named form of ``denoiser(x_t, t, clip_denoised=..., **model_kwargs)``."""
    return denoiser(x_t, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, **(model_kwargs or {}))
