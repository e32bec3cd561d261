"""Config: YAML round trip, overrides, presets and every kind of validation error."""

from pathlib import Path

import pytest
import yaml

from difflab.config import (
    Config,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    override,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = {"model": {"preset": "mnist-tiny"}}


def test_round_trip_save_load_equal(tmp_path):
    cfg = config_from_dict(
        {
            "model": {"preset": "mnist-small", "dropout": 0.0, "channel_mult": [1, 2, 4], "image_size": 8,
                      "learn_sigma": True, "num_classes": 10},
            "diffusion": {"schedule": "cosine", "var_type": "learned_range", "loss_type": "hybrid"},
            "data": {"source": "digits", "image_size": 8, "class_cond": True},
            "train": {"lr": "2e-4", "ema_rates": [0.9999, 0.999], "microbatch": 16, "grad_clip": 1.0},
            "sample": {"sampler": "ddim", "steps": 50},
        }
    )
    path = tmp_path / "c.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert isinstance(again.train.ema_rates, tuple) and again.train.ema_rates == (0.9999, 0.999)
    assert again.train.lr == 2e-4
    assert again.model.channel_mult == (1, 2, 4) and again.model.dropout == 0.0
    # the saved file is explicit: no preset reference remains, every field is written
    raw = yaml.safe_load(path.read_text())
    assert "preset" not in raw["model"] and raw["model"]["model_channels"] == 32
    assert set(raw["train"]) == {f for f in TrainConfig.__dataclass_fields__}


def test_overrides_parse_yaml_values_and_nest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(TINY))
    cfg = load_config(
        path,
        overrides=[
            "train.lr=1e-4",
            "train.ema_rates=[0.5, 0.25]",
            "train.bf16=true",
            "sample.steps=null",
            "diffusion.steps=4000",
            "model.dropout=0.3",
            "data.path=/some/where",
            "data.source=folder",
        ],
    )
    assert cfg.train.lr == 1e-4 and cfg.train.ema_rates == (0.5, 0.25) and cfg.train.bf16 is True
    assert cfg.sample.steps is None and cfg.diffusion.steps == 4000
    assert cfg.model.dropout == 0.3 and cfg.model.model_channels == 16  # preset kept, one field changed
    assert cfg.data.path == "/some/where"
    changed = override(cfg, ["train.seed=7"])
    assert changed.train.seed == 7 and changed.train.lr == cfg.train.lr and changed != cfg


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["train.lrr=1"], "train.lrr", ["unknown key", "did you mean 'train.lr'"]),
        (["diffusion.shedule=cosine"], "diffusion.shedule", ["did you mean 'diffusion.schedule'"]),
        (["trian.lr=1"], "trian", ["did you mean 'train'"]),
        (["model.model_channel=8"], "model.model_channel", ["did you mean 'model.model_channels'"]),
        (["diffusion.schedule=cosin"], "diffusion.schedule", ["'linear'", "'cosine'"]),
        (["diffusion.mean_type=score"], "diffusion.mean_type", ["'eps'", "'x0'", "'v'"]),
        (["diffusion.var_type=learned"], "diffusion.var_type", ["'fixed_small'", "'fixed_large'", "'learned_range'"]),
        (["diffusion.loss_type=l1"], "diffusion.loss_type", ["'mse'", "'hybrid'", "'kl'", "'rescaled_kl'"]),
        (["diffusion.timestep_sampler=x"], "diffusion.timestep_sampler", ["'uniform'", "'loss_second_moment'"]),
        (["data.source=cifar"], "data.source", ["'mnist5k'", "'digits'", "'folder'", "'npz'"]),
        (["sample.sampler=euler_a"], "sample.sampler", ["'ancestral'", "'ddim'"]),
        (["diffusion.steps=-5"], "diffusion.steps", [">= 1", "-5"]),
        (["train.lr=0"], "train.lr", ["> 0"]),
        (["train.lr=-1e-4"], "train.lr", ["> 0"]),
        (["diffusion.p_uncond=1.5"], "diffusion.p_uncond", ["[0, 1]", "1.5"]),
        (["diffusion.p_uncond=-0.1"], "diffusion.p_uncond", ["[0, 1]"]),
        (["train.batch_size=many"], "train.batch_size", ["integer", "'many'"]),
        (["train.batch_size=2.5"], "train.batch_size", ["integer"]),
        (["train.bf16=1"], "train.bf16", ["true or false"]),
        (["train.lr=fast"], "train.lr", ["number"]),
        (["train.ema_rates=[0.9, 1.0]"], "train.ema_rates", ["[0, 1)"]),
        (["train.ema_rates=[0.9, x]"], "train.ema_rates[1]", ["number"]),
        (["train.adam_betas=[0.9]"], "train.adam_betas", ["2 items"]),
        (["train.microbatch=999"], "train.microbatch", ["batch_size=128"]),
        (["train.keep_last=0"], "train.keep_last", [">= 1"]),
        (["sample.steps=2000"], "sample.steps", ["diffusion.steps=1000"]),
        (["sample.ema_rate=0.5"], "sample.ema_rate", ["0.9999"]),
        (["diffusion.p_uncond=0.1"], "diffusion.p_uncond", ["class_cond"]),
        (["diffusion.loss_type=hybrid"], "diffusion.loss_type", ["learned_range"]),
        (["data.channels=2"], "data.channels", ["1, 3 or null"]),
        (["data.source=npz"], "data.path", ["needs a path"]),
        (["model.preset=mnist-tinyy"], "model.preset", ["did you mean 'mnist-tiny'", "ddpm-cifar10"]),
        (["model.num_res_blocks=0"], "model.num_res_blocks", ["integer >= 1"]),
        (["model.num_heads=3"], "model.num_heads", ["divisor of every width with attention"]),
        (["train=3"], "train", ["mapping"]),
        (["diffusion.var_type=learned_range", "diffusion.loss_type=hybrid"], "model.learn_sigma", ["must be True"]),
        (["model.learn_sigma=true"], "model.learn_sigma", ["must be False", "'fixed_large'"]),
        (["data.class_cond=true"], "model.num_classes", ["data.class_cond is true"]),
        (["model.num_classes=10"], "model.num_classes", ["is 10 but data.class_cond is false"]),
        (["model.num_classes=10", "data.class_cond=true", "diffusion.p_uncond=0.1"], "model.class_null", ["p_uncond"]),
        (["data.channels=3"], "data.channels", ["model.in_channels is 1"]),
        (["data.image_size=28"], "data.image_size", ["model.image_size is 32"]),
        (["train.lr.x=3"], "train.lr", ["expected a number"]),
        (["train.lr=1", "train.lr.x=3"], "train.lr", ["not a section"]),
    ],
)
def test_errors_name_the_key_and_the_choices(overrides, key, words):
    with pytest.raises(ValueError) as info:
        config_from_dict(TINY, overrides)
    msg = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert msg.startswith(key + ":"), msg
    for w in words:
        assert w in msg, (w, msg)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="section.key=value"):
        config_from_dict(TINY, ["train.lr"])
    with pytest.raises(ValueError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: mnist-tiny}\ntrain: {lr: 0}\n")
    with pytest.raises(ValueError, match=r"train\.lr: must be > 0.*bad\.yaml"):
        load_config(bad)


