"""Few-step ODE samplers (DPM-Solver++(2M), Karras Euler / Heun) on Gaussian mixtures with exact denoisers.

The mixture's modes (std 0.07) are narrower than the noise at the last step of time spacing (~T/K), from
which the solver jumps to x0^ = E[x0 | x_t] and under-disperses them; the mixture tests therefore pass
"logsnrK", which ends at step 0, rather than DPM-Solver++'s int default "timeK" (better FD on images).

Checks: the mixture is reproduced in few steps; first-order DPM-Solver++ and Euler are DDIM (eta = 0)
on the same steps to float64 rounding; eps, x0 and v parameterizations that predict the same x0 give
the same samples; class conditioning and exact classifier guidance draw one component; bad input.
"""

import pytest
import torch

from difflab import Denoiser, Parameterization, Process, get_v, predict_x0_from_eps, sample_ddim
from difflab.samplers import (
    SAMPLERS,
    get_sampler,
    sample_ancestral,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_heun,
    solver_timesteps,
)
from difflab.schedules import UseTimesteps
from difflab.toy import GaussianMixture
from test_samplers_mixture import MIX_2D, assert_reproduces, optimal_denoiser, x_T

FAST = [sample_dpmpp_2m, sample_euler, sample_heun]


# -- the mixture is reproduced --------------------------------------------------------------------


def linear_denoiser(mix=MIX_2D, var_type="fixed_small"):
    """The exact denoiser on the linear schedule (sigma_max ~ 157, the range k-diffusion's samplers expect)."""
    process = Process.named("linear", 1000)
    return Denoiser(mix.eps_net(process), process, Parameterization("eps", var_type))


@pytest.mark.parametrize(
    "sampler, steps, std_rel_tol",
    [
        # 20 evaluations. The narrow modes (std 0.07) are the hard part; the exact ODE itself (1000 DDIM
        # steps) is within ~4% here, and 20 DDIM steps are 22% off.
        (sample_dpmpp_2m, "logsnr20", 0.15),
        (sample_heun, 15, 0.15),  # 29 evaluations
        (sample_euler, 50, 0.15),  # first order: 50 evaluations
    ],
    ids=["dpmpp-2m-20", "heun-15", "euler-50"],
)
def test_reproduces_mixture(sampler, steps, std_rel_tol):
    x = sampler(linear_denoiser(), x_T(MIX_2D, 20), steps=steps, clip_denoised=False)
    assert_reproduces(MIX_2D, x, mean_tol=0.03, std_rel_tol=std_rel_tol)


@pytest.mark.parametrize("schedule, steps", [("linear", 20), ("cosine", 50)])
def test_sde_variant_reproduces_mixture(schedule, steps):
    """SDE-DPM-Solver++(2M) reproduces the mixture in 20 evaluations on the linear schedule; on the cosine
    schedule 20 leave the component means ~0.05 off (the stochastic solver needs more steps there), 50 do not."""
    process = Process.named(schedule, 1000)
    d = Denoiser(MIX_2D.eps_net(process), process, Parameterization("eps"))
    x = sample_dpmpp_2m_sde(d, x_T(MIX_2D, 20), steps=f"logsnr{steps}", clip_denoised=False,
                            generator=torch.Generator().manual_seed(11))
    assert_reproduces(MIX_2D, x, mean_tol=0.03, std_rel_tol=0.15)


def test_dpmpp_2m_on_cosine_schedule():
    """The cosine schedule's top step (abar ~ 2e-9) is stiff; 20 steps still draw the weights and means."""
    x = sample_dpmpp_2m(optimal_denoiser(MIX_2D), x_T(MIX_2D, 20), steps="logsnr20", clip_denoised=False)
    assert_reproduces(MIX_2D, x, std_rel_tol=0.2)


