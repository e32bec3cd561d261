"""Guidance wrappers: official goldens, identities (s = 0, w = 0), one batched call per step, exact
distributions on a Gaussian mixture whose class posterior is known, and bad input.

On the mixture the "classifier" is the exact log p(k | x_t) of ``difflab.toy``, so classifier
guidance at s = 1 of the optimal unconditional model must sample p(x_0 | y), and classifier-free
guidance of the optimal conditional model satisfies, by Bayes,
    (1 + w) eps_c - w eps_u = eps_u - (1 + w) sqrt(1 - abar_t) grad log p(y | x_t),
i.e. CFG with weight w is classifier guidance with s = 1 + w (checked to float64 precision).
"""

import math

import pytest
import torch

from difflab import Denoiser, Parameterization, Process, ddim_sample, p_sample, sample_ancestral, sample_ddim
from difflab.guidance import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    ClassifierInfo,
    classifier_free_denoiser,
    classifier_grad_fn,
    drop_labels,
    guided_denoiser,
)
from difflab.nn.classifier import Classifier, ClassifierConfig
from difflab.nn.unet import UNet, UNetConfig
from difflab.toy import GaussianMixture
from test_process_goldens import assert_close, denoiser_for, fixture_cond_fn

pytestmark = pytest.mark.usefixtures("single_thread")

# Two overlapping components (p(k | x_0) is far from 0/1 near x = 0), unequal weights.
MIX = GaussianMixture(means=[[-0.3, 0.1], [0.3, -0.1]], stds=[0.2, 0.2], weights=[0.3, 0.7])
N = 4000


@pytest.fixture(scope="module")
def gold(fixtures_dir):
    from safetensors.torch import load_file

    return load_file(str(fixtures_dir / "process.safetensors"))


# ------------------------------------------------------------------------------------------- helpers


def toy_process(T=1000):
    return Process.named("cosine", T)


def posterior_classifier(mix, process):
    """logits = log p(k | x_t) exactly, at original steps t of ``process``, with its ClassifierInfo."""
    abar = process.alphas_cumprod

    def clf(x_t, t):
        return mix.class_log_posterior(x_t, abar[t.cpu()].to(torch.float64))

    clf.diffusion_info = ClassifierInfo.from_process(process, image_size=1, num_classes=mix.means.shape[0])
    return clf


def conditional_toy_net(mix, process):
    """The optimal class-conditional eps network with null label K (= the unconditional model)."""
    net = mix.eps_net(process)
    K = mix.means.shape[0]

    def cond_net(x_t, t, y=None):
        if y is None:
            return net(x_t, t)
        out_c = net(x_t, t, y.clamp(max=K - 1))
        if not bool((y == K).any()):
            return out_c
        return torch.where((y == K).reshape(-1, 1, 1, 1), net(x_t, t), out_c)

    return cond_net


def unconditional_toy(process=None):
    process = process or toy_process()
    return Denoiser(MIX.eps_net(process), process, Parameterization("eps", "fixed_small"))


def x_T(seed, n=N):
    return torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def labels(n=N):
    return torch.arange(n) % 2  # both classes in one batch: the guidance is per example


def assert_class_conditional(x, y, tol_mean=0.02, tol_std=0.1, tol_frac=0.025):
    """Samples x with labels y follow p(x_0 | y) = N(mu_y, s_y^2 I): mean, spread and the exact mass
    on the own side of the decision line x_1 = 0 (Phi(0.3 / 0.2) = 0.933: the overlap is real)."""
    flat = x.reshape(x.shape[0], -1)
    for k in range(2):
        pts = flat[y == k]
        mu, s = MIX.means[k], MIX.stds[k].item()
        assert (pts.mean(0) - mu).abs().max().item() < tol_mean, (k, pts.mean(0), mu)
        assert (pts.std(0) / s - 1).abs().max().item() < tol_std, (k, pts.std(0), s)
        own_side = ((pts[:, 0] < 0) if k == 0 else (pts[:, 0] > 0)).double().mean().item()
        expected = 0.5 * (1 + math.erf(abs(mu[0].item()) / s / math.sqrt(2)))
        assert abs(own_side - expected) < tol_frac, (k, own_side, expected)


