"""Typed run configuration: frozen dataclasses, YAML in / out, dotted overrides, validation.

A run is described by :class:`Config` with five sections::

    model:      difflab.nn.unet.UNetConfig   (or {preset: NAME, ...field overrides})
    diffusion:  DiffusionConfig   the noise process, parameterisation and loss
    data:       DataConfig        what to train on
    train:      TrainConfig       optimiser, batch, EMA, logging and checkpoint cadence
    sample:     SampleConfig      how ``difflab sample`` draws images

``load_config(path, overrides=["train.lr=1e-4"])`` reads YAML, applies overrides (each value parsed
with ``yaml.safe_load``), resolves a model preset and validates everything; ``save_config`` writes
the fully resolved config (a preset is written out field by field, so the file alone rebuilds the
run). Errors are :class:`ConfigError` (a ``ValueError``) naming the dotted key: an unknown key
suggests the nearest valid one, a wrong choice lists the valid ones, a wrong type or an out-of-range
value names the field and the value.

The conversion is generic over (nested) dataclasses: ``Literal``, ``Optional`` / unions, tuples,
lists, dicts, bool / int / float / str / Path and nested dataclasses, so it serves
``UNetConfig`` and any config written later.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import yaml

if TYPE_CHECKING:
    from difflab.nn.classifier import ClassifierConfig
    from difflab.nn.clip import NoisedCLIPConfig
    from difflab.nn.clip_unet import DecoderUNetConfig
    from difflab.nn.openai_clip import CLIPConfig
    from difflab.nn.prior import PriorConfig
    from difflab.nn.text_unet import TextUNetConfig
    from difflab.nn.unet import UNetConfig


class ConfigError(ValueError):
    """A bad config value or key; ``path`` is the dotted key (``train.lr``), ``problem`` the reason."""

    def __init__(self, path: Sequence[str], problem: str) -> None:
        self.path = tuple(path)
        self.problem = problem
        where = ".".join(self.path)
        super().__init__(f"{where}: {problem}" if where else problem)

    def under(self, *prefix: str) -> ConfigError:
        """The same error with ``prefix`` put in front of its key."""
        return ConfigError((*prefix, *self.path), self.problem)


# ============================================================================ generic machinery


_UNION_TYPES = (Union, types.UnionType)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass (string annotations included). The network configs are
    imported here, not at module level: :mod:`difflab.nn` needs no config, and config needs nn only
    to read a file (so there is no import circle)."""
    import sys

    from difflab.nn.classifier import ClassifierConfig
    from difflab.nn.text_unet import TextUNetConfig
    from difflab.nn.unet import UNetConfig

    ns = dict(vars(sys.modules[cls.__module__]))
    ns.setdefault("UNetConfig", UNetConfig)
    ns.setdefault("TextUNetConfig", TextUNetConfig)
    ns.setdefault("ClassifierConfig", ClassifierConfig)
    from difflab.nn.clip import NoisedCLIPConfig
    from difflab.nn.clip_unet import DecoderUNetConfig
    from difflab.nn.openai_clip import CLIPConfig
    from difflab.nn.prior import PriorConfig

    ns.setdefault("NoisedCLIPConfig", NoisedCLIPConfig)
    ns.setdefault("CLIPConfig", CLIPConfig)
    ns.setdefault("PriorConfig", PriorConfig)
    ns.setdefault("DecoderUNetConfig", DecoderUNetConfig)
    return typing.get_type_hints(cls, globalns=ns)