def test_second_order_converges_faster_than_ddim():
    """Pathwise: 20 steps of DPM-Solver++(2M) land >= 3x closer to the converged ODE solution (1000 DDIM
    steps from the same x_T) than 20 DDIM steps do, and halving the steps of 2M costs more than 2x."""
    d = linear_denoiser()
    x = x_T(MIX_2D, 21)[:1000]
    exact = sample_ddim(d, x, steps=None, clip_denoised=False)

    def err(out):
        return (out - exact).abs().mean().item()

    e_2m = {k: err(sample_dpmpp_2m(d, x, steps=f"logsnr{k}", clip_denoised=False)) for k in (10, 20, 40)}
    e_ddim = err(sample_ddim(d, x, steps=20, clip_denoised=False))
    assert e_2m[20] < e_ddim / 3, (e_2m, e_ddim)
    assert e_2m[10] > 2 * e_2m[20] > 4 * e_2m[40], e_2m


# -- exactness -------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", ["1", "7", "ddim10", "logsnr5", UseTimesteps([0, 300, 999])])
@pytest.mark.parametrize("clip", [False, True])
def test_first_order_is_ddim(steps, clip):
    """DPM-Solver++ with order 1, and Euler in sigma, are DDIM with eta = 0 on the same steps."""
    d = optimal_denoiser(MIX_2D)
    x = x_T(MIX_2D, 3)[:256] * 1.5  # wider than the data so that clipping acts
    ref = sample_ddim(d, x, steps=solver_timesteps(d.process, steps), clip_denoised=clip)
    for out in (
        sample_dpmpp_2m(d, x, steps=steps, order=1, clip_denoised=clip),
        sample_euler(d, x, steps=steps, clip_denoised=clip),
    ):
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("steps", ["7", "time10", UseTimesteps([0, 300, 999])])
@pytest.mark.parametrize("clip", [False, True])
def test_first_order_sde_is_ddpm_posterior(steps, clip):
    """First-order SDE-DPM-Solver++ is DDIM with eta = 1 (the posterior q(x_t | x_s, x0^)) on the same steps,
    drawing the same noise from the same generator."""
    d = optimal_denoiser(MIX_2D)
    x = x_T(MIX_2D, 3)[:256] * 1.5

    def gen():
        return torch.Generator().manual_seed(5)

    ref = sample_ddim(d, x, steps=solver_timesteps(d.process, steps), eta=1.0, clip_denoised=clip, generator=gen())
    out = sample_dpmpp_2m_sde(d, x, steps=steps, order=1, clip_denoised=clip, generator=gen())
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_one_step_second_order_is_first_order():
    """With one step there is no history: 2M takes the first-order (DDIM) step."""
    d = optimal_denoiser(MIX_2D)
    x = x_T(MIX_2D, 4)[:64]
    torch.testing.assert_close(
        sample_dpmpp_2m(d, x, steps=1, clip_denoised=False),
        sample_ddim(d, x, steps=UseTimesteps([999]), clip_denoised=False),
    )


def test_second_order_step_is_exact_for_linear_data_prediction():
    """When x0^ is constant along the path every DPM-Solver++ step is exact: for (nearly) one-point data
    (x0^ = mu everywhere) 2M lands on mu to rounding, from any number of steps."""
    point = GaussianMixture(means=[[0.3, -0.2]], stds=[1e-6], weights=[1.0])
    process = Process.named("linear", 1000)
    d = Denoiser(point.eps_net(process), process, Parameterization("eps"))
    x = sample_dpmpp_2m(d, x_T(point, 5)[:32], steps=5, clip_denoised=False)
    torch.testing.assert_close(x.reshape(32, 2), point.means.expand(32, 2), atol=1e-5, rtol=0)


def _reparameterized(mean_type, process):
    """A net predicting x0 or v from the exact eps net (same predictions, other parameterization)."""
    eps_net = MIX_2D.eps_net(process)

    def net(x_t, t, **cond):
        eps = eps_net(x_t, t, **cond)
        x0 = predict_x0_from_eps(process, x_t, t, eps)
        return x0 if mean_type == "x0" else get_v(process, x0, eps, t)

    return net


