"""Samplers and the likelihood on Gaussian mixtures, where the optimal denoiser is closed form.

With the exact E[x_0 | x_t], ancestral sampling, respaced ancestral sampling and DDIM must draw
the mixture itself (its weights and per-component moments), and the bits/dim of the optimal
model must bound the data's true entropy from above, tightening as the number of steps grows.
"""

import math

import pytest
import torch

from difflab import Denoiser, Parameterization, Process, calc_bpd_loop, sample_ancestral, sample_ddim
from difflab.toy import GaussianMixture

N = 4000
MIX_1D = GaussianMixture(means=[[-0.6], [0.1], [0.6]], stds=[0.08, 0.05, 0.12], weights=[0.5, 0.2, 0.3])
MIX_2D = GaussianMixture(
    means=[[-0.5, -0.4], [0.5, -0.3], [0.0, 0.55]], stds=[0.1, 0.07, 0.12], weights=[0.2, 0.5, 0.3]
)


def optimal_denoiser(mix, var_type="fixed_small", T=1000):
    process = Process.named("cosine", T)
    return Denoiser(mix.eps_net(process), process, Parameterization("eps", var_type))


def assign(mix, x):
    """Nearest-component labels of points [N, D, 1, 1] (components are well separated)."""
    flat = x.reshape(x.shape[0], -1)
    return torch.cdist(flat, mix.means).argmin(dim=1)


def region_stats(mix, x):
    """Per nearest-component region: (fraction of points, mean [D], std [D])."""
    labels = assign(mix, x)
    flat = x.reshape(x.shape[0], -1)
    return [
        (float((labels == k).double().mean()), flat[labels == k].mean(0), flat[labels == k].std(0))
        for k in range(mix.means.shape[0])
    ]


def assert_reproduces(mix, x, weight_tol=0.03, mean_tol=0.02, std_rel_tol=0.1):
    """Samples x fall into each component's region with the mixture's frequency, mean and spread.

    The reference is a large exact sample put through the same nearest-component assignment, so
    the tails that cross a region boundary count the same way on both sides.
    """
    ref, _ = mix.sample(100_000, generator=torch.Generator().manual_seed(1234))
    pairs = zip(region_stats(mix, x), region_stats(mix, ref), strict=True)
    for k, ((frac, mean, std), (rfrac, rmean, rstd)) in enumerate(pairs):
        assert abs(frac - rfrac) < weight_tol, (k, frac, rfrac)
        assert (mean - rmean).abs().max().item() < mean_tol, (k, mean, rmean)
        assert ((std - rstd).abs() / rstd).max().item() < std_rel_tol, (k, std, rstd)