def test_direct_construction_validates_and_normalises():
    with pytest.raises(ConfigError, match="p_uncond"):
        DiffusionConfig(p_uncond=2.0)
    with pytest.raises(ConfigError, match="'linear', 'cosine'"):
        DiffusionConfig(schedule="cosin")
    t = TrainConfig(ema_rates=[0.9], lr=1)
    assert t.ema_rates == (0.9,) and isinstance(t.lr, float)
    assert DataConfig(source="digits").split is None


def test_model_section_explicit_fields_and_wrong_preset_kind():
    cfg = config_from_dict({"model": {"in_channels": 1, "model_channels": 8, "num_groups": 8}})
    assert cfg.model.in_channels == 1 and cfg.model.model_channels == 8
    with pytest.raises(ValueError, match="ClassifierConfig, not a UNetConfig"):
        config_from_dict({"model": {"preset": "guided-diffusion/64x64_classifier"}})
    with pytest.raises(ValueError, match="missing required key"):
        config_from_dict({})
    assert isinstance(cfg, Config)


RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.endswith((".cascade.yaml", ".unclip.yaml")))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg


def test_the_cdm_cascade_file_chains_its_shipped_stage_configs():
    """configs/cdm-imagenet.cascade.yaml lists run folders of the three shipped CDM configs, which chain by size."""
    from difflab.pipelines.cascade import is_cascade_file, load_cascade

    path = CONFIGS / "cdm-imagenet.cascade.yaml"
    assert is_cascade_file(path) and not any(is_cascade_file(p) for p in RUN_CONFIGS)
    cascade = load_cascade(path)
    assert cascade.stages and not cascade.stages[0].aug_level
    sizes = [load_config(CONFIGS / f).data for f in ("cdm-imagenet-32.yaml", "cdm-imagenet-32-64.yaml",
                                                      "cdm-imagenet-64-256.yaml")]
    assert len(cascade.stages) == len(sizes)
    assert [d.low_res_size for d in sizes[1:]] == [d.image_size for d in sizes[:-1]]


