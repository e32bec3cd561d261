"""CLIP guidance is classifier guidance's mechanism with a noised CLIP's gradient: the ancestral mean moves by
Sigma * g, the DDIM / ODE score by -sqrt(1 - abar_t) * g, the CLIP always sees the original step (respaced chains,
rescaled network steps), and a CLIP that does not fit the model is refused."""

import math

import pytest
import torch

from difflab import Denoiser, Parameterization, Process, ddim_sample, p_sample
from difflab.clip_guidance import (
    check_clip_fits,
    clip_cond_fn,
    clip_guided_denoiser,
    clip_text_embeddings,
    clip_tokens,
)
from difflab.guidance import ClassifierGuidance
from difflab.nn.clip import NoisedCLIP, NoisedCLIPConfig
from difflab.process import predict_eps_from_x0, predict_x0_from_eps
from difflab.text import MiniatureTokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

T = 40
CAPTIONS = ["a red 7", "a blue 1 on the left", "a green 3"]


def tiny_clip(schedule="cosine", steps=T, size=8) -> NoisedCLIP:
    torch.manual_seed(0)
    cfg = NoisedCLIPConfig(image_size=size, patch_size=4, n_timesteps=steps, beta_schedule=schedule, n_embd=8,
                           n_head_image=2, n_head_state_image=4, n_xf_blocks_image=1, n_vocab=32, max_text_len=8,
                           n_head_text=2, n_head_state_text=4, n_xf_blocks_text=1, logit_scale=20.0)
    clip = NoisedCLIP(cfg).eval()
    clip.tokenizer = MiniatureTokenizer.from_captions(CAPTIONS)
    return clip


def toy_net(x, t, **_):
    """eps in the first 3 channels, the learned-range value v in the last 3 (depends on x and t)."""
    tt = t.float().view(-1, 1, 1, 1) / T
    return torch.cat([torch.tanh(0.7 * x + 0.3 * tt), torch.sin(1.3 * x - tt)], dim=1)


def toy_denoiser(time_scale=None) -> Denoiser:
    return Denoiser(toy_net, Process.named("cosine", T), Parameterization("eps", "learned_range"),
                    time_scale=time_scale)


def inputs(n=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g), torch.tensor([0, 17, 39][:n])


def test_ancestral_mean_is_shifted_by_variance_times_the_gradient():
    clip, den = tiny_clip(), toy_denoiser()
    x, t = inputs()
    z_t = clip_text_embeddings(clip, CAPTIONS)
    guided = clip_guided_denoiser(den, clip, CAPTIONS, 2.5)
    assert isinstance(guided, ClassifierGuidance)
    p, pg = den(x, t), guided(x, t)
    grad = clip_cond_fn(clip, z_t, 2.5)(x, t)
    assert grad.abs().max() > 1e-3  # a real gradient, not zero
    torch.testing.assert_close(pg.mean, p.mean + p.variance * grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pg.variance, p.variance)
    # and so the ancestral step (GLIDE's p_sample with cond_fn)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    step = p_sample(guided, x, t, clip_denoised=False, noise=z)["sample"]
    by_hand = p_sample(den, x, t, clip_denoised=False, noise=z, cond_fn=clip_cond_fn(clip, z_t, 2.5))["sample"]
    torch.testing.assert_close(step, by_hand, rtol=1e-6, atol=1e-7)
    # the gradient by hand: d/dx of exp(logit_scale) * sum(z_t . z_i)
    x_in = x.clone().requires_grad_(True)
    (torch.exp(clip.logit_scale) * (z_t * clip.image_embeddings(x_in, t)).sum()).backward()
    torch.testing.assert_close(grad, 2.5 * x_in.grad, rtol=1e-6, atol=1e-8)


