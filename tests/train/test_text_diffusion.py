"""Text-conditional diffusion (GLIDE's TextUNet) on the one trainer: captions become tokens, dropped captions
the empty caption, sampling takes prompts, classifier-free guidance uses the empty caption as its null, and a
text cascade in one command equals its stages one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from train_helpers import ROOT, sets

from difflab.build import build_tokenizer, load_run
from difflab.cli import main
from difflab.config import load_config
from difflab.data.scenes import reference_captions
from difflab.generate import draw_samples
from difflab.guidance import ClassifierFreeGuidance
from difflab.train.tasks.diffusion import DiffusionTask

pytestmark = pytest.mark.usefixtures("single_thread")
BASE = ROOT / "configs" / "scenes-text16.yaml"
SR = ROOT / "configs" / "scenes-sr16-32.yaml"
# a few-second miniature of the scenes configs (16x16 base, 16 -> 32 SR): narrow U-Nets, one-layer text transformer
TINY = ["model.model_channels=16", "model.num_head_channels=8", "model.num_groups=8", "model.text.xf_width=16",
        "model.text.xf_layers=1",
        "train.batch_size=8", "train.max_steps=3", "train.save_every=3", "train.log_every=1",
        "data.num_scenes=64", "diffusion.steps=100", "augment.steps=100", "augment.max_level=50"]
PROMPTS = ["a large red 7", "a small blue two in the top left"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    base, sr = root / "base", root / "sr"
    assert main(["train", str(BASE), "--out", str(base), "--quiet", *sets(*TINY)]) == 0
    assert main(["train", str(SR), "--out", str(sr), "--quiet", *sets(*TINY, "sample.aug_level=20")]) == 0
    return {"root": root, "base": base, "sr": sr}


def test_the_scene_vocabulary_covers_every_reference_caption():
    tokenizer = build_tokenizer(load_config(BASE))
    unk = tokenizer.unk_token
    for caption in reference_captions():
        ids = tokenizer.encode(caption)
        assert unk not in ids and len(ids) + 2 <= load_config(BASE).model.text.text_ctx, caption


def test_dropped_captions_are_the_empty_caption():
    cfg = load_config(BASE, TINY)
    task = DiffusionTask(cfg)
    batch = {"x0": torch.zeros(3, 3, 16, 16), "caption": ["a large red 7", "a large blue 1", "a large white 2"]}
    kw = task.model_kwargs(batch, {"drop": torch.tensor([False, True, False])})
    empty_tokens, empty_mask = task.tokens([""], torch.device("cpu"))
    kept_tokens, _ = task.tokens(["a large red 7"], torch.device("cpu"))
    assert torch.equal(kw["tokens"][1], empty_tokens[0]) and torch.equal(kw["mask"][1], empty_mask[0])
    assert torch.equal(kw["tokens"][0], kept_tokens[0])
    assert int(empty_mask.sum()) == 2  # SOT and EOT only


def test_text_guidance_is_the_cfg_combination_with_the_empty_caption():
    """(1 + w) eps(x, caption) - w eps(x, "") on the mean channels; the variance from the conditional half."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)

    def net(x, t, tokens, mask):  # a toy network that depends on the tokens
        return torch.cat([x + lin(tokens.float())[:, :, None, None].mean(1, keepdim=True), x * 0.5], dim=1)

    x, t = torch.randn(2, 1, 2, 2), torch.tensor([3, 7])
    tokens, mask = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]]), torch.ones(2, 4, dtype=torch.bool)
    null = {"tokens": torch.tensor([[1, 2, 0, 0]]), "mask": torch.tensor([[True, True, False, False]])}
    w = 2.5
    out = ClassifierFreeGuidance(net, w, null_cond=null)(x, t, tokens=tokens, mask=mask)
    c = net(x, t, tokens, mask)
    u = net(x, t, null["tokens"].expand(2, 4), null["mask"].expand(2, 4))
    torch.testing.assert_close(out[:, :1], (1 + w) * c[:, :1] - w * u[:, :1])
    torch.testing.assert_close(out[:, 1:], c[:, 1:])
    assert torch.equal(ClassifierFreeGuidance(net, 0.0, null_cond=null)(x, t, tokens=tokens, mask=mask), c)


