"""Samplers: plain functions over a :class:`~difflab.denoiser.Denoiser`.

``SAMPLERS`` maps the names the CLI takes (``difflab sample --sampler NAME``) to the functions; each
is called as ``fn(denoiser, x_T, *, steps, clip_denoised, generator, callback, model_kwargs, progress)``.
Network evaluations for ``steps`` = K: K for every sampler except ``heun`` (2K - 1).
"""

from collections.abc import Callable

from difflab.samplers.ancestral import p_sample, sample_ancestral
from difflab.samplers.ddim import ddim_invert, ddim_reverse_sample, ddim_sample, sample_ddim
from difflab.samplers.dpm_solver import dpmpp_2m_update, sample_dpmpp_2m, sample_dpmpp_2m_sde
from difflab.samplers.karras import sample_euler, sample_heun
from difflab.samplers.spacing import solver_timesteps


class SamplerRegistry(dict):
    """A dict of name -> sampler whose unknown names raise ValueError listing the valid ones."""

    def __missing__(self, name):
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(self)}")


SAMPLERS: dict[str, Callable] = SamplerRegistry(
    ancestral=sample_ancestral,
    ddim=sample_ddim,
    **{"dpmpp-2m": sample_dpmpp_2m, "dpmpp-2m-sde": sample_dpmpp_2m_sde},
    euler=sample_euler,
    heun=sample_heun,
)


def get_sampler(name: str) -> Callable:
    """The sampler function called ``name`` (see ``SAMPLERS``); ValueError listing the valid names otherwise."""
    return SAMPLERS[name]


__all__ = [
    "p_sample", "sample_ancestral", "ddim_sample", "ddim_reverse_sample", "sample_ddim", "ddim_invert",
    "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "dpmpp_2m_update", "sample_euler", "sample_heun", "solver_timesteps",
    "SAMPLERS", "get_sampler",
]