def randomize(net, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def tiny_unet(**over):
    cfg = dict(in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
               num_groups=8, num_heads=2, num_classes=3, class_null=True, learn_sigma=True, image_size=8)
    cfg.update(over)
    return randomize(UNet(UNetConfig(**cfg))).eval()


class Counter:
    """Counts the calls of a network and the batch sizes it sees."""

    def __init__(self, net):
        self.net, self.batches = net, []

    def __call__(self, x, t, **kw):
        self.batches.append(x.shape[0])
        return self.net(x, t, **kw)


# ------------------------------------------------------------------------------------------- goldens


def test_wrapper_matches_golden_ancestral(gold):
    d = ClassifierGuidance(denoiser_for("cosine", "eps_learned_range"), cond_fn=fixture_cond_fn)
    out = p_sample(d, gold["step/x_t"], gold["t"], clip_denoised=True, noise=gold["step/z"])
    assert_close(out["sample"], gold["guidance/p_sample_cond_mean"])


def test_wrapper_matches_golden_ddim(gold):
    d = ClassifierGuidance(denoiser_for("cosine", "eps_learned_range"), cond_fn=fixture_cond_fn)
    out = ddim_sample(d, gold["step/x_t"], gold["t"], eta=0.0, clip_denoised=True)
    assert_close(out["sample"], gold["guidance/ddim_cond_score"])


def test_wrapper_equals_cond_fn_argument_for_learned_and_fixed_variances(gold):
    """The wrapper and the samplers' cond_fn argument are the same guidance (ancestral and DDIM, eta > 0)."""
    for param in ("eps_fixed_small", "x0_learned_range"):
        base = denoiser_for("linear", param)
        d = ClassifierGuidance(base, cond_fn=fixture_cond_fn)
        x, t, z = gold["step/x_t"], gold["t"], gold["step/z"]
        a = p_sample(d, x, t, noise=z)["sample"]
        b = p_sample(base, x, t, noise=z, cond_fn=fixture_cond_fn)["sample"]
        assert_close(a, b, rtol=1e-12)
        a = ddim_sample(d, x, t, eta=0.5, noise=z)["sample"]
        b = ddim_sample(base, x, t, eta=0.5, noise=z, cond_fn=fixture_cond_fn)["sample"]
        assert_close(a, b, rtol=1e-12)


def test_respaced_wrapper_keeps_guidance_and_feeds_original_steps():
    seen = []

    def cond_fn(x, t, **_):
        seen.append(t.clone())
        return torch.ones_like(x)

    d = ClassifierGuidance(unconditional_toy(), cond_fn=cond_fn)
    respaced = d.respace("ddim50")
    assert isinstance(respaced, ClassifierGuidance) and respaced.num_timesteps == 50
    sample_ddim(d, x_T(0, 4), steps="ddim50", clip_denoised=False)
    assert [int(t[0]) for t in seen] == list(range(980, -1, -20))
    # the guided eps differs from the unguided one by exactly sqrt(1 - abar) * g at every respaced step
    t = torch.full((4,), 10)
    x = x_T(1, 4)
    gap = respaced(x, t).eps - respaced.denoiser(x, t).eps
    assert_close(gap, torch.full_like(x, -math.sqrt(1 - respaced.process.alphas_cumprod[10].item())), rtol=1e-10)


# ------------------------------------------------------------------------------------------- identities


def test_scale_zero_is_the_unguided_model():
    process = toy_process()
    base = unconditional_toy(process)
    d = ClassifierGuidance(base, posterior_classifier(MIX, process), scale=0.0, conditional_model=False)
    for sampler in (sample_ancestral, sample_ddim):
        a = sampler(d, x_T(2, 64), steps=20, clip_denoised=False, generator=torch.Generator().manual_seed(0),
                    model_kwargs={"y": labels(64)})
        b = sampler(base, x_T(2, 64), steps=20, clip_denoised=False, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, b)


def test_cfg_weight_zero_is_the_conditional_model_exactly():
    net = tiny_unet()
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        assert torch.equal(ClassifierFreeGuidance(net, 0.0)(x, t, y=y), net(x, t, y=y))
    process = toy_process()
    cond = conditional_toy_net(MIX, process)
    d = Denoiser(cond, process, Parameterization("eps", "fixed_small"))
    g = classifier_free_denoiser(d, 0.0, null_label=2, num_classes=2)
    a = sample_ddim(g, x_T(3, 64), steps=20, clip_denoised=False, model_kwargs={"y": labels(64)})
    b = sample_ddim(d, x_T(3, 64), steps=20, clip_denoised=False, model_kwargs={"y": labels(64)})
    assert torch.equal(a, b)


def test_cfg_combines_mean_channels_and_passes_the_conditional_variance():
    net = tiny_unet()
    w = 1.5
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        out = ClassifierFreeGuidance(net, w)(x, t, y=y)
        c, u = net(x, t, y=y), net(x, t, y=torch.full_like(y, 3))
    assert out.shape == (4, 6, 8, 8)
    assert_close(out[:, :3], (1 + w) * c[:, :3] - w * u[:, :3], rtol=1e-5)
    assert_close(out[:, 3:], c[:, 3:], rtol=1e-5)


def test_cfg_is_classifier_guidance_with_scale_one_plus_w_on_exact_models():
    process = toy_process()
    w = 2.0
    cfg = classifier_free_denoiser(Denoiser(conditional_toy_net(MIX, process), process,
                                            Parameterization("eps", "fixed_small")), w, null_label=2, num_classes=2)
    cg = ClassifierGuidance(unconditional_toy(process), posterior_classifier(MIX, process), scale=1 + w,
                            conditional_model=False)
    x, y = x_T(4, 64), labels(64)
    for step in (0, 100, 600, 999):
        t = torch.full((64,), step)
        a, b = cfg(x, t, y=y), cg(x, t, y=y)
        assert_close(a.eps, b.eps, rtol=1e-8)
        assert_close(a.pred_xstart, b.pred_xstart, rtol=1e-8)


@pytest.mark.parametrize("mean_type", ["x0", "v"])
def test_cfg_is_the_same_guidance_for_every_mean_type(mean_type):
    """(1 + w) c - w u of x0 or v predictions gives the same x0^ as that of eps predictions (affine, weights sum 1)."""
    from difflab.process import get_v, predict_x0_from_eps

    process = toy_process()
    eps_net = conditional_toy_net(MIX, process)

    def net(x, t, y=None):
        eps = eps_net(x, t, y)
        x0 = predict_x0_from_eps(process, x, t, eps)
        return x0 if mean_type == "x0" else get_v(process, x0, eps, t)

    w, x, y = 1.5, x_T(10, 64), labels(64)
    a = classifier_free_denoiser(Denoiser(eps_net, process, Parameterization("eps")), w, 2, num_classes=2)
    b = classifier_free_denoiser(Denoiser(net, process, Parameterization(mean_type)), w, 2, num_classes=2)
    for step in (0, 300, 900):
        t = torch.full((64,), step)
        assert_close(b(x, t, y=y).pred_xstart, a(x, t, y=y).pred_xstart, rtol=1e-9)


# ------------------------------------------------------------------------------------------- one call per step


@pytest.mark.parametrize("sampler", [sample_ancestral, sample_ddim])
def test_cfg_runs_one_batched_call_per_step(sampler):
    process = toy_process()
    counter = Counter(conditional_toy_net(MIX, process))
    d = classifier_free_denoiser(Denoiser(counter, process, Parameterization("eps", "fixed_small")), 3.0,
                                 null_label=2, num_classes=2)
    sampler(d, x_T(5, 16), steps=10, clip_denoised=False, model_kwargs={"y": labels(16)})
    assert counter.batches == [32] * 10


def test_cfg_duplicates_other_conditions():
    seen = {}

    def net(x, t, y=None, low_res=None, scale=None):
        seen.update(t=t, y=y, low_res=low_res, scale=scale)
        return x * 0 + low_res.mean()

    cfg = ClassifierFreeGuidance(net, 1.0, null_label=5, num_classes=5)
    cfg(torch.zeros(2, 1, 4, 4), torch.tensor([3, 4]), y=torch.tensor([0, 4]), low_res=torch.ones(2, 1, 2, 2),
        scale=0.5)
    assert seen["t"].tolist() == [3, 4, 3, 4] and seen["y"].tolist() == [0, 4, 5, 5]
    assert seen["low_res"].shape == (4, 1, 2, 2) and seen["scale"] == 0.5


# ------------------------------------------------------------------------------------------- distributions


def test_classifier_guidance_scale_one_samples_the_class_conditional():
    process = toy_process()
    d = ClassifierGuidance(unconditional_toy(process), posterior_classifier(MIX, process), scale=1.0,
                           conditional_model=False)
    y = labels()
    x = sample_ancestral(d, x_T(6), steps=250, clip_denoised=False, generator=torch.Generator().manual_seed(6),
                         model_kwargs={"y": y})
    assert_class_conditional(x, y, tol_std=0.12)  # sigma^2 = beta~ under-disperses a little when respaced
    x = sample_ddim(d, x_T(7), steps=250, clip_denoised=False, model_kwargs={"y": y})
    assert_class_conditional(x, y)


def test_unguided_model_is_not_class_conditional():
    """The check has teeth: unguided samples carry no information about y."""
    x = sample_ddim(unconditional_toy(), x_T(7), steps=100, clip_denoised=False)
    with pytest.raises(AssertionError):
        assert_class_conditional(x, labels())


def test_larger_scale_concentrates():
    process = toy_process()
    clf = posterior_classifier(MIX, process)
    y = labels()
    stats = {}
    for s in (1.0, 3.0):
        d = ClassifierGuidance(unconditional_toy(process), clf, scale=s, conditional_model=False)
        x = sample_ddim(d, x_T(8), steps=100, clip_denoised=False, model_kwargs={"y": y})
        conf = clf(x, torch.zeros(N, dtype=torch.long)).gather(1, y[:, None]).exp().mean().item()
        own = (x.reshape(N, 2)[:, 0] * (2 * y - 1)).gt(0).double().mean().item()
        spread = max(x.reshape(N, 2)[y == k, 0].std().item() for k in range(2))  # along the class axis
        stats[s] = conf, own, spread
    assert stats[3.0][0] > stats[1.0][0] + 0.05, stats  # p(y | x_0) of the samples rises
    assert stats[3.0][1] > 0.98 > stats[1.0][1], stats  # fewer samples on the other class's side
    assert stats[3.0][2] < 0.85 * stats[1.0][2], stats  # each class narrower than N(mu_y, 0.2^2)


def test_cfg_weight_zero_samples_the_class_conditional():
    process = toy_process()
    d = classifier_free_denoiser(Denoiser(conditional_toy_net(MIX, process), process,
                                          Parameterization("eps", "fixed_small")), 0.0, null_label=2, num_classes=2)
    y = labels()
    x = sample_ddim(d, x_T(9), steps=250, clip_denoised=False, model_kwargs={"y": y})
    assert_class_conditional(x, y)


# ------------------------------------------------------------------------------------------- training side


def test_drop_labels():
    y = torch.arange(10_000) % 7
    out = drop_labels(y, 0.2, 7, torch.Generator().manual_seed(0))
    frac = (out == 7).double().mean().item()
    assert abs(frac - 0.2) < 0.02
    kept = out != 7
    assert torch.equal(out[kept], y[kept])
    assert torch.equal(out, drop_labels(y, 0.2, 7, torch.Generator().manual_seed(0)))
    assert torch.equal(drop_labels(y, 0.0, 7), y) and bool((drop_labels(y, 1.0, 7) == 7).all())
    with pytest.raises(ValueError, match=r"p_uncond must be in \[0, 1\]"):
        drop_labels(y, 1.5, 7)


# ------------------------------------------------------------------------------------------- bad input


def tiny_classifier(**over):
    cfg = dict(in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
               num_groups=8, pool="adaptive", image_size=8, out_channels=3)
    cfg.update(over)
    return Classifier(ClassifierConfig(**cfg))


def test_label_outside_the_classes():
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"label 3 is outside the classes; valid labels are 0\.\.2"):
        ClassifierFreeGuidance(tiny_unet(), 1.0)(x, t, y=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"label -1 is outside the classes; valid labels are 0\.\.2"):
        classifier_grad_fn(tiny_classifier())(x, t, y=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="needs class labels"):
        classifier_grad_fn(tiny_classifier())(x, t)
    with pytest.raises(ValueError, match="must be an integer tensor"):
        classifier_grad_fn(tiny_classifier())(x, t, y=torch.tensor([0.0, 1.0]))
    process = toy_process()
    d = ClassifierGuidance(unconditional_toy(process), posterior_classifier(MIX, process), conditional_model=False)
    with pytest.raises(ValueError, match=r"label 2 is outside the classes; valid labels are 0\.\.1"):
        d(x_T(0, 2), torch.tensor([5, 5]), y=torch.tensor([2, 0]))