def _type_name(tp: Any) -> str:
    """A type in the words of YAML: ``bool | Literal["auto"]`` -> ``true, false or 'auto'``."""
    if tp is bool:
        return "true or false"
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in _UNION_TYPES:
        names = [_type_name(a) for a in typing.get_args(tp)]
        return ", ".join(names[:-1]) + " or " + names[-1]
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _convert(tp: Any, value: Any, path: tuple[str, ...]) -> Any:
    """Check ``value`` against the type ``tp`` and return it normalised (list -> tuple, int -> float,
    ``"1e-4"`` -> 1e-4 for floats, mapping -> dataclass). Raises :class:`ConfigError` at ``path``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if isinstance(value, bool) or value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(path, f"must be one of {choices}; got {value!r}")
        return value
    if origin in _UNION_TYPES:
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, f"must not be null (expected {_type_name(tp)})")
        options = [a for a in args if a is not type(None)]
        classes = [o for o in options if dataclasses.is_dataclass(o)]
        if isinstance(value, Mapping) and len(classes) > 1 and "preset" in value:
            try:  # {preset: NAME, ...}: the preset's own config class, when it is one of the options
                kind = type(_preset(str(value["preset"]), path))
            except ConfigError:
                kind = None
            if kind in classes:
                return _convert(kind, value, path)
        if isinstance(value, Mapping) and len(classes) > 1:
            # a mapping for one of several configs: the first whose fields hold every key (else the first, so
            # that its error names the unknown key)
            keys = set(value) - {"preset"}
            fitting = [o for o in classes if keys <= set(_field_names(o))]
            return _convert((fitting or classes)[0], value, path)
        errors = []
        for option in options:
            try:
                return _convert(option, value, path)
            except ConfigError as e:
                errors.append(e.problem)
        if len(options) == 1:
            raise ConfigError(path, errors[0])
        raise ConfigError(path, f"expected {_type_name(tp)}; got {_describe(value)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping) and "preset" in value and "preset" not in _field_names(tp):
            return _from_preset(tp, value, path)
        return from_dict(tp, value, path=path)
    if origin is tuple or tp is tuple:
        if isinstance(value, (str, bytes, Mapping)):
            raise ConfigError(path, f"expected a list; got {_describe(value)}")
        if not isinstance(value, Sequence):
            if len(args) == 2 and args[1] is Ellipsis:  # a bare scalar for a variadic tuple
                value = [value]
            else:
                raise ConfigError(path, f"expected a list; got {_describe(value)}")
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, (*path[:-1], f"{path[-1]}[{i}]")) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(path, f"expected a list of {len(args)} items; got {len(value)}")
        items = enumerate(zip(args, value, strict=True))
        return tuple(_convert(a, v, (*path[:-1], f"{path[-1]}[{i}]")) for i, (a, v) in items)
    if origin is list or tp is list:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise ConfigError(path, f"expected a list; got {_describe(value)}")
        item = args[0] if args else Any
        return [_convert(item, v, (*path[:-1], f"{path[-1]}[{i}]")) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping; got {_describe(value)}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, path): _convert(vt, v, (*path, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false; got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(path, f"expected an integer; got {_describe(value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(path, f"expected an integer; got {_describe(value)}") from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(path, f"expected an integer; got {_describe(value)}")
    if tp is float:
        number: Any = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(path, f"expected a number; got {_describe(value)}")
        try:
            number = float(number)
        except OverflowError:  # an int beyond float range
            number = math.inf
        if not math.isfinite(number):  # no float setting can work at nan or +-inf (lr, eta, scales, rates...)
            raise ConfigError(path, f"must be a finite number; got {value!r}")
        return number
    if tp is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string; got {_describe(value)}")
        return value
    if tp is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(path, f"expected a path; got {_describe(value)}")
        return Path(value)
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise ConfigError(path, f"expected {tp.__name__}; got {_describe(value)}")
        return value
    return value  # an annotation this converter does not know: accept as is


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _field_names(cls: type) -> list[str]:
    return [f.name for f in _init_fields(cls)]


def _unknown_key(cls: type, key: Any, path: tuple[str, ...]) -> ConfigError:
    names = [f.name for f in _init_fields(cls)]
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
    hint = f"did you mean '{'.'.join((*path, close[0]))}'? " if close else ""
    return ConfigError(
        (*path, str(key)),
        f"unknown key; {hint}valid keys{' in ' + '.'.join(path) if path else ''}: {', '.join(names)}",
    )


def from_dict(cls: type, data: Any, *, path: Sequence[str] = ()) -> Any:
    """Build dataclass ``cls`` from a (nested) mapping, converting and validating every value.

    Missing keys take the field defaults; unknown keys, wrong types and invalid values raise
    :class:`ConfigError` with the dotted key under ``path``.
    """
    path = tuple(path)
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a mapping of {cls.__name__} fields; got {_describe(data)}")
    fields = {f.name: f for f in _init_fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown_key(cls, key, path)
    missing = [
        n
        for n, f in fields.items()
        if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(path, f"missing required key(s): {', '.join(missing)}")
    hints = _hints(cls)
    kwargs = {k: _convert(hints[k], v, (*path, k)) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)  # configs that check themselves on request (UNetConfig)
        if callable(validate):
            validate()
        return obj
    except ConfigError as e:
        raise e.under(*path) from None
    except (ValueError, TypeError) as e:
        field_name = getattr(e, "field", None)  # a network config's FieldError names its field
        if isinstance(field_name, str) and isinstance(getattr(e, "problem", None), str):
            raise ConfigError((*path, field_name), e.problem) from e
        raise ConfigError(path, str(e)) from e


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML-safe data (tuples -> lists, paths -> strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def _normalise(self: Any) -> None:
    """``__post_init__`` helper: convert every field to its declared type (a frozen-safe setattr)."""
    hints = _hints(type(self))
    for f in _init_fields(type(self)):
        value = getattr(self, f.name)
        new = _convert(hints[f.name], value, (f.name,))
        if new is not value:
            object.__setattr__(self, f.name, new)


def _require(self: Any, ok: bool, name: str, problem: str) -> None:
    """Raise a :class:`ConfigError` at field ``name`` of ``self`` unless ``ok``."""
    if not ok:
        raise ConfigError((name,), f"{problem}; got {getattr(self, name)!r}")


# ============================================================================ the sections


@dataclass(frozen=True)
class DiffusionConfig:
    """The noise process, the network's parameterisation and the training loss (Ho 2020; Nichol 2021)."""

    # T, the number of diffusion steps of the original process
    steps: int = 1000
    # beta schedule: DDPM's linear or IDDPM's cosine
    schedule: Literal["linear", "cosine"] = "linear"
    # what the network predicts for the mean
    mean_type: Literal["eps", "x0", "v"] = "eps"
    # sigma_t^2: beta~, beta, or learned interpolation
    var_type: Literal["fixed_small", "fixed_large", "learned_range"] = "fixed_large"
    # L_simple, L_simple + lambda*L_vlb, L_vlb, L_vlb * T/1000
    loss_type: Literal["mse", "hybrid", "kl", "rescaled_kl"] = "mse"
    # how training draws t (IDDPM importance sampling)
    timestep_sampler: Literal["uniform", "loss_second_moment"] = "uniform"
    # hybrid: scale the VLB term by T/1000 (the official RESCALED_MSE, lambda = 0.001)
    rescale_learned_sigmas: bool = True
    # feed the network t * 1000 / T as a float instead of the index t (improved-diffusion's default, which its
    # unconditional 4000-step checkpoints were trained with; guided-diffusion and difflab runs do not)
    rescale_timesteps: bool = False
    # classifier-free guidance: probability of dropping the class label in training
    p_uncond: float = 0.0

    def __post_init__(self) -> None:
        _normalise(self)
        _require(self, self.steps >= 1, "steps", "must be >= 1")
        _require(self, 0.0 <= self.p_uncond <= 1.0, "p_uncond", "must be in [0, 1]")
        if self.loss_type == "hybrid" and self.var_type != "learned_range":
            raise ConfigError(("loss_type",), "'hybrid' trains the variance: set var_type to 'learned_range'")
        if self.loss_type == "mse" and self.var_type == "learned_range":
            raise ConfigError(
                ("loss_type",),
                "a learned variance is trained by the VLB term: "
                "use loss_type 'hybrid', 'kl' or 'rescaled_kl'",
            )


