"""Values that cannot work are refused at once, naming the key (issue 12, item 4).

Every float field of every config dataclass is found by walking the type hints, so a field added
later is covered too: nan, inf and -inf (YAML ``.nan`` / ``.inf`` / ``-.inf``, the strings "nan" /
"inf", an int beyond float range) are each a :class:`ConfigError` at that field's dotted key. Then
the ranges (non-positive learning rates and the like), the same values on ``--resume --set``, the
one-line CLI refusal before any folder exists, and the library calls that take such values directly.
"""

import dataclasses
import math
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import torch

from difflab.config import (
    ClassifierRunConfig,
    Config,
    ConfigError,
    TrainConfig,
    _hints,
    config_from_dict,
    from_dict,
    load_config,
    override,
    to_dict,
)
from difflab.nn.unet import UNetConfig

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": {"preset": "mnist-tiny"}}
BAD = [".nan", ".inf", "-.inf", "nan", "inf", "'-inf'", "1e999", str(10**400)]


def _float_fields(cls, prefix=()):
    """(dotted key, override value template) of every float-typed field below dataclass ``cls``:
    ``{}`` in the template is where the bad value goes (tuples keep their other items)."""
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _hints(cls)[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
            typing.Union, types.UnionType) else [tp]
        key = (*prefix, f.name)
        for a in args:
            if dataclasses.is_dataclass(a):
                out += _float_fields(a, key)
            elif a is float:
                out.append((".".join(key), "{}"))
            elif typing.get_origin(a) is tuple and float in typing.get_args(a):
                items = typing.get_args(a)
                if items[-1] is Ellipsis:
                    out.append((".".join(key), "[{}]"))
                else:
                    rest = ", ".join("0.5" for _ in items[1:])
                    out.append((".".join(key), "[{}, " + rest + "]" if rest else "[{}]"))
    return out


RUN_FIELDS = _float_fields(Config)
CLASSIFIER_FIELDS = [k for k in _float_fields(ClassifierRunConfig) if k[0].startswith(("classifier.", "export_ema"))]


def test_the_walk_finds_every_float_field():
    keys = {k for k, _ in RUN_FIELDS}
    assert {"train.lr", "train.weight_decay", "train.grad_clip", "train.ema_rates", "train.adam_betas",
            "diffusion.p_uncond", "sample.eta", "sample.guidance_scale", "sample.classifier_scale",
            "sample.ema_rate", "augment.blur_sigma", "augment.blur_prob", "model.dropout",
            "model.channel_mult"} <= keys
    assert {"classifier.dropout", "classifier.channel_mult", "export_ema"} <= {k for k, _ in CLASSIFIER_FIELDS}


@pytest.mark.parametrize("key,template", RUN_FIELDS, ids=[k for k, _ in RUN_FIELDS])
@pytest.mark.parametrize("bad", BAD)
def test_non_finite_floats_are_refused_naming_the_key(key, template, bad):
    with pytest.raises(ConfigError) as e:
        config_from_dict(BASE, [f"{key}={template.format(bad)}"])
    where = ".".join(e.value.path)
    assert where == key or where.startswith(key + "["), (where, key)
    assert str(e.value).startswith(key)


@pytest.mark.parametrize("key,template", CLASSIFIER_FIELDS, ids=[k for k, _ in CLASSIFIER_FIELDS])
def test_non_finite_floats_of_a_classifier_run_are_refused(key, template):
    for bad in (".nan", ".inf"):
        with pytest.raises(ConfigError) as e:
            load_config(ROOT / "configs" / "mnist-classifier.yaml", [f"{key}={template.format(bad)}"])
        assert ".".join(e.value.path).startswith(key)