def test_guidance_of_an_unconditional_model_needs_a_classifier():
    unet = tiny_unet(num_classes=None, class_null=False)
    d = Denoiser(unet, toy_process(), Parameterization("eps", "learned_range"))
    with pytest.raises(ValueError, match="this model is unconditional: guide it with a noisy classifier"):
        guided_denoiser(d, guidance_scale=2.0)
    with pytest.raises(ValueError, match="classifier_scale=1.0 needs a classifier"):
        guided_denoiser(d, classifier_scale=1.0)
    with pytest.raises(ValueError, match="exactly one of a classifier"):
        ClassifierGuidance(d)
    with pytest.raises(ValueError, match="needs the null label"):
        ClassifierFreeGuidance(tiny_unet(class_null=False), 1.0)
    with pytest.raises(ValueError, match="guidance_scale w must be a finite number >= 0"):
        ClassifierFreeGuidance(tiny_unet(), -1.0)
    # a plain function: whether it takes labels must be said
    g = ClassifierGuidance(unconditional_toy(), cond_fn=lambda x, t, **_: torch.zeros_like(x))
    with pytest.raises(ValueError, match="cannot tell whether the model takes the labels y"):
        g(x_T(0, 2), torch.tensor([3, 3]), y=torch.tensor([0, 1]))


