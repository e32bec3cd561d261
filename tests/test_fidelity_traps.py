"""Fidelity traps against the official OpenAI code (issue 12, item 8).

Goldens: ../shared/fixtures/openai/process.safetensors (respacing) and tests/goldens/fidelity_traps.safetensors,
made by tests/goldens/make_fidelity_goldens.py from the unmodified official improved-diffusion and
guided-diffusion code (networks the official constructors build, the t their ``cond_fn`` receives, their
float32 ``p_mean_variance``).

a. A bare list of steps is section counts officially and was indices in difflab: it is now refused,
   the official list form stays section counts in ``space_timesteps``, explicit indices are ``UseTimesteps``.
b. Under ``rescale_timesteps`` ``cond_fn`` receives the model's rescaled float t.
c. Learned-range (and fixed-large) float32 log variances are the float64 logs rounded once.
d. The U-Net builds what the official constructors build, with the same parameters and outputs.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from difflab import Denoiser, Parameterization, Process, UseTimesteps, p_mean_variance, space_timesteps
from difflab.augment import sample_truncated, truncation_steps
from difflab.guidance import ClassifierGuidance, classifier_grad_fn
from difflab.nn.presets import build_network, config_from_official_flags, config_from_official_kwargs
from difflab.nn.unet import UNet, UNetConfig
from difflab.samplers import sample_ancestral, sample_ddim
from difflab.samplers.ancestral import p_sample
from difflab.samplers.ddim import ddim_sample
from difflab.schedules import get_named_beta_schedule, resolve_timesteps

pytestmark = pytest.mark.usefixtures("single_thread")

GOLDEN = Path(__file__).with_name("goldens") / "fidelity_traps.safetensors"


@pytest.fixture(scope="module")
def gold():
    return load_file(str(GOLDEN))


@pytest.fixture(scope="module")
def meta():
    with safe_open(str(GOLDEN), "pt") as f:
        return {k: json.loads(v) for k, v in f.metadata().items()}


@pytest.fixture(scope="module")
def process_gold(fixtures_dir):
    return load_file(str(fixtures_dir / "process.safetensors"))


class Spy:
    """A network that records the t it is called with (eps = tanh(x); learned-range values 0)."""

    def __init__(self, learned: bool = False):
        self.learned, self.seen = learned, []

    def __call__(self, x, t, **_):
        self.seen.append(t.clone())
        eps = torch.tanh(x)
        return torch.cat([eps, torch.zeros_like(x)], 1) if self.learned else eps


# ---------------------------------------------------------------------------------------------- a. respacing


@pytest.mark.parametrize("spec,counts", [("250", [250]), ("50", [50]), ("10,10,3,2,2", [10, 10, 3, 2, 2]),
                                         ("1000", [1000])])
def test_official_list_form_is_section_counts(process_gold, spec, counts):
    want = process_gold[f"respace/{spec}/timestep_map"].tolist()
    assert space_timesteps(1000, counts) == want  # the official list form, as officially
    assert space_timesteps(1000, spec) == want
    base = Process.named("cosine", 1000)
    for respaced in (base.respace(spec), base.respace(space_timesteps(1000, counts))):
        assert respaced.timestep_map.tolist() == want
        torch.testing.assert_close(respaced.betas, process_gold[f"respace/{spec}/betas"], rtol=1e-12, atol=0)
    assert isinstance(space_timesteps(1000, counts), UseTimesteps)


AMBIGUOUS = r'ambiguous.*section counts.*"250", "10,10,3".*UseTimesteps\(\[\.\.\.\]\)'


@pytest.mark.parametrize("ambiguous", [[250], [10, 10, 3], (250,), np.array([250]), torch.tensor([250]),
                                       range(0, 1000, 4)])
def test_a_bare_list_is_refused_naming_both_spellings(ambiguous):
    process = Process.named("cosine", 1000)
    d = Denoiser(Spy(), process, Parameterization())
    for call in (lambda: process.respace(ambiguous), lambda: d.respace(ambiguous),
                 lambda: sample_ddim(d, (1, 1, 1, 1), steps=ambiguous),
                 lambda: sample_ancestral(d, (1, 1, 1, 1), steps=ambiguous)):
        with pytest.raises(ValueError, match=AMBIGUOUS):
            call()
    assert d.net.seen == []  # refused before any network call


def test_explicit_indices_and_official_sets():
    process = Process.named("cosine", 1000)
    one = process.respace(UseTimesteps([250]))
    assert one.timestep_map.tolist() == [250] and one.num_timesteps == 1
    assert one.alphas_cumprod.item() == process.alphas_cumprod[250].item()
    # the official use_timesteps is a set (what the official space_timesteps returns)
    official_set = set(space_timesteps(1000, "10"))
    assert process.respace(official_set).timestep_map.tolist() == sorted(official_set)
    assert resolve_timesteps(1000, frozenset({999, 0, 500})) == [0, 500, 999]
    with pytest.raises(ValueError, match="section counts, not kept steps"):
        space_timesteps(1000, UseTimesteps([1, 2]))
    assert repr(UseTimesteps([1, 2])) == "UseTimesteps([1, 2])" and UseTimesteps(np.arange(3)) == [0, 1, 2]


def test_samplers_take_both_spellings():
    T = 1000
    for sampler in (sample_ddim, sample_ancestral):
        counts = Spy()
        sampler(Denoiser(counts, Process.named("cosine", T), Parameterization()), (1, 1, 1, 1), steps="250",
                generator=torch.Generator().manual_seed(0))
        seen = [int(t) for t in counts.seen]
        assert seen == sorted(space_timesteps(T, "250"), reverse=True) and len(seen) == 250
        kept = Spy()
        sampler(Denoiser(kept, Process.named("cosine", T), Parameterization()), (1, 1, 1, 1),
                steps=UseTimesteps([250]), generator=torch.Generator().manual_seed(0))
        assert [int(t) for t in kept.seen] == [250]


@pytest.mark.parametrize("sampler", [sample_ddim, sample_ancestral], ids=["ddim", "ancestral"])
@pytest.mark.parametrize("steps", [None, "5", 7])
def test_truncated_chains_go_through_the_explicit_form(sampler, steps):
    T, s = 100, 30
    kept = truncation_steps(T, s, steps)
    assert isinstance(kept, UseTimesteps) and kept[0] == s - 1
    assert kept[1:] == ([*range(s, T)] if steps is None else [s + i for i in space_timesteps(T - s, steps)])
    spy = Spy()
    d = Denoiser(spy, Process.named("cosine", T), Parameterization())
    z = sample_truncated(sampler, d, (2, 1, 2, 2), s, steps=steps, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 1, 2, 2)
    assert [int(t[0]) for t in spy.seen] == sorted(kept, reverse=True)[:-1]  # end = 1: the chain stops at z_s


# ---------------------------------------------------------------------------------------------- b. cond_fn's t


def _rescaled_denoiser(meta):
    m = meta["condfn"]
    process = Process.named("cosine", m["T"]).respace(UseTimesteps(m["use_timesteps"]))
    spy = Spy(learned=True)
    return Denoiser(spy, process, Parameterization("eps", "learned_range"), time_scale=1000.0 / m["T"]), spy


def test_cond_fn_gets_the_rescaled_t_of_the_model(gold, meta):
    """guided-diffusion's p_sample and ddim_sample on SpacedDiffusion(rescale_timesteps=True): cond_fn and the
    model both receive timestep_map[t] * 1000 / T as float32, bit for bit."""
    d, spy = _rescaled_denoiser(meta)
    seen = []

    def cond_fn(x, t, **_):
        seen.append(t.clone())
        return 0.1 * torch.ones_like(x)

    x = torch.zeros(3, 1, 2, 2)
    t = torch.tensor(meta["condfn"]["t"])
    p_sample(d, x, t, cond_fn=cond_fn, generator=torch.Generator().manual_seed(0))
    ddim_sample(d, x, t, cond_fn=cond_fn)
    for got, want in ((spy.seen, gold["condfn/model_t"]), (seen, gold["condfn/cond_t"])):
        got = torch.stack(got)
        assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want), (got, want)
    assert torch.equal(gold["condfn/cond_t"], gold["condfn/model_t"])


def test_classifier_guidance_hands_the_classifier_the_model_t(gold, meta):
    d, spy = _rescaled_denoiser(meta)
    seen = []

    def classifier(x, t):
        seen.append(t.clone())
        return torch.stack([x.flatten(1).sum(1), -x.flatten(1).sum(1)], 1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no ClassifierInfo: unchecked, says a warning
        guided = ClassifierGuidance(d, classifier, 2.0, conditional_model=False)
    t = torch.tensor(meta["condfn"]["t"])
    guided(torch.zeros(3, 1, 2, 2), t, y=torch.tensor([0, 1, 0]))
    assert torch.equal(seen[0], gold["condfn/cond_t"][0]) and torch.equal(guided.network_t(t), seen[0])
    # without rescale_timesteps: the integer original index, as before
    plain = Denoiser(Spy(), Process.named("cosine", 4000).respace("10"), Parameterization())
    got = []
    cond = classifier_grad_fn(lambda x, t: got.append(t) or classifier(x, t), 1.0)
    p_sample(plain, torch.zeros(3, 1, 2, 2), t, cond_fn=cond, model_kwargs={"y": torch.tensor([0, 1, 0])},
             generator=torch.Generator().manual_seed(0))
    assert got[0].dtype == torch.int64 and got[0].tolist() == plain.process.timestep_map[t].tolist()


# ---------------------------------------------------------------------------------------------- c. float32 logs


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("var_type", ["learned_range", "fixed_large", "fixed_small"])
def test_float32_log_variance_equals_the_official_bit_for_bit(gold, schedule, var_type):
    param = Parameterization("eps", var_type)
    x, t = gold["var/x"], gold["var/t"]

    def net(x, t, **_):  # the fixtures' model function (fixtures/openai/README.md)
        s = (t.float() / 1000).reshape(-1, 1, 1, 1)
        eps = torch.tanh(0.7 * x + 0.3 * s) - 0.1 * torch.flip(x, dims=[-1])
        return torch.cat([eps, torch.sin(1.3 * x - s)], 1) if param.learned_variance else eps

    out = p_mean_variance(Denoiser(net, Process.named(schedule, 1000), param), x, t, clip_denoised=False)
    for name in ("log_variance", "variance"):
        want = gold[f"var/{schedule}/{var_type}/{name}"]
        got = getattr(out, name)
        assert got.dtype == torch.float32 and torch.equal(got.expand_as(want), want), name


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_log_betas_are_the_float64_log_cast_once(schedule):
    betas = get_named_beta_schedule(schedule, 1000)
    process = Process(betas)
    t = torch.arange(1000)
    like = torch.zeros(1000, dtype=torch.float32)
    got = process.extract("log_betas", t, like)
    assert torch.equal(got, torch.from_numpy(np.log(betas).astype(np.float32)))
    large = np.append(process.posterior_variance[1].item(), betas[1:])
    want = torch.from_numpy(np.log(large).astype(np.float32))
    assert torch.equal(process.extract("large_log_variance", t, like), want)
    # float64 data: the float64 logs themselves
    assert torch.equal(process.extract("log_betas", t, like.double()), torch.from_numpy(np.log(betas)))
    if schedule == "cosine":  # the trap is real: the log of the rounded beta differs there, 1.3e-5 relative at T-1
        wrong = torch.log(torch.from_numpy(betas).float())
        rel = ((wrong.double() - got.double()) / got.double()).abs()
        assert 1e-5 < rel[-1].item() < 2e-5


# ---------------------------------------------------------------------------------------------- d. the U-Net


def _fill(model):
    """The golden's weights: every parameter, in sorted key order, randn(shape) * 0.2 from one seed-0 generator."""
    g = torch.Generator().manual_seed(0)
    sd = model.state_dict()
    with torch.no_grad():
        for k in sorted(sd):
            sd[k].copy_(torch.randn(sd[k].shape, generator=g) * 0.2)


