"""difflab's CLIP (nn/openai_clip.py) against goldens of the peer code, and its released ViT-L/14 layout.

The goldens (tests/fixtures/clip/, made by tools/make_clip_goldens.py) are tiny random CLIPs of OpenAI's
``clip.model.CLIP`` (QuickGELU) and OpenCLIP's ``open_clip.CLIP`` (exact GELU) with their weights, inputs and
outputs: ``encode_image`` of a normalised image, ``encode_text`` of SOT ... EOT tokens, the ``ln_final`` sequence
inside ``encode_text`` and the contrastive logits.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflab.nn.openai_clip import CLIP, OPENAI_IMAGE_MEAN, OPENAI_IMAGE_STD, CLIPConfig

GOLDENS = Path(__file__).resolve().parents[1] / "fixtures" / "clip"
PEERS = ("openai_clip_tiny", "open_clip_tiny")
TOL = 1e-5


def load_golden(name: str, **override):
    """(difflab CLIP with the golden's weights, strict; the golden's tensors)."""
    meta = json.loads((GOLDENS / f"{name}.json").read_text())
    tensors = load_file(str(GOLDENS / f"{name}.safetensors"))
    model = CLIP(CLIPConfig(**{**meta["config"], **override})).eval()
    weights = {k.removeprefix("weights."): v.float() for k, v in tensors.items() if k.startswith("weights.")}
    model.load_state_dict(weights, strict=True)
    return model, tensors


def to_unit_range(image: torch.Tensor) -> torch.Tensor:
    """The peer's normalised input back in [-1, 1]: invert (x01 - mean) / std, then 2 x01 - 1."""
    mean, std = torch.tensor(OPENAI_IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_IMAGE_STD).view(1, 3, 1, 1)
    return (image * std + mean) * 2 - 1


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def outputs(model: CLIP, t: dict, lens: bool = True) -> dict[str, torch.Tensor]:
    x = to_unit_range(t["image"])
    with torch.no_grad():
        pooled, seq = model.encode_text(t["tokens"], t["lens"] if lens else None)
        return {"image_features": model.encode_image(x), "text_features": pooled, "text_sequence": seq,
                "logits_per_image": model(x, t["tokens"], t["lens"] if lens else None)}


@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("lens", [True, False], ids=["lens", "argmax"])
def test_equals_the_peer_golden(name, lens):
    """Image pooled, text pooled, ln_final sequence and logits within 1e-5 of the peer's, pooled at lens - 1 or at
    argmax(tokens) (OpenAI's rule; EOT is the largest id of the golden's tokens)."""
    model, t = load_golden(name)
    assert t["image"].min() < -1.5  # the stored image is the peer's normalised input, not [-1, 1]
    got = outputs(model, t, lens)
    for key, value in got.items():
        assert value.shape == t[key].shape, key
        assert rel(value, t[key]) < TOL, (key, rel(value, t[key]))


@pytest.mark.parametrize("name, wrong", [("openai_clip_tiny", "gelu"), ("open_clip_tiny", "quick_gelu")])
def test_the_activation_matters(name, wrong):
    """The weights load under either activation (the weights cannot tell), but only the right one gives the
    golden: OpenAI's CLIP is QuickGELU, OpenCLIP's LAION-style models exact GELU."""
    model, t = load_golden(name, activation=wrong)
    got = outputs(model, t)
    for key in ("image_features", "text_features", "text_sequence"):
        assert rel(got[key], t[key]) > 1e-3, key