@dataclass(frozen=True)
class TextConfig:
    """How a text-conditional run (``model.text``: GLIDE's text transformer) turns captions into tokens."""

    # gpt2 = GLIDE's BPE, clip = CLIP's, miniature = word-level (difflab.text; docs/text.md)
    tokenizer: Literal["gpt2", "clip", "miniature"] = "miniature"
    # the vocabulary: a path (gpt2: the folder with encoder.json and vocab.bpe; clip: bpe_simple_vocab_16e6.txt;
    # miniature: its tokenizer.json), or "scenes" = the miniature vocabulary of the captioned MNIST scenes
    vocab: str = "scenes"

    def __post_init__(self) -> None:
        _normalise(self)
        ok = self.vocab != "scenes" or self.tokenizer == "miniature"
        _require(self, ok, "vocab", "'scenes' is a miniature vocabulary: set text.tokenizer: miniature or a path")


@dataclass(frozen=True)
class UnCLIPEmbeddingConfig:
    """The CLIP whose embeddings an unCLIP prior or decoder reads (unCLIP Sec. 2; docs/unclip.md).

    The embedding space of difflab's unCLIP: e = embed_scale * z for the unit CLIP embeddings z (image z_i and
    pooled text z_t), so that each coordinate has about unit scale (the paper scales its ViT-H/16 embeddings by
    17.2); the prior diffuses e_i, the decoder is told e_i and e_t.
    """

    # a task: clip run folder (its clip.safetensors) or a difflab convert folder of an OpenAI / OpenCLIP CLIP;
    # null for every other model
    run: str | None = None
    # e = embed_scale * z; null = sqrt(embed_dim) (unit RMS per coordinate)
    embed_scale: float | None = None

    def __post_init__(self) -> None:
        _normalise(self)
        _require(self, self.embed_scale is None or self.embed_scale > 0, "embed_scale", "must be null or > 0")


@dataclass(frozen=True)
class AugmentConfig:
    """Conditioning augmentation of a super-resolution stage's low-res input (CDM Sec. 4.2; difflab.augment)."""

    # none; noise = z_s ~ q(z_s | z_0) of the augmentation process, s fed as a second timestep embedding
    # (model.cond_dim); blur = a Gaussian blur on a fraction of the examples, none at sampling
    kind: Literal["none", "noise", "blur"] = "none"
    # noise: the augmentation process, the low-res stage's own noise process (truncated sampling needs it)
    schedule: Literal["linear", "cosine"] = "cosine"
    steps: int = 1000
    # noise: training draws s uniformly from 0..max_level per example (0 = none); null = steps
    max_level: int | None = None
    # blur: sigma (low-res pixels) uniform in this range, on a fraction blur_prob of the examples
    blur_sigma: tuple[float, float] = (0.4, 0.6)
    blur_prob: float = 0.5

    def __post_init__(self) -> None:
        _normalise(self)
        _require(self, self.steps >= 2, "steps", "must be >= 2")
        ok = self.max_level is None or 0 <= self.max_level <= self.steps
        _require(self, ok, "max_level", f"must be null or in [0, steps={self.steps}]")
        lo, hi = self.blur_sigma
        _require(self, 0 <= lo <= hi, "blur_sigma", "must be [lo, hi] with 0 <= lo <= hi")
        _require(self, 0 <= self.blur_prob <= 1, "blur_prob", "must be in [0, 1]")

    @property
    def levels(self) -> int:
        """The largest training level s."""
        return self.steps if self.max_level is None else self.max_level