def test_classifier_from_another_schedule_or_resolution():
    unet = tiny_unet()
    cosine = Denoiser(unet, Process.named("cosine", 1000), Parameterization("eps", "learned_range"))
    clf = tiny_classifier()
    clf.diffusion_info = ClassifierInfo.from_process(Process.named("linear", 1000), 8, 3, "linear/1000")
    with pytest.raises(ValueError, match=r"trained on another noise schedule \(linear/1000\): at step 0"):
        ClassifierGuidance(cosine, clf)
    clf.diffusion_info = ClassifierInfo.from_process(Process.named("cosine", 1000), 8, 3)
    longer = Denoiser(unet, Process.named("cosine", 4000), Parameterization("eps", "learned_range"))
    with pytest.raises(ValueError, match="another noise schedule: it never saw step 1000"):
        ClassifierGuidance(longer, clf).respace(None)
    clf.diffusion_info = ClassifierInfo.from_process(Process.named("cosine", 1000), 16, 3)
    with pytest.raises(ValueError, match="trained on 16x16 images but the diffusion model makes 8x8"):
        ClassifierGuidance(cosine, clf)
    # fits: same schedule (also respaced) and size; the wrong size at call time is still caught
    clf.diffusion_info = ClassifierInfo.from_process(Process.named("cosine", 1000), 8, 3)
    g = ClassifierGuidance(cosine, clf).respace(50)
    with pytest.raises(ValueError, match="trained on 8x8 images, got x_t of size 16x16"):
        g(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="the classifier has 5 classes but the class-conditional model has 3"):
        ClassifierGuidance(cosine, tiny_classifier(out_channels=5), info=None)


def test_classifier_without_info_warns():
    unet = tiny_unet()
    d = Denoiser(unet, Process.named("cosine", 1000), Parameterization("eps", "learned_range"))
    with pytest.warns(UserWarning, match="carries no ClassifierInfo"):
        ClassifierGuidance(d, tiny_classifier())
