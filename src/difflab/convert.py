"""Official OpenAI checkpoints (improved-diffusion, guided-diffusion) -> difflab.

Key mapping — a deliberate choice: difflab's ``UNet`` and ``Classifier`` name their submodules
exactly as the official ``UNetModel`` / ``SuperResModel`` / ``EncoderUNetModel`` do (``time_embed``,
``label_emb``, ``input_blocks.{i}.{j}``, ``middle_block``, ``output_blocks``, ``out``; inside blocks
``in_layers``, ``emb_layers``, ``out_layers``, ``skip_connection``, ``norm``, ``qkv``, ``proj_out``,
``op``, ``conv``, ``qkv_proj``, ``c_proj``, ``positional_embedding``) with the same
``nn.Sequential`` indices. So the official -> difflab key map is the identity for every released
U-Net, classifier and upsampler, and a user of the official code finds the same names here. The
hook ``KEY_RENAMES`` (official prefix -> difflab prefix) is where later families that differ
(GLIDE's ``transformer_proj`` -> ``cond_proj``, the text transformer) add their renames.

What is checked: every key present on both sides, every shape equal; the error lists missing keys,
unexpected keys, shape mismatches and the architecture flags the shapes point to (learn_sigma,
num_classes, super-resolution input, use_scale_shift_norm, resblock_updown, ...). Flags that shapes
cannot reveal (num_heads vs num_head_channels, the attention order) are checked against the official
flags when they are given (``flags=``).

CLIP (:func:`convert_clip`): OpenAI's ViT CLIPs and OpenCLIP's ViT models keep OpenAI's parameter names, which
``difflab.nn.openai_clip.CLIP`` uses too, so the key map is the identity; the config is read off the shapes as
openai/CLIP's ``build_model`` does, and the activation (not in the weights) is said by the caller.

Loading is safe: ``torch.load(..., weights_only=True)`` never unpickles code. The one exception to "a state dict or
safetensors" is OpenAI's released CLIP archives, which are TorchScript: see :func:`read_clip_state_dict`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from difflab.config import from_dict, save_config
from difflab.fileio import atomic_write_with, require_new_folder
from difflab.nn.classifier import ClassifierConfig
from difflab.nn.clip import NoisedCLIPConfig
from difflab.nn.clip_unet import DecoderUNetConfig
from difflab.nn.openai_clip import CLIPConfig
from difflab.nn.presets import build_network, config_from_official_flags, get_preset
from difflab.nn.prior import PriorConfig
from difflab.nn.progressive_sr import ProgressiveSRConfig
from difflab.nn.text_unet import TextUNetConfig
from difflab.nn.unet import UNetConfig
from difflab.safeload import load_weights_only

__all__ = [
    "KEY_RENAMES",
    "official_to_difflab_key",
    "map_official_state_dict",
    "check_state_dict",
    "check_flags",
    "load_official_state_dict",
    "convert_checkpoint",
    "save_converted",
    "load_converted",
    "converted_network_config",
    "OFFICIAL_DIFFUSION",
    "OFFICIAL_CLASSIFIER_DIFFUSION",
    "is_converted_folder",
    "converted_classifier",
    "converted_run_config",
    "glide_vocab_folder",
    "clip_vocab_file",
    "convert_noised_clip",
    "check_karlo_state_dict",
    "read_clip_state_dict",
    "clip_config_from_state_dict",
    "check_clip_state_dict",
    "convert_clip",
]

# Official key prefix -> difflab key prefix. improved-/guided-diffusion keys are difflab keys as they are;
# GLIDE's projection of the final text token (added to the time embedding) is difflab's generic cond_proj.
# GLIDE's text encoder keys (transformer.*, token_embedding, positional_embedding, padding_embedding,
# final_ln) are TextUNet's as they are (difflab.nn.text.TextEncoderMixin).
KEY_RENAMES: dict[str, str] = {"transformer_proj.": "cond_proj."}

_MAX_LISTED = 12

# The diffusion flags each released U-Net was trained with (the official READMEs; a .pt holds weights only):
# T, the beta schedule, and rescale_timesteps / rescale_learned_sigmas (improved-diffusion's defaults are on,
# guided-diffusion's off; the README of the class-conditional ImageNet-64 model turns both off). Every one of
# them predicts eps and learns the variance (learn_sigma).
_GUIDED = {"rescale_timesteps": False, "rescale_learned_sigmas": False}
_GUIDED_LINEAR = {"steps": 1000, "schedule": "linear", **_GUIDED}
_IMPROVED = {"steps": 4000, "schedule": "cosine", "rescale_timesteps": True, "rescale_learned_sigmas": True}
_GLIDE_BASE = {"steps": 1000, "schedule": "cosine", **_GUIDED, "p_uncond": 0.2}
_GLIDE_UP = {**_GUIDED_LINEAR, "low_res_ratio": 4}  # 64 -> 256: takes image_size / 4
_FAST27 = {"steps": "fast27", "temperature": 0.997}
OFFICIAL_DIFFUSION: dict[str, dict[str, Any]] = {
    "guided-diffusion/64x64_diffusion": {"steps": 1000, "schedule": "cosine", **_GUIDED},
    "guided-diffusion/128x128_diffusion": _GUIDED_LINEAR,
    "guided-diffusion/256x256_diffusion": _GUIDED_LINEAR,
    "guided-diffusion/256x256_diffusion_uncond": _GUIDED_LINEAR,
    "guided-diffusion/512x512_diffusion": _GUIDED_LINEAR,
    "guided-diffusion/lsun_bedroom": _GUIDED_LINEAR,
    "guided-diffusion/64_256_upsampler": _GUIDED_LINEAR,
    "guided-diffusion/128_512_upsampler": _GUIDED_LINEAR,
    "improved-diffusion/cifar10_uncond_50M_500K": _IMPROVED,
    "improved-diffusion/imagenet64_uncond_100M_1500K": _IMPROVED,
    "improved-diffusion/imagenet64_cond_270M_250K": {**_IMPROVED, "rescale_timesteps": False,
                                                     "rescale_learned_sigmas": False},
    # glide-text2im's model_creation.py: T = 1000, squaredcos_cap_v2 for the base models, linear for the
    # upsamplers; the network sees the original step (SpacedDiffusion) and no rescaling. The base was fine-tuned
    # with 20% of its captions dropped (GLIDE Sec. 4), so it guides without a classifier. "sample" is what the
    # notebooks draw with (text2im.ipynb, inpaint.ipynb): the base p_sample_loop over 100 respaced steps at
    # guidance scale 3 (5 inpainting; GLIDE's s = 1 + w, so difflab's w = 2 / 4, on the eps channels), the
    # upsampler over "fast27" from x_T * upsample_temp 0.997 with the base's samples quantised to uint8 levels,
    # by ddim_sample_loop (eta 0) in text2im and p_sample_loop in inpaint.
    "glide/base": {**_GLIDE_BASE, "sample": {"sampler": "ancestral", "steps": 100, "guidance_scale": 2.0}},
    "glide/base-inpaint": {**_GLIDE_BASE, "sample": {"sampler": "ancestral", "steps": 100, "guidance_scale": 4.0}},
    "glide/upsample": {**_GLIDE_UP, "sample": {"sampler": "ddim", "eta": 0.0, **_FAST27}},
    "glide/upsample-inpaint": {**_GLIDE_UP, "sample": {"sampler": "ancestral", **_FAST27}},
}
# The tokenizer files a converted GLIDE folder keeps (copied from the user's glide-text2im at conversion)
GLIDE_VOCAB_FILES = ("encoder.json", "vocab.bpe")
# The released noisy classifiers guide the diffusion model of the same size (guided-diffusion's README pairs
# each classifier with it), so they see that model's noise levels: T = 1000, cosine at 64x64, linear otherwise.
OFFICIAL_CLASSIFIER_DIFFUSION: dict[str, dict[str, Any]] = {
    "guided-diffusion/64x64_classifier": {"steps": 1000, "schedule": "cosine"},
    "guided-diffusion/128x128_classifier": {"steps": 1000, "schedule": "linear"},
    "guided-diffusion/256x256_classifier": {"steps": 1000, "schedule": "linear"},
    "guided-diffusion/512x512_classifier": {"steps": 1000, "schedule": "linear"},
}


def official_to_difflab_key(key: str) -> str:
    """The difflab state-dict key of an official key (identity unless a ``KEY_RENAMES`` prefix applies)."""
    for old, new in KEY_RENAMES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def map_official_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every key of an official state dict to its difflab key (values untouched)."""
    return {official_to_difflab_key(k): v for k, v in sd.items()}


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}): {shown}{more}"


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    return tuple(sd[key].shape) if key in sd else None