@pytest.mark.parametrize("sampler", FAST, ids=lambda f: f.__name__)
@pytest.mark.parametrize("mean_type", ["x0", "v"])
def test_parameterizations_agree(sampler, mean_type):
    process = Process.named("cosine", 1000)
    eps_d = Denoiser(MIX_2D.eps_net(process), process, Parameterization("eps"))
    other = Denoiser(_reparameterized(mean_type, process), process, Parameterization(mean_type))
    x = x_T(MIX_2D, 6)[:128]
    a = sampler(eps_d, x, steps=8, clip_denoised=False)
    b = sampler(other, x, steps=8, clip_denoised=False)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_learned_variance_denoiser_gives_the_same_samples():
    """ODE solvers read x0^ only: a learned-variance output does not change their samples."""
    process = Process.named("cosine", 1000).respace("ddim20")
    fixed = Denoiser(MIX_2D.eps_net(process), process, Parameterization("eps"))
    learned = Denoiser(MIX_2D.eps_net(process, optimal_variance=True), process, Parameterization("eps", "learned"))
    x = x_T(MIX_2D, 7)[:64]
    for sampler in FAST:
        torch.testing.assert_close(sampler(fixed, x, steps=10, clip_denoised=False),
                                   sampler(learned, x, steps=10, clip_denoised=False))


# -- conditioning, guidance, wrappers ---------------------------------------------------------------


def _component(k):
    return GaussianMixture(means=MIX_2D.means[k : k + 1], stds=MIX_2D.stds[k : k + 1], weights=[1.0])


def test_class_conditional_model_kwargs():
    """model_kwargs reach the network: the optimal conditional denoiser with y = k draws component k."""
    d = optimal_denoiser(MIX_2D)
    y = torch.full((2000,), 1)
    x = sample_dpmpp_2m(d, x_T(MIX_2D, 8)[:2000], steps="logsnr20", clip_denoised=False, model_kwargs={"y": y})
    assert_reproduces(_component(1), x, mean_tol=0.01)


def test_classifier_guidance_with_exact_classifier():
    """cond_fn = grad log p(y | x_t) of the exact posterior turns the unconditional score into the conditional
    one (ADM Alg. 2), so guided DPM-Solver++ draws component y; the gradient is taken under enable_grad."""
    process = Process.named("cosine", 1000)
    d = optimal_denoiser(MIX_2D)
    k = 2

    def cond_fn(x_t, t):
        with torch.enable_grad():
            x_in = x_t.detach().requires_grad_(True)
            abar = process.alphas_cumprod[t.cpu()]
            log_p = MIX_2D.class_log_posterior(x_in, abar)[:, k]
            return torch.autograd.grad(log_p.sum(), x_in)[0]

    x = sample_dpmpp_2m(d, x_T(MIX_2D, 9)[:2000], steps="logsnr20", clip_denoised=False, cond_fn=cond_fn)
    assert_reproduces(_component(k), x, mean_tol=0.01)


