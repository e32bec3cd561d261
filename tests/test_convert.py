"""Checkpoint conversion: bad state dicts are named precisely; .pt -> safetensors round trip; CLI."""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from difflab.build import official_denoiser
from difflab.cli import main
from difflab.convert import (
    OFFICIAL_DIFFUSION,
    check_flags,
    convert_checkpoint,
    converted_run_config,
    load_converted,
    load_official_state_dict,
    save_converted,
)
from difflab.nn.presets import RELEASED_FLAGS, build_network, config_from_official_kwargs, get_preset

pytestmark = pytest.mark.usefixtures("single_thread")


def fixture(fixtures_dir, name):
    meta = json.loads((fixtures_dir / "models" / f"{name}.json").read_text())
    tensors = load_file(str(fixtures_dir / "models" / f"{name}.safetensors"))
    return meta, {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}


def build(meta, **over):
    return build_network(config_from_official_kwargs(meta["class"], {**meta["kwargs"], **over}))


def test_missing_extra_and_wrong_shape_are_listed(fixtures_dir):
    meta, sd = fixture(fixtures_dir, "guided_unet_adm_neworder0")
    bad = dict(sd)
    del bad["middle_block.1.qkv.weight"]
    bad["middle_block.9.weight"] = torch.zeros(3)
    bad["out.0.bias"] = torch.zeros(7)
    with pytest.raises(ValueError) as e:
        load_official_state_dict(build(meta), bad)
    msg = str(e.value)
    assert "missing keys (1): middle_block.1.qkv.weight" in msg
    assert "unexpected keys (1): middle_block.9.weight" in msg
    assert "out.0.bias checkpoint [7] vs model [32]" in msg
    assert "\n" not in msg


def test_learn_sigma_mismatch_is_named(fixtures_dir):
    meta, sd = fixture(fixtures_dir, "improved_unet_cond_learnsigma")  # 6 outputs
    with pytest.raises(ValueError, match=r"output channels: checkpoint 6, model 3 \(learn_sigma"):
        load_official_state_dict(build(meta, out_channels=3), sd)


def test_class_conditioning_mismatch_is_named(fixtures_dir):
    meta, sd = fixture(fixtures_dir, "improved_unet_cond_learnsigma")
    kwargs = dict(meta["kwargs"])
    kwargs.pop("num_classes")
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): label_emb.weight.*class-conditional \(10 labels\)"):
        load_official_state_dict(build_network(config_from_official_kwargs(meta["class"], kwargs)), sd)


def test_updown_scale_shift_and_superres_mismatches_are_named(fixtures_dir):
    meta, sd = fixture(fixtures_dir, "guided_unet_adm_neworder0")
    with pytest.raises(ValueError, match="resblock_updown"):
        load_official_state_dict(build(meta, resblock_updown=False), sd)
    with pytest.raises(ValueError, match="use_scale_shift_norm: checkpoint True, model False"):
        load_official_state_dict(build(meta, use_scale_shift_norm=False), sd)
    meta_sr, sd_sr = fixture(fixtures_dir, "guided_superres")
    with pytest.raises(ValueError, match="input channels: checkpoint 6, model 3"):
        load_official_state_dict(build(meta_sr | {"class": "guided_diffusion.unet.UNetModel"}), sd_sr)
    with pytest.raises(ValueError, match=r"attention layers: checkpoint 4, model 1"):
        load_official_state_dict(build(meta, attention_resolutions=[]), sd)


def test_num_heads_flag_mismatch_is_named():
    """Heads do not show in shapes: checked against the official flags."""
    flags = RELEASED_FLAGS["guided-diffusion/256x256_diffusion"]
    cfg = get_preset("guided-diffusion/128x128_diffusion")  # 4 heads, no num_head_channels
    with pytest.raises(ValueError, match="num_head_channels: flags 64, model -1"):
        check_flags(cfg, flags, "guided-diffusion")
    check_flags(get_preset("guided-diffusion/256x256_diffusion"), flags, "guided-diffusion")
    with torch.device("meta"):
        model = build_network(get_preset("guided-diffusion/64x64_diffusion"))
    flags64 = dict(RELEASED_FLAGS["guided-diffusion/64x64_diffusion"], use_new_attention_order=False)
    with pytest.raises(ValueError, match="use_new_attention_order: flags False, model True"):
        load_official_state_dict(model, {}, flags=flags64, family="guided-diffusion")