def _check_net(gold, name, model):
    assert sum(p.numel() for p in model.parameters()) == gold[f"net/{name}/params"].item()
    _fill(model)
    model.eval()
    kwargs = {"y": gold[f"net/{name}/y"]} if f"net/{name}/y" in gold else {}
    with torch.no_grad():
        out = model(gold[f"net/{name}/x"], gold[f"net/{name}/t"], **kwargs)
    want = gold[f"net/{name}/out"]
    assert out.shape == want.shape
    rel = ((out.double() - want.double()).abs().max() / want.double().abs().max()).item()
    assert rel < 1e-5, f"{name}: relative error {rel:.3g}"


NET_CASES = ["improved_heads_upsample", "guided_heads_upsample", "guided_head_channels", "guided_classifier"]


@pytest.mark.parametrize("name", NET_CASES)
def test_official_constructor_configs_build_and_match(gold, meta, name):
    m = meta[f"net/{name}"]
    with pytest.warns(UserWarning, match="are not downsample rates of any level.*ignored"):
        config = config_from_official_kwargs(m["class"], m["kwargs"])
        model = build_network(config)
    _check_net(gold, name, model)


def test_official_flags_build_and_match(gold, meta):
    m = meta["net/improved_flags"]
    with pytest.warns(UserWarning, match=r"attention_resolutions \[16\]"):
        config = config_from_official_flags(m["flags"], m["family"])
        model = build_network(config)
    assert config.attention_resolutions == (2, 4, 16) and config.num_heads_upsample == 4
    _check_net(gold, "improved_flags", model)


