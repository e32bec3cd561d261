"""Every case of ../shared/fixtures/openai/process.safetensors, reproduced in float64 to < 1e-6 relative error.

The goldens were computed by the official improved-diffusion / guided-diffusion code (with its
float32 casts removed). The "model" is the fixed function of the fixtures README.
"""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difflab import (
    Denoiser,
    LossSecondMomentResampler,
    Parameterization,
    Process,
    calc_bpd_loop,
    ddim_reverse_sample,
    ddim_sample,
    get_named_beta_schedule,
    p_mean_variance,
    p_sample,
    q_posterior_mean_variance,
    q_sample,
    space_timesteps,
    training_losses,
    vb_terms_bpd,
)

RTOL = 1e-6
PARAMS = {
    "eps_learned_range": Parameterization("eps", "learned_range"),
    "eps_fixed_small": Parameterization("eps", "fixed_small"),
    "eps_fixed_large": Parameterization("eps", "fixed_large"),
    "x0_learned_range": Parameterization("x0", "learned_range"),
}
CASES = [(s, p) for s in ("linear", "cosine") for p in PARAMS]


@pytest.fixture(scope="module")
def gold(fixtures_dir):
    return load_file(str(fixtures_dir / "process.safetensors"))


def assert_close(actual, expected, rtol=RTOL):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1e-30)
    assert err / scale < rtol, f"relative error {err / scale:.3e}"


def fixture_model(learned: bool, T_scale: float = 1000.0):
    """The fixtures' fixed "network": eps = tanh(0.7x + 0.3 t/T_scale) - 0.1 flip(x), v = sin(1.3x - t/T_scale)."""

    def net(x, t):
        tt = (t.to(x.dtype) / T_scale).reshape(-1, *([1] * (x.dim() - 1)))
        eps = torch.tanh(0.7 * x + 0.3 * tt) - 0.1 * torch.flip(x, dims=[-1])
        if not learned:
            return eps
        return torch.cat([eps, torch.sin(1.3 * x - tt)], dim=1)

    return net


def denoiser_for(schedule, param_name, T=1000):
    param = PARAMS[param_name]
    return Denoiser(fixture_model(param.learned_variance, float(T)), Process.named(schedule, T), param)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 4000])
def test_named_betas(gold, schedule, T):
    assert_close(get_named_beta_schedule(schedule, T), gold[f"betas/{schedule}/{T}"])


@pytest.mark.parametrize("spec,arg", [("ddim25", "ddim25"), ("250", [250]), ("50", [50]),
                                      ("10,10,3,2,2", [10, 10, 3, 2, 2]), ("1000", [1000])])
def test_respacing(gold, spec, arg):
    base = Process.named("cosine", 1000)
    assert space_timesteps(1000, arg) == gold[f"respace/{spec}/timestep_map"].tolist()
    respaced = base.respace(spec)
    assert respaced.timestep_map.tolist() == gold[f"respace/{spec}/timestep_map"].tolist()
    assert_close(respaced.betas, gold[f"respace/{spec}/betas"])


@pytest.mark.parametrize("schedule,param", CASES)
def test_q_side(gold, schedule, param):
    d = denoiser_for(schedule, param)
    x0, noise, t = gold["x0"], gold["noise"], gold["t"]
    key = f"{schedule}/{param}"
    x_t = q_sample(d.process, x0, t, noise)
    assert_close(x_t, gold[f"{key}/q_sample"])
    mean, var, log_var = q_posterior_mean_variance(d.process, x0, x_t, t)
    assert_close(mean, gold[f"{key}/q_posterior/mean"])
    assert_close(var, gold[f"{key}/q_posterior/variance"])
    assert_close(log_var, gold[f"{key}/q_posterior/log_variance"])


@pytest.mark.parametrize("schedule,param", CASES)
@pytest.mark.parametrize("clip", [0, 1])
def test_p_mean_variance(gold, schedule, param, clip):
    d = denoiser_for(schedule, param)
    key = f"{schedule}/{param}"
    x_t = gold[f"{key}/q_sample"]
    out = p_mean_variance(d, x_t, gold["t"], clip_denoised=bool(clip))
    for name in ("mean", "variance", "log_variance", "pred_xstart"):
        assert_close(getattr(out, name), gold[f"{key}/p_mean_variance/clip{clip}/{name}"])


