"""Properties of the core that hold by mathematics, checked independently of the official code."""

import math

import numpy as np
import pytest
import torch

from difflab import (
    Denoiser,
    LossSecondMomentResampler,
    Parameterization,
    Process,
    UniformSampler,
    UseTimesteps,
    get_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_posterior_mean_variance,
    q_sample,
    space_timesteps,
)
from difflab.losses import discretized_gaussian_log_likelihood, normal_kl


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_is_bayes_rule(schedule):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): the product of two Gaussians in x_{t-1}."""
    process = Process.named(schedule, 1000)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([1, 2, 10, 500, 998, 999])
    x0 = torch.rand(6, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    x_t = torch.randn(6, 1, 2, 2, generator=g, dtype=torch.float64)
    mean, var, _ = q_posterior_mean_variance(process, x0, x_t, t)
    beta = process.betas[t].reshape(-1, 1, 1, 1)
    ac_prev = process.alphas_cumprod[t - 1].reshape(-1, 1, 1, 1)
    # x_t | x_{t-1} ~ N(sqrt(1-beta) x_{t-1}, beta): as a function of x_{t-1}, precision (1-beta)/beta.
    prec = (1 - beta) / beta + 1 / (1 - ac_prev)
    bayes_mean = (torch.sqrt(1 - beta) * x_t / beta + torch.sqrt(ac_prev) * x0 / (1 - ac_prev)) / prec
    torch.testing.assert_close(mean, bayes_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, (1 / prec).expand_as(var), rtol=1e-10, atol=1e-14)


def test_posterior_at_t0_is_x0():
    process = Process.named("cosine", 100)
    x0 = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(2, 1, 2, 2)
    x_t = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    mean, var, _ = q_posterior_mean_variance(process, x0, x_t, torch.tensor([0, 0]))
    torch.testing.assert_close(mean, x0)
    assert (var == 0).all()


def test_eps_x0_v_round_trips():
    process = Process.named("cosine", 1000)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 7, 321, 999])
    x0 = torch.rand(4, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    x_t = q_sample(process, x0, t, eps)
    torch.testing.assert_close(predict_x0_from_eps(process, x_t, t, eps), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(predict_eps_from_x0(process, x_t, t, x0), eps, rtol=0, atol=1e-9)
    v = get_v(process, x0, eps, t)
    torch.testing.assert_close(predict_x0_from_v(process, x_t, t, v), x0, rtol=0, atol=1e-12)
    # The three parameterizations give the same p(x_{t-1}|x_t) when they predict the same thing.
    outs = {}
    for mean_type, pred in (("eps", eps), ("x0", x0), ("v", v)):
        param = Parameterization(mean_type, "fixed_small")
        outs[mean_type] = param.p_mean_variance(process, pred, x_t, t)
    for mean_type in ("x0", "v"):
        torch.testing.assert_close(outs[mean_type].mean, outs["eps"].mean, rtol=0, atol=1e-8)
        torch.testing.assert_close(outs[mean_type].eps, eps, rtol=0, atol=1e-8)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respacing_every_step_is_identity(schedule):
    process = Process.named(schedule, 200)
    same = process.respace(UseTimesteps(range(200)))
    torch.testing.assert_close(same.betas, process.betas, rtol=1e-12, atol=0)
    assert same.timestep_map.tolist() == list(range(200))
    assert process.respace("200").timestep_map.tolist() == list(range(200))
    net = lambda x, t: torch.tanh(x + t.double().reshape(-1, 1, 1, 1) / 200)  # noqa: E731
    d_full = Denoiser(net, process, Parameterization("eps", "fixed_large"))
    d_same = d_full.respace(UseTimesteps(range(200)))
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 50, 199])
    a, b = d_full(x, t), d_same(x, t)
    for name in ("mean", "variance", "log_variance", "pred_xstart"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-14)


def test_respacing_keeps_alpha_bar_and_composes():
    process = Process.named("cosine", 1000)
    sub = process.respace("ddim50")
    kept = sub.timestep_map
    torch.testing.assert_close(sub.alphas_cumprod, process.alphas_cumprod[kept], rtol=1e-12, atol=0)
    subsub = sub.respace(UseTimesteps([0, 10, 49]))
    assert subsub.timestep_map.tolist() == [kept[0].item(), kept[10].item(), kept[49].item()]
    torch.testing.assert_close(subsub.alphas_cumprod, process.alphas_cumprod[subsub.timestep_map], rtol=1e-12, atol=0)


def test_rescale_timesteps_feeds_the_network_scaled_original_steps():
    """improved-diffusion's rescale_timesteps: the network sees timestep_map[t] * 1000 / T as float32, on the
    process and on every respacing of it, and through a guidance wrapper; without it, the int64 indices."""
    from difflab.build import build_denoiser
    from difflab.config import Config
    from difflab.guidance import classifier_free_denoiser

    seen = []

    def net(x_t, t, **cond):
        seen.append(t)
        return torch.zeros_like(x_t)

    base = {"model": {"preset": "mnist-tiny", "image_size": 8, "in_channels": 1, "num_classes": 10,
                      "class_null": True},
            "diffusion": {"steps": 4000, "schedule": "cosine"}, "data": {"source": "digits", "image_size": 8,
                                                                      "class_cond": True}}
    x = torch.zeros(3, 1, 8, 8)
    t = torch.tensor([0, 5, 9])
    d = build_denoiser(Config(**{**base, "diffusion": {**base["diffusion"], "rescale_timesteps": True}}), net)
    assert d.time_scale == 0.25
    d(x, torch.tensor([0, 1999, 3999]))
    assert seen[-1].dtype == torch.float32 and seen[-1].tolist() == [0.0, 499.75, 999.75]
    sub = d.respace("ddim10")
    sub(x, t)
    assert seen[-1].tolist() == (sub.process.timestep_map[t].double() * 0.25).tolist()
    classifier_free_denoiser(sub, 1.0, null_label=10, num_classes=10)(x, t, y=torch.tensor([1, 2, 3]))
    assert seen[-1].tolist() == (sub.process.timestep_map[t].double() * 0.25).repeat(2).tolist()
    plain = build_denoiser(Config(**base), net).respace("ddim10")
    plain(x, t)
    assert seen[-1].dtype == torch.int64 and torch.equal(seen[-1], plain.process.timestep_map[t])


def test_fast27_is_glide_upsampler_schedule():
    steps = space_timesteps(1000, "fast27")
    assert len(steps) == 27 and 999 not in steps and 997 in steps


def test_importance_weighted_loss_is_unbiased():
    """E_{t~p}[w_t L_t] = (1/T) sum_t L_t exactly, and a Monte Carlo average agrees."""
    T = 20
    sampler = LossSecondMomentResampler(T, history_per_term=10, uniform_prob=0.001)
    true_losses = torch.linspace(0.1, 3.0, T, dtype=torch.float64) ** 2
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        sampler.update(torch.arange(T), true_losses * (1 + 0.1 * torch.randn(T, generator=g, dtype=torch.float64)))
    w = sampler.weights()
    p = w / w.sum()
    assert p.max() / p.min() > 10  # genuinely non-uniform
    exact = float(np.sum(p * (1 / (T * p)) * true_losses.numpy()))
    assert math.isclose(exact, true_losses.mean().item(), rel_tol=1e-12)
    t, weights = sampler.sample(200_000, generator=g)
    estimate = (weights.double() * true_losses[t]).mean().item()
    stderr = (weights.double() * true_losses[t]).std().item() / math.sqrt(200_000)
    assert abs(estimate - true_losses.mean().item()) < 4 * stderr
    # The sampler concentrates on large-loss steps.
    counts = torch.bincount(t, minlength=T)
    assert counts[-1] > 10 * counts[0]


def test_uniform_sampler():
    t, w = UniformSampler(7).sample(70_000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=7).double() / 70_000
    assert torch.allclose(counts, torch.full((7,), 1 / 7, dtype=torch.float64), atol=0.01)
    assert (w == 1).all()


def test_resampler_state_round_trip():
    a = LossSecondMomentResampler(5, history_per_term=2)
    for j in range(3):
        a.update(torch.arange(5), torch.arange(5.0) + j)
    b = LossSecondMomentResampler(5, history_per_term=2)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.weights(), b.weights())
    assert a.loss_history[:, -1].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]  # oldest dropped


def test_normal_kl_closed_form_and_zero():
    m1, m2 = torch.tensor([0.3], dtype=torch.float64), torch.tensor([-0.2], dtype=torch.float64)
    lv1, lv2 = torch.tensor([0.1], dtype=torch.float64), torch.tensor([-0.4], dtype=torch.float64)
    s1, s2 = math.exp(0.05), math.exp(-0.2)
    expected = math.log(s2 / s1) + (s1**2 + 0.25) / (2 * s2**2) - 0.5
    assert math.isclose(normal_kl(m1, lv1, m2, lv2).item(), expected, rel_tol=1e-12)
    assert normal_kl(m1, lv1, m1, lv1).item() == 0.0


def test_discretized_decoder_is_a_distribution():
    """The 256 bin probabilities of the decoder sum to 1 for any mean and scale (exact CDF)."""
    grid = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.0, -3.0), (0.7, -1.0), (-0.95, -5.0)):
        logp = discretized_gaussian_log_likelihood(
            grid, torch.full_like(grid, mean), torch.full_like(grid, log_scale), exact_cdf=True
        )
        assert math.isclose(logp.exp().sum().item(), 1.0, rel_tol=1e-9)