@dataclass(frozen=True)
class DataConfig:
    """What to train on; see :func:`difflab.data.build_dataset`."""

    # built-in MNIST-5k / sklearn digits / captioned MNIST scenes, files (an image folder, an .npz, a JSONL
    # manifest, webdataset tar shards), or none (a converted checkpoint: sampling only)
    source: Literal["mnist5k", "digits", "scenes", "folder", "npz", "manifest", "webdataset", "none"] = "mnist5k"
    # image folder, .npz file, manifest .jsonl, or webdataset shards (a folder of .tar or a brace pattern)
    path: str | None = None
    # folder: read the caption sidecar x.txt of every image x.png (each batch then carries 'caption')
    captions: bool = False
    # scenes: the seed of the scene draws (BENCHMARKS.md: a scene is a function of (split, seed, index))
    scene_seed: int = 0
    # scenes: how many scenes the split holds (null = 1,000 for test, the reference set; 20,000 for train)
    num_scenes: int | None = None
    # super-resolution pairs: each batch also carries 'low_res', x0 area-downsampled to this side
    low_res_size: int | None = None
    # random crops of image_size from larger images (reproducible from (seed, epoch, index)) instead of
    # the centre crop: super-resolution training on patches
    random_crop: bool = False
    # scenes: the side the scenes are rendered at (16, 32 or 64) when random_crop cuts image_size windows
    # of larger renders (null = image_size); e.g. a 32 -> 64 upsampler trained on 32x32 crops of 64 renders
    render_size: int | None = None
    # side of the square training images; MNIST / digits / npz are padded up with -1
    image_size: int = 32
    # 1 or 3; null = from the data (a folder mixing grey and colour is an error)
    channels: int | None = None
    # mnist5k / digits split (null = train); folders and npz are one set
    split: Literal["train", "test", "all"] | None = None
    # horizontal flips with p = 0.5, reproducible from (seed, epoch, index)
    random_flip: bool = False
    # feed labels to the network (needs labelled data)
    class_cond: bool = False
    # folder: a broken file among good ones is skipped with a warning, or an error
    on_broken: Literal["skip", "raise"] = "skip"
    # folder: keep the decoded, resized images in memory
    cache: bool = False
    # folder without cache: threads decoding each batch's files in parallel (0 = in the training thread;
    # 2 on 2 cores: 1.5x the batches per second, docs/results/folder-loading.md)
    num_workers: int = 0

    def __post_init__(self) -> None:
        _normalise(self)
        _require(self, self.image_size >= 1, "image_size", "must be >= 1")
        _require(self, self.channels in (None, 1, 3), "channels", "must be 1, 3 or null")
        _require(self, self.num_workers >= 0, "num_workers", "must be >= 0")
        _require(self, self.low_res_size is None or 1 <= self.low_res_size < self.image_size, "low_res_size",
                 f"must be null or in [1, image_size={self.image_size})")
        _require(self, self.num_scenes is None or self.num_scenes >= 1, "num_scenes", "must be null or >= 1")
        _require(self, self.render_size is None or self.render_size >= self.image_size, "render_size",
                 f"must be null or >= image_size={self.image_size} (crops are windows of the render)")
        _require(self, self.render_size is None or self.low_res_size is None
                 or self.render_size * self.low_res_size % self.image_size == 0, "render_size",
                 f"times low_res_size={self.low_res_size} must be a multiple of image_size={self.image_size} "
                 "(the low-res side at the render size)")
        if self.source in ("folder", "npz", "manifest", "webdataset") and not self.path:
            raise ConfigError(("path",), f"source '{self.source}' needs a path")

    @property
    def sample_size(self) -> int:
        """The side of sampled images: ``image_size``, or ``render_size`` for a model trained on crops of
        larger renders (the U-Net is convolutional, so it samples the whole render)."""
        return self.render_size or self.image_size

    @property
    def sample_low_res_size(self) -> int | None:
        """The low-res side a super-resolution stage takes when sampling ``sample_size`` images."""
        return None if self.low_res_size is None else self.low_res_size * self.sample_size // self.image_size


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser (AdamW, as the official code), batch, EMA, logging and checkpoint cadence."""

    # AdamW learning rate after warmup
    lr: float = 1e-4
    # AdamW decoupled weight decay
    weight_decay: float = 0.0
    # AdamW (beta1, beta2)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    # linear learning-rate warmup from 0 over this many steps
    warmup_steps: int = 0
    # after the warm-up: constant lr, or cosine = lr * (1 + cos(pi * (step - warmup_steps) / (max_steps -
    # warmup_steps))) / 2, from lr at the end of the warm-up down to 0 at max_steps
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # global batch (all ranks together)
    batch_size: int = 128
    # split each batch into chunks of this size (gradient accumulation); null = off
    microbatch: int | None = None
    # clip the global gradient norm to this; null = off
    grad_clip: float | None = None
    # one EMA of the weights per rate: targ = rate*targ + (1-rate)*src
    ema_rates: tuple[float, ...] = (0.9999,)
    # optimiser steps to train for
    max_steps: int = 100_000
    # steps between metric lines in metrics.jsonl
    log_every: int = 100
    # steps between checkpoints (one is always written at the end)
    save_every: int = 10_000
    # steps between sample grids; 0 = never
    sample_every: int = 0
    # checkpoints kept in the run folder (older ones are deleted)
    keep_last: int = 3
    # seeds parameters init, data order, flips, timesteps and noise
    seed: int = 0
    # run the network under bf16 autocast; weights, optimiser state, EMA and the loss stay float32. auto = on
    # where bf16 is native (CUDA with bf16, CPUs with AMX-BF16 / AVX512-BF16: 1.8x the steps), off elsewhere
    # (emulated bf16 is several times slower); the choice and its reason are printed when training starts
    bf16: bool | Literal["auto"] = "auto"
    # several processes (torchrun): ddp = every rank holds the whole model, gradients all-reduced; fsdp = FSDP2
    # (torch.distributed.fsdp.fully_shard): parameters, gradients and optimiser state sharded across ranks, for
    # models that do not fit one GPU; checkpoints are then sharded (difflab gather makes one file)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # torch.compile the network (inductor): faster steps on GPUs (ADM-64 bf16 +71% on an H200), about +7% on
    # a CPU after a minute or more of compilation (docs/results/speed.md)
    compile: bool = False

    def __post_init__(self) -> None:
        _normalise(self)
        _require(self, self.lr > 0, "lr", "must be > 0")
        _require(self, self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(self, all(0 <= b < 1 for b in self.adam_betas), "adam_betas", "each must be in [0, 1)")
        _require(self, self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _require(self, self.batch_size >= 1, "batch_size", "must be >= 1")
        mb_ok = self.microbatch is None or 1 <= self.microbatch <= self.batch_size
        _require(self, mb_ok, "microbatch", f"must be null or in [1, batch_size={self.batch_size}]")
        _require(self, self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be null or > 0")
        _require(self, all(0 <= r < 1 for r in self.ema_rates), "ema_rates", "each must be in [0, 1)")
        _require(self, len(set(self.ema_rates)) == len(self.ema_rates), "ema_rates", "must be distinct")
        _require(self, self.max_steps >= 0, "max_steps", "must be >= 0")
        _require(self, self.log_every >= 1, "log_every", "must be >= 1")
        _require(self, self.save_every >= 1, "save_every", "must be >= 1")
        _require(self, self.sample_every >= 0, "sample_every", "must be >= 0 (0 = never)")
        _require(self, self.keep_last >= 1, "keep_last", "must be >= 1")
        _require(self, self.seed >= 0, "seed", "must be >= 0")


@dataclass(frozen=True)
class SampleConfig:
    """How ``difflab sample`` draws images from a trained run."""

    # a name of difflab.samplers.SAMPLERS
    sampler: Literal["ancestral", "ddim", "dpmpp-2m", "dpmpp-2m-sde", "euler", "heun"] = "ancestral"
    # network evaluations via respacing: K, or a respacing rule ("100", "ddim50", "10,10,3", GLIDE's upsampler
    # "fast27"; difflab.schedules.space_timesteps); null = all T steps
    steps: int | str | None = None
    # DDIM: 0 = deterministic, 1 = ancestral-like noise
    eta: float = 0.0
    # number of images to draw
    n: int = 64
    # images per network call
    batch: int = 64
    # clip the predicted x0 to [-1, 1] at each step; null = the sampler's default (on for ancestral, ddim,
    # euler, heun as in the OpenAI code; off for dpmpp-2m and dpmpp-2m-sde as in DPM-Solver++ and diffusers)
    clip_denoised: bool | None = None
    # classifier-free guidance weight w: (1+w)*eps_c - w*eps_u; 0 = off
    guidance_scale: float = 0.0
    # noisy classifier for classifier guidance: a classifier run folder or its .safetensors; null = none
    classifier: str | None = None
    # classifier guidance scale s: mu + s*Sigma*grad log p(y|x_t) (ADM Alg. 1/2); 0 = off
    classifier_scale: float = 0.0
    # run the network under bf16 autocast; the samplers' arithmetic stays float32. auto = on where bf16 is
    # native (CUDA with bf16, CPUs with AMX-BF16 / AVX512-BF16: 1.75x the images per second), off elsewhere
    bf16: bool | Literal["auto"] = "auto"
    # sample from this EMA (null = the first of train.ema_rates)
    ema_rate: float | None = None
    # a noise-augmented super-resolution stage: the level s of its low-res conditioning (0 = clean; CDM Sec. 4.2)
    aug_level: int = 0
    # seeds the sampling noise
    seed: int = 0
    # x_T ~ N(0, temperature^2 I): GLIDE's upsampler notebook draws its start at 0.997 (upsample_temp); 1 = the model
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _normalise(self)
        _require(self, not isinstance(self.steps, int) or self.steps >= 1, "steps", "must be null or >= 1")
        if isinstance(self.steps, str):
            from difflab.schedules import space_timesteps

            try:  # the rule's form (its fit to diffusion.steps is checked where both are known)
                space_timesteps(10_000, self.steps)
            except ValueError as e:
                raise ConfigError(("steps",), str(e)) from None
        _require(self, 0 < self.temperature <= 2 and self.temperature == self.temperature, "temperature",
                 "must be in (0, 2]")
        _require(self, self.eta >= 0, "eta", "must be >= 0")
        _require(self, self.n >= 1, "n", "must be >= 1")
        _require(self, self.batch >= 1, "batch", "must be >= 1")
        _require(self, self.guidance_scale >= 0, "guidance_scale", "must be >= 0")
        _require(self, self.classifier_scale >= 0, "classifier_scale", "must be >= 0")
        _require(self, self.seed >= 0, "seed", "must be >= 0")
        _require(self, self.aug_level >= 0, "aug_level", "must be >= 0")


@dataclass(frozen=True)
class Config:
    """A whole run: network, diffusion, data, training and sampling."""

    # the network (difflab.nn.unet.UNetConfig; with a `text` section GLIDE's difflab.nn.text_unet.TextUNetConfig;
    # unCLIP's prior difflab.nn.prior.PriorConfig (xf_layers, xf_heads, ...) or decoder
    # difflab.nn.clip_unet.DecoderUNetConfig (clip_dim, xf_width, ...), which read the CLIP of the `clip` section);
    # YAML may say {preset: NAME, ...overrides}
    model: UNetConfig | TextUNetConfig | PriorConfig | DecoderUNetConfig
    # noise process and loss
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    # training data
    data: DataConfig = field(default_factory=DataConfig)
    # optimisation and checkpoints
    train: TrainConfig = field(default_factory=TrainConfig)
    # sampling defaults
    sample: SampleConfig = field(default_factory=SampleConfig)
    # a super-resolution stage's conditioning augmentation (CDM; docs/cascade.md)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # a text-conditional network's tokenizer (GLIDE; docs/text.md)
    text: TextConfig = field(default_factory=TextConfig)
    # the CLIP an unCLIP prior or decoder reads its embeddings from (docs/unclip.md)
    clip: UnCLIPEmbeddingConfig = field(default_factory=lambda: UnCLIPEmbeddingConfig())

    def __post_init__(self) -> None:
        if isinstance(self.model, Mapping):
            object.__setattr__(self, "model", resolve_model_section(self.model))
        _normalise(self)
        if (self.is_text or self.unclip_kind) and not self.data.captions and self.data.source != "none":
            what = "an unCLIP prior / decoder" if self.unclip_kind else "a text-conditional model (model.text)"
            raise ConfigError(("data", "captions"), f"{what} trains on captions: set data.captions: true")
        if self.unclip_kind and self.clip.run is None:
            raise ConfigError(("clip", "run"), f"an unCLIP {self.unclip_kind} reads CLIP embeddings: name the CLIP "
                                               "(a task: clip run folder or a converted CLIP folder)")
        if self.clip.run is not None and not self.unclip_kind:
            raise ConfigError(("clip", "run"), "only an unCLIP prior (model: PriorConfig fields) or decoder "
                                               "(DecoderUNetConfig fields) reads a CLIP; set clip.run: null")
        if self.diffusion.p_uncond > 0 and not (self.data.class_cond or self.is_text or self.unclip_kind):
            raise ConfigError(("diffusion", "p_uncond"), "label dropout needs data.class_cond: true (or caption "
                                                         "dropout a text-conditional model.text)")
        if isinstance(self.sample.steps, int) and self.sample.steps > self.diffusion.steps:
            raise ConfigError(
                ("sample", "steps"), f"must be <= diffusion.steps={self.diffusion.steps}",
            )
        if isinstance(self.sample.steps, str):
            from difflab.schedules import space_timesteps

            try:
                space_timesteps(self.diffusion.steps, self.sample.steps)
            except ValueError as e:
                raise ConfigError(("sample", "steps"), f"{e} (diffusion.steps={self.diffusion.steps})") from None
        self._check_model_fits()
        rate = self.sample.ema_rate
        if rate is not None and rate not in self.train.ema_rates:
            rates = list(self.train.ema_rates)
            raise ConfigError(("sample", "ema_rate"), f"must be one of train.ema_rates {rates}; got {rate}")


    @property
    def is_text(self) -> bool:
        """A text-conditional network (GLIDE's TextUNet: ``model.text``)."""
        return getattr(self.model, "text", None) is not None

    @property
    def unclip_kind(self) -> str | None:
        """``"prior"`` or ``"decoder"`` for unCLIP's networks (they read CLIP features), else None."""
        from difflab.nn.clip_unet import DecoderUNetConfig
        from difflab.nn.prior import PriorConfig

        if isinstance(self.model, PriorConfig):
            return "prior"
        return "decoder" if isinstance(self.model, DecoderUNetConfig) else None

    def _check_model_fits(self) -> None:
        """Cross-checks between the network and the other sections (for networks with these fields)."""
        m = self.model
        learn_sigma = getattr(m, "learn_sigma", None)
        if learn_sigma is not None and learn_sigma != (self.diffusion.var_type == "learned_range"):
            raise ConfigError(
                ("model", "learn_sigma"),
                f"must be {not learn_sigma} for diffusion.var_type '{self.diffusion.var_type}' "
                "(a learned variance needs the network's second half of output channels)",
            )
        if hasattr(m, "num_classes") and (m.num_classes is not None) != self.data.class_cond:
            raise ConfigError(
                ("model", "num_classes"),
                f"is {m.num_classes} but data.class_cond is {str(self.data.class_cond).lower()}; "
                "a class-conditional network needs labelled data and vice versa",
            )
        if self.diffusion.p_uncond > 0 and not (self.is_text or self.unclip_kind) \
                and getattr(m, "class_null", True) is False:
            raise ConfigError(("model", "class_null"), "must be true when diffusion.p_uncond > 0 (the dropped label)")
        in_ch = getattr(m, "in_channels", None)
        if in_ch is not None and self.data.channels is not None and in_ch != self.data.channels:
            raise ConfigError(("data", "channels"), f"is {self.data.channels} but model.in_channels is {in_ch}")
        size = getattr(m, "image_size", None)
        if size is not None and size != self.data.image_size:
            raise ConfigError(("data", "image_size"), f"is {self.data.image_size} but model.image_size is {size}")
        self._check_super_resolution()

    def _check_super_resolution(self) -> None:
        """A super-resolution stage (model.low_res_channels > 0) trains on low-res / high-res pairs."""
        m, a = self.model, self.augment
        low = getattr(m, "low_res_channels", 0)
        if low and self.data.low_res_size is None and self.data.source != "none":
            raise ConfigError(("data", "low_res_size"), f"must be set: model.low_res_channels is {low} (a super-"
                                                        "resolution stage trains on low-res / high-res pairs)")
        if not low and self.data.low_res_size is not None:
            raise ConfigError(("model", "low_res_channels"), "must be > 0 when data.low_res_size is set")
        if low and low != m.in_channels:
            raise ConfigError(("model", "low_res_channels"), f"must equal model.in_channels ({m.in_channels})")
        if a.kind != "none" and not low:
            raise ConfigError(("augment", "kind"), f"is {a.kind!r} but the model takes no low-res input "
                                                  "(model.low_res_channels: 0)")
        if a.kind == "noise" and getattr(m, "cond_dim", None) is None:
            raise ConfigError(("model", "cond_dim"), "must be set for augment.kind 'noise': the level s is fed "
                                                    "as a second timestep embedding of that width")
        level = self.sample.aug_level
        if level and a.kind != "noise":
            raise ConfigError(("sample", "aug_level"), "needs augment.kind 'noise' (the level the model was told)")
        if level > a.steps:
            raise ConfigError(("sample", "aug_level"), f"must be in [0, augment.steps={a.steps}]")


@dataclass(frozen=True)
class ClassifierRunConfig:
    """A noisy-classifier run (ADM Sec. 4): the network, the diffusion schedule it is trained on, data and
    optimiser. A YAML file whose top level says ``task: classifier`` is one; it trains on the same loop
    as a diffusion model (:class:`difflab.train.tasks.classifier.ClassifierTask`)."""

    # the network (difflab.nn.classifier.ClassifierConfig); YAML may say {preset: NAME, ...overrides}
    classifier: ClassifierConfig
    # marks the file as a classifier config (a diffusion config has no 'task')
    task: Literal["classifier"] = "classifier"
    # the noise process of the diffusion model to guide (steps and schedule are used)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    # labelled training data; the held-out split (mnist5k / digits) scores accuracy per noise level
    data: DataConfig = field(default_factory=DataConfig)
    # the loop's settings (optimiser, batch, EMAs, checkpoints, DDP / FSDP, bf16)
    train: TrainConfig = field(default_factory=TrainConfig)
    # the weights written to classifier.safetensors at the end: null = the trained weights (guided-diffusion's
    # classifiers keep no average), or one of train.ema_rates
    export_ema: float | None = None

    def __post_init__(self) -> None:
        _normalise(self)
        c, d = self.classifier, self.data
        if c.image_size != d.image_size:
            raise ConfigError(("data", "image_size"), f"is {d.image_size} but classifier.image_size is {c.image_size}")
        if d.channels is not None and d.channels != c.in_channels:
            raise ConfigError(("data", "channels"), f"is {d.channels} but classifier.in_channels is {c.in_channels}")
        rate = self.export_ema
        if rate is not None and rate not in self.train.ema_rates:
            raise ConfigError(("export_ema",), f"must be null or one of train.ema_rates {list(self.train.ema_rates)}; "
                                               f"got {rate}")

    @property
    def schedule_name(self) -> str:
        """``"cosine/1000"``: the schedule's name in the classifier's info and in messages."""
        return f"{self.diffusion.schedule}/{self.diffusion.steps}"


@dataclass(frozen=True)
class SceneFeaturesRunConfig:
    """The scene evaluator's feature network (:class:`difflab.eval.scenes.SceneFeatureNet`) trained on captioned
    MNIST scenes to read each scene's layout and both objects' digit and colour. A YAML file whose top level says
    ``task: scene_features`` is one; it trains on the one loop
    (:class:`difflab.train.tasks.scene_features.SceneFeaturesTask`, docs/scenes.md)."""

    # the training scenes: source scenes at image_size 32 (each example is its 32x32 render or its 16x16 one)
    data: DataConfig
    # marks the file as a scene-feature config (a diffusion config has no 'task')
    task: Literal["scene_features"] = "scene_features"
    # the loop's settings (optimiser, lr schedule, batch, checkpoints)
    train: TrainConfig = field(default_factory=TrainConfig)
    # probability that an example is its 16x16 render upsampled to 32x32 (as SceneFeatureNet does) instead of its
    # 32x32 render
    p_low_res: float = 0.5
    # probability that an example gets Gaussian pixel noise (sigma in [-1, 1] units; then clipped to [-1, 1])
    p_noise: float = 0.5
    # the noise's sigma ~ U(0, max_noise_sigma), per example
    max_noise_sigma: float = 0.1
    # scored at the end: this many test scenes (the 1,000 reference scenes first, then test scenes of seed 1) at
    # 64 / 32 / 16, and the first min(eval_scenes, num_scenes) training scenes at 32 / 16
    eval_scenes: int = 5000

    def __post_init__(self) -> None:
        _normalise(self)
        d = self.data
        if d.source != "scenes":
            raise ConfigError(("data", "source"), f"must be 'scenes' for task scene_features; got {d.source!r}")
        if d.image_size != 32:
            raise ConfigError(("data", "image_size"), "must be 32 for task scene_features (the network's working "
                                                      f"size; the 16x16 renders come with it); got {d.image_size}")
        if d.low_res_size is not None:
            raise ConfigError(("data", "low_res_size"), "must be null for task scene_features (the 16x16 renders "
                                                        f"are the scenes' own); got {d.low_res_size}")
        _require(self, 0 <= self.p_low_res <= 1, "p_low_res", "must be in [0, 1]")
        _require(self, 0 <= self.p_noise <= 1, "p_noise", "must be in [0, 1]")
        _require(self, self.max_noise_sigma >= 0, "max_noise_sigma", "must be >= 0")
        _require(self, self.eval_scenes >= 1, "eval_scenes", "must be >= 1")


def _check_contrastive_run(self: Any, learner: str, size: tuple[str, int]) -> None:
    """The checks a contrastive CLIP run (``task: noised_clip`` or ``clip``) shares: captioned RGB data of the
    CLIP's size (``size`` = the clip field's name and value), no low-res pairs, an exported EMA that is trained, at
    least 2 held-out examples. ``learner`` names the network in the messages."""
    d = self.data
    if not d.captions:
        raise ConfigError(("data", "captions"), f"must be true: {learner} learns from image-caption pairs")
    if d.image_size != size[1]:
        raise ConfigError(("data", "image_size"), f"is {d.image_size} but clip.{size[0]} is {size[1]}")
    if d.channels not in (None, 3):
        raise ConfigError(("data", "channels"), f"must be 3 or null ({learner} reads RGB); got {d.channels}")
    if d.low_res_size is not None:
        raise ConfigError(("data", "low_res_size"), f"must be null for task {self.task}")
    rate = self.export_ema
    if rate is not None and rate not in self.train.ema_rates:
        raise ConfigError(("export_ema",), f"must be null or one of train.ema_rates {list(self.train.ema_rates)}; "
                                           f"got {rate}")
    _require(self, self.eval_examples >= 2, "eval_examples", "must be >= 2")


@dataclass(frozen=True)
class NoisedCLIPRunConfig:
    """GLIDE's noised CLIP (:class:`difflab.nn.clip.NoisedCLIP`) trained contrastively on noised captioned images
    x_t = q_sample(x_0, t), t uniform over the diffusion's steps, for CLIP guidance. A YAML file whose top level says
    ``task: noised_clip`` is one; it trains on the one loop (:class:`difflab.train.tasks.noised_clip.NoisedCLIPTask`,
    docs/clip.md)."""

    # the network (difflab.nn.clip.NoisedCLIPConfig); its n_timesteps and beta_schedule are the diffusion whose x_t
    # it learns to read (that of the model it will guide); YAML may say {preset: glide/clip, ...overrides}
    clip: NoisedCLIPConfig
    # marks the file as a noised-CLIP config (a diffusion config has no 'task')
    task: Literal["noised_clip"] = "noised_clip"
    # captioned training images (data.captions: true), image_size = clip.image_size, 3 channels
    data: DataConfig = field(default_factory=lambda: DataConfig(source="scenes", captions=True))
    # the captions' tokenizer (miniature scenes vocabulary, or CLIP's BPE: tokenizer clip, vocab PATH)
    text: TextConfig = field(default_factory=TextConfig)
    # the loop's settings (optimiser, batch, EMAs, checkpoints); the contrastive negatives are the other examples
    # of each rank's (micro-)batch
    train: TrainConfig = field(default_factory=TrainConfig)
    # the weights written to noised_clip.safetensors at the end: null = the trained weights, or one of
    # train.ema_rates
    export_ema: float | None = None
    # scored at the end: image -> caption retrieval among this many held-out examples, per band of t
    eval_examples: int = 256

    def __post_init__(self) -> None:
        _normalise(self)
        c = self.clip
        if c.encoders != "both":
            raise ConfigError(("clip", "encoders"), f"must be 'both' to train a noised CLIP; got {c.encoders!r}")
        _check_contrastive_run(self, "the noised CLIP", ("image_size", c.image_size))


@dataclass(frozen=True)
class CLIPRunConfig:
    """A CLIP (:class:`difflab.nn.openai_clip.CLIP`, OpenAI's layout) trained contrastively on clean captioned
    images: the CLIP unCLIP's prior and decoder read (unCLIP Sec. 2; CLIP, Radford et al. 2021). A YAML file whose top
    level says ``task: clip`` is one; it trains on the one loop (:class:`difflab.train.tasks.clip.CLIPTask`,
    docs/unclip.md)."""

    # the network (difflab.nn.openai_clip.CLIPConfig): image_resolution = data.image_size; the prior and decoder
    # read embed_dim-wide embeddings and the text transformer's transformer_width-wide token sequence
    clip: CLIPConfig
    # marks the file as a CLIP config
    task: Literal["clip"] = "clip"
    # captioned training images (data.captions: true), 3 channels
    data: DataConfig = field(default_factory=lambda: DataConfig(source="scenes", captions=True))
    # the captions' tokenizer (the miniature scenes vocabulary, or CLIP's BPE: tokenizer clip, vocab PATH)
    text: TextConfig = field(default_factory=TextConfig)
    # the loop's settings; the contrastive negatives are the other examples of each rank's (micro-)batch
    train: TrainConfig = field(default_factory=TrainConfig)
    # the weights written to clip.safetensors at the end: null = the trained weights, or one of train.ema_rates
    export_ema: float | None = None
    # scored every train.sample_every steps (retrieval.jsonl) and at the end (clip_accuracy.json): zero-shot
    # retrieval among this many held-out examples
    eval_examples: int = 256

    def __post_init__(self) -> None:
        _normalise(self)
        _check_contrastive_run(self, "CLIP", ("image_resolution", self.clip.image_resolution))


# ============================================================================ model presets


def _preset(name: str, path: tuple[str, ...]) -> Any:
    """The network config registered under ``name`` in :mod:`difflab.nn.presets`."""
    try:
        from difflab.nn.presets import PRESETS
    except ImportError as e:
        raise ConfigError((*path, "preset"), f"no presets available ({e})") from None
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError((*path, "preset"), f"unknown preset {name!r}; {hint}valid: {', '.join(PRESETS)}")
    return PRESETS[name]


def _from_preset(cls: type, section: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """``{preset: NAME, **overrides}`` -> preset NAME with the overrides applied (nested mappings
    merge key by key), validated as ``cls``."""
    section = dict(section)
    name = section.pop("preset")
    base = _preset(str(name), path)
    if not isinstance(base, cls):
        raise ConfigError((*path, "preset"), f"{name!r} is a {type(base).__name__}, not a {cls.__name__}")
    return from_dict(type(base), _deep_merge(to_dict(base), section), path=path)


def resolve_model_section(section: Mapping[str, Any]) -> Any:
    """The ``model`` section as a config: ``{preset: NAME, **overrides}`` or the explicit fields (a
    ``text`` field makes it GLIDE's :class:`~difflab.nn.text_unet.TextUNetConfig`)."""
    return _convert(_hints(Config)["model"], section, ("model",))  # the union picks the config by its keys


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


# ============================================================================ YAML in / out


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``KEY.PATH=VALUE`` strings to a raw config mapping (values parsed with ``yaml.safe_load``,
    so ``true``, ``3``, ``[0.9999, 0.999]``, ``null`` work). Returns a new mapping."""
    out = _deep_merge({}, data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError((), f"override {item!r} must look like section.key=value (e.g. train.lr=1e-4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(tuple(key.split(".")), f"cannot parse override value {raw!r} ({e})") from None
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(tuple(parts[: i + 1]), f"is a value, not a section; cannot set {key}")
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = value
    return out


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """A validated :class:`Config` from a raw mapping plus dotted overrides."""
    return from_dict(Config, apply_overrides(dict(data or {}), overrides))


# the config class of each `task:` a YAML file may name (a diffusion config names none)
TASK_CONFIGS: dict[str, type] = {"classifier": ClassifierRunConfig, "scene_features": SceneFeaturesRunConfig}
TASK_CONFIGS["noised_clip"] = NoisedCLIPRunConfig
TASK_CONFIGS["clip"] = CLIPRunConfig


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``overrides`` (``["train.lr=1e-4", ...]``) and validate it.

    A file whose top level says ``task: NAME`` is the config of another training task and comes back as
    that task's class (:data:`TASK_CONFIGS`: ``classifier`` a :class:`ClassifierRunConfig`, ``scene_features``
    a :class:`SceneFeaturesRunConfig`) instead.
    """
    path = Path(path)
    data = read_yaml(path)
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError((), f"{path}: expected a mapping of sections at the top level")
    try:
        if isinstance(data, Mapping) and "task" in data:
            task = data["task"]
            if not isinstance(task, str) or task not in TASK_CONFIGS:
                raise ConfigError(("task",), f"unknown task {task!r}; valid: {', '.join(TASK_CONFIGS)} "
                                             "(a diffusion config has no 'task')")
            return from_dict(TASK_CONFIGS[task], apply_overrides(dict(data), overrides))
        return config_from_dict(data or {}, overrides)
    except ConfigError as e:
        raise ConfigError(e.path, f"{e.problem} ({where_set(e.path, overrides, path)})") from None


def where_set(key: Sequence[str], overrides: Sequence[str], path: str | os.PathLike) -> str:
    """Where the value at dotted ``key`` came from: the ``--set`` override that names it (or a section
    above it), else the file ``path``."""
    for item in reversed(overrides):
        name = tuple(item.partition("=")[0].strip().split("."))
        if tuple(key[: len(name)]) == name or name[: len(key)] == tuple(key) and key:
            return f"from --set {item}"
    return f"in {path}"


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file; a missing file, non-UTF-8 bytes or bad YAML is a :class:`ConfigError` that names
    the file and, for bad YAML, the line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError((), f"config file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError((), f"{path}, line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file "
                              "as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError((), f"{path}{at}: not valid YAML ({what})") from None


def dump_config(cfg: Any) -> str:
    """YAML text of a config dataclass, every field explicit, in declaration order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML to ``path`` atomically (a crash never leaves a half-written file)."""
    from difflab.fileio import atomic_write_text

    atomic_write_text(path, dump_config(cfg))


def override(cfg: Any, overrides: Sequence[str]) -> Any:
    """A new config of ``cfg``'s type (a :class:`Config` or :class:`ClassifierRunConfig`): ``cfg`` with
    dotted ``overrides`` applied and everything re-validated."""
    try:
        return from_dict(type(cfg), apply_overrides(to_dict(cfg), overrides))
    except ConfigError as e:
        where = where_set(e.path, overrides, "")
        raise (ConfigError(e.path, f"{e.problem} ({where})") if where.startswith("from") else e) from None


#: what ``difflab train --resume RUN --set KEY=VALUE`` may change: how long the run goes on, how often it logs,
#: checkpoints and draws grids, how it computes (bf16, compile, decode threads) and every sampling default.
#: Every other key shaped the state in the checkpoint (the network, the process, the data, the optimiser, the
#: seeds), so changing it would silently make a different run: it is refused.
RESUME_CHANGEABLE = ("train.max_steps", "train.log_every", "train.save_every", "train.sample_every",
                     "train.keep_last", "train.bf16", "train.compile", "data.num_workers", "sample.")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def check_resume_changes(saved: Any, resumed: Any, overrides: Sequence[str]) -> None:
    """Refuse a resumed config that differs from the saved one outside :data:`RESUME_CHANGEABLE`."""
    old, new = _flat(to_dict(saved)), _flat(to_dict(resumed))
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key) and not key.startswith(RESUME_CHANGEABLE):
            allowed = ", ".join(k + ("*" if k.endswith(".") else "") for k in RESUME_CHANGEABLE)
            where = where_set(key.split("."), overrides, "the run")
            raise ConfigError(tuple(key.split(".")), f"cannot change on resume ({where}: {old.get(key)!r} -> "
                              f"{new.get(key)!r}); the checkpoint was trained with the saved value. Keys that may "
                              f"change on resume: {allowed}")