def test_logits_are_scale_times_cosines():
    """forward(x, tok)[i, j] = min(exp(logit_scale), 100) z_i[i] . z_t[j], for every pair, both ways round."""
    model, t = load_golden("openai_clip_tiny")
    x, tokens, lens = to_unit_range(t["image"]), t["tokens"], t["lens"]
    scale = float(model.logit_scale.detach().exp())
    with torch.no_grad():
        logits = model(x, tokens, lens)
        z_i, z_t = model.image_embeddings(x), model.text_embeddings(tokens, lens)
        swapped = model(x.flip(0), tokens.flip(0), lens.flip(0))
    assert math.isclose(scale, 20.0, rel_tol=1e-3)  # the golden's, not 1 / 0.07
    assert torch.allclose(z_i.norm(dim=-1), torch.ones(len(x))) and torch.allclose(z_t.norm(dim=-1), torch.ones(4))
    for i in range(len(x)):
        for j in range(len(tokens)):
            assert math.isclose(float(logits[i, j]), scale * float(z_i[i] @ z_t[j]), rel_tol=1e-5,
                                abs_tol=1e-5)
    assert torch.allclose(swapped, logits.flip(0).flip(1), atol=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))  # clamped at 100
        assert torch.allclose(model(x, tokens, lens), 100 * z_i @ z_t.t(), atol=1e-4)


def test_vit_l14_default_has_the_released_keys_shapes_and_count(fixtures_dir):
    entry = json.loads((fixtures_dir / "released.json").read_text())["karlo/clip-vit-l-14"]
    with torch.device("meta"):
        model = CLIP(CLIPConfig())
    sd = model.state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == {k: list(s) for k, s in entry["keys"]}
    assert len(sd) == len(entry["keys"]) == 446
    assert sum(p.numel() for p in model.parameters()) == entry["params"] == 427_616_513
    flags = {k: v for k, v in entry["flags"].items() if k != "note"}
    assert all(getattr(CLIPConfig(), k) == v for k, v in flags.items())
    assert CLIPConfig().heads_image == 16


@pytest.fixture(scope="module")
def tiny():
    return load_golden("openai_clip_tiny")


@pytest.mark.parametrize("shape", [(3, 3, 16, 16), (3, 1, 32, 32), (3, 32, 32), (3, 3, 32, 33)])
def test_wrong_image_size_is_named(tiny, shape):
    with pytest.raises(ValueError, match=r"images \[N, 3, 32, 32\].*got"):
        tiny[0].encode_image(torch.zeros(shape))


def test_bad_tokens_and_lens_are_named(tiny):
    model, t = tiny
    tokens, lens = t["tokens"], t["lens"]
    with pytest.raises(ValueError, match="integer tokens.*float"):
        model.encode_text(tokens.float(), lens)
    with pytest.raises(ValueError, match="context_length=77"):
        model.encode_text(tokens[:, :76], lens)
    with pytest.raises(ValueError, match=r"0\.\.511 \(vocab_size\)"):
        model.encode_text(tokens.clamp(max=511) + 1, lens)
    with pytest.raises(ValueError, match=r"0\.\.511 \(vocab_size\); got -1"):
        model.encode_text(tokens - 1, lens)
    for bad in (lens * 0, lens.clamp(max=77) + 1):
        with pytest.raises(ValueError, match=r"lens must lie in 1\.\.77"):
            model.encode_text(tokens, bad)
    with pytest.raises(ValueError, match="lens must be integers"):
        model.encode_text(tokens, lens.float())
    with pytest.raises(ValueError, match=r"lens must be integers \[N=4\]"):
        model.encode_text(tokens, lens[:3])


@pytest.mark.parametrize("field, value, words", [
    ("activation", "relu", "'quick_gelu', 'gelu'"),
    ("vision_patch_size", 5, "a divisor of image_resolution=224"),
    ("transformer_heads", 5, "a divisor of transformer_width=768"),
    ("vision_heads", 3, "a divisor of vision_width=1024"),
    ("vocab_size", 0, "an integer >= 1"),
    ("context_length", 1, ">= 2"),
    ("logit_scale", -1.0, "a finite number > 0"),
    ("embed_dim", 7.5, "an integer >= 1"),
])
def test_bad_config_field_is_named(field, value, words):
    with pytest.raises(ValueError, match=field) as e:
        with torch.device("meta"):
            CLIP(CLIPConfig(**{field: value}))
    assert words in str(e.value)
