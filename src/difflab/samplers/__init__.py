"""Samplers: plain functions over a :class:`~difflab.denoiser.Denoiser`."""

from difflab.samplers.ancestral import p_sample, sample_ancestral
from difflab.samplers.ddim import ddim_invert, ddim_reverse_sample, ddim_sample, sample_ddim

__all__ = ["p_sample", "sample_ancestral", "ddim_sample", "ddim_reverse_sample", "sample_ddim", "ddim_invert"]