@pytest.mark.parametrize("override_,key", [
    ("train.lr=0", "train.lr"), ("train.lr=-1e-4", "train.lr"), ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.grad_clip=0", "train.grad_clip"), ("train.grad_clip=-1", "train.grad_clip"),
    ("train.ema_rates=[1.0]", "train.ema_rates"), ("train.ema_rates=[-0.1]", "train.ema_rates"),
    ("train.adam_betas=[1.0, 0.999]", "train.adam_betas"), ("diffusion.p_uncond=1.5", "diffusion.p_uncond"),
    ("sample.eta=-1", "sample.eta"), ("sample.guidance_scale=-1", "sample.guidance_scale"),
    ("augment.blur_prob=2", "augment.blur_prob"), ("augment.blur_sigma=[0.6, 0.4]", "augment.blur_sigma"),
    ("model.dropout=1.0", "model.dropout"), ("model.channel_mult=[1, 0]", "model.channel_mult"),
    ("train.batch_size=.inf", "train.batch_size"), ("train.max_steps=.nan", "train.max_steps"),
])
def test_out_of_range_values_name_the_key(override_, key):
    with pytest.raises(ConfigError) as e:
        config_from_dict(BASE, [override_])
    assert str(e.value).startswith(key), str(e.value)


def test_python_construction_is_checked_too():
    for value in (math.inf, math.nan, -math.inf):
        with pytest.raises(ConfigError, match=r"^lr: must be a finite number"):
            TrainConfig(lr=value)
    with pytest.raises(ConfigError, match=r"^grad_clip: must be a finite number; got inf"):
        TrainConfig(grad_clip=math.inf)
    with pytest.raises(ConfigError, match=r"^ema_rates\[1\]: must be a finite number"):
        TrainConfig(ema_rates=(0.999, math.nan))
    for mult in ((1, math.inf), (1, math.nan)):
        with pytest.raises(ValueError, match="channel_mult"):
            UNetConfig(channel_mult=mult).validate()


def test_finite_values_still_pass_unchanged():
    cfg = config_from_dict(BASE, ["train.lr=3e-4", "train.grad_clip=1", "train.ema_rates=[0.999, 0.9999]",
                                  "sample.eta='0.5'", "train.weight_decay=0"])
    assert cfg.train.lr == 3e-4 and cfg.train.grad_clip == 1.0 and isinstance(cfg.train.grad_clip, float)
    assert cfg.train.ema_rates == (0.999, 0.9999) and cfg.sample.eta == 0.5
    assert from_dict(Config, to_dict(cfg)) == cfg


def test_resume_overrides_are_validated_the_same_way():
    cfg = config_from_dict(BASE)
    for bad in ("train.lr=.inf", "train.lr=.nan", "sample.eta=.nan", "train.grad_clip=.inf"):
        with pytest.raises(ConfigError) as e:
            override(cfg, [bad])
        assert str(e.value).startswith(bad.split("=")[0])


def test_cli_refuses_before_any_folder_exists(tmp_path):
    out = tmp_path / "run"
    for bad in ("train.lr=.inf", "train.lr=nan", "diffusion.p_uncond=.nan", "train.ema_rates=[.nan]"):
        r = subprocess.run([sys.executable, "-m", "difflab", "train", str(ROOT / "configs" / "mnist-tiny.yaml"),
                            "--set", bad, "--out", str(out)], capture_output=True, text=True, timeout=300,
                           env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and bad.split("=")[0] in lines[0], r.stderr
        assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_library_calls_refuse_non_finite_values():
    from difflab import Denoiser, Parameterization, Process
    from difflab.guidance import ClassifierFreeGuidance, ClassifierGuidance
    from difflab.samplers.ddim import sample_ddim

    d = Denoiser(lambda x, t, **_: torch.zeros_like(x), Process.named("cosine", 10), Parameterization())
    for eta in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
            sample_ddim(d, (1, 1, 2, 2), eta=eta, generator=torch.Generator().manual_seed(0))
    for s in (math.nan, math.inf, "x"):
        with pytest.raises(ValueError, match="classifier scale s must be a finite number"):
            ClassifierGuidance(d, cond_fn=lambda x, t, **_: x, scale=s)
    for w in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="guidance_scale w must be a finite number >= 0"):
            ClassifierFreeGuidance(lambda x, t, **_: x, w, null_label=0)