def _count(sd: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return sum(1 for k in sd if rx.fullmatch(k))


def _hints(model_sd: Mapping[str, Any], ckpt: Mapping[str, Any]) -> list[str]:
    """Architecture flags evident from the shapes and key layout of the two state dicts."""
    hints = []
    mo, co = _shape(model_sd, "out.2.weight"), _shape(ckpt, "out.2.weight")
    if mo and co and mo[0] != co[0]:
        hints.append(f"output channels: checkpoint {co[0]}, model {mo[0]} (learn_sigma / out_channels)")
    mo, co = _shape(model_sd, "out.2.c_proj.weight"), _shape(ckpt, "out.2.c_proj.weight")
    if mo and co and mo[0] != co[0]:
        hints.append(f"classifier outputs: checkpoint {co[0]}, model {mo[0]} (out_channels)")
    ml, cl = _shape(model_sd, "label_emb.weight"), _shape(ckpt, "label_emb.weight")
    if cl and not ml:
        hints.append(f"checkpoint is class-conditional ({cl[0]} labels) but the model has num_classes=None")
    elif ml and not cl:
        hints.append(f"model is class-conditional ({ml[0]} labels) but the checkpoint is unconditional")
    elif ml and cl and ml[0] != cl[0]:
        hints.append(f"label_emb rows: checkpoint {cl[0]}, model {ml[0]} (num_classes / class_null)")
    mi, ci = _shape(model_sd, "input_blocks.0.0.weight"), _shape(ckpt, "input_blocks.0.0.weight")
    if mi and ci and mi[1] != ci[1]:
        hints.append(f"input channels: checkpoint {ci[1]}, model {mi[1]} "
                     "(in_channels / low_res_channels for super-resolution / inpaint)")
    if mi and ci and mi[0] != ci[0]:
        hints.append(f"first-level width: checkpoint {ci[0]}, model {mi[0]} (model_channels / channel_mult)")
    mt, ct = _shape(model_sd, "time_embed.0.weight"), _shape(ckpt, "time_embed.0.weight")
    if mt and ct and mt != ct:
        hints.append(f"time_embed: checkpoint {list(ct)}, model {list(mt)} (model_channels)")
    me, ce = _shape(model_sd, "middle_block.0.emb_layers.1.weight"), _shape(ckpt, "middle_block.0.emb_layers.1.weight")
    mm, cm = _shape(model_sd, "middle_block.0.out_layers.3.weight"), _shape(ckpt, "middle_block.0.out_layers.3.weight")
    if me and ce and mm and cm and (me[0] // mm[0]) != (ce[0] // cm[0]):
        hints.append(f"use_scale_shift_norm: checkpoint {ce[0] // cm[0] == 2}, model {me[0] // mm[0] == 2}")
    for side, sd, other_side, other in (("checkpoint", ckpt, "model", model_sd),
                                        ("model", model_sd, "checkpoint", ckpt)):
        ops = {k.rsplit(".op.", 1)[0] for k in sd if ".op." in k}
        res = {k for k in ops if any(o.startswith(k + ".in_layers") for o in other)}
        if res:
            hints.append(f"resblock_updown: the {side} has plain Downsample layers where the {other_side} has "
                         f"residual up/down blocks ({sorted(res)[0]}, ...)")
    ma, ca = _count(model_sd, r".*\.qkv\.weight"), _count(ckpt, r".*\.qkv\.weight")
    if ma != ca:
        hints.append(f"attention layers: checkpoint {ca}, model {ma} (attention_resolutions / num_res_blocks)")
    mb = len({k.split(".")[1] for k in model_sd if k.startswith("input_blocks.")})
    cb = len({k.split(".")[1] for k in ckpt if k.startswith("input_blocks.")})
    if mb != cb and cb:
        hints.append(f"input blocks: checkpoint {cb}, model {mb} (num_res_blocks / channel_mult levels)")
    mk, ck = _count(model_sd, r".*encoder_kv\.weight"), _count(ckpt, r".*encoder_kv\.weight")
    if mk != ck:
        hints.append(f"encoder_kv layers: checkpoint {ck}, model {mk} (encoder_channels)")
    return hints


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an official state dict onto ``model``'s keys and check every key and shape.

    Works on a model built on the ``meta`` device (nothing is allocated or copied).

    Returns:
        the state dict under difflab keys.
    Raises:
        ValueError listing missing keys, unexpected keys, shape mismatches and the architecture
        flags they point to.
    """
    mapped = map_official_state_dict(sd)
    bad_values = [k for k, v in mapped.items() if not isinstance(v, torch.Tensor)]
    if bad_values:
        raise ValueError(_listing("state dict values that are not tensors", bad_values))
    model_sd = model.state_dict()
    missing = [k for k in model_sd if k not in mapped]
    unexpected = [k for k in mapped if k not in model_sd]
    shapes = [
        f"{k} checkpoint {list(mapped[k].shape)} vs model {list(model_sd[k].shape)}"
        for k in model_sd if k in mapped and tuple(mapped[k].shape) != tuple(model_sd[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = ["checkpoint does not fit the model"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if shapes:
            parts.append(_listing("shape mismatches", shapes))
        hints = _hints(model_sd, mapped)
        if hints:
            parts.append("architecture: " + "; ".join(hints))
        raise ValueError("; ".join(parts))
    return mapped


def check_flags(config: UNetConfig | ClassifierConfig, flags: Mapping[str, Any], family: str) -> None:
    """Compare ``config`` with the config the official ``flags`` describe; ValueError lists differences.

    Catches what shapes cannot (num_heads vs num_head_channels, use_new_attention_order, dropout).
    ``use_checkpoint`` is ignored (it changes memory, not the function).
    """
    expected = config_from_official_flags(dict(flags), family)
    if type(expected) is not type(config):
        raise ValueError(f"flags describe a {type(expected).__name__}, the model is a {type(config).__name__}")
    diffs = [
        f"{f.name}: flags {getattr(expected, f.name)!r}, model {getattr(config, f.name)!r}"
        for f in dataclasses.fields(config)
        if f.name != "use_checkpoint" and getattr(expected, f.name) != getattr(config, f.name)
    ]
    if diffs:
        raise ValueError("model config differs from the official flags: " + "; ".join(diffs))


def load_official_state_dict(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    flags: Mapping[str, Any] | None = None,
    family: str | None = None,
) -> nn.Module:
    """Load an official improved-/guided-diffusion state dict into a difflab ``UNet`` / ``Classifier``.

    Args:
        model: the difflab network (a ``meta``-device model is loaded with ``assign=True``).
        sd: the official state dict (e.g. ``torch.load(path, map_location="cpu", weights_only=True)``).
        flags, family: optionally the official flags and family (see ``config_from_official_flags``)
            to also check the flags that shapes do not reveal.
    Returns:
        ``model``, with the weights loaded.
    Raises:
        ValueError naming every missing / unexpected key, shape mismatch or flag difference.
    """
    if flags is not None:
        if family is None:
            raise ValueError("family is required with flags; valid: improved-diffusion, guided-diffusion, "
                             "guided-diffusion-classifier, guided-diffusion-sr, glide")
        check_flags(model.config, flags, family)
    mapped = check_state_dict(model, sd)
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(mapped, strict=True, assign=on_meta)
    return model


def save_converted(
    sd: Mapping[str, torch.Tensor],
    config: UNetConfig | ClassifierConfig,
    out_dir: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a difflab checkpoint folder: ``model.safetensors`` + ``config.yaml`` (atomically)."""
    out = require_new_folder(out_dir, "--out")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in sd.items()}
    atomic_write_with(out / "model.safetensors", lambda p: save_file(tensors, str(p), metadata=metadata))
    save_config(config, out / "config.yaml")  # dataclasses field by field, written atomically
    return out


def _installed_glide_tokenizer(missing: str) -> Path:
    """The ``tokenizer`` folder of an installed ``glide_text2im`` (its BPE files); ValueError ``missing`` if none."""
    import importlib.util

    spec = importlib.util.find_spec("glide_text2im")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(missing)
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer"


def glide_vocab_folder(vocab: str | os.PathLike | None) -> Path:
    """The folder with GLIDE's GPT-2 BPE files (``encoder.json`` and ``vocab.bpe``, either gzipped): ``vocab``,
    or the ``tokenizer`` folder of an installed ``glide_text2im``. Checked by loading it (50,257 ids)."""
    from difflab.text.gpt2_bpe import GPT2Tokenizer

    if vocab is None:
        vocab = _installed_glide_tokenizer("a GLIDE text U-Net needs its tokenizer: --vocab FOLDER (glide-text2im's "
                                           "glide_text2im/tokenizer, holding encoder.json.gz and vocab.bpe.gz)")
    folder = Path(vocab)
    if not folder.is_dir():
        raise FileNotFoundError(f"--vocab: not a folder: {folder}")
    n = GPT2Tokenizer(folder).n_vocab
    if n != 50257:
        raise ValueError(f"--vocab {folder}: a GPT-2 BPE of {n} ids; GLIDE's has 50,257")
    return folder


def _copy_vocab(folder: Path, out: Path) -> None:
    """GLIDE's tokenizer files into ``out/tokenizer`` (gzipped or not, as found), each written atomically."""
    dest = out / "tokenizer"
    dest.mkdir()
    for name in GLIDE_VOCAB_FILES:
        src = next(p for p in (folder / name, folder / (name + ".gz")) if p.is_file())
        data = src.read_bytes()
        atomic_write_with(dest / src.name, lambda p, data=data: p.write_bytes(data))


def convert_checkpoint(
    pt_path: str | os.PathLike,
    preset_or_config: str | UNetConfig | ClassifierConfig,
    out_dir: str | os.PathLike,
    vocab: str | os.PathLike | None = None,
) -> Path:
    """Convert an official ``.pt`` state dict into a difflab checkpoint folder.

    Args:
        pt_path: the official checkpoint (a plain state dict saved with ``torch.save``; Karlo's ``.ckpt``, presets
            ``karlo/*``: ``{"state_dict": ...}``, see :func:`check_karlo_state_dict`); for GLIDE's noised CLIP
            (preset ``glide/clip``) the two released files, see :func:`convert_noised_clip`.
        preset_or_config: a preset name of ``difflab.nn.presets`` or a config.
        out_dir: the folder to write ``model.safetensors`` and ``config.yaml`` into.
        vocab: a GLIDE text U-Net's tokenizer folder (:func:`glide_vocab_folder`; default: the installed
            glide-text2im's), copied into ``out_dir/tokenizer``; for the noised CLIP, CLIP's BPE file
            (:func:`clip_vocab_file`).
    Returns:
        ``out_dir`` as a Path.
    Raises:
        FileNotFoundError if ``pt_path`` does not exist; ValueError if it is not a state dict or does
        not fit the config (listing what did not match).
    """
    config = get_preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    if isinstance(config, NoisedCLIPConfig):  # GLIDE's noised CLIP: two released files, one folder
        return convert_noised_clip(pt_path, out_dir, vocab=vocab, config=config,
                                   preset=preset_or_config if isinstance(preset_or_config, str) else None)
    if not isinstance(pt_path, (str, os.PathLike)):
        paths = list(pt_path)
        if len(paths) != 1:
            raise ValueError(f"one checkpoint file converts into one network; got {len(paths)} files")
        pt_path = paths[0]
    path = Path(pt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    require_new_folder(out_dir, "--out")  # before minutes of reading a large checkpoint
    text = isinstance(config, TextUNetConfig)
    if vocab is not None and not text:
        raise ValueError("--vocab: only for a GLIDE text U-Net (presets glide/...)")
    # a released GLIDE preset needs its tokenizer to sample; a network converted from a config takes one if given
    preset = isinstance(preset_or_config, str)
    vocab_folder = glide_vocab_folder(vocab) if text and (preset or vocab is not None) else None
    sd = load_weights_only(path, what="official checkpoint")
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict (a mapping of key -> tensor)")
    with torch.device("meta"):
        model = build_network(config)
    if isinstance(config, _KARLO_CONFIGS):  # a Karlo .ckpt: {"state_dict": ...} under "model."
        mapped = check_karlo_state_dict(model, sd, path)
    else:
        mapped = check_state_dict(model, sd)
    meta = {"source": path.name, "format": "pt"}
    if isinstance(preset_or_config, str):
        meta["preset"] = preset_or_config
    out = save_converted(mapped, config, out_dir, metadata=meta)
    if vocab_folder is not None:
        _copy_vocab(vocab_folder, out)
    return out


# Karlo's networks (kakaobrain/karlo): each released .ckpt holds {"state_dict": ...}, the prior and the decoder under
# "model." (PriorDiffusionModel.model, Text2ImProgressiveModel.model); the upsampler's two U-Nets under
# "model_first_steps." / "model_last_step.", which are ProgressiveSR's own names. A key that tells each file apart:
_KARLO_CONFIGS = (PriorConfig, DecoderUNetConfig, ProgressiveSRConfig)
_KARLO_FILES = {"model.prd_emb": ("prior", "karlo/prior"), "model.clip_tok_proj.weight": ("decoder", "karlo/decoder"),
                "model_first_steps.out.2.weight": ("64 -> 256 upsampler", "karlo/sr-64-256")}


def check_karlo_state_dict(model: nn.Module, ckpt: Any,
                           path: str | os.PathLike = "checkpoint") -> dict[str, torch.Tensor]:
    """:func:`check_state_dict` for a Karlo ``.ckpt`` and one of difflab's Karlo networks (``PriorTransformer``,
    ``DecoderUNet``, ``ProgressiveSR``): ``ckpt["state_dict"]`` (or ``ckpt`` itself, a bare state dict), with the
    ``model.`` prefix taken off for the prior and the decoder, checked key for key and shape for shape.

    Returns:
        the state dict under difflab keys (``model.load_state_dict(..., strict=True)`` takes it).
    Raises:
        ValueError when ``ckpt`` is no state dict or does not fit ``model`` (one line: the missing and unexpected
        keys, and the preset that fits when the file is another Karlo network's).
    """
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else ckpt
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a Karlo checkpoint (a mapping with a state_dict)")
    config = getattr(model, "config", None)
    if not isinstance(config, _KARLO_CONFIGS):
        raise ValueError(f"{type(model).__name__} is not one of Karlo's networks (PriorTransformer, DecoderUNet, "
                         "ProgressiveSR)")
    mapped = dict(sd) if isinstance(config, ProgressiveSRConfig) else {k.removeprefix("model."): v
                                                                       for k, v in sd.items()}
    try:
        return check_state_dict(model, mapped)
    except ValueError as e:
        wanted = {PriorConfig: "prior", DecoderUNetConfig: "decoder"}.get(type(config), "64 -> 256 upsampler")
        held = next((found for key, found in _KARLO_FILES.items() if key in sd), None)
        if held is None or held[0] == wanted:
            raise
        raise ValueError(f"{e}; {path} is Karlo's {held[0]} checkpoint, not the {wanted}: --preset {held[1]}") from None


# GLIDE's noised CLIP: the state-dict key that tells each released file's tower, and CLIP's BPE vocabulary file
_CLIP_TOWERS = {"blocks.input.w_t": "image", "blocks.input.w_voc": "text"}
CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt"


def clip_vocab_file(vocab: str | os.PathLike | None) -> Path:
    """CLIP's BPE file (``bpe_simple_vocab_16e6.txt`` or ``.gz``): ``vocab`` (the file or its folder), or the one
    an installed ``glide_text2im`` ships in ``glide_text2im/tokenizer``. Checked by loading it (49,408 ids)."""
    from difflab.text import CLIPTokenizer

    if vocab is None:
        vocab = _installed_glide_tokenizer("GLIDE's noised CLIP needs CLIP's tokenizer: --vocab FILE "
                                           "(bpe_simple_vocab_16e6.txt.gz, in glide-text2im's glide_text2im/tokenizer "
                                           "or openai/CLIP's clip/)")
    path = Path(vocab)
    if path.is_dir():
        found = [p for p in (path / CLIP_VOCAB_FILE, path / (CLIP_VOCAB_FILE + ".gz")) if p.is_file()]
        if not found:
            raise FileNotFoundError(f"--vocab {path}: no {CLIP_VOCAB_FILE}[.gz] in the folder")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"--vocab: file not found: {path}")
    n = CLIPTokenizer(path).n_vocab
    if n != 49408:
        raise ValueError(f"--vocab {path}: a CLIP BPE of {n} ids; CLIP's has 49,408")
    return path


def convert_noised_clip(
    pt_paths,
    out_dir: str | os.PathLike,
    *,
    vocab: str | os.PathLike | None = None,
    config: NoisedCLIPConfig | None = None,
    preset: str | None = "glide/clip",
) -> Path:
    """GLIDE's two released noised-CLIP files (``clip/image-enc`` and ``clip/text-enc``, in any order: each is
    told by its keys) into one folder that CLIP guidance loads (:func:`difflab.clip_guidance.load_noised_clip`):
    ``model.safetensors`` (keys ``image_encoder.*``, ``text_encoder.*`` and ``logit_scale`` = float32 ln 100, the
    official fixed value), ``config.yaml`` (a :class:`NoisedCLIPConfig` with both towers) and ``tokenizer/`` with
    CLIP's BPE (:func:`clip_vocab_file`). Every key and shape is checked against the towers of ``config``
    (default: preset ``glide/clip``).

    Raises FileNotFoundError for a missing file; ValueError for a single-tower preset, a file that is neither tower,
    two files of the same tower, or weights that do not fit (listing what did not match).
    """
    import math

    from difflab.nn.clip import ImageEncoder, TextEncoder

    config = get_preset("glide/clip") if config is None else config
    if config.encoders != "both":
        raise ValueError(f"{preset or 'this config'} is one tower of the noised CLIP; guidance needs both: convert the "
                         "two released files into one folder: difflab convert IMAGE_ENC.pt TEXT_ENC.pt "
                         "--preset glide/clip --out DIR")
    paths = [Path(pt_paths)] if isinstance(pt_paths, (str, os.PathLike)) else [Path(p) for p in pt_paths]
    if len(paths) != 2:
        raise ValueError(f"GLIDE's noised CLIP is two released files (clip/image-enc and clip/text-enc); got "
                         f"{len(paths)}: difflab convert IMAGE_ENC.pt TEXT_ENC.pt --preset glide/clip --out DIR")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
    require_new_folder(out_dir, "--out")
    vocab_file = clip_vocab_file(vocab)
    towers: dict[str, tuple[Path, Mapping[str, torch.Tensor]]] = {}
    for path in paths:
        sd = load_weights_only(path, what="official checkpoint")
        if not isinstance(sd, Mapping):
            raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict (a mapping of key -> tensor)")
        kind = next((k for key, k in _CLIP_TOWERS.items() if key in sd), None)
        if kind is None:
            raise ValueError(f"{path} is neither released noised-CLIP tower: it has no {' or '.join(_CLIP_TOWERS)}")
        if kind in towers:
            raise ValueError(f"{towers[kind][0]} and {path} both hold the {kind} tower; give clip/image-enc and "
                             "clip/text-enc")
        towers[kind] = (path, sd)
    mapped: dict[str, torch.Tensor] = {}
    for kind, cls in (("image", ImageEncoder), ("text", TextEncoder)):
        path, sd = towers[kind]
        with torch.device("meta"):
            tower = cls(config)
        try:
            checked = check_state_dict(tower, sd)
        except ValueError as e:
            raise ValueError(f"{path} ({kind} tower): {e}") from None
        mapped.update({f"{kind}_encoder.{k}": v for k, v in checked.items()})
    mapped["logit_scale"] = torch.tensor(math.log(config.logit_scale), dtype=torch.float32)
    meta = {"source": f"{towers['image'][0].name},{towers['text'][0].name}", "format": "pt"}
    if preset is not None:
        meta["preset"] = preset
    out = save_converted(mapped, config, out_dir, metadata=meta)
    _copy_clip_vocab(vocab_file, out)
    return out


# CLIP (openai/CLIP's ViT models, OpenCLIP's ViT models with OpenAI's layout): difflab.nn.openai_clip.CLIP keeps
# OpenAI's parameter names, so the key map is the identity; the config is read off the shapes as OpenAI's
# build_model does. Keys a checkpoint may hold that are no parameters: OpenAI's released archives keep the three
# build_model deletes; OpenCLIP's older files the causal text mask (a buffer); a trace of difflab's own CLIP its
# mask and the preprocessing mean / std (non-persistent buffers, so not in its state_dict).
CLIP_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")
CLIP_BUFFERS = ("attn_mask", "image_mean", "image_std")
_CLIP_ACTIVATION_HELP = ("quick_gelu for OpenAI's released CLIPs (and OpenCLIP's 'openai' / *-quickgelu models), gelu "
                         "for OpenCLIP's LAION / DataComp-trained ViTs (e.g. ViT-H-14 laion2b_s32b_b79k)")


def _is_torchscript(path: Path) -> bool:
    """A TorchScript zip (``torch.jit.save``: a ``code/`` folder and ``constants.pkl``), not a ``torch.save`` zip."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())


def read_clip_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a CLIP checkpoint file and its format (``safetensors``, ``pt`` or ``torchscript``).

    - ``.safetensors``: read as it is.
    - OpenAI's released archives (``ViT-L-14.pt``, ...) are TorchScript zips: their tensors are read with
      ``torch.jit.load(path, map_location="cpu").state_dict()``, as openai/CLIP's ``clip.load(jit=False)`` does.
      TorchScript is not pickled Python: its loader resolves no Python globals, and no method of the loaded module
      is called here (only torch's own ``state_dict``). It does compile the archive's TorchScript code, so take
      such archives from OpenAI's release only; anything else converts from a safetensors file or a state dict.
    - Anything else (OpenCLIP's ``open_clip_pytorch_model.bin``, a ``torch.save`` state dict, an OpenCLIP training
      checkpoint ``{"state_dict": {"module.*": ...}}``): ``torch.load(weights_only=True)``, which never unpickles code.

    Raises FileNotFoundError for a missing file, ValueError (one line) for an unreadable one or no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), "safetensors"
        except Exception as e:  # safetensors' errors are of several types
            raise ValueError(f"cannot read safetensors file {path}: {' '.join(str(e).split()) or type(e).__name__}") \
                from None
    if _is_torchscript(path):
        import warnings

        try:
            with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; OpenAI's archives are TorchScript
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated",
                                        category=DeprecationWarning)
                sd = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except Exception as e:  # a damaged archive fails in the TorchScript loader in many ways
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise ValueError(f"cannot read TorchScript archive {path}: {first}") from None
        return sd, "torchscript"
    sd = load_weights_only(path, what="CLIP checkpoint")
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):  # an OpenCLIP training checkpoint
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict (a mapping of key -> tensor)")
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return dict(sd), "pt"


def _clip_int(value: Any) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def clip_config_from_state_dict(
    sd: Mapping[str, torch.Tensor],
    *,
    activation: str = "quick_gelu",
    vision_heads: int | None = None,
    transformer_heads: int | None = None,
) -> CLIPConfig:
    """The :class:`CLIPConfig` of an OpenAI-layout ViT CLIP state dict, read off its shapes as openai/CLIP's
    ``build_model`` does: vision_width = rows of ``visual.conv1.weight``, vision_layers = count of
    ``visual.*.attn.in_proj_weight``, patch = its kernel side, image_resolution = patch * sqrt(positions - 1),
    embed_dim = columns of ``text_projection``, context_length = rows of ``positional_embedding``, vocab_size = rows
    of ``token_embedding.weight``, transformer_width = ``ln_final.weight``'s size, transformer_layers = count of
    ``transformer.resblocks.{i}``, and heads = width / 64 (both towers, OpenAI's rule; ``vision_heads`` /
    ``transformer_heads`` override it for models trained otherwise, e.g. OpenCLIP's ViT-g-14 with 88-wide heads).

    The activation is not in the weights: ``activation`` says it (quick_gelu: OpenAI; gelu: OpenCLIP's LAION models).

    Raises ValueError (one line) for a ResNet CLIP, a state dict without the keys the shapes are read from, or shapes
    that give no valid config.
    """
    if activation not in ("quick_gelu", "gelu"):
        raise ValueError(f"activation: {activation!r} is not one of 'quick_gelu', 'gelu' ({_CLIP_ACTIVATION_HELP})")
    if "visual.layer1.0.conv1.weight" in sd or "visual.attnpool.positional_embedding" in sd:
        raise ValueError("this is a ResNet CLIP (RN50, RN101, RN50x*): difflab's CLIP is the ViT one (ViT-B/32, "
                         "ViT-B/16, ViT-L/14, ...)")
    needed = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection",
              "positional_embedding", "token_embedding.weight", "ln_final.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"not an OpenAI-layout ViT CLIP state dict: {_listing('missing keys', missing)}")
    shapes = {k: tuple(sd[k].shape) for k in needed}
    if len(shapes["visual.conv1.weight"]) != 4 or len(shapes["visual.positional_embedding"]) != 2 \
            or len(shapes["text_projection"]) != 2 or len(shapes["positional_embedding"]) != 2 \
            or len(shapes["token_embedding.weight"]) != 2 or len(shapes["ln_final.weight"]) != 1:
        raise ValueError("not an OpenAI-layout ViT CLIP state dict: shapes "
                         + ", ".join(f"{k} {list(s)}" for k, s in shapes.items()))
    vision_width, patch = shapes["visual.conv1.weight"][0], shapes["visual.conv1.weight"][-1]
    positions = shapes["visual.positional_embedding"][0]
    grid = round((positions - 1) ** 0.5)
    if grid < 1 or grid * grid + 1 != positions:
        raise ValueError(f"visual.positional_embedding has {positions} rows, not 1 + a square number of patches")
    width = shapes["ln_final.weight"][0]
    for name, w, given in (("vision", vision_width, vision_heads), ("text", width, transformer_heads)):
        if given is None and w < 64:
            raise ValueError(f"{name} width {w} < 64: heads = width / 64 (OpenAI's rule) gives none; say the heads "
                             f"({'vision_heads' if name == 'vision' else 'transformer_heads'})")
    layers_text = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    config = CLIPConfig(
        embed_dim=shapes["text_projection"][1],
        image_resolution=patch * grid,
        vision_layers=sum(1 for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")),
        vision_width=vision_width,
        vision_patch_size=patch,
        vision_heads=vision_heads,
        context_length=shapes["positional_embedding"][0],
        vocab_size=shapes["token_embedding.weight"][0],
        transformer_width=width,
        transformer_heads=transformer_heads if transformer_heads is not None else width // 64,
        transformer_layers=layers_text,
        activation=activation,
    )
    config.validate()
    for key in CLIP_OPENAI_EXTRAS:  # OpenAI's archives say these again: they must agree with the shapes
        held, inferred = _clip_int(sd.get(key)), getattr(config, "image_resolution" if key == "input_resolution"
                                                         else key)
        if key in sd and held != inferred:
            raise ValueError(f"the checkpoint's {key} is {held if held is not None else sd[key]!r} but its shapes "
                             f"give {inferred}")
    return config


def check_clip_state_dict(model: nn.Module, sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """:func:`check_state_dict` for difflab's ``CLIP`` and an OpenAI / OpenCLIP state dict, after dropping the keys
    that are no parameters (``CLIP_OPENAI_EXTRAS``; ``CLIP_BUFFERS``, the mean / std checked to be OpenAI's).

    Raises ValueError (one line) naming the missing and unexpected keys and the shape mismatches.
    """
    from difflab.nn.openai_clip import OPENAI_IMAGE_MEAN, OPENAI_IMAGE_STD

    for key, expected in (("image_mean", OPENAI_IMAGE_MEAN), ("image_std", OPENAI_IMAGE_STD)):
        value = sd.get(key)
        if isinstance(value, torch.Tensor) and (value.numel() != 3 or not torch.allclose(
                value.float().flatten().cpu(), torch.tensor(expected), atol=1e-6)):
            raise ValueError(f"the checkpoint's {key} is {value.flatten().tolist()}, not OpenAI's {list(expected)}: "
                             "difflab's CLIP normalises images with OpenAI's statistics")
    drop = set(CLIP_OPENAI_EXTRAS) | set(CLIP_BUFFERS)
    try:
        return check_state_dict(model, {k: v for k, v in sd.items() if k not in drop})
    except ValueError as e:
        hint = ""
        if "logit_bias" in sd:
            hint = "; logit_bias is a SigLIP model's (not CLIP)"
        elif any(".ls_1." in k for k in sd):
            hint = "; ls_1 / ls_2 are OpenCLIP's layer scale, which difflab's CLIP has not"
        raise ValueError(f"{e}{hint}") from None


def _copy_clip_vocab(vocab_file: Path, out: Path) -> None:
    """CLIP's BPE file into ``out/tokenizer`` (gzipped or not, as found), written atomically."""
    dest = out / "tokenizer"
    dest.mkdir()
    data = vocab_file.read_bytes()
    atomic_write_with(dest / vocab_file.name, lambda p: p.write_bytes(data))


def convert_clip(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    activation: str = "quick_gelu",
    vision_heads: int | None = None,
    transformer_heads: int | None = None,
    vocab: str | os.PathLike | None = None,
) -> Path:
    """An OpenAI or OpenCLIP ViT CLIP checkpoint (:func:`read_clip_state_dict`: safetensors, a weights-only state
    dict, OpenAI's TorchScript archive) -> a difflab folder that :func:`load_converted` turns into
    :class:`difflab.nn.openai_clip.CLIP`: ``model.safetensors`` (the weights under OpenAI's names, in the file's
    dtype: OpenAI's releases are float16), ``config.yaml`` (the :class:`CLIPConfig` the shapes give,
    :func:`clip_config_from_state_dict`, with ``activation``) and, with ``vocab``, ``tokenizer/`` holding CLIP's BPE
    (:func:`clip_vocab_file`).

    Raises FileNotFoundError for a missing file; ValueError (one line) for an unreadable file, a pickle with Python
    objects, a state dict that is no ViT CLIP, missing / unexpected keys or wrong shapes.
    """
    from difflab.nn.openai_clip import CLIP

    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    require_new_folder(out_dir, "--out")  # before reading a large checkpoint
    vocab_file = clip_vocab_file(vocab) if vocab is not None else None
    sd, fmt = read_clip_state_dict(path)
    bad_values = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad_values:
        raise ValueError(f"{path}: " + _listing("state dict values that are not tensors", bad_values))
    try:
        config = clip_config_from_state_dict(sd, activation=activation, vision_heads=vision_heads,
                                             transformer_heads=transformer_heads)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if vocab_file is not None and config.vocab_size != 49408:
        raise ValueError(f"--vocab: {path} has {config.vocab_size} token rows; CLIP's BPE has 49,408 ids")
    with torch.device("meta"):
        model = CLIP(config)
    try:
        mapped = check_clip_state_dict(model, sd)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    meta = {"source": path.name, "format": fmt, "family": "clip", "activation": activation}
    out = save_converted(mapped, config, out_dir, metadata=meta)
    if vocab_file is not None:
        _copy_clip_vocab(vocab_file, out)
    return out


def converted_network_config(out_dir: str | os.PathLike) -> UNetConfig | ClassifierConfig:
    """The network config of a difflab checkpoint folder (its ``config.yaml``; ``model.safetensors`` must be there)."""
    out = Path(out_dir)
    cfg_path = out / "config.yaml"
    for p in (cfg_path, out / "model.safetensors"):
        if not p.is_file():
            raise FileNotFoundError(f"not a difflab checkpoint folder, {p.name} missing: {out}")
    d = yaml.safe_load(cfg_path.read_text())
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_path} is not a mapping of config fields")
    if "vision_patch_size" in d:  # CLIP in OpenAI's layout (convert_clip)
        return from_dict(CLIPConfig, d)
    if "n_xf_blocks_image" in d:  # GLIDE's noised CLIP (convert_noised_clip)
        return from_dict(NoisedCLIPConfig, d)
    if "clip_dim" in d:  # Karlo's prior or decoder; its upsampler is the pair of U-Nets under "unet"
        return from_dict(DecoderUNetConfig if "model_channels" in d else PriorConfig, d)
    if "unet" in d:
        return from_dict(ProgressiveSRConfig, d)
    return from_dict(ClassifierConfig if "pool" in d else TextUNetConfig if "text" in d else UNetConfig, d)


def load_converted(out_dir: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Build the network of a difflab checkpoint folder and load its ``model.safetensors`` (strict); a converted CLIP
    (:func:`convert_clip`) is a :class:`difflab.nn.openai_clip.CLIP` in float32."""
    config = converted_network_config(out_dir)
    if isinstance(config, CLIPConfig):
        from difflab.nn.openai_clip import CLIP

        model = CLIP(config)
    else:
        model = build_network(config)
    model.load_state_dict(load_file(str(Path(out_dir) / "model.safetensors"), device=str(device)), strict=True)
    return model.to(device)


def is_converted_folder(folder: str | os.PathLike) -> bool:
    """True for a folder ``difflab convert`` wrote (``model.safetensors`` beside ``config.yaml``; runs keep
    their weights in ``ckpt_*/``)."""
    return (Path(folder) / "model.safetensors").is_file()


def _converted_preset(out: Path) -> str | None:
    """The preset recorded in a converted folder's ``model.safetensors`` (None if converted from a config)."""
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        return (f.metadata() or {}).get("preset")


def _unknown_preset(out: Path, preset: str | None, known) -> ValueError:
    return ValueError(f"{out} was converted {'from preset ' + repr(preset) if preset else 'without a preset'}, "
                      f"whose diffusion flags are not known here; known: {', '.join(known)}")


def converted_classifier(folder: str | os.PathLike, device: str | torch.device = "cpu"):
    """A converted released noisy classifier in eval mode, with the ``diffusion_info`` of the model it was
    released to guide (:data:`OFFICIAL_CLASSIFIER_DIFFUSION`), so that guidance checks it like a trained one."""
    from difflab.guidance import ClassifierInfo
    from difflab.process import Process

    out = Path(folder)
    clf = load_converted(out, device=device).eval()
    if not isinstance(clf.config, ClassifierConfig):
        raise ValueError(f"{out} holds a converted diffusion U-Net, not a classifier")
    preset = _converted_preset(out)
    if preset not in OFFICIAL_CLASSIFIER_DIFFUSION:
        raise _unknown_preset(out, preset, OFFICIAL_CLASSIFIER_DIFFUSION)
    flags = OFFICIAL_CLASSIFIER_DIFFUSION[preset]
    process = Process.named(flags["schedule"], flags["steps"])
    clf.diffusion_info = ClassifierInfo.from_process(process, clf.config.image_size, clf.config.out_channels,
                                                     schedule=f"{flags['schedule']}/{flags['steps']}")
    return clf


def converted_run_config(folder: str | os.PathLike):
    """The run config under which ``difflab sample`` / ``nll`` / ``info`` use a converted released U-Net:
    its network, the diffusion flags of its README (:data:`OFFICIAL_DIFFUSION`, found by the preset recorded
    at conversion), ``data.source: none`` at the network's image size, and no EMA (the file's weights).

    Raises ValueError for a classifier, a folder converted without a known preset, or a network without
    an ``image_size``; FileNotFoundError for a missing file.
    """
    from difflab.config import Config, DataConfig, DiffusionConfig, SampleConfig, TextConfig, TrainConfig

    out = Path(folder)
    net = converted_network_config(out)
    if isinstance(net, ClassifierConfig):
        raise ValueError(f"{out} holds a converted classifier, not a diffusion U-Net: guide with it "
                         "(difflab sample RUN --classifier FOLDER --classifier-scale S)")
    if isinstance(net, NoisedCLIPConfig):
        raise ValueError(f"{out} holds a converted noised CLIP, not a diffusion U-Net: guide a text run with it "
                         "(difflab sample RUN --prompt TEXT --clip FOLDER --clip-scale S)")
    if isinstance(net, CLIPConfig):
        raise ValueError(f"{out} holds a converted CLIP, not a diffusion U-Net: load it in Python with "
                         "difflab.convert.load_converted (docs/unclip.md)")
    if isinstance(net, _KARLO_CONFIGS):
        raise ValueError(f"{out} holds a converted Karlo (unCLIP) network; its sampling pipeline is not built yet "
                         "(docs/unclip.md): load it in Python with difflab.convert.load_converted")
    preset = _converted_preset(out)
    if preset not in OFFICIAL_DIFFUSION:
        raise _unknown_preset(out, preset, OFFICIAL_DIFFUSION)
    if net.image_size is None:
        raise ValueError(f"{out}: the network config has no image_size to sample at")
    flags = OFFICIAL_DIFFUSION[preset]
    text = isinstance(net, TextUNetConfig)
    learned = net.learn_sigma
    if text and not (out / "tokenizer").is_dir():
        raise FileNotFoundError(f"{out}: a converted GLIDE U-Net without its tokenizer folder (tokenizer/); "
                                "convert it again with --vocab")
    diffusion = DiffusionConfig(
        steps=flags["steps"], schedule=flags["schedule"], mean_type="eps",
        var_type="learned_range" if learned else "fixed_large",
        loss_type="hybrid" if learned else "mse", rescale_timesteps=flags["rescale_timesteps"],
        rescale_learned_sigmas=flags["rescale_learned_sigmas"], p_uncond=flags.get("p_uncond", 0.0),
    )
    from difflab.nn.presets import RELEASED_FLAGS

    # an upsampler takes its README's small_size images (guided-diffusion super_res_sample.py), no augmentation
    low_res_size = RELEASED_FLAGS.get(preset, {}).get("small_size")
    if "low_res_ratio" in flags:
        low_res_size = net.image_size // flags["low_res_ratio"]
    data = DataConfig(source="none", image_size=net.image_size, channels=net.in_channels,
                      class_cond=net.num_classes is not None,
                      low_res_size=low_res_size if net.low_res_channels else None)
    extra = {"text": TextConfig(tokenizer="gpt2", vocab=str(out / "tokenizer"))} if text else {}
    return Config(model=net, diffusion=diffusion, data=data, train=TrainConfig(ema_rates=()),
                  sample=SampleConfig(**flags.get("sample", {})), **extra)