def test_convert_round_trip(tmp_path, fixtures_dir):
    """.pt (torch.save of a state dict) -> model.safetensors + config.yaml -> identical weights and outputs."""
    meta, sd = fixture(fixtures_dir, "guided_classifier")
    pt = tmp_path / "official.pt"
    torch.save(sd, pt)
    cfg = config_from_official_kwargs(meta["class"], meta["kwargs"])
    out = convert_checkpoint(pt, cfg, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(sd)
    assert all(torch.equal(saved[k], sd[k]) for k in sd)
    model = load_converted(out).eval()
    assert model.config == cfg
    reference = load_official_state_dict(build_network(cfg), sd).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 500])
    with torch.no_grad():
        assert torch.equal(model(x, t), reference(x, t))


def test_cli_convert_with_preset(tmp_path, capsys):
    torch.manual_seed(0)
    net = build_network(get_preset("mnist-tiny"))
    pt = tmp_path / "tiny.pt"
    torch.save(net.state_dict(), pt)
    assert main(["convert", str(pt), "--preset", "mnist-tiny", "--out", str(tmp_path / "o")]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    saved = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())


def _tiny_converted(folder, preset):
    """A converted folder holding a tiny learned-variance U-Net recorded as ``preset`` (stands in for the real one:
    only the recorded preset decides the diffusion flags)."""
    cfg = get_preset("mnist-tiny")
    cfg = type(cfg)(**{**cfg.__dict__, "learn_sigma": True, "image_size": 8})
    torch.manual_seed(0)
    save_converted(build_network(cfg).state_dict(), cfg, folder, metadata={"preset": preset})
    return cfg