def test_ddim_score_is_shifted_by_sqrt_one_minus_alpha_bar_times_the_gradient():
    clip, den = tiny_clip(), toy_denoiser()
    x, t = inputs()
    guided = clip_guided_denoiser(den, clip, CAPTIONS, 3.0)
    p, pg = den(x, t, clip_denoised=True), guided(x, t, clip_denoised=True)
    grad = clip_cond_fn(clip, clip_text_embeddings(clip, CAPTIONS), 3.0)(x, t)
    abar = den.process.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    eps = predict_eps_from_x0(den.process, x, t, p.pred_xstart) - torch.sqrt(1 - abar) * grad
    torch.testing.assert_close(pg.eps, eps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pg.pred_xstart, predict_x0_from_eps(den.process, x, t, eps), rtol=1e-5, atol=1e-6)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    a = ddim_sample(guided, x, t, eta=0.5, noise=z)["sample"]
    b = ddim_sample(den, x, t, eta=0.5, noise=z, cond_fn=clip_cond_fn(clip, clip_text_embeddings(clip, CAPTIONS), 3.0))
    torch.testing.assert_close(a, b["sample"], rtol=1e-5, atol=1e-6)
    assert (pg.eps - p.eps).abs().max() > 1e-4


@pytest.mark.parametrize("time_scale", [None, 1000 / T])
def test_the_clip_sees_original_integer_steps(time_scale):
    """A respaced chain hands the CLIP timestep_map[t]; a network fed t * 1000 / T still leaves the CLIP its
    integer step (the w_t row), where classifier guidance hands the classifier the network's t."""
    clip = tiny_clip()
    seen = []
    clip.image_encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    respaced = clip_guided_denoiser(toy_denoiser(time_scale), clip, CAPTIONS, 1.0).respace("10")
    assert isinstance(respaced, ClassifierGuidance) and respaced.num_timesteps == 10
    x, _ = inputs()
    t = torch.tensor([0, 4, 9])
    respaced(x, t)
    assert seen[-1].dtype == torch.int64 and torch.equal(seen[-1], respaced.process.timestep_map[t])
    assert seen[-1].tolist() == [0, 17, 39]


def test_scale_zero_leaves_the_mean():
    clip, den = tiny_clip(), toy_denoiser()
    x, t = inputs()
    torch.testing.assert_close(clip_guided_denoiser(den, clip, CAPTIONS, 0.0)(x, t).mean, den(x, t).mean)


def test_a_clip_that_does_not_fit_is_refused():
    den = toy_denoiser()
    with pytest.raises(ValueError, match="sees 8x8 images but the diffusion model makes 16x16"):
        clip_guided_denoiser(den, tiny_clip(), CAPTIONS, 1.0, image_size=16)
    with pytest.raises(ValueError, match=r"another noise schedule \(linear/40\): at step 0"):
        check_clip_fits(tiny_clip("linear").config, den.process)
    with pytest.raises(ValueError, match="trained on cosine/20 steps but the diffusion model has step 39"):
        check_clip_fits(tiny_clip(steps=20).config, den.process)
    check_clip_fits(tiny_clip().config, den.process.respace("ddim10"), 8)  # a respaced chain of the same process
    clip = tiny_clip()
    with pytest.raises(ValueError, match="2 caption embeddings for a batch of 3 images"):
        clip_guided_denoiser(den, clip, CAPTIONS[:2], 1.0)(*inputs())
    with pytest.raises(ValueError, match="finite"):
        clip_cond_fn(clip, clip_text_embeddings(clip, CAPTIONS), math.inf)


def test_tokens_and_lengths_of_the_miniature_tokenizer():
    tok = MiniatureTokenizer.from_captions(CAPTIONS)
    tokens, lens = clip_tokens(tok, ["a red 7", ""], 8)
    assert lens.tolist() == [5, 2]  # SOT + 3 words + EOT; the empty caption SOT EOT
    assert tokens[0, 4] == tok.eot_token and tokens[1, 1] == tok.eot_token and tokens.dtype == torch.int64
