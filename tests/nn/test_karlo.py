"""Karlo's three networks (unCLIP's prior, decoder and 64 -> 256 upsampler) reproduce kakaobrain/karlo's
(goldens in fixtures/openai/models/karlo_*), load every released key, and convert through the CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file

from difflab.cli import main
from difflab.convert import check_karlo_state_dict, check_state_dict, load_converted
from difflab.nn.clip_unet import DecoderUNet, DecoderUNetConfig
from difflab.nn.presets import KARLO_FLAGS, PRESETS, build_network, config_from_karlo_flags, get_preset
from difflab.nn.prior import PriorConfig, PriorTransformer
from difflab.nn.progressive_sr import ProgressiveSR, ProgressiveSRConfig
from difflab.nn.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("single_thread")

GOLDENS = ["karlo_prior", "karlo_decoder", "karlo_sr"]
PRESET_OF = {"karlo_prior": "karlo/prior", "karlo_decoder": "karlo/decoder", "karlo_sr": "karlo/sr-64-256"}


def load_golden(fixtures_dir, name):
    meta = json.loads((fixtures_dir / "models" / f"{name}.json").read_text())
    tensors = load_file(str(fixtures_dir / "models" / f"{name}.safetensors"))
    sd = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    inputs = {k[3:]: v for k, v in tensors.items() if k.startswith("in.")}
    return meta, sd, inputs, tensors["out"]


def network_of(config):
    """The network a golden holds: the prior, the decoder, or ONE of the upsampler's two U-Nets."""
    return UNet(config.unet) if isinstance(config, ProgressiveSRConfig) else build_network(config)


def golden_model(fixtures_dir, name):
    meta, sd, inputs, expected = load_golden(fixtures_dir, name)
    model = network_of(config_from_karlo_flags(meta["config"]))
    model.load_state_dict(sd, strict=True)
    return model.eval(), meta, sd, inputs, expected


def run(model, inputs):
    kw = {k: v for k, v in inputs.items() if k not in ("x", "timesteps", "causal_mask")}
    with torch.no_grad():
        return model(inputs["x"], inputs["timesteps"], **kw)