def test_cli_samples_a_converted_folder(tmp_path, capsys):
    """difflab sample / info read a converted released network with its README's flags; nll needs data it has not."""
    import numpy as np

    folder = tmp_path / "c"
    _tiny_converted(folder, "guided-diffusion/64x64_diffusion")
    npz = tmp_path / "s.npz"
    assert main(["sample", str(folder), "--n", "3", "--sampler", "ddim", "--steps", "4", "--npz", str(npz),
                 "--quiet"]) == 0
    images = np.load(npz)["arr_0"]
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
    # the same images as the Python path: official_denoiser and the sampler, from the CLI's noise
    from difflab.generate import draw_samples

    d = official_denoiser(folder)
    x, _ = draw_samples(d, converted_run_config(folder), n=3, sampler="ddim", steps=4)
    from difflab.images import to_uint8

    assert np.array_equal(to_uint8(x, converted_run_config(folder).data), images)
    capsys.readouterr()
    assert main(["info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["diffusion"].startswith("T=1000 cosine, predicts eps, variance learned_range")
    assert info["checkpoints"] == [] and info["data"].startswith("none")
    for cmd, message in ((["nll", str(folder)], "data.source is 'none'"),
                         (["sample", str(folder), "--ema", "0.9999"], "no EMA at rate 0.9999"),
                         (["sample", str(folder), "--checkpoint", "5"], "one set of weights")):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err


def test_converted_classifier_guides_a_converted_unet(tmp_path, capsys):
    """A released classifier from difflab convert carries the noise levels of the model it was released with
    (64x64: cosine, T = 1000), so it guides the converted 64x64 U-Net from the CLI, and a linear-schedule one
    (the 128x128 classifier) is refused by the guidance check."""
    import numpy as np

    from difflab.nn.classifier import ClassifierConfig
    from difflab.train.classifier import load_classifier

    _tiny_converted(tmp_path / "unet", "guided-diffusion/64x64_diffusion")
    clf_cfg = ClassifierConfig(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                               attention_resolutions=(), num_groups=8, pool="adaptive", image_size=8, out_channels=10)
    torch.manual_seed(1)
    for name, size in (("clf64", "64x64"), ("clf128", "128x128")):
        preset = f"guided-diffusion/{size}_classifier"
        save_converted(build_network(clf_cfg).state_dict(), clf_cfg, tmp_path / name, metadata={"preset": preset})
    clf = load_classifier(tmp_path / "clf64")
    info = clf.diffusion_info
    assert not clf.training and info.num_classes == 10 and info.image_size == 8 and info.schedule == "cosine/1000"
    from difflab import Process

    assert torch.allclose(torch.tensor(info.alphas_cumprod, dtype=torch.float64),
                          Process.named("cosine", 1000).alphas_cumprod, rtol=0, atol=0)
    npz = tmp_path / "g.npz"
    base = ["sample", str(tmp_path / "unet"), "--n", "2", "--steps", "3", "--quiet", "--label", "4",
            "--classifier-scale", "1"]
    assert main([*base, "--classifier", str(tmp_path / "clf64"), "--npz", str(npz)]) == 0
    assert np.load(npz)["arr_1"].tolist() == [4, 4]
    capsys.readouterr()
    assert main([*base, "--classifier", str(tmp_path / "clf128")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "linear/1000" in err
    with pytest.raises(ValueError, match="holds a converted diffusion U-Net, not a classifier"):
        load_classifier(tmp_path / "unet")


def test_cli_on_a_converted_folder_of_an_unknown_preset(tmp_path, capsys):
    _tiny_converted(tmp_path / "u", "mnist-tiny")
    assert main(["sample", str(tmp_path / "u"), "--n", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "from preset 'mnist-tiny'" in err and "known: guided-diffusion/" in err


def test_cli_missing_file_exits_2(tmp_path, capsys):
    code = main(["convert", str(tmp_path / "nope.pt"), "--preset", "mnist-tiny", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("difflab: error: checkpoint not found") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_wrong_architecture_exits_2_and_writes_nothing(tmp_path, capsys):
    pt = tmp_path / "small.pt"
    torch.save(build_network(get_preset("mnist-tiny")).state_dict(), pt)
    code = main(["convert", str(pt), "--preset", "mnist-small", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "missing keys" in err
    assert not (tmp_path / "o" / "model.safetensors").exists()
    assert main(["convert", str(pt), "--preset", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_pickled_code_is_refused(tmp_path, capsys):
    pt = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(1), "obj": argparse.Namespace(a=1)}, pt)  # an arbitrary class: refused
    assert main(["convert", str(pt), "--preset", "mnist-tiny", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "argparse.Namespace" in err  # says what was refused
    assert "weights_only=False" not in err and "allow_pickle" not in err  # and never how to turn the check off
    assert not (tmp_path / "o").exists()


def test_load_into_meta_model_assigns_weights(fixtures_dir):
    """A model built on the meta device (no memory) takes the official tensors themselves."""
    meta, sd = fixture(fixtures_dir, "improved_unet_ddpm")
    with torch.device("meta"):
        model = build(meta)
    load_official_state_dict(model, sd)
    assert not any(p.is_meta for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.parametrize("preset, steps, schedule, time_scale, loss", [
    ("guided-diffusion/64x64_diffusion", 1000, "cosine", None, "mse"),
    ("guided-diffusion/256x256_diffusion", 1000, "linear", None, "mse"),
    ("improved-diffusion/cifar10_uncond_50M_500K", 4000, "cosine", 0.25, "hybrid"),
    ("improved-diffusion/imagenet64_cond_270M_250K", 4000, "cosine", None, "mse"),  # README: both rescales off
])
def test_official_denoiser_takes_the_readme_diffusion_flags(tmp_path, preset, steps, schedule, time_scale, loss):
    """official_denoiser wraps a converted U-Net with the flags its preset was released with: T, schedule,
    rescale_timesteps (time_scale) and rescale_learned_sigmas (hybrid = RESCALED_MSE, else MSE + VB)."""
    from difflab import Process
    from difflab.build import training_loss_type

    _tiny_converted(tmp_path, preset)
    d = official_denoiser(tmp_path)
    assert d.num_timesteps == steps and d.time_scale == time_scale
    assert torch.equal(d.process.betas, Process.named(schedule, steps).betas)
    assert d.parameterization.mean_type == "eps" and d.parameterization.var_type == "learned_range"
    assert training_loss_type(converted_run_config(tmp_path).diffusion) == loss
    assert not d.net.training


def test_official_denoiser_unknown_preset_and_classifier(tmp_path, fixtures_dir):
    cfg = get_preset("mnist-tiny")
    save_converted(build_network(cfg).state_dict(), cfg, tmp_path / "tiny", metadata={"preset": "mnist-tiny"})
    with pytest.raises(ValueError, match="from preset 'mnist-tiny'.*known: guided-diffusion/64x64_diffusion"):
        official_denoiser(tmp_path / "tiny")
    meta, sd = fixture(fixtures_dir, "guided_classifier")
    save_converted(sd, config_from_official_kwargs(meta["class"], meta["kwargs"]), tmp_path / "clf")
    with pytest.raises(ValueError, match="holds a converted classifier"):
        official_denoiser(tmp_path / "clf")
    assert set(OFFICIAL_DIFFUSION) <= set(RELEASED_FLAGS) | {"guided-diffusion/lsun_bedroom"}
