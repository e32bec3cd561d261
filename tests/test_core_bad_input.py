"""Bad input to the core: a ValueError that names the problem and the valid choices."""

import pytest
import torch

from difflab import (
    Denoiser,
    Parameterization,
    Process,
    UseTimesteps,
    get_named_beta_schedule,
    q_sample,
    space_timesteps,
    training_losses,
)
from difflab.timesteps import create_timestep_sampler


def test_unknown_schedule_lists_choices():
    with pytest.raises(ValueError, match=r"unknown beta schedule 'cosin'.*linear, cosine"):
        get_named_beta_schedule("cosin", 1000)


@pytest.mark.parametrize("T", [0, -5, 2.5, True])
def test_bad_T(T):
    with pytest.raises(ValueError, match="T must be an integer >= 1"):
        get_named_beta_schedule("linear", T)


def test_linear_schedule_too_short():
    with pytest.raises(ValueError, match="linear schedule needs T >= 20"):
        get_named_beta_schedule("linear", 10)


def test_timesteps_out_of_range():
    process = Process.named("cosine", 10)
    x0 = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"out of range: got 0..10, valid 0..9"):
        q_sample(process, x0, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="integer tensor"):
        q_sample(process, x0, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize(
    "spec,message",
    [
        (UseTimesteps([3, 2, 5]), "strictly increasing"),
        (UseTimesteps([0, 5, 10]), r"must lie in \[0, 9\]"),
        (UseTimesteps([]), "at least one step"),
        ([0, 5], r"steps=\[0, 5\] is ambiguous.*\"10,10,3\".*UseTimesteps"),
        (2.5, "bad respacing 2.5"),
        ("11", "cannot take 11 steps"),
        ("ddim7", "cannot create exactly 7 steps"),
        ("fast", "expected 'K', 'a,b,...', 'ddimK', 'fast27'"),
        ("0", "integers >= 1"),
    ],
)
def test_bad_respacing(spec, message):
    with pytest.raises(ValueError, match=message):
        Process.named("cosine", 10).respace(spec)


def test_bad_parameterization_lists_choices():
    with pytest.raises(ValueError, match="unknown mean_type 'mu'; valid choices: eps, x0, v"):
        Parameterization("mu", "fixed_small")
    with pytest.raises(ValueError, match="valid choices: fixed_small, fixed_large, learned, learned_range"):
        Parameterization("eps", "small")


def test_output_channels_that_do_not_fit():
    process = Process.named("cosine", 10)
    d = Denoiser(lambda x, t: x, process, Parameterization("eps", "learned_range"))
    with pytest.raises(ValueError, match="expected 6 channels for 3-channel data with var_type='learned_range'"):
        d(torch.zeros(2, 3, 4, 4), torch.tensor([1, 2]))


def test_shapes_that_do_not_fit():
    process = Process.named("cosine", 10)
    d = Denoiser(lambda x, t: x, process, Parameterization("eps", "fixed_small"))
    with pytest.raises(ValueError, match=r"timesteps must have shape \(2,\)"):
        d(torch.zeros(2, 3, 4, 4), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="noise shape"):
        q_sample(process, torch.zeros(2, 3, 4, 4), torch.tensor([1, 2]), torch.zeros(2, 3, 4, 5))


def test_unknown_loss_and_sampler():
    d = Denoiser(lambda x, t: x, Process.named("cosine", 10), Parameterization())
    with pytest.raises(ValueError, match="valid choices: mse, hybrid, kl, rescaled_kl"):
        training_losses(d, torch.zeros(1, 1, 2, 2), torch.tensor([0]), loss_type="l1")
    with pytest.raises(ValueError, match="valid choices: uniform, loss_second_moment"):
        create_timestep_sampler("importance", 10)


def test_space_timesteps_rejects_non_numbers():
    with pytest.raises(ValueError, match="bad respacing"):
        space_timesteps(100, "ddimX")
