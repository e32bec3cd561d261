"""Converted GLIDE folders sample as the official notebooks do: the diffusion flags of model_creation.py,
the notebooks' settings (100 steps at guidance 3 for the base, fast27 from x_T * 0.997 for the upsampler),
GLIDE's own tokenizer copied into the folder, and the network of the tiny official golden (fixtures)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difflab.build import build_denoiser
from difflab.cli import main
from difflab.convert import (
    convert_checkpoint,
    converted_run_config,
    load_converted,
    map_official_state_dict,
    save_converted,
)
from difflab.nn.presets import build_network, config_from_official_kwargs
from difflab.text import load_tokenizer


def tiny_glide(fixtures_dir, name="glide_text2im", image_size=16):
    """The official tiny GLIDE network of the fixtures (real GLIDE vocabulary, 50,257 ids) at ``image_size``."""
    meta = json.loads((fixtures_dir / "models" / f"{name}.json").read_text())
    tensors = load_file(str(fixtures_dir / "models" / f"{name}.safetensors"))
    sd = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    cfg = config_from_official_kwargs(meta["class"], meta["kwargs"])
    assert cfg.out_channels == 2 * cfg.in_channels  # GLIDE's out_channels=6: learn_sigma, as the presets say it
    cfg = dataclasses.replace(cfg, image_size=image_size, out_channels=None, learn_sigma=True)
    return cfg, sd


def converted(tmp_path, fixtures_dir, preset, name="glide_text2im", image_size=16):
    """A folder as ``difflab convert --preset PRESET --vocab`` writes it, for the tiny network."""
    from difflab.convert import _copy_vocab

    cfg, sd = tiny_glide(fixtures_dir, name, image_size)
    out = save_converted(map_official_state_dict(sd), cfg, tmp_path / preset.replace("/", "-"),
                         metadata={"preset": preset})
    _copy_vocab(fixtures_dir / "tokenizers", out)
    return out


def test_base_folder_takes_the_notebook_settings(tmp_path, fixtures_dir):
    cfg = converted_run_config(converted(tmp_path, fixtures_dir, "glide/base"))
    d, s = cfg.diffusion, cfg.sample
    assert (d.steps, d.schedule, d.mean_type, d.var_type) == (1000, "cosine", "eps", "learned_range")
    assert not d.rescale_timesteps and not d.rescale_learned_sigmas
    assert (s.steps, s.guidance_scale, s.temperature, s.sampler) == (100, 2.0, 1.0, "ancestral")
    assert cfg.text.tokenizer == "gpt2" and cfg.is_text
    # GLIDE's tokens (fixtures/openai/tokenizers/goldens.json) from the folder's own copy of the vocabulary
    tok = load_tokenizer("gpt2", cfg.text.vocab)
    golden = json.loads((fixtures_dir / "tokenizers" / "goldens.json").read_text())
    case = next(c for c in (golden["cases"] if isinstance(golden, dict) else golden) if c["text"])
    assert tok.encode(case["text"]) == case["glide_ids"]


def test_upsampler_folder_takes_fast27_and_upsample_temp(tmp_path, fixtures_dir):
    cfg = converted_run_config(converted(tmp_path, fixtures_dir, "glide/upsample", "glide_upsample", 256))
    assert (cfg.diffusion.schedule, cfg.diffusion.steps) == ("linear", 1000)
    s = cfg.sample
    assert (s.sampler, s.eta, s.steps, s.temperature, s.guidance_scale) == ("ddim", 0.0, "fast27", 0.997, 0.0)
    assert cfg.data.low_res_size == 64 and cfg.model.low_res_channels == 3
    inpaint = converted_run_config(converted(tmp_path, fixtures_dir, "glide/upsample-inpaint", "glide_upsample", 256))
    assert inpaint.diffusion == cfg.diffusion
    assert (inpaint.sample.sampler, inpaint.sample.steps, inpaint.sample.temperature) == ("ancestral", "fast27", 0.997)
    base = converted_run_config(converted(tmp_path, fixtures_dir, "glide/base-inpaint", "glide_inpaint"))
    assert (base.sample.steps, base.sample.guidance_scale, base.diffusion.p_uncond) == (100, 4.0, 0.2)


def test_temperature_scales_the_start_only(tmp_path, fixtures_dir):
    """x_T ~ N(0, 0.997^2): the first network input is the seeded draw times the temperature."""
    from difflab.generate import _batch_seed, draw_samples

    folder = converted(tmp_path, fixtures_dir, "glide/base")
    cfg = converted_run_config(folder)
    den = build_denoiser(cfg, load_converted(folder).eval())
    seen = []
    net = den.net
    hook = net.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        for temp in (1.0, 0.997):
            c = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, temperature=temp))
            draw_samples(den, c, n=2, batch=2, steps=2, seed=5, guidance_scale=0.0, prompts=["a red digit seven"])
    finally:
        hook.remove()
    g = torch.Generator().manual_seed(_batch_seed(5, 0))
    x_T = torch.randn((2, 3, 16, 16), generator=g)
    first = [x for x in seen if x.shape[0] == 2][0::2]  # the first step of each draw
    assert torch.equal(first[0], x_T)
    assert torch.allclose(first[1], x_T * 0.997, atol=0, rtol=1e-7)


def test_cli_samples_a_converted_glide_folder(tmp_path, fixtures_dir, capsys):
    """``difflab sample FOLDER --prompt``: the notebook's guided sampling (guidance from the folder), written
    as a grid equal to draw_samples with the same arguments."""
    from difflab.generate import draw_samples
    from difflab.images import to_uint8

    folder = converted(tmp_path, fixtures_dir, "glide/base")
    npz = tmp_path / "s.npz"
    assert main(["sample", str(folder), "--prompt", "a red digit seven", "--prompt", "", "--steps", "3",
                 "--npz", str(npz), "--quiet"]) == 0
    cfg = converted_run_config(folder)
    den = build_denoiser(cfg, load_converted(folder).eval())
    x, _ = draw_samples(den, cfg, steps=3, prompts=["a red digit seven", ""])
    assert np.array_equal(np.load(npz)["arr_0"], to_uint8(x, cfg.data))


@pytest.mark.parametrize("steps, message", [("fast", "bad respacing 'fast'"), ("2000", "steps must be in [1, 1000]")])
def test_bad_steps_are_one_line(tmp_path, fixtures_dir, capsys, steps, message):
    folder = converted(tmp_path, fixtures_dir, "glide/base")
    assert main(["sample", str(folder), "--prompt", "a", "--steps", steps, "--npz", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "x.npz").exists()


def test_convert_copies_glide_tokenizer_and_refuses_without_one(tmp_path, fixtures_dir, capsys):
    cfg, sd = tiny_glide(fixtures_dir)
    pt = tmp_path / "base.pt"
    torch.save(sd, pt)  # official keys (transformer_proj.*)
    out = convert_checkpoint(pt, cfg, tmp_path / "ok", vocab=fixtures_dir / "tokenizers")
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["encoder.json.gz", "vocab.bpe.gz"]
    vocab = (fixtures_dir / "tokenizers" / "vocab.bpe.gz").read_bytes()
    assert (out / "tokenizer" / "vocab.bpe.gz").read_bytes() == vocab
    net = load_converted(out)
    assert torch.equal(net.state_dict()["token_embedding.weight"], sd["token_embedding.weight"])
    assert torch.equal(net.state_dict()["cond_proj.weight"], sd["transformer_proj.weight"])
    # no glide_text2im installed here, no --vocab: one line naming the flag, nothing written
    assert main(["convert", str(pt), "--preset", "glide/base", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--vocab" in err[0] and not (tmp_path / "none").exists()
    # a U-Net that is not GLIDE's takes no vocabulary
    small = build_network(config_from_official_kwargs("improved_diffusion.unet.UNetModel", dict(
        in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1, attention_resolutions=[])))
    torch.save(small.state_dict(), tmp_path / "u.pt")
    assert main(["convert", str(tmp_path / "u.pt"), "--preset", "guided-diffusion/64x64_diffusion", "--vocab",
                 str(fixtures_dir / "tokenizers"), "--out", str(tmp_path / "u")]) == 2
    assert "only for a GLIDE text U-Net" in capsys.readouterr().err


def test_folder_without_its_tokenizer_is_refused(tmp_path, fixtures_dir):
    import shutil

    folder = converted(tmp_path, fixtures_dir, "glide/base")
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        converted_run_config(folder)


def test_glide_base_and_upsampler_cascade_in_one_command(tmp_path, fixtures_dir):
    """The text2im notebook as one cascade (at a quarter of the sides): the converted base (guided, its own
    100-step default cut to 2 here) then the converted upsampler, 4x (ddim, from x_T * 0.997), the prompt
    reaching both; the upsampler sees the base's images rounded to uint8 levels, as the notebook's low_res."""
    from difflab.generate import draw_samples
    from difflab.pipelines.cascade import build_cascade, load_cascade, sample_cascade

    base = converted(tmp_path, fixtures_dir, "glide/base", image_size=16)
    up = converted(tmp_path, fixtures_dir, "glide/upsample", "glide_upsample", 64)  # takes 64 / 4 (256 / 4 released)
    (tmp_path / "c.yaml").write_text(json.dumps({"stages": [{"run": str(base), "steps": 2},
                                                            {"run": str(up), "steps": 2}], "n": 2, "batch": 2}))
    cascade = load_cascade(tmp_path / "c.yaml")
    stages = build_cascade(cascade)
    prompts = ["an oil painting of a corgi", ""]
    (x64, _), (x256, _) = sample_cascade(cascade, stages, prompts=prompts)
    assert x64.shape == (2, 3, 16, 16) and x256.shape == (2, 3, 64, 64)
    b, u = stages
    alone, _ = draw_samples(b.denoiser, b.cfg, steps=2, seed=0, batch=2, prompts=prompts)
    assert torch.equal(alone, x64)
    low = torch.round((x64.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
    again, _ = draw_samples(u.denoiser, u.cfg, steps=2, seed=1, batch=2, low_res=low, prompts=prompts)
    assert torch.allclose(again, x256, atol=1e-6)
