"""difflab: pixel-space diffusion models exact to the papers and the official OpenAI code.

The process math is importable under the official OpenAI names::

    from difflab import Process, Parameterization, Denoiser, q_sample, training_losses, calc_bpd_loop
"""

from difflab.denoiser import Denoiser, p_mean_variance
from difflab.guidance import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    ClassifierInfo,
    classifier_free_denoiser,
    classifier_grad_fn,
    drop_labels,
    guided_denoiser,
)
from difflab.likelihood import calc_bpd_loop, prior_bpd
from difflab.losses import (
    discretized_gaussian_log_likelihood,
    normal_kl,
    training_losses,
    vb_terms_bpd,
)
from difflab.prediction import Parameterization, PMeanVar
from difflab.process import (
    Process,
    get_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
)
from difflab.samplers import (
    SAMPLERS,
    ddim_invert,
    ddim_reverse_sample,
    ddim_sample,
    get_sampler,
    p_sample,
    sample_ancestral,
    sample_ddim,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_heun,
)
from difflab.schedules import UseTimesteps, betas_for_alpha_bar, get_named_beta_schedule, space_timesteps
from difflab.timesteps import LossSecondMomentResampler, UniformSampler, create_timestep_sampler

__version__ = "0.1.0"

__all__ = [
    "Denoiser", "Parameterization", "PMeanVar", "Process",
    "betas_for_alpha_bar", "get_named_beta_schedule", "space_timesteps", "UseTimesteps",
    "q_sample", "q_mean_variance", "q_posterior_mean_variance", "p_mean_variance",
    "predict_x0_from_eps", "predict_eps_from_x0", "predict_x0_from_v", "get_v",
    "normal_kl", "discretized_gaussian_log_likelihood", "training_losses", "vb_terms_bpd",
    "calc_bpd_loop", "prior_bpd",
    "p_sample", "sample_ancestral", "ddim_sample", "ddim_reverse_sample", "sample_ddim", "ddim_invert",
    "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_euler", "sample_heun", "SAMPLERS", "get_sampler",
    "UniformSampler", "LossSecondMomentResampler", "create_timestep_sampler",
    "ClassifierGuidance", "ClassifierFreeGuidance", "ClassifierInfo", "classifier_free_denoiser",
    "classifier_grad_fn", "drop_labels", "guided_denoiser",
]
