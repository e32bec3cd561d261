"""GLIDE's text transformer and text U-Net reproduce glide_text2im (goldens in fixtures/openai/models) and
load every released GLIDE state dict key for key."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from difflab.convert import (
    check_state_dict,
    convert_checkpoint,
    load_converted,
    load_official_state_dict,
    map_official_state_dict,
)
from difflab.nn.presets import build_network, config_from_official_flags, config_from_official_kwargs
from difflab.nn.text import TextEncoderConfig, TextTransformer
from difflab.nn.text_unet import TextUNet, TextUNetConfig

pytestmark = pytest.mark.usefixtures("single_thread")

GOLDENS = ["glide_text2im", "glide_inpaint", "glide_upsample"]
RELEASED = ["glide/base", "glide/base-inpaint", "glide/upsample", "glide/upsample-inpaint"]
TEXT_KEYS = ("transformer", "token_embedding", "positional_embedding", "padding_embedding", "final_ln")


def load_golden(fixtures_dir, name):
    meta = json.loads((fixtures_dir / "models" / f"{name}.json").read_text())
    tensors = load_file(str(fixtures_dir / "models" / f"{name}.safetensors"))
    sd = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    inputs = {k[3:]: v for k, v in tensors.items() if k.startswith("in.")}
    return meta, sd, inputs, tensors["out"]


def golden_model(fixtures_dir, name):
    meta, sd, inputs, expected = load_golden(fixtures_dir, name)
    model = build_network(config_from_official_kwargs(meta["class"], meta["kwargs"]))
    load_official_state_dict(model, sd)
    return model.eval(), meta, sd, inputs, expected


def run(model, inputs):
    kw = {k: v for k, v in inputs.items() if k not in ("x", "timesteps")}
    with torch.no_grad():
        return model(inputs["x"], inputs["timesteps"], **kw)


def rel_err(out, expected):
    return ((out.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("name", GOLDENS)
def test_matches_official_output(fixtures_dir, name):
    model, meta, _, inputs, expected = golden_model(fixtures_dir, name)
    assert isinstance(model, TextUNet)
    assert sum(p.numel() for p in model.parameters()) == meta["params"]
    assert set(inputs) == set(meta["forward"])
    out = run(model, inputs)
    assert out.shape == expected.shape
    assert rel_err(out, expected) < 1e-5, name  # measured 1.7e-6 .. 1.8e-6 (float32 rounding)


def test_inputs_reach_the_output(fixtures_dir):
    """The caption, the inpainting image and the low-res image each change the output: no path is dead."""
    model, _, _, inputs, expected = golden_model(fixtures_dir, "glide_text2im")
    other = dict(inputs, tokens=inputs["tokens"].flip(0), mask=inputs["mask"].flip(0))
    assert rel_err(run(model, other), expected) > 1e-2
    model, _, _, inputs, expected = golden_model(fixtures_dir, "glide_inpaint")
    assert rel_err(run(model, dict(inputs, inpaint_mask=1 - inputs["inpaint_mask"])), expected) > 1e-2
    model, _, _, inputs, expected = golden_model(fixtures_dir, "glide_upsample")
    assert rel_err(run(model, dict(inputs, low_res=inputs["low_res"].flip(-1))), expected) > 1e-2


def reference_text_emb(sd, tokens, mask, heads):
    """The official get_text_emb written out in float64: per-head [q k v] split of c_qkv, C^-1/4 on q and k,
    padding_embedding where mask is False, pre-LN blocks with exact GELU, final_ln, the last position."""
    sd = {k: v.double() for k, v in sd.items()}
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][None]
    x = torch.where(mask[..., None], x, sd["padding_embedding"][None])
    n, length, width = x.shape

    def ln(h, name):
        return F.layer_norm(h, (width,), sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)

    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        qkv = F.linear(ln(x, p + "ln_1"), sd[p + "attn.c_qkv.weight"], sd[p + "attn.c_qkv.bias"])
        ch = width // heads
        q, k, v = qkv.view(n, length, heads, 3 * ch).split(ch, dim=-1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        w = torch.softmax(torch.einsum("bthc,bshc->bhts", q * scale, k * scale), dim=-1)
        a = torch.einsum("bhts,bshc->bthc", w, v).reshape(n, length, width)
        x = x + F.linear(a, sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"])
        h = F.gelu(F.linear(ln(x, p + "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    x = ln(x, "final_ln")
    return x[:, -1], x


def golden_text_encoder(fixtures_dir):
    meta, sd, inputs, _ = load_golden(fixtures_dir, "glide_text2im")
    kw = meta["kwargs"]
    cfg = TextEncoderConfig(text_ctx=kw["text_ctx"], xf_width=kw["xf_width"], xf_layers=kw["xf_layers"],
                            xf_heads=kw["xf_heads"], xf_final_ln=kw["xf_final_ln"], xf_padding=kw["xf_padding"])
    enc = TextTransformer(cfg).eval()
    text_sd = {k: v for k, v in sd.items() if k.split(".")[0] in TEXT_KEYS}
    enc.load_state_dict(text_sd, strict=True)  # the official keys, unchanged
    return enc, text_sd, inputs, kw["xf_heads"]


def test_text_transformer_matches_reference(fixtures_dir):
    enc, sd, inputs, heads = golden_text_encoder(fixtures_dir)
    with torch.no_grad():
        pooled, context = enc(inputs["tokens"], inputs["mask"])
    ref_pooled, ref_context = reference_text_emb(sd, inputs["tokens"], inputs["mask"], heads)
    assert context.shape == (2, 8, 16) and pooled.shape == (2, 16)
    assert torch.equal(pooled, context[:, -1])
    assert (context.double() - ref_context).abs().max() < 1e-5
    assert (pooled.double() - ref_pooled).abs().max() < 1e-5


def test_qkv_is_split_per_head(fixtures_dir):
    """Reading c_qkv as [Q | K | V] instead of per head [q k v] changes the text encoding: the layout is real."""
    enc, sd, inputs, heads = golden_text_encoder(fixtures_dir)
    width = sd["positional_embedding"].shape[1]
    ch = width // heads
    # permute the rows so that a per-head reading of the new weights is the [Q | K | V] reading of the old
    order = torch.cat([torch.arange(ch) + part * width + h * ch for h in range(heads) for part in range(3)])
    wrong = dict(sd)
    for i in range(len(enc.transformer.resblocks)):
        for suffix in ("weight", "bias"):
            key = f"transformer.resblocks.{i}.attn.c_qkv.{suffix}"
            wrong[key] = sd[key][order]
    with torch.no_grad():
        _, context = enc(inputs["tokens"], inputs["mask"])
        enc.load_state_dict(wrong)
        _, context_wrong = enc(inputs["tokens"], inputs["mask"])
    assert (context - context_wrong).abs().max() > 1e-2


def test_padding_embedding_replaces_masked_positions(fixtures_dir):
    enc, _, inputs, _ = golden_text_encoder(fixtures_dir)
    tokens, mask = inputs["tokens"], inputs["mask"]
    with torch.no_grad():
        _, context = enc(tokens, mask)
        changed = torch.where(mask, tokens, torch.zeros_like(tokens))  # other ids under the padding
        assert torch.equal(enc(changed, mask)[1], context)
        real = torch.where(mask, (tokens + 1) % enc.text_config.n_vocab, tokens)  # other caption ids
        assert (enc(real, mask)[1] - context).abs().max() > 1e-3
    no_pad = TextTransformer(TextEncoderConfig(text_ctx=8, xf_width=16, xf_layers=1, xf_heads=2, xf_padding=False,
                                               xf_final_ln=False))
    assert not hasattr(no_pad, "padding_embedding") and no_pad.final_ln is None
    with torch.no_grad():
        _, ctx = no_pad(tokens)  # no mask needed without xf_padding
    assert ctx.shape == (2, 8, 16)


def test_bad_text_inputs_are_refused(fixtures_dir):
    model, _, _, inputs, _ = golden_model(fixtures_dir, "glide_text2im")
    x, t, tokens, mask = inputs["x"], inputs["timesteps"], inputs["tokens"], inputs["mask"]
    with pytest.raises(ValueError, match="pass tokens"):
        model(x, t)
    with pytest.raises(ValueError, match="xf_padding=True: pass mask"):
        model(x, t, tokens=tokens)
    with pytest.raises(ValueError, match=r"text_ctx=8\]; got \[2, 7\]"):
        model(x, t, tokens=tokens[:, :7], mask=mask[:, :7])
    with pytest.raises(ValueError, match="integer ids"):
        model(x, t, tokens=tokens.float(), mask=mask)
    with pytest.raises(ValueError, match="context come from the text encoder"):
        model(x, t, tokens=tokens, mask=mask, context=torch.zeros(2, 8, 16))
    with pytest.raises(ValueError, match="low_res was given"):
        model(x, t, tokens=tokens, mask=mask, low_res=x)


def test_upsample_inpaint_input_order(fixtures_dir):
    """SuperResInpaintText2ImUnet (no golden of its own): the first conv sees [x_t, image * mask, mask,
    bilinear(low_res, align_corners=False)], 10 channels; checked against a plain text U-Net with 10 input
    channels, the same weights, and that concatenation made by hand."""
    meta, *_ = load_golden(fixtures_dir, "glide_text2im")
    cfg = config_from_official_kwargs("glide_text2im.text2im_model.SuperResInpaintText2ImUnet", meta["kwargs"])
    assert cfg.input_channels == 10 and cfg.inpaint and cfg.low_res_channels == 3
    torch.manual_seed(0)
    model = build_network(cfg).eval()
    for p in model.parameters():  # every layer live (the official zero-init of out / proj_out hides nothing)
        p.data.normal_(0, 0.2)
    plain = TextUNet(TextUNetConfig(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
                                       "in_channels": 10, "inpaint": False, "low_res_channels": 0})).eval()
    plain.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    x, image, low = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g), torch.randn(
        2, 3, 16, 16, generator=g)
    mask = (torch.rand(2, 1, 32, 32, generator=g) > 0.5).float()
    t = torch.tensor([3, 800])
    tokens, tmask = torch.randint(0, 50257, (2, 8), generator=g), torch.arange(8).expand(2, 8) < 5
    up = F.interpolate(low, (32, 32), mode="bilinear", align_corners=False)
    with torch.no_grad():
        out = model(x, t, tokens=tokens, mask=tmask, low_res=low, inpaint_image=image, inpaint_mask=mask)
        by_hand = plain(torch.cat([x, image * mask, mask, up], 1), t, tokens=tokens, mask=tmask)
    assert out.shape == (2, 6, 32, 32)
    assert torch.allclose(out, by_hand, rtol=0, atol=1e-5 * by_hand.abs().max().item())


@pytest.mark.parametrize("name", RELEASED)
def test_released_keys_load_unchanged(fixtures_dir, name):
    """Every key of the released GLIDE state dicts fits a TextUNet built from the release's flags, with equal
    shapes and the published parameter count; only transformer_proj is renamed (to cond_proj)."""
    entry = json.loads((fixtures_dir / "released.json").read_text())[name]
    cfg = config_from_official_flags(entry["flags"], "glide")
    with torch.device("meta"):
        model = build_network(cfg)
    assert isinstance(model, TextUNet)
    assert sum(p.numel() for p in model.parameters()) == entry["params"]
    fake = {k: torch.empty(s, device="meta") for k, s in entry["keys"]}
    renamed = {k: v for k, v in map_official_state_dict(fake).items() if k not in fake}
    assert sorted(renamed) == ["cond_proj.bias", "cond_proj.weight"]
    assert {k: tuple(v.shape) for k, v in check_state_dict(model, fake).items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()}
    # and the loader accepts it with the official flags checked too (meta tensors are assigned)
    load_official_state_dict(model, fake, flags=entry["flags"], family="glide")
    assert model.token_embedding.weight.shape == (50257, 512)


def test_released_configs():
    base = config_from_official_flags({}, "glide")  # the defaults are the released base model
    assert base == config_from_official_flags({"image_size": 64, "inpaint": False}, "glide")
    assert base.channel_mult == (1, 2, 3, 4) and base.attention_resolutions == (2, 4, 8)
    assert base.resolved_out_channels == 6 and base.input_channels == 3 and base.dropout == 0.1
    assert base.text == TextEncoderConfig(128, 512, 16, 8, True, True, 50257)
    assert base.cond_dim == base.encoder_channels == 512
    up = config_from_official_flags({"image_size": 256, "num_res_blocks": 2, "super_res": True, "inpaint": True},
                                    "glide")
    assert up.channel_mult == (1, 1, 2, 2, 4, 4) and up.input_channels == 10
    assert config_from_official_flags({"channel_mult": "1,2,2,4"}, "glide").channel_mult == (1, 2, 2, 4)
    with pytest.raises(ValueError, match="channel_mult='1,2' is invalid for image_size=64"):
        config_from_official_flags({"channel_mult": "1,2"}, "glide")
    with pytest.raises(ValueError, match="image_size=32 has no default channel_mult; valid: \\[64, 128, 256\\]"):
        config_from_official_flags({"image_size": 32}, "glide")


def test_convert_round_trip(fixtures_dir, tmp_path):
    """difflab convert writes a TextUNet folder that loads back (config.yaml with its text section)."""
    meta, sd, inputs, expected = load_golden(fixtures_dir, "glide_upsample")
    cfg = config_from_official_kwargs(meta["class"], meta["kwargs"])
    torch.save(sd, tmp_path / "upsample.pt")
    out = convert_checkpoint(tmp_path / "upsample.pt", cfg, tmp_path / "converted")
    model = load_converted(out).eval()
    assert isinstance(model, TextUNet) and model.config == cfg
    assert rel_err(run(model, inputs), expected) < 1e-5


def test_official_kwargs_refused():
    kw = dict(text_ctx=8, xf_width=16, xf_layers=1, xf_heads=2, xf_final_ln=True, in_channels=3, model_channels=32,
              out_channels=6, num_res_blocks=1, attention_resolutions=[2], channel_mult=[1, 2])
    with pytest.raises(ValueError, match="xf_ar"):
        config_from_official_kwargs("glide_text2im.text2im_model.Text2ImUNet", dict(kw, xf_ar=0.2))
    with pytest.raises(ValueError, match="unsupported argument.*num_classes"):
        config_from_official_kwargs("glide_text2im.text2im_model.Text2ImUNet", dict(kw, num_classes=10))
    cfg = config_from_official_kwargs("glide_text2im.text2im_model.Text2ImUNet", kw)
    assert cfg.text.xf_padding is False  # the official default


@pytest.mark.parametrize("kwargs,field,valid", [
    (dict(xf_heads=3), "xf_heads", "a divisor of xf_width=512"),
    (dict(xf_width=0), "xf_width", "an integer >= 1"),
    (dict(text_ctx=True), "text_ctx", "an integer >= 1"),
    (dict(xf_layers=2.0), "xf_layers", "an integer >= 1"),
    (dict(n_vocab=-1), "n_vocab", "an integer >= 1"),
    (dict(xf_final_ln="yes"), "xf_final_ln", "True or False"),
    (dict(xf_padding=1), "xf_padding", "True or False"),
])
def test_text_config_validation(kwargs, field, valid):
    (name, value), = kwargs.items()
    with pytest.raises(ValueError, match=f"^{field}={value!r} is invalid; valid: {valid}") as e:
        TextTransformer(TextEncoderConfig(**kwargs))
    assert e.value.field == field and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=f"^text.{field}={value!r} is invalid") as e:  # inside the U-Net's config
        TextUNetConfig(text=TextEncoderConfig(**kwargs)).validate()
    assert e.value.field == f"text.{field}"


@pytest.mark.parametrize("kwargs,match", [
    (dict(cond_dim=7), "^cond_dim=7 is invalid; valid: None or text.xf_width=512"),
    (dict(encoder_channels=64), "^encoder_channels=64 is invalid; valid: None or text.xf_width=512"),
    (dict(num_classes=10), "^num_classes=10 is invalid; valid: None"),
    (dict(text={"xf_width": 512}), "^text=.* is invalid; valid: a TextEncoderConfig"),
    (dict(num_head_channels=48), "^num_head_channels=48 is invalid"),  # the U-Net's own checks still run
])
def test_text_unet_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextUNetConfig(model_channels=64, **kwargs).validate()


def test_text_unet_needs_its_config():
    from difflab.nn.unet import UNetConfig

    with pytest.raises(ValueError, match="TextUNet needs a TextUNetConfig; got UNetConfig"):
        TextUNet(UNetConfig())


def test_bfloat16_runs(fixtures_dir):
    """Under CPU autocast and with every weight cast to bfloat16 (LayerNorms then still compute in float32),
    the output stays near the float32 golden (bf16 rounding with N(0, 0.2^2) weights: measured ~2%)."""
    model, _, _, inputs, expected = golden_model(fixtures_dir, "glide_text2im")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rel_err(run(model, inputs).float(), expected) < 5e-2
    model = model.to(torch.bfloat16)
    out = run(model, {k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()})
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), expected) < 5e-2