@pytest.mark.parametrize("schedule,param", CASES)
def test_vb_terms_bpd(gold, schedule, param):
    d = denoiser_for(schedule, param)
    key = f"{schedule}/{param}"
    out = vb_terms_bpd(d, gold["x0"], gold[f"{key}/q_sample"], gold["t"], clip_denoised=False)
    assert_close(out["output"], gold[f"{key}/vb_terms_bpd"])


@pytest.mark.parametrize("schedule,param", CASES)
@pytest.mark.parametrize("loss_type", ["mse", "hybrid", "kl", "rescaled_kl"])
def test_training_losses(gold, schedule, param, loss_type):
    d = denoiser_for(schedule, param)
    prefix = f"{schedule}/{param}/training_losses/{loss_type}/"
    terms = training_losses(d, gold["x0"], gold["t"], loss_type=loss_type, noise=gold["noise"])
    expected = {k[len(prefix):]: v for k, v in gold.items() if k.startswith(prefix)}
    assert expected and set(expected) == set(terms), (set(expected), set(terms))
    for name, value in expected.items():
        assert_close(terms[name], value)


def test_p_sample_step(gold):
    d = denoiser_for("cosine", "eps_learned_range")
    out = p_sample(d, gold["step/x_t"], gold["t"], clip_denoised=True, noise=gold["step/z"])
    assert_close(out["sample"], gold["step/p_sample"])


@pytest.mark.parametrize("eta", ["0.0", "0.5", "1.0"])
def test_ddim_step(gold, eta):
    d = denoiser_for("cosine", "eps_learned_range")
    out = ddim_sample(d, gold["step/x_t"], gold["t"], eta=float(eta), clip_denoised=True, noise=gold["step/z"])
    assert_close(out["sample"], gold[f"step/ddim_sample/eta{eta}"])


def test_ddim_reverse_step(gold):
    d = denoiser_for("cosine", "eps_learned_range")
    t = torch.tensor([0, 1, 500, 998])
    out = ddim_reverse_sample(d, gold["step/x_t"], t, clip_denoised=False)
    assert_close(out["sample"], gold["step/ddim_reverse_sample"])


def fixture_cond_fn(x, t):
    return 0.3 * torch.sin(2 * x) + 0.01 * (t.to(x.dtype) / 1000).reshape(-1, *([1] * (x.dim() - 1)))


def test_guided_p_sample(gold):
    d = denoiser_for("cosine", "eps_learned_range")
    out = p_sample(d, gold["step/x_t"], gold["t"], clip_denoised=True, noise=gold["step/z"], cond_fn=fixture_cond_fn)
    assert_close(out["sample"], gold["guidance/p_sample_cond_mean"])


def test_guided_ddim(gold):
    d = denoiser_for("cosine", "eps_learned_range")
    out = ddim_sample(d, gold["step/x_t"], gold["t"], eta=0.0, clip_denoised=True, cond_fn=fixture_cond_fn)
    assert_close(out["sample"], gold["guidance/ddim_cond_score"])


def test_bpd_loop(gold):
    d = denoiser_for("cosine", "eps_learned_range", T=50)
    noises = list(gold["bpd_loop/noises"])
    out = calc_bpd_loop(d, gold["x0"], clip_denoised=True, noises=noises)
    for name in ("total_bpd", "prior_bpd", "vb", "xstart_mse", "mse"):
        assert_close(out[name], gold[f"bpd_loop/{name}"])


def test_importance_sampler_weights(gold):
    history = gold["resample/history"]
    sampler = LossSecondMomentResampler(20, history_per_term=10, uniform_prob=0.001)
    assert np.allclose(sampler.weights(), 1.0)  # uniform until every t has a full history
    for j in range(history.shape[1]):
        sampler.update(torch.arange(20), history[:, j])
    assert_close(sampler.weights(), gold["resample/weights"])