class ScaledWrapper:
    """A stand-in guidance wrapper: it wraps a Denoiser and keeps its interface (process, respace, __call__)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    @property
    def process(self):
        return self.inner.process

    @property
    def num_timesteps(self):
        return self.inner.num_timesteps

    def respace(self, spec):
        return ScaledWrapper(self.inner.respace(spec)) if spec is not None else self

    def __call__(self, x_t, t, **kw):
        ScaledWrapper.calls += 1
        return self.inner(x_t, t, **kw)


@pytest.mark.parametrize("name, nfe", [("dpmpp-2m", 6), ("dpmpp-2m-sde", 6), ("euler", 6), ("heun", 11), ("ddim", 6)])
def test_wrappers_and_evaluation_counts(name, nfe):
    d = optimal_denoiser(MIX_2D)
    ScaledWrapper.calls = 0
    x = x_T(MIX_2D, 10)[:16]
    out = SAMPLERS[name](ScaledWrapper(d), x, steps=6, clip_denoised=False, generator=torch.Generator().manual_seed(0))
    assert ScaledWrapper.calls == nfe
    torch.testing.assert_close(
        out, get_sampler(name)(d, x, steps=6, clip_denoised=False, generator=torch.Generator().manual_seed(0)))


def test_callback_and_generator():
    d = optimal_denoiser(MIX_2D)
    seen = []
    a = sample_dpmpp_2m(d, (8, 2, 1, 1), steps=5, generator=torch.Generator().manual_seed(1),
                        callback=lambda info: seen.append((info["i"], info["t"])))
    b = sample_dpmpp_2m(d, (8, 2, 1, 1), steps=5, generator=torch.Generator().manual_seed(1))
    assert seen == [(i, 4 - i) for i in range(5)]
    assert torch.equal(a, b) and a.dtype == torch.float32


def test_samples_are_ordinary_tensors():
    """Sampling runs under inference_mode, but what comes back can be edited in place and used in autograd."""
    d = optimal_denoiser(MIX_2D)
    for sampler in FAST:
        x = sampler(d, (4, 2, 1, 1), steps=3)
        assert not x.is_inference()
        x.clamp_(-1, 1)


# -- step spacings ----------------------------------------------------------------------------------


def test_int_steps_default_spacing():
    """An int K is "timeK" for DPM-Solver++ (both variants) and "logsnrK" for Euler / Heun; no clipping is
    DPM-Solver++'s default, clipping the others' (modes beyond +-1, so that clipping x0^ acts)."""
    wide = GaussianMixture(means=[[-1.3, 0.4], [1.2, -0.2]], stds=[0.1, 0.1], weights=[0.5, 0.5])
    d = optimal_denoiser(wide)
    x = x_T(wide, 12)[:64]

    def g():
        return torch.Generator().manual_seed(3)

    assert torch.equal(sample_dpmpp_2m(d, x, steps=7), sample_dpmpp_2m(d, x, steps="time7", clip_denoised=False))
    assert not torch.equal(sample_dpmpp_2m(d, x, steps=7), sample_dpmpp_2m(d, x, steps="time7", clip_denoised=True))
    assert not torch.equal(sample_dpmpp_2m(d, x, steps=7), sample_dpmpp_2m(d, x, steps="logsnr7"))
    assert torch.equal(sample_dpmpp_2m_sde(d, x, steps=7, generator=g()),
                       sample_dpmpp_2m_sde(d, x, steps="time7", clip_denoised=False, generator=g()))
    for sampler in (sample_euler, sample_heun):
        assert torch.equal(sampler(d, x, steps=7), sampler(d, x, steps="logsnr7", clip_denoised=True))
        assert not torch.equal(sampler(d, x, steps=7), sampler(d, x, steps="logsnr7", clip_denoised=False))


def test_solver_timesteps():
    process = Process.named("linear", 1000)
    assert solver_timesteps(process, "time10") == [100, 200, 300, 400, 500, 599, 699, 799, 899, 999]
    for kind in ("logsnr", "karras"):
        steps = solver_timesteps(process, f"{kind}12")
        assert len(steps) == 12 and steps[0] == 0 and steps[-1] == 999, steps
        assert solver_timesteps(process, f"{kind}1") == [999]
    lam = 0.5 * (process.alphas_cumprod.log() - (1 - process.alphas_cumprod).log())
    gaps = lam[solver_timesteps(process, "logsnr12")].diff().neg()
    assert (gaps.max() / gaps.min()).item() < 1.2  # uniform in logSNR up to rounding to whole steps
    assert solver_timesteps(process, "ddim10") == "ddim10"  # others pass through to Process.respace


# -- bad input -------------------------------------------------------------------------------------


def test_unknown_sampler_lists_names():
    names = "ancestral, ddim, dpmpp-2m, dpmpp-2m-sde, euler, heun"
    with pytest.raises(ValueError, match=rf"unknown sampler 'dpm'.*{names}"):
        SAMPLERS["dpm"]
    with pytest.raises(ValueError, match="valid: ancestral"):
        get_sampler("")


@pytest.mark.parametrize("steps", [0, -3, 1001, "logsnr0", "karras2000", "ddim0", "bogus", UseTimesteps([5, 3]),
                                   [5, 3]])
@pytest.mark.parametrize("sampler", [*FAST, sample_ancestral], ids=lambda f: f.__name__)
def test_bad_steps(sampler, steps):
    d = optimal_denoiser(MIX_2D)
    with pytest.raises(ValueError):
        sampler(d, (2, 2, 1, 1), steps=steps)


def test_bad_order():
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        sample_dpmpp_2m(optimal_denoiser(MIX_2D), (2, 2, 1, 1), steps=3, order=3)
