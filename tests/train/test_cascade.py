"""Cascades (CDM) as pipelines: a cascade sampled in one command equals its stages sampled one by one
with the same seeds (non-truncated through the CLI's .npz files, truncated through the library), and
bad stage chains are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from train_helpers import TINY, sets

from difflab.build import load_run
from difflab.cli import main
from difflab.data import float_to_uint8, load_digits8, uint8_to_float
from difflab.generate import draw_samples
from difflab.images import save_npz
from difflab.pipelines.cascade import build_cascade, load_cascade, sample_cascade

pytestmark = pytest.mark.usefixtures("single_thread")
COND = ["data.class_cond=true", "model.num_classes=10"]
QUICK = ["train.max_steps=3", "train.batch_size=16", "train.save_every=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Digits 4x4 -> 8x8, class-conditional: a base on the 4x4 area-downsampled digits, a noise-augmented
    SR stage 4 -> 8 whose augmentation process is the base's (cosine, T = 100), and an unconditional SR."""
    root = tmp_path_factory.mktemp("cascade")
    images, labels = load_digits8("train")
    small = torch.nn.functional.interpolate(uint8_to_float(images[..., None]), size=4, mode="area")
    save_npz(float_to_uint8(small), labels, root / "digits4.npz")
    base = ["data.source=npz", f"data.path={root / 'digits4.npz'}", "data.split=null", "data.image_size=4",
            "model.image_size=4", *COND, *QUICK]
    sr = [*COND, *QUICK, "data.low_res_size=4", "model.low_res_channels=1", "augment.kind=noise",
          "augment.steps=100", "augment.schedule=cosine", "model.cond_dim=32"]
    out = {"root": root}
    for name, extra in (("base", base), ("sr", sr), ("sr_uncond", [*QUICK, "data.low_res_size=4",
                                                                   "model.low_res_channels=1"])):
        out[name] = root / name
        assert main(["train", str(TINY), "--out", str(out[name]), "--quiet", *sets(*extra)]) == 0
    return out


def _cascade_file(path, stages, **top):
    path.write_text(yaml.safe_dump({"n": 6, "batch": 4, "seed": 5, **top, "stages": stages}))
    return path