def test_sampling_takes_prompts_and_guidance_zero_is_the_conditional_model(runs):
    cfg, _, denoiser = load_run(runs["base"])
    kw = dict(n=4, sampler="ddim", steps=3, seed=1, prompts=PROMPTS)
    x0, _ = draw_samples(denoiser, cfg, guidance_scale=0.0, **kw)
    x1, _ = draw_samples(denoiser, cfg, guidance_scale=0.0, **{**kw, "prompts": PROMPTS[::-1]})
    x2, _ = draw_samples(denoiser, cfg, guidance_scale=3.0, **kw)
    assert x0.shape == (4, 3, 16, 16)
    assert not torch.equal(x0, x1) and not torch.equal(x0, x2)  # the prompt and the guidance both matter
    # sample i takes prompts[i % 2]: the same prompt and noise give the same image whatever the rest of the batch
    alone, _ = draw_samples(denoiser, cfg, guidance_scale=0.0, **{**kw, "prompts": [PROMPTS[0]] * 4})
    torch.testing.assert_close(alone[0], x0[0])


def test_prompt_mistakes_are_one_line(runs, tmp_path, capsys):
    for args, needle in ((["sample", runs["base"], "--n", "2"], "--prompt TEXT"),
                         (["sample", runs["base"], "--prompts", tmp_path / "none.txt"], "file not found")):
        capsys.readouterr()
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_a_text_cascade_in_one_command_equals_its_stages(runs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({"n": 4, "batch": 4, "seed": 2, "stages": [
        {"run": str(runs["base"]), "sampler": "ddim", "steps": 3, "guidance": 1.0},
        {"run": str(runs["sr"]), "sampler": "ddim", "steps": 3, "aug_level": 20}]}))
    assert main(["sample", str(file), "--prompts", str(prompts), "--npz", str(tmp_path / "c.npz"), "--quiet"]) == 0
    assert main(["sample", str(runs["base"]), "--n", "4", "--seed", "2", "--sampler", "ddim", "--steps", "3",
                 "--guidance", "1", "--prompts", str(prompts), "--npz", str(tmp_path / "b.npz"), "--quiet"]) == 0
    assert main(["sample", str(runs["sr"]), "--low-res", str(tmp_path / "b.npz"), "--seed", "3", "--sampler", "ddim",
                 "--steps", "3", "--aug-level", "20", "--prompts", str(prompts), "--npz", str(tmp_path / "s.npz"),
                 "--quiet"]) == 0
    with np.load(tmp_path / "c.npz") as a, np.load(tmp_path / "s.npz") as b:
        assert a["arr_0"].shape == (4, 32, 32, 3) and np.array_equal(a["arr_0"], b["arr_0"])


def test_an_empty_prompt_is_the_unconditional_sample(runs, capsys):
    """GLIDE: the empty caption is the null, so "" samples the unconditional model and any guidance w leaves it
    unchanged ((1 + w) eps(x, "") - w eps(x, "") = eps(x, "")); a prompt on a model without text is one line."""
    cfg, _, denoiser = load_run(runs["base"])
    kw = dict(n=2, sampler="ddim", steps=3, seed=4, prompts=[""])
    x0, _ = draw_samples(denoiser, cfg, guidance_scale=0.0, **kw)
    x3, _ = draw_samples(denoiser, cfg, guidance_scale=3.0, **kw)
    torch.testing.assert_close(x3, x0, atol=1e-5, rtol=0)
    tokens, mask = build_tokenizer(cfg).padded_tokens_and_mask("", cfg.model.text.text_ctx)
    assert list(mask).count(True) == 2  # SOT + EOT only: the caption the dropped training examples saw
    mnist = ROOT / "configs" / "mnist-tiny.yaml"
    run = runs["root"] / "mnist"
    assert main(["train", str(mnist), "--out", str(run), "--quiet", "--max-steps", "1"]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", "a red 7", "--npz", str(runs["root"] / "m.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not text-conditional" in err[0]
