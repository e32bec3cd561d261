"""difflab networks reproduce the official OpenAI networks' outputs (goldens in fixtures/openai/models)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from difflab.convert import load_official_state_dict
from difflab.nn.classifier import Classifier, ClassifierConfig
from difflab.nn.presets import build_network, config_from_official_kwargs
from difflab.nn.unet import UNet

pytestmark = pytest.mark.usefixtures("single_thread")

OFFICIAL = [
    "improved_unet_ddpm",
    "improved_unet_cond_learnsigma",
    "guided_unet_adm_neworder0",
    "guided_unet_adm_neworder1",
    "guided_classifier",
    "guided_superres",
]
# forward-argument name of the official code -> difflab keyword
ARG_NAMES = {"y": "y", "low_res": "low_res"}


def load_fixture(fixtures_dir, name):
    meta = json.loads((fixtures_dir / "models" / f"{name}.json").read_text())
    tensors = load_file(str(fixtures_dir / "models" / f"{name}.safetensors"))
    sd = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    inputs = {k[3:]: v for k, v in tensors.items() if k.startswith("in.")}
    return meta, sd, inputs, tensors["out"]


@pytest.mark.parametrize("name", OFFICIAL)
def test_matches_official_output(fixtures_dir, name):
    meta, sd, inputs, expected = load_fixture(fixtures_dir, name)
    config = config_from_official_kwargs(meta["class"], meta["kwargs"])
    model = build_network(config)
    assert isinstance(model, Classifier if meta["class"].endswith("EncoderUNetModel") else UNet)
    assert sum(p.numel() for p in model.parameters()) == meta["params"]
    load_official_state_dict(model, sd)
    model.eval()
    kwargs = {ARG_NAMES[k]: v for k, v in inputs.items() if k not in ("x", "timesteps")}
    assert set(inputs) == set(meta["forward"])
    with torch.no_grad():
        out = model(inputs["x"].float(), inputs["timesteps"], **kwargs)
    assert out.shape == expected.shape
    rel = (out.double() - expected.double()).abs().max() / expected.double().abs().max()
    assert rel < 1e-5, f"{name}: relative error {rel:.3g}"


def test_attention_orders_differ(fixtures_dir):
    """The same weights give different outputs under the two qkv layouts: the switch is real."""
    meta, sd, inputs, expected = load_fixture(fixtures_dir, "guided_unet_adm_neworder1")
    kwargs = dict(meta["kwargs"], use_new_attention_order=False)
    model = load_official_state_dict(build_network(config_from_official_kwargs(meta["class"], kwargs)), sd).eval()
    with torch.no_grad():
        out = model(inputs["x"], inputs["timesteps"], y=inputs["y"])
    assert (out - expected).abs().max() / expected.abs().max() > 1e-3


def test_classifier_pools_run(fixtures_dir):
    """Every pool builds, maps to [N, out_channels], and 'adaptive' starts at exactly zero logits."""
    base = dict(in_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(2,), num_head_channels=16, image_size=16, out_channels=7)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 999])
    for pool in ("attention", "adaptive", "spatial", "spatial_v2"):
        torch.manual_seed(0)
        clf = Classifier(ClassifierConfig(**base, pool=pool)).eval()
        with torch.no_grad():
            logits = clf(x, t)
        assert logits.shape == (2, 7)
        if pool == "adaptive":
            assert torch.count_nonzero(logits) == 0
        else:
            assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name,extra", [("glide_text2im", {}), ("glide_inpaint", {"inpaint": True}),
                                        ("glide_upsample", {"low_res_channels": 3})])
def test_glide_unet_keys_fit(fixtures_dir, name, extra):
    """GLIDE's U-Net (encoder_kv in every attention layer, transformer_proj) maps key for key; only the
    text transformer's own keys are left for the GLIDE milestone."""
    from difflab.convert import map_official_state_dict
    from difflab.nn.unet import UNetConfig

    meta, sd, _, _ = load_fixture(fixtures_dir, name)
    kw = meta["kwargs"]
    cfg = UNetConfig(in_channels=kw["in_channels"], model_channels=kw["model_channels"],
                     channel_mult=tuple(kw["channel_mult"]), num_res_blocks=kw["num_res_blocks"],
                     attention_resolutions=tuple(kw["attention_resolutions"]),
                     num_head_channels=kw["num_head_channels"], use_scale_shift_norm=True, resblock_updown=True,
                     out_channels=kw["out_channels"], cond_dim=kw["xf_width"], encoder_channels=kw["xf_width"],
                     **extra)
    with torch.device("meta"):
        model_shapes = {k: tuple(v.shape) for k, v in UNet(cfg).state_dict().items()}
    mapped = {k: tuple(v.shape) for k, v in map_official_state_dict(sd).items()}
    text_only = {k for k in mapped if k.split(".")[0] in
                 ("transformer", "token_embedding", "positional_embedding", "padding_embedding", "final_ln")}
    assert {k: s for k, s in mapped.items() if k not in text_only} == model_shapes