def test_cascade_in_one_command_equals_its_stages_one_by_one(runs, tmp_path, capsys):
    stages = [{"run": str(runs["base"]), "sampler": "ddim", "steps": 5},
              {"run": str(runs["sr"]), "sampler": "ancestral", "steps": 4, "aug_level": 30}]
    file = _cascade_file(tmp_path / "c.yaml", stages, label=3)
    assert main(["sample", str(file), "--npz", str(tmp_path / "c.npz"), "--stages", str(tmp_path / "st"),
                 "--quiet"]) == 0
    # the same two stages by hand: the base with seed 5, then the SR run on its .npz with seed 6
    assert main(["sample", str(runs["base"]), "--n", "6", "--batch", "4", "--seed", "5", "--label", "3",
                 "--sampler", "ddim", "--steps", "5", "--npz", str(tmp_path / "b.npz"), "--quiet"]) == 0
    assert main(["sample", str(runs["sr"]), "--low-res", str(tmp_path / "b.npz"), "--batch", "4", "--seed", "6",
                 "--label", "3", "--sampler", "ancestral", "--steps", "4", "--aug-level", "30",
                 "--npz", str(tmp_path / "s.npz"), "--quiet"]) == 0
    one, base, sr = (np.load(tmp_path / f) for f in ("c.npz", "b.npz", "s.npz"))
    assert one["arr_0"].shape == (6, 8, 8, 1) and one["arr_1"].tolist() == [3] * 6
    assert np.array_equal(one["arr_0"], sr["arr_0"])
    assert np.array_equal(np.load(tmp_path / "st" / "stage_0.npz")["arr_0"], base["arr_0"])
    # the level matters: s = 0 gives other images
    assert main(["sample", str(runs["sr"]), "--low-res", str(tmp_path / "b.npz"), "--seed", "6", "--label", "3",
                 "--sampler", "ancestral", "--steps", "4", "--npz", str(tmp_path / "s0.npz"), "--quiet"]) == 0
    assert not np.array_equal(np.load(tmp_path / "s0.npz")["arr_0"], sr["arr_0"])
    # nothing is overwritten
    capsys.readouterr()
    assert main(["sample", str(file), "--npz", str(tmp_path / "c.npz"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_truncated_cascade_hands_on_the_base_chain_stopped_at_s(runs, tmp_path):
    stages = [{"run": str(runs["base"]), "sampler": "ancestral"},
              {"run": str(runs["sr"]), "sampler": "ddim", "steps": 4, "aug_level": 40, "truncated": True}]
    cascade = load_cascade(_cascade_file(tmp_path / "t.yaml", stages, label="all"))
    (z, _), (x, labels) = sample_cascade(cascade, build_cascade(cascade))
    cfg_b, _, d_b = load_run(runs["base"], ema=0.99)
    cfg_s, _, d_s = load_run(runs["sr"], ema=0.99)
    z_hand, _ = draw_samples(d_b, cfg_b, n=6, batch=4, seed=5, sampler="ancestral", truncate_at=40)
    x_hand, _ = draw_samples(d_s, cfg_s, n=6, batch=4, seed=6, sampler="ddim", steps=4, low_res=z_hand,
                             aug_level=40, low_res_noised=True)
    assert torch.equal(z, z_hand) and torch.equal(x, x_hand)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5]
    # z_s is still noisy: the chain stopped 40 steps short of x_0
    full, _ = draw_samples(d_b, cfg_b, n=6, batch=4, seed=5, sampler="ancestral")
    assert not torch.allclose(z, full, atol=1e-3)


def _fails(capsys, args, *needles):
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("difflab: error: "), err
    for needle in needles:
        assert needle in err, err


def test_bad_stage_chains_are_one_line_errors(runs, tmp_path, capsys):
    def chain(name, stages, **top):
        return _cascade_file(tmp_path / f"{name}.yaml", stages, **top)

    base, sr, unc = ({"run": str(runs[k])} for k in ("base", "sr", "sr_uncond"))
    out = ["--npz", tmp_path / "o.npz", "--quiet"]
    _fails(capsys, ["sample", chain("sr_first", [sr]), *out], "super-resolution stage", "starts with a base")
    _fails(capsys, ["sample", chain("two_bases", [base, base]), *out], "takes no low-res input")
    _fails(capsys, ["sample", chain("size", [base, sr, sr]), *out], "takes 4x4 low-res images", "makes 8x8")
    _fails(capsys, ["sample", chain("label", [base, unc], label=2), *out], "unconditional", "no class label")
    trunc = {**sr, "aug_level": 10, "truncated": True}
    _fails(capsys, ["sample", chain("solver", [{**base, "sampler": "dpmpp-2m"}, trunc]), *out],
           "ancestral or ddim", "dpmpp-2m")
    _fails(capsys, ["sample", chain("level", [base, {**sr, "truncated": True}]), *out], "aug_level s >= 1")
    _fails(capsys, ["sample", chain("base_aug", [{**base, "aug_level": 3}, sr]), *out], "base stage")
    _fails(capsys, ["sample", chain("flags", [base, sr]), "--steps", "3", *out], "--steps", "per stage")
    _fails(capsys, ["sample", runs["sr"], "--n", "2", *out], "needs low-res images")
    _fails(capsys, ["sample", runs["base"], "--stages", tmp_path, *out], "--stages", "cascade file")
    assert not (tmp_path / "o.npz").exists()


def test_released_upsamplers_chain_after_their_base_models(tmp_path):
    """Converted folders recorded as guided-diffusion's 64x64 model and its 64 -> 256 upsampler (tiny random
    stand-ins of the same shapes of input and output: only the recorded preset decides the flags) chain with
    their README's flags: linear T = 1000 for the upsampler, low-res 64x64, 1000 classes; the 128 -> 512
    upsampler is known too."""
    from difflab.convert import converted_run_config, save_converted
    from difflab.nn.presets import RELEASED_FLAGS, build_network, config_from_official_flags, get_preset

    def tiny(**kw):
        cfg = get_preset("mnist-tiny")
        return type(cfg)(**{**cfg.__dict__, "in_channels": 3, "learn_sigma": True, "num_classes": 1000,
                                "attention_resolutions": (), **kw})

    torch.manual_seed(0)
    # as many levels as the released networks, so the middle block's attention runs at 8x8
    base = tiny(image_size=64, channel_mult=(1,) * 4)
    up = tiny(image_size=256, channel_mult=(1,) * 6, low_res_channels=3)
    save_converted(build_network(base).state_dict(), base, tmp_path / "base",
                   metadata={"preset": "guided-diffusion/64x64_diffusion"})
    save_converted(build_network(up).state_dict(), up, tmp_path / "up",
                   metadata={"preset": "guided-diffusion/64_256_upsampler"})
    cfg = converted_run_config(tmp_path / "up")
    assert cfg.data.low_res_size == 64 and (cfg.diffusion.schedule, cfg.diffusion.steps) == ("linear", 1000)
    cascade = load_cascade(_cascade_file(tmp_path / "c.yaml", [
        {"run": str(tmp_path / "base"), "sampler": "ddim", "steps": 2},
        {"run": str(tmp_path / "up"), "sampler": "ddim", "steps": 2}], n=2, batch=2, label=207))
    (x64, _), (x256, labels) = sample_cascade(cascade, build_cascade(cascade))
    assert x64.shape == (2, 3, 64, 64) and x256.shape == (2, 3, 256, 256) and labels.tolist() == [207, 207]
    big = config_from_official_flags(RELEASED_FLAGS["guided-diffusion/128_512_upsampler"], "guided-diffusion-sr")
    assert big.image_size == 512 and big.low_res_channels == 3 and big.attention_resolutions == (16, 32)
    assert big.num_head_channels == 64 and big.model_channels == 192 and big.num_classes == 1000
