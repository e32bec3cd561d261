"""Conditioning augmentation (CDM Sec. 4.2) against its definitions, on processes whose denoiser is exact."""

import math

import pytest
import torch

from difflab import Process, sample_ancestral, sample_ddim
from difflab.augment import blur_augment, level_embedding, noise_augment, sample_truncated, truncation_steps
from difflab.process import q_sample
from difflab.toy import GaussianMixture
from test_samplers_mixture import MIX_1D, assert_reproduces, optimal_denoiser, x_T

PROCESS = Process.named("cosine", 1000)


def noised(mix, s, process=PROCESS):
    """The exact law of z_s ~ q(z_s | z_0), z_0 ~ mix: a mixture of N(a mu_k, a^2 s_k^2 + b^2) (level s >= 1)."""
    abar = float(process.alphas_cumprod[s - 1])
    a, b2 = math.sqrt(abar), 1 - abar
    return GaussianMixture(a * mix.means, torch.sqrt(abar * mix.stds**2 + b2), mix.weights)


def test_level_zero_is_no_augmentation_and_level_s_is_q_sample_at_step_s():
    z0 = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(z0)
    assert torch.equal(noise_augment(z0, 0, PROCESS, eps), z0)
    s = torch.tensor([0, 1, 2, 500, 999, 1000])
    out = noise_augment(z0, s, PROCESS, eps)
    assert torch.equal(out[0], z0[0])
    expect = q_sample(PROCESS, z0[1:], s[1:] - 1, eps[1:])  # paper step s = code index s - 1
    assert torch.allclose(out[1:], expect, atol=1e-15, rtol=0)
    abar = PROCESS.alphas_cumprod
    assert torch.allclose(out[5], abar[999].sqrt() * z0[5] + (1 - abar[999]).sqrt() * eps[5], atol=1e-15)
    with pytest.raises(ValueError, match=r"0\.\.1000"):
        noise_augment(z0, 1001, PROCESS, eps)


def test_truncated_chain_is_the_full_chain_stopped_at_step_s():
    d = optimal_denoiser(MIX_1D)
    seen = {}
    full = sample_ancestral(d, x_T(MIX_1D, 0)[:64], generator=torch.Generator().manual_seed(3),
                            callback=lambda info: seen.__setitem__(info["t"], info["x"]))
    s = 300
    trunc = sample_truncated(sample_ancestral, d, x_T(MIX_1D, 0)[:64], s, generator=torch.Generator().manual_seed(3))
    # the state after the step at code index s is z at code index s - 1 = the paper's z_s
    assert torch.allclose(trunc, seen[s], atol=1e-12, rtol=0)
    assert not torch.allclose(trunc, full)
    assert truncation_steps(1000, s)[:2] == [s - 1, s] and len(truncation_steps(1000, s)) == 1000 - s + 1


@pytest.mark.parametrize("sampler,steps", [(sample_ancestral, None), (sample_ancestral, 50), (sample_ddim, 50)])
def test_truncated_and_non_truncated_levels_have_the_law_of_q(sampler, steps):
    """With the exact denoiser both ways of making z_s draw q(z_s) = the data mixture noised to step s."""
    d, s = optimal_denoiser(MIX_1D), 200
    truth = noised(MIX_1D, s)
    trunc = sample_truncated(sampler, d, x_T(MIX_1D, 1), s, steps=steps, generator=torch.Generator().manual_seed(4))
    assert_reproduces(truth, trunc, mean_tol=0.03)
    z0 = sampler(d, x_T(MIX_1D, 2), steps=steps, generator=torch.Generator().manual_seed(5))
    non_trunc = noise_augment(z0, s, PROCESS, generator=torch.Generator().manual_seed(6))
    assert_reproduces(truth, non_trunc, mean_tol=0.03)
    # and neither is the clean data (the test can tell the levels apart)
    with pytest.raises(AssertionError):
        assert_reproduces(MIX_1D, trunc)


def test_truncation_levels_are_checked():
    with pytest.raises(ValueError, match=r"1\.\.999"):
        truncation_steps(1000, 1000)
    assert truncation_steps(1000, 1, 10)[0] == 0 and len(truncation_steps(1000, 1, 10)) == 11


def test_blur_is_a_normalised_gaussian_and_sigma_zero_is_identity():
    z = torch.zeros(3, 2, 17, 17, dtype=torch.float64)
    z[:, :, 8, 8] = 1.0
    out = blur_augment(z, torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(out[0], z[0])
    for i, sigma in ((1, 1.0), (2, 2.0)):
        img = out[i, 0]
        assert img.sum().item() == pytest.approx(1.0, abs=1e-12)  # mass kept (the impulse is far from edges)
        yy, xx = torch.meshgrid(torch.arange(17.0), torch.arange(17.0), indexing="ij")
        var = float((img * (xx - 8) ** 2).sum())
        assert var == pytest.approx(sigma**2, rel=0.02)  # a discretised Gaussian's variance ~ sigma^2
        assert torch.allclose(img, img.t(), atol=1e-15) and torch.equal(out[i, 0], out[i, 1])
    # a kernel wider than a tiny image still works (reflect what exists)
    assert blur_augment(torch.ones(1, 1, 2, 2), torch.tensor([3.0])).shape == (1, 1, 2, 2)


def test_level_embedding_is_the_timestep_embedding():
    from difflab.nn.layers import timestep_embedding

    s = torch.tensor([0, 7, 250])
    assert torch.equal(level_embedding(s, 32), timestep_embedding(s.float(), 32))
    assert not torch.equal(level_embedding(s, 32)[0], level_embedding(s, 32)[1])
