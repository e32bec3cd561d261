"""GLIDE's noised CLIP reproduces glide_text2im.clip (goldens in fixtures/openai/models: both towers, the guidance
gradient), its tokens come from difflab's CLIP tokenizer, and every released key loads unchanged."""

import json

import pytest
import torch
from safetensors.torch import load_file

from difflab.clip_guidance import clip_cond_fn, clip_tokens
from difflab.convert import check_state_dict
from difflab.nn.clip import ImageEncoder, NoisedCLIP, NoisedCLIPConfig, TextEncoder
from difflab.nn.presets import PRESETS, build_network, config_from_official_flags
from difflab.text import CLIPTokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

RELEASED = {"glide/clip-image-enc": ImageEncoder, "glide/clip-text-enc": TextEncoder}


def rel_err(out, expected):
    return ((out.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def load_golden(fixtures_dir, name):
    meta = json.loads((fixtures_dir / "models" / f"{name}.json").read_text())
    tensors = load_file(str(fixtures_dir / "models" / f"{name}.safetensors"))
    sd = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    inputs = {k[3:]: v for k, v in tensors.items() if k.startswith("in.")}
    return meta, sd, inputs, tensors.get("out")


def tiny_config(fixtures_dir) -> NoisedCLIPConfig:
    """The fixtures' config (the official keys) through the official-flags path."""
    meta = json.loads((fixtures_dir / "models" / "glide_clip_image.json").read_text())
    return config_from_official_flags(meta["config"], "glide-clip")


def golden_clip(fixtures_dir) -> NoisedCLIP:
    """Both fixture towers in one NoisedCLIP, logit_scale ln 100 as the official (float32)."""
    sd = {}
    for name, prefix in (("glide_clip_image", "image_encoder."), ("glide_clip_text", "text_encoder.")):
        sd.update({prefix + k: v for k, v in load_golden(fixtures_dir, name)[1].items()})
    sd["logit_scale"] = load_file(str(fixtures_dir / "models" / "glide_clip_guidance.safetensors"))["logit_scale"]
    clip = NoisedCLIP(tiny_config(fixtures_dir))
    clip.load_state_dict(sd, strict=True)
    return clip.eval()


@pytest.mark.parametrize("name, cls", [("glide_clip_image", ImageEncoder), ("glide_clip_text", TextEncoder)])
def test_towers_match_official_output(fixtures_dir, name, cls):
    meta, sd, inputs, expected = load_golden(fixtures_dir, name)
    cfg = tiny_config(fixtures_dir)
    assert (cfg.image_width, cfg.text_width, cfg.n_embd, cfg.n_vocab, cfg.beta_schedule) == (64, 16, 48, 49408,
                                                                                           "cosine")
    tower = cls(cfg)
    tower.load_state_dict(sd, strict=True)  # the official keys by identity
    assert sum(p.numel() for p in tower.parameters()) == meta["params"]
    with torch.no_grad():
        out = tower(*(inputs[k] for k in meta["forward"]))
    assert out.shape == expected.shape
    assert rel_err(out, expected) < 1e-5, name  # measured 3.9e-7 (image), 2.1e-7 (text)


def test_guidance_gradient_matches_official(fixtures_dir):
    """GLIDE's cond_fn: grad_x of exp(logit_scale) sum(z_t . z_i(x, t)), and 3x it (the notebook's grad_scale)."""
    g = load_file(str(fixtures_dir / "models" / "glide_clip_guidance.safetensors"))
    clip = golden_clip(fixtures_dir)
    with torch.no_grad():
        z_t = clip.text_embeddings(g["text"], g["text_len"])
        z_i = clip.image_embeddings(g["in.x"], g["in.t"])
        loss = torch.exp(clip.logit_scale) * (z_t * z_i).sum()
    assert rel_err(z_t, g["z_t"]) < 1e-5 and rel_err(z_i, g["z_i"]) < 1e-5
    assert rel_err(loss, g["loss"][0]) < 1e-5
    grad = clip_cond_fn(clip, z_t, 1.0)(g["in.x"], g["in.t"])
    assert rel_err(grad, g["grad"]) < 1e-5  # measured 9.4e-7
    assert rel_err(clip_cond_fn(clip, z_t, 3.0)(g["in.x"], g["in.t"]), g["cond_fn_scale3"]) < 1e-5  # 9.5e-7
    # each image's gradient depends on its own caption only
    swapped = clip_cond_fn(clip, z_t.flip(0), 1.0)(g["in.x"], g["in.t"])
    assert rel_err(swapped[0], g["grad"][0]) > 1e-2
    alone = clip_cond_fn(clip, z_t[:1], 1.0)(g["in.x"][:1], g["in.t"][:1])
    assert rel_err(alone, g["grad"][:1]) < 1e-5


def test_clip_tokenizer_reproduces_the_fixture_tokens(fixtures_dir):
    tokenizer = CLIPTokenizer(fixtures_dir / "tokenizers")
    text_meta, _, text_inputs, _ = load_golden(fixtures_dir, "glide_clip_text")
    with pytest.warns(UserWarning, match="cut 15 to fit text_ctx=77"):  # the 90-token caption
        tokens, lens = clip_tokens(tokenizer, text_meta["captions"], 77)
    assert torch.equal(tokens, text_inputs["text"]) and torch.equal(lens, text_inputs["text_len"])
    assert lens.tolist() == [6, 2, 77]
    guidance = json.loads((fixtures_dir / "models" / "glide_clip_guidance.json").read_text())
    g = load_file(str(fixtures_dir / "models" / "glide_clip_guidance.safetensors"))
    tokens, lens = clip_tokens(tokenizer, guidance["prompts"], 77)
    assert torch.equal(tokens, g["text"]) and torch.equal(lens, g["text_len"])


def test_text_feature_is_read_at_the_eot_causally(fixtures_dir):
    """Tokens after text_len - 1 never change the feature (causal attention, read at the EOT, not argmax)."""
    _, sd, inputs, expected = load_golden(fixtures_dir, "glide_clip_text")
    tower = TextEncoder(tiny_config(fixtures_dir)).eval()
    tower.load_state_dict(sd)
    tokens, lens = inputs["text"].clone(), inputs["text_len"]
    tokens[0, lens[0]:] = 49407  # ids after the EOT (argmax pooling would move)
    with torch.no_grad():
        assert rel_err(tower(tokens, lens), expected) < 1e-5
        tokens[0, 1] = 500  # a caption token before it does change the feature
        assert rel_err(tower(tokens, lens)[0], expected[0]) > 1e-2


def test_the_step_row_reaches_the_image_feature(fixtures_dir):
    _, sd, inputs, expected = load_golden(fixtures_dir, "glide_clip_image")
    tower = ImageEncoder(tiny_config(fixtures_dir)).eval()
    tower.load_state_dict(sd)
    with torch.no_grad():
        other = tower(inputs["image"], inputs["timesteps"].flip(0))
    assert rel_err(other, expected) > 1e-2
    with pytest.raises(ValueError, match="timesteps must lie in 0..999"):
        tower(inputs["image"], torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match=r"takes images \[N, 3, 64, 64\]"):
        tower(inputs["image"][..., :32], inputs["timesteps"])


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_keys_load_unchanged(fixtures_dir, name):
    """A tower built (on the meta device) from the release's flags has every key and shape of the released
    state dict and its exact parameter count; the converter's check accepts the listing as it is."""
    entry = json.loads((fixtures_dir / "released.json").read_text())[name]
    cfg = config_from_official_flags(entry["flags"], "glide-clip")
    assert cfg == PRESETS[name] and cfg.n_vocab == 65536 and cfg.encoders == name.rsplit("-", 2)[1]
    with torch.device("meta"):
        tower = build_network(cfg)
    assert isinstance(tower, RELEASED[name])
    assert sum(p.numel() for p in tower.parameters()) == entry["params"]  # 86,443,776 / 71,679,488
    official = {k: tuple(s) for k, s in entry["keys"]}
    assert {k: tuple(v.shape) for k, v in tower.state_dict().items()} == official
    fake = {k: torch.empty(s, device="meta") for k, s in entry["keys"]}
    assert set(check_state_dict(tower, fake)) == set(official)


def test_both_towers_preset():
    with torch.device("meta"):
        clip = build_network(PRESETS["glide/clip"])
    assert isinstance(clip, NoisedCLIP)
    assert sum(p.numel() for p in clip.parameters()) == 86_443_776 + 71_679_488 + 1  # + logit_scale
    assert clip.config.image_width == 768 and clip.config.text_width == 512 and clip.config.image_tokens == 257


@pytest.mark.parametrize("kwargs, field", [
    ({"patch_size": 5}, "patch_size"), ({"max_text_len": 1}, "max_text_len"), ({"encoders": "audio"}, "encoders"),
    ({"logit_scale": 0.0}, "logit_scale"), ({"n_head_image": 0}, "n_head_image"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}="):
        NoisedCLIP(NoisedCLIPConfig(**kwargs))
    with pytest.raises(ValueError, match="beta_schedule='squaredcos'"):
        config_from_official_flags({"beta_schedule": "squaredcos"}, "glide-clip")
    with pytest.raises(ValueError, match="encoders='image' is invalid; valid: 'both'"):
        NoisedCLIP(NoisedCLIPConfig(encoders="image"))


def _tower_files(fixtures_dir, tmp_path):
    paths = {}
    for name, kind in (("glide_clip_image", "image"), ("glide_clip_text", "text")):
        paths[kind] = tmp_path / f"{kind}-enc.pt"
        torch.save(load_golden(fixtures_dir, name)[1], paths[kind])
    return paths


def test_convert_both_files_into_a_folder_guidance_loads(fixtures_dir, tmp_path, monkeypatch, capsys):
    """difflab convert TEXT.pt IMAGE.pt --preset glide/clip (either order) writes one folder; load_noised_clip
    reads it with CLIP's BPE copied beside it, and its guidance gradient from the prompts is the official one."""
    from difflab.cli import main
    from difflab.clip_guidance import clip_text_embeddings, load_noised_clip

    paths = _tower_files(fixtures_dir, tmp_path)
    monkeypatch.setitem(PRESETS, "glide/clip", tiny_config(fixtures_dir))  # the fixtures' widths
    out = tmp_path / "clip"
    assert main(["convert", str(paths["text"]), str(paths["image"]), "--preset", "glide/clip", "--out", str(out),
                 "--vocab", str(fixtures_dir / "tokenizers")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors", "tokenizer"]
    assert [p.name for p in (out / "tokenizer").iterdir()] == ["bpe_simple_vocab_16e6.txt.gz"]
    clip = load_noised_clip(out)
    assert isinstance(clip, NoisedCLIP) and not clip.training and clip.config == tiny_config(fixtures_dir)
    assert clip.logit_scale.dtype == torch.float32 and clip.logit_scale.item() == pytest.approx(4.605170, abs=1e-6)
    g = load_file(str(fixtures_dir / "models" / "glide_clip_guidance.safetensors"))
    prompts = json.loads((fixtures_dir / "models" / "glide_clip_guidance.json").read_text())["prompts"]
    grad = clip_cond_fn(clip, clip_text_embeddings(clip, prompts), 3.0)(g["in.x"], g["in.t"])
    assert rel_err(grad, g["cond_fn_scale3"]) < 1e-5
    # a folder the sampler cannot use as a diffusion model says what it is
    assert main(["sample", str(out), "--n", "1"]) == 2
    assert "holds a converted noised CLIP" in capsys.readouterr().err


def test_convert_refuses_what_is_not_the_pair(fixtures_dir, tmp_path, capsys):
    """One line and exit 2, nothing written: a single-tower preset, one file, a file of neither tower, the same
    tower twice, and the fixtures' tiny towers against the released widths."""
    from difflab.cli import main

    paths = _tower_files(fixtures_dir, tmp_path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    vocab = ["--vocab", str(fixtures_dir / "tokenizers")]
    cases = [
        ([paths["image"], paths["text"]], "glide/clip-image-enc", "is one tower of the noised CLIP"),
        ([paths["image"]], "glide/clip", "two released files"),
        ([paths["image"], tmp_path / "other.pt"], "glide/clip", "neither released noised-CLIP tower"),
        ([paths["image"], paths["image"]], "glide/clip", "both hold the image tower"),
        ([paths["image"], paths["text"]], "glide/clip", "(image tower): checkpoint does not fit the model"),
        ([paths["image"], paths["text"]], "glide/base", "one checkpoint file converts into one network; got 2"),
    ]
    for k, (files, preset, message) in enumerate(cases):
        out = tmp_path / f"out{k}"
        assert main(["convert", *map(str, files), "--preset", preset, "--out", str(out), *vocab]) == 2, message
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()
    assert main(["convert", str(paths["image"]), str(paths["text"]), "--preset", "glide/clip", "--out",
                 str(tmp_path / "o"), "--vocab", str(tmp_path)]) == 2
    assert "no bpe_simple_vocab_16e6.txt[.gz] in the folder" in capsys.readouterr().err