def x_T(mix, seed):
    return torch.randn(N, mix.dim, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("mix", [MIX_1D, MIX_2D], ids=["1d", "2d"])
def test_ancestral_full_chain(mix):
    d = optimal_denoiser(mix, "fixed_small")
    g = torch.Generator().manual_seed(10)
    x = sample_ancestral(d, x_T(mix, 0), clip_denoised=False, generator=g)
    assert_reproduces(mix, x)


@pytest.mark.parametrize("mix", [MIX_1D, MIX_2D], ids=["1d", "2d"])
def test_respaced_ancestral(mix):
    d = optimal_denoiser(mix, "fixed_small")
    g = torch.Generator().manual_seed(11)
    x = sample_ancestral(d, x_T(mix, 1), steps=250, clip_denoised=False, generator=g)
    # sigma^2 = beta~ is the lower bound of the reverse variance: a little under-dispersed when respaced.
    assert_reproduces(mix, x, std_rel_tol=0.15)


def test_fixed_large_overdisperses_when_respaced():
    """sigma^2 = beta is an upper bound on the reverse variance: narrow modes come out too wide (by ~18% at 100
    steps here), while sigma^2 = beta~ reproduces them (Improved DDPM sec. 3.1)."""
    d = optimal_denoiser(MIX_1D, "fixed_large")
    x = sample_ancestral(d, x_T(MIX_1D, 1), steps=100, clip_denoised=False, generator=torch.Generator().manual_seed(11))
    (_, _, std), = region_stats(MIX_1D, x)[1:2]
    (_, _, ref_std), = region_stats(MIX_1D, MIX_1D.sample(100_000, generator=torch.Generator().manual_seed(0))[0])[1:2]
    assert std.item() > 1.1 * ref_std.item()


@pytest.mark.parametrize("mix", [MIX_1D, MIX_2D], ids=["1d", "2d"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim(mix, eta):
    d = optimal_denoiser(mix)
    g = torch.Generator().manual_seed(12)
    x = sample_ddim(d, x_T(mix, 2), steps=250, eta=eta, clip_denoised=False, generator=g)
    # eta = 1 is ancestral sampling with sigma^2 = beta~ (under-dispersed when respaced); eta = 0 is the ODE.
    assert_reproduces(mix, x, std_rel_tol=0.1 if eta == 0 else 0.15)


def test_wrong_model_fails_the_check():
    """The check has teeth: a denoiser for another mixture does not pass it."""
    other = GaussianMixture(means=[[-0.6], [0.1], [0.6]], stds=[0.08, 0.05, 0.12], weights=[0.2, 0.5, 0.3])
    process = Process.named("cosine", 1000)
    d = Denoiser(other.eps_net(process), process, Parameterization("eps", "fixed_small"))
    x = sample_ddim(d, x_T(MIX_1D, 3), steps=50, clip_denoised=False)
    with pytest.raises(AssertionError):
        assert_reproduces(MIX_1D, x)


def test_same_seed_same_samples():
    d = optimal_denoiser(MIX_2D)
    a = sample_ancestral(d, (16, 2, 1, 1), steps=20, generator=torch.Generator().manual_seed(5), clip_denoised=False)
    b = sample_ancestral(d, (16, 2, 1, 1), steps=20, generator=torch.Generator().manual_seed(5), clip_denoised=False)
    c = sample_ancestral(d, (16, 2, 1, 1), steps=20, generator=torch.Generator().manual_seed(6), clip_denoised=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_callback_sees_every_step():
    d = optimal_denoiser(MIX_1D)
    seen = []
    sample_ddim(d, (4, 1, 1, 1), steps=25, callback=lambda info: seen.append(info["t"]))
    assert seen == list(range(24, -1, -1))


def test_ddim_inversion_round_trip():
    """DDIM (eta = 0) decodes the latent that DDIM inversion encodes, on a smooth optimal model."""
    from difflab import ddim_invert

    d = optimal_denoiser(MIX_1D)
    g = torch.Generator().manual_seed(7)
    x0, _ = MIX_1D.sample(64, generator=g)
    latent = ddim_invert(d, x0, steps=500)
    assert 0.5 < latent.std().item() < 1.5  # a latent on the prior's scale
    recon = sample_ddim(d, latent, steps=500, eta=0.0, clip_denoised=False)
    assert (recon - x0).abs().max().item() < 0.02


def discrete_entropy_bits(mix, x0_grid):
    """-log2 P(bin) per dimension of 8-bit-grid points, P(bin) ~ density * (2/255)^D (bins << stds)."""
    return -(mix.log_prob(x0_grid) + mix.dim * math.log(2 / 255)) / math.log(2) / mix.dim


def grid_data(mix, n, seed):
    x0, _ = mix.sample(n, generator=torch.Generator().manual_seed(seed))
    return (torch.round((x0.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1).to(torch.float64)


def bpd(d, x0):
    total = calc_bpd_loop(d, x0, clip_denoised=False, generator=torch.Generator().manual_seed(4))["total_bpd"]
    return total.mean().item(), total.std().item() / math.sqrt(len(total))


def test_bits_per_dim_of_fixed_variance_bounds_the_true_nll_and_tightens():
    mix = MIX_1D
    x0 = grid_data(mix, 2000, 3)
    true_nll = discrete_entropy_bits(mix, x0).mean().item()
    bounds = {steps: bpd(optimal_denoiser(mix, "fixed_small").respace(steps), x0) for steps in (10, 50, 1000)}
    for steps, (value, stderr) in bounds.items():
        assert value > true_nll - 3 * stderr, (steps, value, true_nll)
    assert bounds[10][0] > bounds[50][0] > bounds[1000][0], bounds


def test_bits_per_dim_of_optimal_model_approaches_the_true_nll():
    """With the optimal mean and the moment-matched variance the bound closes on -log p(x_0) as steps grow."""
    mix = MIX_1D
    x0 = grid_data(mix, 2000, 3)
    true_nll = discrete_entropy_bits(mix, x0).mean().item()
    gaps = {}
    for steps in (10, 100, 1000):
        process = Process.named("cosine", 1000).respace(steps)
        d = Denoiser(mix.eps_net(process, optimal_variance=True), process, Parameterization("eps", "learned"))
        value, stderr = bpd(d, x0)
        assert value > true_nll - 3 * stderr, (steps, value, true_nll)
        gaps[steps] = value - true_nll
    assert gaps[10] > gaps[100] > gaps[1000], gaps
    assert gaps[1000] < 0.05, gaps