def test_heads_per_block():
    """num_heads on the way down and in the middle, num_heads_upsample on the way up (official)."""
    cfg = UNetConfig(in_channels=3, model_channels=32, channel_mult=(1, 3), num_res_blocks=1,
                     attention_resolutions=(2,), num_heads=3, num_heads_upsample=6)
    net = UNet(cfg)
    heads = lambda blocks: [m.num_heads for b in blocks for m in b.modules() if hasattr(m, "qkv")]  # noqa: E731
    assert heads(net.input_blocks) == [3] and heads([net.middle_block]) == [3]
    assert heads(net.output_blocks) == [6, 6]
    assert cfg.heads_upsample == 6 and UNetConfig(num_heads=4).heads_upsample == 4
    # num_head_channels overrides both; the official flags then give num_heads_upsample -1
    flags = dict(image_size=64, num_channels=64, num_head_channels=32, num_heads_upsample=8)
    assert config_from_official_flags(flags, "guided-diffusion").num_heads_upsample == -1
    same = config_from_official_flags(dict(num_heads=4, num_heads_upsample=4), "improved-diffusion")
    assert same.num_heads_upsample == -1


def test_an_unreached_rate_changes_nothing():
    base = dict(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, num_groups=8, num_heads=2)
    with pytest.warns(UserWarning, match=r"\[4, 16\]"):
        deep = UNet(UNetConfig(**base, attention_resolutions=(2, 4, 16)))
    plain = UNet(UNetConfig(**base, attention_resolutions=(2,)))
    assert {k: v.shape for k, v in deep.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    _fill(deep)
    plain.load_state_dict(deep.state_dict())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 9])
    with torch.no_grad():
        assert torch.equal(deep(x, t), plain(x, t))


@pytest.mark.parametrize("over,field", [
    (dict(num_heads=5), "num_heads"),                     # 5 divides neither 96 (attention) nor 32
    (dict(num_heads_upsample=5), "num_heads_upsample"),
    (dict(num_heads=1, num_head_channels=40), "num_head_channels"),
    (dict(attention_resolutions=(1, 2), num_heads=3), "num_heads"),  # now the 32-wide level has attention
])
def test_what_the_official_code_cannot_run_is_still_refused(over, field):
    cfg = dict(in_channels=3, model_channels=32, channel_mult=(1, 3), num_res_blocks=1, attention_resolutions=(2,),
               num_heads=3)
    with pytest.raises(ValueError, match=rf"^{field}=.*divisor of every width with attention"):
        UNetConfig(**{**cfg, **over}).validate()