def rel_err(out, expected):
    return ((out.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("name", GOLDENS)
def test_matches_official_output(fixtures_dir, name):
    """float32, eval mode; measured max |diff| / max |out|: prior 4.7e-7, decoder 1.9e-6, upsampler 8.7e-7."""
    model, meta, _, inputs, expected = golden_model(fixtures_dir, name)
    assert type(model) is {"karlo_prior": PriorTransformer, "karlo_decoder": DecoderUNet, "karlo_sr": UNet}[name]
    assert sum(p.numel() for p in model.parameters()) == meta["params"]
    assert set(inputs) == set(meta["forward"])
    out = run(model, inputs)
    assert out.shape == expected.shape
    assert rel_err(out, expected) < 1e-5, name


def test_prior_builds_the_official_causal_mask(fixtures_dir):
    """The -inf-above-the-diagonal buffer the official wrapper passes (causal_mask) is the one built inside."""
    model, _, _, inputs, _ = golden_model(fixtures_dir, "karlo_prior")
    official = inputs["causal_mask"]
    assert official.shape == (1, 81, 81)
    assert torch.equal(torch.where(model.causal_mask, 0.0, float("-inf"))[None], official)


@pytest.mark.parametrize("name", GOLDENS)
def test_golden_config_is_the_official_constructor_call(fixtures_dir, name):
    """config_from_karlo_flags on the fixture's YAML gives the constructor arguments Karlo's wrapper passed
    (attention resolutions in pixels -> downsample rates, 6 outputs with learn_sigma, the SR's fixed choices)."""
    meta, *_ = load_golden(fixtures_dir, name)
    cfg, kw = config_from_karlo_flags(meta["config"]), meta["kwargs"]
    if name == "karlo_prior":
        assert {k: getattr(cfg, k) for k in kw} == kw
        return
    unet = cfg.unet if name == "karlo_sr" else cfg
    assert unet.model_channels == kw["model_channels"] and unet.num_res_blocks == kw["num_res_blocks"]
    assert list(unet.channel_mult) == kw["channel_mult"] and list(unet.attention_resolutions) == kw[
        "attention_resolutions"]
    assert unet.resolved_out_channels == kw["out_channels"] and unet.in_channels == kw["in_channels"]
    assert unet.resblock_updown == kw["resblock_updown"] and unet.dropout == kw["dropout"]
    if name == "karlo_decoder":
        assert (cfg.xf_width, cfg.clip_dim, cfg.clip_emb_mult, cfg.text_ctx) == (48, 32, 4, 77)
        assert cfg.num_head_channels == kw["num_head_channels"] and cfg.use_scale_shift_norm
        assert cfg.encoder_channels == kw["xf_width"] and cfg.clip_emb_drop == kw["clip_emb_drop"]
    else:
        assert not unet.use_middle_attention and not kw["use_middle_attention"]
        assert unet.low_res_channels == 3 and not unet.use_scale_shift_norm and not unet.learn_sigma


def released(fixtures_dir):
    return {k: v for k, v in json.loads((fixtures_dir / "released.json").read_text()).items() if k in KARLO_FLAGS}


@pytest.mark.parametrize("name", sorted(KARLO_FLAGS))
def test_release_keys_map_exactly(fixtures_dir, name):
    """The released-size network, built on the meta device from the release's own YAML flags, has exactly the
    keys and shapes of its ckpt["state_dict"] and the published parameter count."""
    entry = released(fixtures_dir)[name]
    assert KARLO_FLAGS[name] == entry["flags"]
    assert get_preset(name) == config_from_karlo_flags(entry["flags"])
    with torch.device("meta"):
        model = build_network(get_preset(name))
    n = sum(p.numel() for p in model.parameters())
    assert n == entry["params"] == {"karlo/prior": 1_022_028_544, "karlo/decoder": 893_318_086,
                                    "karlo/sr-64-256": 1_383_159_046}[name]
    if name == "karlo/sr-64-256":
        assert isinstance(model, ProgressiveSR)
        assert sum(p.numel() for p in model.model_last_step.parameters()) == 691_579_523 == n // 2
    prefix = "" if name == "karlo/sr-64-256" else "model."
    official = {k: tuple(s) for k, s in entry["keys"]}
    assert len(official) == len(entry["keys"])
    assert official == {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}
    fake = {"state_dict": {k: torch.empty(s, device="meta") for k, s in entry["keys"]}}
    assert set(check_karlo_state_dict(model, fake)) == set(model.state_dict())


def test_head_major_qkv_and_interleaved_clip_tokens_are_pinned(fixtures_dir):
    """The goldens tell the layouts apart: the prior's c_qkv read as [Q | K | V], the decoder's 4 CLIP tokens read
    as consecutive chunks (reshape(N, 4, W)), or the decoder's 4 always-attended tokens put at the END of the mask
    (instead of the front) each move the output far from the official one."""
    model, _, sd, inputs, expected = golden_model(fixtures_dir, "karlo_prior")
    w, heads = model.config.xf_width, model.config.xf_heads
    c = w // heads
    # row r of [Q | K | V] (part p, head h, channel i) placed where the head-major reading looks for it
    qkv_rows = torch.arange(3 * w).view(3, heads, c).permute(1, 0, 2).reshape(-1)
    wrong = {k: v[qkv_rows] if ".attn.c_qkv." in k else v for k, v in sd.items()}
    model.load_state_dict(wrong)
    assert rel_err(run(model, inputs), expected) > 0.1  # README: ~0.48

    model, _, sd, inputs, expected = golden_model(fixtures_dir, "karlo_decoder")
    xf, mult = model.config.xf_width, model.config.clip_emb_mult
    # non-interleaved: token k, channel c = out[k * W + c]; the interleaved reading takes out[c * 4 + k]
    chunk_rows = torch.arange(xf * mult).view(mult, xf).t().reshape(-1)
    model.load_state_dict({k: v[chunk_rows] if k.startswith("clip_tok_proj.") else v for k, v in sd.items()})
    assert rel_err(run(model, inputs), expected) > 1e-2

    model.load_state_dict(sd)
    emb_extra, context, context_mask = model.encode_condition(inputs["y"], inputs["txt_feat"], inputs["txt_feat_seq"],
                                                              inputs["mask"])
    assert context.shape == (2, 4 + 77, xf) and context_mask[:, :4].all()
    back = torch.cat([inputs["mask"], torch.ones(2, mult, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        right = UNet.forward(model, inputs["x"], inputs["timesteps"], context=context, context_mask=context_mask,
                             emb_extra=emb_extra)
        moved = UNet.forward(model, inputs["x"], inputs["timesteps"], context=context, context_mask=back,
                             emb_extra=emb_extra)
    assert rel_err(right, expected) < 1e-5 and rel_err(moved, expected) > 1e-3


def test_every_condition_reaches_the_output(fixtures_dir):
    """No dead input: each of the prior's and the decoder's conditions changes the output; the decoder's y=None is
    its learned null cf_param, and the prior's caption mask matters (padded tokens are never attended)."""
    model, _, _, inputs, expected = golden_model(fixtures_dir, "karlo_prior")
    for key, other in (("text_emb", inputs["text_emb"].flip(0)), ("text_enc", inputs["text_enc"].flip(0)),
                       ("mask", torch.ones_like(inputs["mask"])), ("timesteps", inputs["timesteps"].flip(0))):
        assert rel_err(run(model, dict(inputs, **{key: other})), expected) > 1e-3, key
    model, _, _, inputs, expected = golden_model(fixtures_dir, "karlo_decoder")
    for key, other in (("y", inputs["y"].flip(0)), ("txt_feat", inputs["txt_feat"].flip(0)),
                       ("txt_feat_seq", inputs["txt_feat_seq"].flip(0)), ("mask", torch.ones_like(inputs["mask"]))):
        # the caption tokens move the output least (~1e-3 here, 500x the float32 agreement)
        assert rel_err(run(model, dict(inputs, **{key: other})), expected) > 2e-4, key
    null = run(model, dict(inputs, y=model.cf_param.detach()[None].expand(2, -1)))
    assert torch.equal(run(model, {k: v for k, v in inputs.items() if k != "y"}), null)


def test_upsampler_pair_routes_the_last_step(fixtures_dir):
    """ProgressiveSR: samples at t = 0 go through model_last_step, the others through model_first_steps."""
    meta, sd, inputs, expected = load_golden(fixtures_dir, "karlo_sr")
    pair = ProgressiveSR(config_from_karlo_flags(meta["config"])).eval()
    pair.model_first_steps.load_state_dict(sd)
    torch.manual_seed(0)
    pair.model_last_step.load_state_dict({k: torch.randn_like(v) * 0.2 for k, v in sd.items()})
    x, low = inputs["x"], inputs["low_res"]
    with torch.no_grad():
        assert rel_err(pair(x, inputs["timesteps"], low), expected) < 1e-5  # t = [3, 800]: first steps only
        mixed = pair(x, torch.tensor([0, 800]), low)
        assert torch.equal(mixed[:1], pair.model_last_step(x[:1], torch.tensor([0]), low_res=low[:1]))
        assert torch.equal(mixed[1:], pair.model_first_steps(x[1:], torch.tensor([800]), low_res=low[1:]))
        assert rel_err(pair(x, torch.zeros(2, dtype=torch.long), low),
                       pair.model_first_steps(x, torch.zeros(2, dtype=torch.long), low_res=low)) > 1e-2


def karlo_ckpt(fixtures_dir, tmp_path, name):
    """A file as Karlo releases it ({"state_dict": ...}) with the golden's tiny random weights (the upsampler's
    second U-Net drawn anew), and the tiny config."""
    meta, sd, inputs, expected = load_golden(fixtures_dir, name)
    cfg = config_from_karlo_flags(meta["config"])
    if name == "karlo_sr":
        gen = torch.Generator().manual_seed(1)
        state = {**{f"model_first_steps.{k}": v for k, v in sd.items()},
                 **{f"model_last_step.{k}": torch.randn(v.shape, generator=gen) * 0.2 for k, v in sd.items()}}
    else:
        state = {f"model.{k}": v for k, v in sd.items()}
    path = tmp_path / f"{name}.ckpt"
    torch.save({"state_dict": state}, path)
    return path, cfg, inputs, expected


@pytest.mark.parametrize("name", GOLDENS)
def test_convert_cli_writes_a_folder_that_loads(fixtures_dir, tmp_path, monkeypatch, capsys, name):
    """difflab convert NAME.ckpt --preset karlo/... --out DIR (the preset swapped for the golden's tiny config):
    the folder loads strictly into the same network, which gives the official output; sampling it says what it is."""
    path, cfg, inputs, expected = karlo_ckpt(fixtures_dir, tmp_path, name)
    preset = PRESET_OF[name]
    monkeypatch.setitem(PRESETS, preset, cfg)
    out = tmp_path / "converted"
    assert main(["convert", str(path), "--preset", preset, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
    model = load_converted(out).eval()
    assert model.config == cfg
    net = model.model_first_steps if name == "karlo_sr" else model
    assert rel_err(run(net, inputs), expected) < 1e-5
    assert main(["sample", str(out), "--n", "1"]) == 2
    assert "Karlo (unCLIP) network; its sampling pipeline is not built yet" in capsys.readouterr().err


def test_convert_cli_refuses_what_does_not_fit(fixtures_dir, tmp_path, monkeypatch, capsys):
    """One line and exit 2, nothing written: a prior checkpoint under the decoder's preset (the keys listed and the
    preset that fits), a checkpoint missing one key, a file that holds no state dict."""
    prior, prior_cfg, *_ = karlo_ckpt(fixtures_dir, tmp_path, "karlo_prior")
    _, decoder_cfg, *_ = karlo_ckpt(fixtures_dir, tmp_path, "karlo_decoder")
    monkeypatch.setitem(PRESETS, "karlo/prior", prior_cfg)
    monkeypatch.setitem(PRESETS, "karlo/decoder", decoder_cfg)
    state = torch.load(prior, weights_only=True)["state_dict"]
    short = tmp_path / "short.ckpt"
    torch.save({"state_dict": {k: v for k, v in state.items() if k != "model.final_ln.bias"}}, short)
    tensor = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(3), tensor)
    cases = [
        (prior, "karlo/decoder", ["missing keys (", "unexpected keys (",
                                  "is Karlo's prior checkpoint, not the decoder: --preset karlo/prior"]),
        (short, "karlo/prior", ["missing keys (1): final_ln.bias"]),
        (tensor, "karlo/prior", ["holds a Tensor, not a state dict"]),
    ]
    for k, (path, preset, messages) in enumerate(cases):
        out = tmp_path / f"out{k}"
        assert main(["convert", str(path), "--preset", preset, "--out", str(out)]) == 2, preset
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("difflab: error:"), err
        for message in messages:
            assert message in err, (message, err)
        assert not out.exists()


def test_configs_name_the_bad_field():
    """Bad values raise one ValueError naming the field and the valid values."""
    with pytest.raises(ValueError, match=r"xf_heads=3 is invalid; valid: a divisor of xf_width=64"):
        PriorTransformer(PriorConfig(xf_width=64, xf_heads=3))
    with pytest.raises(ValueError, match=r"encoder_channels=7 is invalid; valid: None or xf_width=48"):
        DecoderUNet(DecoderUNetConfig(model_channels=32, channel_mult=(1,), attention_resolutions=(1,), xf_width=48,
                                     encoder_channels=7))
    with pytest.raises(ValueError, match=r"use_middle_attention='no' is invalid; valid: True or False"):
        UNet(UNetConfig(model_channels=32, channel_mult=(1,), attention_resolutions=(), use_middle_attention="no"))
    with pytest.raises(ValueError, match=r"unet.low_res_channels=0 is invalid"):
        ProgressiveSR(ProgressiveSRConfig(unet=UNetConfig(model_channels=32, channel_mult=(1,),
                                                          attention_resolutions=())))
    with pytest.raises(ValueError, match=r"model.type='ar-prior' is invalid; valid: prior, t2i-decoder"):
        config_from_karlo_flags({"model": {"type": "ar-prior", "hparams": {}}})
    with pytest.raises(ValueError, match=r"unknown prior hparam\(s\) \['xf_padding'\]"):
        config_from_karlo_flags({"model": {"type": "prior", "hparams": {**KARLO_FLAGS["karlo/prior"]["model"][
            "hparams"], "xf_padding": True}}})
    with pytest.raises(ValueError, match=r"pass y \[N, clip_dim\]"):
        cfg = DecoderUNetConfig(model_channels=32, channel_mult=(1,), attention_resolutions=(1,), clip_dim=8,
                                xf_width=16, text_ctx=5, clip_emb_drop=0.0)
        DecoderUNet(cfg)(torch.zeros(1, 3, 8, 8), torch.zeros(1), txt_feat=torch.zeros(1, 8),
                         txt_feat_seq=torch.zeros(1, 5, 8), mask=torch.ones(1, 5, dtype=torch.bool))
    # the official key check itself (check_state_dict) still sees the SR's middle block as two residual blocks
    with torch.device("meta"):
        sr = build_network(get_preset("karlo/sr-64-256")).model_first_steps
    assert not any(k.startswith("middle_block.2") for k in sr.state_dict())
    assert check_state_dict(sr, {k: torch.empty(v.shape, device="meta") for k, v in sr.state_dict().items()})
