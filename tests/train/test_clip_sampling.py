"""CLIP guidance when sampling (draw_samples / difflab sample --clip): the samples are those of the sampler on the
CLIP-guided denoiser, scale 0 is the unguided model exactly, any run takes prompts with a CLIP, and bad input is
one line with exit 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import ROOT, sets

from difflab.build import build_denoiser, build_tokenizer, load_run
from difflab.cli import main
from difflab.clip_guidance import clip_guided_denoiser, load_noised_clip, save_noised_clip
from difflab.config import config_from_dict, load_config
from difflab.generate import _batch_seed, draw_samples, get_sampler
from difflab.nn.clip import NoisedCLIP
from difflab.nn.presets import build_network
from difflab.text import tokenize_batch

pytestmark = pytest.mark.usefixtures("single_thread")

BASE = ROOT / "configs" / "scenes-text16.yaml"
CLIP = ROOT / "configs" / "scenes-clip16.yaml"
TEXT_TINY = ["model.model_channels=16", "model.num_head_channels=8", "model.num_groups=8", "model.text.xf_width=16",
             "model.text.xf_layers=1", "train.batch_size=8", "train.max_steps=2", "train.save_every=2",
             "train.log_every=1", "data.num_scenes=16", "diffusion.steps=100"]
CLIP_TINY = ["clip.n_timesteps=100", "clip.patch_size=4", "clip.n_xf_blocks_image=1", "clip.n_xf_blocks_text=1",
             "data.num_scenes=16", "train.batch_size=8", "train.max_steps=2", "train.save_every=2", "train.log_every=1",
             "eval_examples=8"]
PROMPTS = ["a large red 7", "a small blue two in the top left"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    out = {"root": root, "text": root / "text", "clip": root / "clip"}
    assert main(["train", str(BASE), "--out", str(out["text"]), "--quiet", *sets(*TEXT_TINY)]) == 0
    assert main(["train", str(CLIP), "--out", str(out["clip"]), "--quiet", *sets(*CLIP_TINY)]) == 0
    # CLIP files that do not fit the text run: 32x32 images, another number of steps
    for name, extra in (("clip32", ["clip.image_size=32", "data.image_size=32"]),
                        ("clip1000", ["clip.n_timesteps=1000"])):
        cfg = load_config(CLIP, [*CLIP_TINY, *extra])
        out[name] = root / f"{name}.safetensors"
        save_noised_clip(out[name], NoisedCLIP(cfg.clip), cfg.text)
    return out


def test_samples_are_the_sampler_on_the_clip_guided_denoiser(runs):
    cfg, _, den = load_run(runs["text"], ema=None)
    clip = load_noised_clip(runs["clip"])
    kw = dict(n=2, steps=3, seed=5, guidance_scale=0.0, prompts=PROMPTS, distributed=False)
    for sampler in ("ancestral", "ddim"):
        x, _ = draw_samples(den, cfg, sampler=sampler, clip=clip, clip_scale=4.0, **kw)
        # by hand: the batch's noise, the model's tokens, the guided denoiser
        g = torch.Generator().manual_seed(_batch_seed(5, 0))
        x_T = torch.randn((2, 3, 16, 16), generator=g)
        tokens, mask = tokenize_batch(build_tokenizer(cfg), PROMPTS, cfg.model.text.text_ctx)
        guided = clip_guided_denoiser(den, clip, PROMPTS, 4.0)
        by_hand = get_sampler(sampler)(guided, x_T, generator=g, steps=3, model_kwargs={"tokens": tokens, "mask": mask})
        torch.testing.assert_close(x, by_hand, rtol=0, atol=1e-6)
        plain, _ = draw_samples(den, cfg, sampler=sampler, **kw)
        assert (x - plain).abs().max() > 1e-3, sampler  # the CLIP moved the samples
        zero, _ = draw_samples(den, cfg, sampler=sampler, clip=clip, clip_scale=0.0, **kw)
        if sampler == "ancestral":  # mu + Sigma * 0 is mu exactly
            assert torch.equal(zero, plain)
        else:  # eps recomputed from x0^ (official condition_score): equal up to float32 rounding, which the
            # large 1 / sqrt(alpha_bar) of the first step amplifies
            torch.testing.assert_close(zero, plain, rtol=0, atol=1e-3)


def test_an_unconditional_run_takes_prompts_with_a_clip(runs):
    """CLIP guidance alone steers an unconditional model; n defaults to the number of prompts."""
    cfg = config_from_dict({"model": {"in_channels": 3, "model_channels": 16, "channel_mult": [1, 2],
                                      "num_res_blocks": 1, "attention_resolutions": [], "num_groups": 8,
                                      "image_size": 16},
                            "diffusion": {"steps": 100, "schedule": "cosine"},
                            "data": {"source": "scenes", "image_size": 16}})
    torch.manual_seed(0)
    den = build_denoiser(cfg, build_network(cfg.model).eval())
    clip = load_noised_clip(runs["clip"])
    x, labels = draw_samples(den, cfg, steps=2, prompts=PROMPTS, clip=clip, clip_scale=3.0, distributed=False)
    plain, _ = draw_samples(den, cfg, n=2, steps=2, distributed=False)
    assert x.shape == (2, 3, 16, 16) and labels is None and (x - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="not text-conditional"):
        draw_samples(den, cfg, n=2, steps=2, prompts=PROMPTS, distributed=False)  # prompts alone: no reader


def test_cli_samples_with_clip_guidance(runs, tmp_path):
    out = tmp_path / "guided.npz"
    assert main(["sample", str(runs["text"]), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--clip",
                 str(runs["clip"]), "--clip-scale", "4", "--steps", "3", "--seed", "5", "--guidance", "0",
                 "--ema", "model", "--npz", str(out), "--quiet"]) == 0
    cfg, _, den = load_run(runs["text"], ema=None)
    x, _ = draw_samples(den, cfg, n=2, steps=3, seed=5, guidance_scale=0.0, prompts=PROMPTS,
                        clip=load_noised_clip(runs["clip"]), clip_scale=4.0, distributed=False)
    from difflab.images import to_uint8

    assert np.array_equal(np.load(out)["arr_0"], to_uint8(x, cfg.data))
    # default names carry the CLIP scale
    assert main(["sample", str(runs["text"]), "--prompt", PROMPTS[0], "--clip", str(runs["clip"] / "noised_clip"
                                                                                   ".safetensors"),
                 "--steps", "2", "--quiet"]) == 0
    assert sorted(p.name for p in (runs["text"] / "samples").glob("*clip*")) == ["ancestral_1_w2_clip1.npz",
                                                                                 "ancestral_1_w2_clip1.png"]


def _fails(capsys, args, *needles):
    capsys.readouterr()
    assert main(args) == 2, f"difflab {' '.join(map(str, args))} did not exit 2"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("difflab: error: "), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"


def test_bad_clip_input_is_one_line(runs, capsys, tmp_path):
    text, clip = str(runs["text"]), str(runs["clip"])
    npz = ["--npz", str(tmp_path / "x.npz"), "--steps", "2", "--quiet"]
    _fails(capsys, ["sample", text, "--prompt", "a red 7", "--clip-scale", "2", *npz], "--clip-scale S needs a noised "
                                                                                     "CLIP (--clip")
    _fails(capsys, ["sample", text, "--clip", clip, *npz], "--clip: CLIP guidance steers the samples towards captions")
    _fails(capsys, ["sample", text, "--prompt", "a red 7", "--clip", str(runs["clip32"]), *npz],
           "the noised CLIP sees 32x32 images but the diffusion model makes 16x16")
    _fails(capsys, ["sample", text, "--prompt", "a red 7", "--clip", str(runs["clip1000"]), *npz],
           "another noise schedule (cosine/1000)")
    _fails(capsys, ["sample", text, "--prompt", "a red 7", "--clip", clip, "--clip-scale", "nan", *npz],
           "finite number >= 0")
    _fails(capsys, ["sample", text, "--prompt", "a red 7", "--clip", text, *npz], "not a noised CLIP")
    _fails(capsys, ["sample", text, "--prompt", "a red 7", "--clip", str(tmp_path / "none"), *npz], "not found")
    _fails(capsys, ["sample", clip, *npz], "noised-CLIP run (task: noised_clip)", "--clip")
    assert not (tmp_path / "x.npz").exists()
    cascade = tmp_path / "c.cascade.yaml"
    cascade.write_text(f"stages:\n  - run: {text}\n")
    _fails(capsys, ["sample", str(cascade), "--clip", clip], "--clip: set per stage")


def test_cfg_and_clip_guidance_compose(runs):
    """Classifier-free guidance (w) and CLIP guidance together: the CLIP shifts the CFG denoiser's step."""
    cfg, _, den = load_run(runs["text"], ema=None)
    clip = load_noised_clip(runs["clip"])
    kw = dict(n=2, steps=2, seed=1, prompts=PROMPTS, distributed=False, guidance_scale=2.0)
    both, _ = draw_samples(den, cfg, clip=clip, clip_scale=3.0, **kw)
    cfg_only, _ = draw_samples(den, cfg, **kw)
    assert (both - cfg_only).abs().max() > 1e-3
    assert load_config(CLIP).clip.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)