def test_miniature_configs_fit_their_data():
    from difflab.data import build_dataset

    for name, size in (("mnist-tiny", 8), ("mnist-default", 28)):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        ds = build_dataset(cfg.data, seed=cfg.train.seed)
        x, _ = ds[0]
        assert x.shape == (cfg.model.in_channels, size, size) == (ds.channels, cfg.model.image_size, size)
        assert cfg.model.learn_sigma and cfg.diffusion.loss_type == "hybrid"
    adm = load_config(CONFIGS / "adm-64.yaml")
    assert adm.model.num_classes == 1000 and adm.model.model_channels == 192 and adm.train.lr == 3e-4


@pytest.mark.parametrize("name, params", [("glide-base-3.5b", 3_554_414_086), ("glide-upsample-1.5b", 1_540_932_998),
                                          ("glide-base-300m", 385_030_726)])
def test_the_glide_configs_have_the_papers_sizes(name, params):
    """GLIDE's 3.5B base (2.3B U-Net at 512 channels + 1.2B text transformer, 24 x 2048) and 1.5B upsampler
    (384 channels, text width 1024), and the released 300M filtered model's shape, counted on the meta device."""
    import torch

    from difflab.nn.presets import build_network

    cfg = load_config(CONFIGS / f"{name}.yaml")
    with torch.device("meta"):
        net = build_network(cfg.model)
    assert sum(p.numel() for p in net.parameters()) == params
    assert cfg.text.tokenizer == "gpt2" and cfg.model.text.n_vocab == 50257 and cfg.data.captions
    assert cfg.train.parallel == ("ddp" if name.endswith("300m") else "fsdp")


@pytest.mark.parametrize("name, kind, params", [("unclip-prior-1b", "prior", 1_022_028_544),
                                                ("unclip-decoder-900m", "decoder", 893_318_086)])
def test_the_unclip_configs_have_karlos_sizes(name, kind, params):
    """The full-size prior and decoder: Karlo's released networks (released.json counts), the paper's dropout
    (captions 10% for the prior, 50% and the image embedding 10% for the decoder), FSDP, a CLIP named."""
    import torch

    from difflab.nn.presets import build_network

    cfg = load_config(CONFIGS / f"{name}.yaml")
    with torch.device("meta"):
        net = build_network(cfg.model)
    assert cfg.unclip_kind == kind and sum(p.numel() for p in net.parameters()) == params
    assert cfg.diffusion.p_uncond == (0.1 if kind == "prior" else 0.5) and cfg.train.parallel == "fsdp"
    assert cfg.clip.run is not None and cfg.data.captions
    if kind == "decoder":
        assert cfg.model.clip_emb_drop == 0.1


def test_a_preset_picks_its_own_config_class():
    """{preset: karlo/prior} in the model section is a PriorConfig (not the first option, a UNetConfig), and a
    mapping that names no preset still picks the config whose fields hold its keys."""
    from difflab.config import config_from_dict
    from difflab.nn.prior import PriorConfig

    base = {"data": {"source": "scenes", "captions": True}, "clip": {"run": "somewhere"},
            "diffusion": {"mean_type": "x0", "var_type": "fixed_small"}}
    assert isinstance(config_from_dict({**base, "model": {"preset": "karlo/prior"}}).model, PriorConfig)
    cfg = config_from_dict({**base, "model": {"xf_layers": 2, "xf_width": 32, "xf_heads": 2, "clip_dim": 8}})
    assert isinstance(cfg.model, PriorConfig) and cfg.model.xf_layers == 2


def test_the_unclip_upsampler_is_unconditional_blurred_and_without_attention():
    """unCLIP's upsamplers: no caption, no attention anywhere, blur augmentation, trained on quarter-area crops
    and sampling the whole 32x32 scene from its 16x16 one."""
    import torch

    from difflab.nn.presets import build_network

    cfg = load_config(CONFIGS / "scenes-unclip-sr16-32.yaml")
    assert cfg.augment.kind == "blur" and not cfg.is_text and cfg.model.attention_resolutions == ()
    assert (cfg.data.sample_size, cfg.data.sample_low_res_size) == (32, 16) and cfg.data.random_crop
    with torch.device("meta"):
        net = build_network(cfg.model)
    assert not any("attn" in name or "qkv" in name for name, _ in net.named_parameters())


def test_the_scenes_unclip_file_names_the_shipped_miniatures():
    """configs/scenes.unclip.yaml is an unCLIP file (no run config) whose prior and decoder are the runs of the
    shipped scenes-unclip configs, relative to the file."""
    from difflab.pipelines.unclip import is_unclip_file, load_unclip

    path = CONFIGS / "scenes.unclip.yaml"
    assert is_unclip_file(path) and not any(is_unclip_file(p) for p in RUN_CONFIGS)
    spec = load_unclip(path)
    assert Path(spec.prior.run).resolve() == (CONFIGS.parent / "runs/unclip/prior16").resolve()
    assert Path(spec.decoder.run).resolve() == (CONFIGS.parent / "runs/unclip/decoder16").resolve()
    assert spec.best_of == 2 and spec.upsamplers == ()
