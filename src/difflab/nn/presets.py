"""Network presets: every released OpenAI checkpoint configuration, DDPM CIFAR-10, and MNIST miniatures.

The released presets are derived from the official command-line flags by the official rules
(``config_from_official_flags``: default ``channel_mult`` per image size, attention resolutions
given in pixels turned into downsample rates, the flag defaults of each repository), so their
parameter counts equal the published ones (tests/nn/test_presets.py checks against released.json).

    name                                             params        network
    guided-diffusion/64x64_diffusion               295,904,454     ADM-64 (cond, learned sigma)
    guided-diffusion/128x128_diffusion             421,529,606     ADM-128
    guided-diffusion/256x256_diffusion             553,838,086     ADM-256
    guided-diffusion/256x256_diffusion_uncond      552,814,086     ADM-256 unconditional
    guided-diffusion/512x512_diffusion             558,997,638     ADM-512
    guided-diffusion/lsun_bedroom                  552,814,086     ADM LSUN (dropout 0.1)
    guided-diffusion/64x64_classifier               65,438,568     noisy classifier
    guided-diffusion/128x128_classifier             42,568,040
    guided-diffusion/256x256_classifier             54,096,360
    guided-diffusion/512x512_classifier             54,448,360
    guided-diffusion/64_256_upsampler              311,795,910     super-resolution 64 -> 256
    improved-diffusion/cifar10_uncond_50M_500K      52,546,438     iDDPM CIFAR-10
    improved-diffusion/imagenet64_uncond_100M_1500K 121,063,942    iDDPM ImageNet-64
    improved-diffusion/imagenet64_cond_270M_250K   273,049,350     iDDPM ImageNet-64 class-cond
    glide/base                                     385,030,726     GLIDE (filtered) 64px text U-Net
    glide/base-inpaint                             385,037,638     GLIDE inpainting (7 input channels)
    glide/upsample                                 398,361,286     GLIDE upsampler 64 -> 256 (text)
    glide/upsample-inpaint                         398,368,198     GLIDE upsampler + inpainting (10 inputs)
    glide/clip-image-enc                            86,443,776     GLIDE's noised CLIP, image tower (clip/image-enc)
    glide/clip-text-enc                             71,679,488     GLIDE's noised CLIP, text tower (clip/text-enc)
    glide/clip                                     158,123,265     both towers + logit_scale (what guidance loads)
    karlo/prior                                  1,022,028,544     Karlo's unCLIP diffusion prior (causal transformer)
    karlo/decoder                                  893,318,086     Karlo's unCLIP decoder, 64px (CLIP-conditioned U-Net)
    karlo/sr-64-256                              1,383,159,046     Karlo's 64 -> 256 upsampler (2 x 691,579,523)
    ddpm-cifar10                                    35,746,307     DDPM (Ho et al.) in this architecture
    mnist-tiny                                         176,849     tests (8x8 .. 32x32, 1 channel)
    mnist-small                                      1,921,601     10-minute CPU training at 32x32
"""

from __future__ import annotations

from typing import Any

from torch import nn

from difflab.nn.classifier import Classifier, ClassifierConfig
from difflab.nn.clip import NoisedCLIPConfig, build_noised_clip
from difflab.nn.clip_unet import DecoderUNet, DecoderUNetConfig
from difflab.nn.prior import PriorConfig, PriorTransformer
from difflab.nn.progressive_sr import ProgressiveSR, ProgressiveSRConfig
from difflab.nn.text import TextEncoderConfig
from difflab.nn.text_unet import TextUNet, TextUNetConfig
from difflab.nn.unet import UNet, UNetConfig

__all__ = [
    "RELEASED_FLAGS",
    "KARLO_FLAGS",
    "NO_KEY_LISTING",
    "PRESETS",
    "config_from_official_flags",
    "config_from_official_kwargs",
    "config_from_karlo_flags",
    "family_of",
    "get_preset",
    "build_network",
]

NUM_CLASSES = 1000  # ImageNet classes of every class-conditional release
# Released, but ../shared/fixtures/openai/released.json holds no key listing of them: their flags are their
# README's, built by the rules the listed releases verify (the 64 -> 256 upsampler's, for the 128 -> 512 one).
NO_KEY_LISTING = frozenset({"guided-diffusion/128_512_upsampler"})

# The flags each released checkpoint was trained/sampled with (README of each repository); flags
# not listed take the repository's defaults (_MODEL_DEFAULTS / _CLASSIFIER_DEFAULTS below).
_ADM = dict(learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True, attention_resolutions="32,16,8")
_ADM_CLF = dict(classifier_use_fp16=False, classifier_width=128, classifier_attention_resolutions="32,16,8",
                classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
                classifier_pool="attention")
_IDDPM = dict(learn_sigma=True, use_checkpoint=False, attention_resolutions="16,8", num_heads=4,
              num_heads_upsample=-1, use_scale_shift_norm=True)
# glide_text2im.model_creation.model_and_diffusion_defaults() without the diffusion flags: the released base
# model; the upsampler is model_and_diffusion_defaults_upsampler() (256px, 2 res blocks, super_res).
_GLIDE = dict(
    image_size=64, num_channels=192, num_res_blocks=3, channel_mult="", num_heads=1, num_head_channels=64,
    num_heads_upsample=-1, attention_resolutions="32,16,8", dropout=0.1, text_ctx=128, xf_width=512,
    xf_layers=16, xf_heads=8, xf_final_ln=True, xf_padding=True, use_scale_shift_norm=True, resblock_updown=True,
    use_fp16=True, cache_text_emb=False, inpaint=False, super_res=False)
_GLIDE_UP = dict(_GLIDE, image_size=256, num_res_blocks=2, super_res=True)
# glide_text2im/clip/config.yaml: the noised CLIP (64px ViT, patch 4, 12 x 64 wide; causal text 8 x 64, 77 tokens)
_GLIDE_CLIP = dict(
    logit_scale=100.0, beta_schedule="squaredcos_cap_v2", n_timesteps=1000, image_size=64, patch_size=4,
    n_vocab=65536, max_text_len=77, n_embd=512, n_head_state_text=64, n_head_text=8, n_xf_blocks_text=12,
    n_head_state_image=64, n_head_image=12, n_xf_blocks_image=12)
RELEASED_FLAGS: dict[str, dict[str, Any]] = {
    "guided-diffusion/64x64_diffusion": dict(
        _ADM, class_cond=True, dropout=0.1, image_size=64, num_channels=192, num_head_channels=64,
        num_res_blocks=3, use_new_attention_order=True),
    "guided-diffusion/128x128_diffusion": dict(
        _ADM, class_cond=True, image_size=128, num_channels=256, num_heads=4, num_res_blocks=2),
    "guided-diffusion/256x256_diffusion": dict(
        _ADM, class_cond=True, image_size=256, num_channels=256, num_head_channels=64, num_res_blocks=2),
    "guided-diffusion/256x256_diffusion_uncond": dict(
        _ADM, class_cond=False, image_size=256, num_channels=256, num_head_channels=64, num_res_blocks=2),
    "guided-diffusion/512x512_diffusion": dict(
        _ADM, class_cond=True, image_size=512, num_channels=256, num_head_channels=64, num_res_blocks=2),
    "guided-diffusion/lsun_bedroom": dict(
        _ADM, class_cond=False, dropout=0.1, image_size=256, num_channels=256, num_head_channels=64,
        num_res_blocks=2),
    "guided-diffusion/64x64_classifier": dict(_ADM_CLF, image_size=64, classifier_depth=4),
    "guided-diffusion/128x128_classifier": dict(_ADM_CLF, image_size=128, classifier_depth=2),
    "guided-diffusion/256x256_classifier": dict(_ADM_CLF, image_size=256, classifier_depth=2),
    "guided-diffusion/512x512_classifier": dict(_ADM_CLF, image_size=512, classifier_depth=2),
    "guided-diffusion/64_256_upsampler": dict(
        large_size=256, small_size=64, num_channels=192, num_res_blocks=2, learn_sigma=True, class_cond=True,
        use_checkpoint=False, attention_resolutions="32,16,8", num_heads=4, num_head_channels=-1,
        num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0, resblock_updown=True, use_fp16=False),
    # guided-diffusion README, "Upsampling: 128 -> 512"
    "guided-diffusion/128_512_upsampler": dict(
        large_size=512, small_size=128, num_channels=192, num_res_blocks=2, learn_sigma=True, class_cond=True,
        attention_resolutions="32,16", num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
        use_fp16=False),
    "improved-diffusion/cifar10_uncond_50M_500K": dict(
        _IDDPM, image_size=32, num_channels=128, num_res_blocks=3, class_cond=False, dropout=0.3),
    "improved-diffusion/imagenet64_uncond_100M_1500K": dict(
        _IDDPM, image_size=64, num_channels=128, num_res_blocks=3, class_cond=False, dropout=0.0),
    "improved-diffusion/imagenet64_cond_270M_250K": dict(
        _IDDPM, image_size=64, num_channels=192, num_res_blocks=3, class_cond=True, dropout=0.0),
    # glide-text2im: base, base-inpaint, upsample, upsample-inpaint (model_creation.py, the notebooks)
    "glide/base": _GLIDE,
    "glide/base-inpaint": dict(_GLIDE, inpaint=True),
    "glide/upsample": _GLIDE_UP,
    "glide/upsample-inpaint": dict(_GLIDE_UP, inpaint=True),
    # glide_text2im/clip/config.yaml; the two released files hold one tower each
    "glide/clip-image-enc": dict(_GLIDE_CLIP, checkpoint="clip/image-enc"),
    "glide/clip-text-enc": dict(_GLIDE_CLIP, checkpoint="clip/text-enc"),
}

# Defaults of the official flag parsers (model_and_diffusion_defaults / classifier_defaults).
_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "guided-diffusion": dict(
        image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
        num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0, class_cond=False,
        use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False, use_fp16=False,
        use_new_attention_order=False, learn_sigma=False),
    "improved-diffusion": dict(
        image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
        attention_resolutions="16,8", dropout=0.0, learn_sigma=False, class_cond=False, use_checkpoint=False,
        use_scale_shift_norm=True),
    "glide": _GLIDE,
}
_CLASSIFIER_DEFAULTS = dict(
    image_size=64, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
    classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True, classifier_pool="attention")

# Default channel_mult per image size (official create_model / create_classifier / sr_create_model).
_GUIDED_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
_IMPROVED_MULT = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}
_SR_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}
_GLIDE_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


def _mult(table: dict[int, tuple], size: int, given: Any = "") -> tuple:
    if given not in ("", None):
        return tuple(float(m) if "." in str(m) else int(m) for m in str(given).split(","))
    if size not in table:
        raise ValueError(f"image_size={size} has no default channel_mult; valid: {sorted(table)}")
    return table[size]


def _ds(attention_resolutions: str, size: int) -> tuple[int, ...]:
    """'32,16,8' (pixel sizes) -> downsample rates (size // 32, size // 16, size // 8)."""
    return tuple(size // int(r) for r in str(attention_resolutions).split(",") if r)


def _heads_upsample(num_heads_upsample: Any, num_heads: Any, num_head_channels: Any) -> Any:
    """difflab's ``num_heads_upsample`` for the official one: -1 wherever the official network ends up with
    ``num_heads`` on the way up (-1 itself, the same count, or num_head_channels set, which overrides both)."""
    if num_heads_upsample in (-1, num_heads) or num_head_channels != -1:
        return -1
    return num_heads_upsample


def _glide_mult(channel_mult: Any, size: int) -> tuple:
    """GLIDE's (and Karlo's decoder's) channel_mult rule: '' is the default per image size, otherwise as many
    levels as 2 ** (levels + 2) == image_size (the official assertion)."""
    if channel_mult in ("", None):
        return _mult(_GLIDE_MULT, size)
    mult = tuple(int(m) for m in str(channel_mult).split(","))
    if 2 ** (len(mult) + 2) != size:
        raise ValueError(f"channel_mult={channel_mult!r} is invalid for image_size={size}; valid: "
                         f"{size.bit_length() - 3} levels (2 ** (levels + 2) == image_size) or ''")
    return mult


def _glide_config(flags: dict[str, Any]) -> TextUNetConfig:
    """glide_text2im.model_creation.create_model's rules: the default channel_mult per image size, attention
    resolutions in pixels, in_channels 3 and out_channels 6 (eps + learned-range variance), the class chosen by
    ``inpaint`` / ``super_res``; ``use_fp16`` and ``cache_text_emb`` do not change the function."""
    f = {**_MODEL_DEFAULTS["glide"], **flags}
    size = f["image_size"]
    mult = _glide_mult(f["channel_mult"], size)
    return TextUNetConfig(
        in_channels=3, model_channels=f["num_channels"], channel_mult=mult, num_res_blocks=f["num_res_blocks"],
        attention_resolutions=_ds(f["attention_resolutions"], size), num_heads=f["num_heads"],
        num_head_channels=f["num_head_channels"],
        num_heads_upsample=_heads_upsample(f["num_heads_upsample"], f["num_heads"], f["num_head_channels"]),
        dropout=float(f["dropout"]), use_scale_shift_norm=f["use_scale_shift_norm"],
        resblock_updown=f["resblock_updown"], learn_sigma=True, inpaint=bool(f["inpaint"]),
        low_res_channels=3 if f["super_res"] else 0, image_size=size,
        text=TextEncoderConfig(text_ctx=f["text_ctx"], xf_width=f["xf_width"], xf_layers=f["xf_layers"],
                               xf_heads=f["xf_heads"], xf_final_ln=f["xf_final_ln"], xf_padding=f["xf_padding"]),
    )


# official beta_schedule names -> difflab's (glide_text2im's get_named_beta_schedule)
_BETA_SCHEDULES = {"squaredcos_cap_v2": "cosine", "linear": "linear"}
# the released noised-CLIP checkpoint each tower comes from (flag "checkpoint"; none: both towers)
_CLIP_CHECKPOINTS = {"clip/image-enc": "image", "clip/text-enc": "text"}


def _glide_clip_config(flags: dict[str, Any]) -> NoisedCLIPConfig:
    """glide_text2im.clip.model_creation.create_clip_model's config (the keys of clip/config.yaml; missing keys
    take the released values), for both towers or, with ``checkpoint``, the one that file holds."""
    f = {**_GLIDE_CLIP, **flags}
    schedule, checkpoint = f.pop("beta_schedule"), f.pop("checkpoint", None)
    if schedule not in _BETA_SCHEDULES:
        raise ValueError(f"beta_schedule={schedule!r} is invalid; valid: {', '.join(_BETA_SCHEDULES)}")
    if checkpoint is not None and checkpoint not in _CLIP_CHECKPOINTS:
        raise ValueError(f"checkpoint={checkpoint!r} is invalid; valid: {', '.join(_CLIP_CHECKPOINTS)}")
    unknown = sorted(set(f) - set(_GLIDE_CLIP) - {"beta_schedule"})
    if unknown:
        raise ValueError(f"unknown noised-CLIP flag(s) {unknown}; valid: {', '.join(_GLIDE_CLIP)}, checkpoint")
    cfg = NoisedCLIPConfig(**f, beta_schedule=_BETA_SCHEDULES[schedule],
                           encoders=_CLIP_CHECKPOINTS.get(checkpoint, "both"))
    cfg.validate()
    return cfg


def config_from_official_flags(flags: dict[str, Any], family: str) -> UNetConfig | ClassifierConfig:
    """Turn the official script flags into a difflab config, following the official create_* rules.

    Args:
        flags: flags as in the official READMEs (``num_channels``, ``attention_resolutions="32,16,8"``,
            ``class_cond``, ...); missing flags take the repository's defaults.
        family: ``"improved-diffusion"``, ``"guided-diffusion"`` (model), ``"guided-diffusion-classifier"``,
            ``"guided-diffusion-sr"`` (SuperResModel; flags ``large_size``/``small_size``) or ``"glide"``
            (glide-text2im's model flags, ``inpaint`` / ``super_res``; a :class:`TextUNetConfig`) or
            ``"glide-clip"`` (clip/config.yaml's keys, ``checkpoint`` naming one tower; a :class:`NoisedCLIPConfig`).
    """
    families = ("improved-diffusion", "guided-diffusion", "guided-diffusion-classifier", "guided-diffusion-sr",
                "glide", "glide-clip")
    if family not in families:
        raise ValueError(f"family={family!r} is invalid; valid: {', '.join(families)}")
    if family == "glide-clip":
        return _glide_clip_config(flags)
    if family == "glide":
        return _glide_config(flags)
    if family == "guided-diffusion-classifier":
        f = {**_CLASSIFIER_DEFAULTS, **flags}
        size = f["image_size"]
        return ClassifierConfig(
            in_channels=3, model_channels=f["classifier_width"], channel_mult=_mult(_GUIDED_MULT, size),
            num_res_blocks=f["classifier_depth"],
            attention_resolutions=_ds(f["classifier_attention_resolutions"], size),
            num_head_channels=64, use_scale_shift_norm=f["classifier_use_scale_shift_norm"],
            resblock_updown=f["classifier_resblock_updown"], image_size=size, out_channels=NUM_CLASSES,
            pool=f["classifier_pool"],
        )
    f = {**_MODEL_DEFAULTS["improved-diffusion" if family == "improved-diffusion" else "guided-diffusion"],
         **flags}
    if family == "guided-diffusion-sr":
        size = f["large_size"]
        mult = _mult(_SR_MULT, size)
    elif family == "improved-diffusion":
        size = f["image_size"]
        mult = _mult(_IMPROVED_MULT, size)
    else:
        size = f["image_size"]
        mult = _mult(_GUIDED_MULT, size, f.get("channel_mult", ""))
    return UNetConfig(
        in_channels=3, model_channels=f["num_channels"], channel_mult=mult,
        num_res_blocks=f["num_res_blocks"], attention_resolutions=_ds(f["attention_resolutions"], size),
        num_heads=f["num_heads"], num_head_channels=f.get("num_head_channels", -1),
        num_heads_upsample=_heads_upsample(f.get("num_heads_upsample", -1), f["num_heads"],
                                           f.get("num_head_channels", -1)),
        use_new_attention_order=f.get("use_new_attention_order", False), dropout=float(f["dropout"]),
        use_scale_shift_norm=f["use_scale_shift_norm"], resblock_updown=f.get("resblock_updown", False),
        use_checkpoint=f["use_checkpoint"], learn_sigma=f["learn_sigma"],
        num_classes=NUM_CLASSES if f["class_cond"] else None,
        low_res_channels=3 if family == "guided-diffusion-sr" else 0, image_size=size,
    )


_OFFICIAL_CLASSES = {
    "improved_diffusion.unet.UNetModel": "unet",
    "improved_diffusion.unet.SuperResModel": "superres",
    "guided_diffusion.unet.UNetModel": "unet",
    "guided_diffusion.unet.SuperResModel": "superres",
    "guided_diffusion.unet.EncoderUNetModel": "classifier",
    "glide_text2im.text2im_model.Text2ImUNet": "text",
    "glide_text2im.text2im_model.InpaintText2ImUNet": "text-inpaint",
    "glide_text2im.text2im_model.SuperResText2ImUNet": "text-superres",
    "glide_text2im.text2im_model.SuperResInpaintText2ImUnet": "text-superres-inpaint",
}


def config_from_official_kwargs(class_name: str, kwargs: dict[str, Any]) -> UNetConfig | ClassifierConfig:
    """The difflab config of an official network constructor call ``class_name(**kwargs)``.

    Args:
        class_name: e.g. ``"guided_diffusion.unet.UNetModel"`` (see ``_OFFICIAL_CLASSES``).
        kwargs: the constructor keyword arguments (``attention_resolutions`` as downsample rates). GLIDE's
            ``in_channels`` is the image's (3): the classes widen the first conv themselves, as difflab does.
    """
    if class_name not in _OFFICIAL_CLASSES:
        raise ValueError(f"unsupported official class {class_name!r}; valid: {', '.join(_OFFICIAL_CLASSES)}")
    kind = _OFFICIAL_CLASSES[class_name]
    kw = dict(kwargs)
    text = None
    if kind.startswith("text"):
        if kw.pop("xf_ar", 0.0) or kw.pop("share_unemb", False):
            raise ValueError(f"{class_name}: xf_ar (the auxiliary text-prediction head) is not supported; valid: 0.0")
        kw.pop("cache_text_emb", None)
        tokenizer = kw.pop("tokenizer", None)
        text = TextEncoderConfig(
            text_ctx=kw.pop("text_ctx"), xf_width=kw.pop("xf_width"), xf_layers=kw.pop("xf_layers"),
            xf_heads=kw.pop("xf_heads"), xf_final_ln=kw.pop("xf_final_ln"), xf_padding=kw.pop("xf_padding", False),
            **({"n_vocab": tokenizer.n_vocab} if tokenizer is not None else {}))
    if kw.pop("dims", 2) != 2:
        raise ValueError("only dims=2 (images) is supported")
    heads_up = _heads_upsample(kw.pop("num_heads_upsample", -1), kw.get("num_heads", 1),
                               kw.get("num_head_channels", -1))
    kw.pop("use_fp16", None)
    common = dict(
        in_channels=kw.pop("in_channels"), model_channels=kw.pop("model_channels"),
        channel_mult=tuple(kw.pop("channel_mult", (1, 2, 4, 8))), num_res_blocks=kw.pop("num_res_blocks"),
        attention_resolutions=tuple(kw.pop("attention_resolutions")), num_heads=kw.pop("num_heads", 1),
        num_head_channels=kw.pop("num_head_channels", -1),
        use_new_attention_order=kw.pop("use_new_attention_order", False), dropout=float(kw.pop("dropout", 0.0)),
        use_scale_shift_norm=kw.pop("use_scale_shift_norm", False), resblock_updown=kw.pop("resblock_updown", False),
        conv_resample=kw.pop("conv_resample", True), use_checkpoint=kw.pop("use_checkpoint", False),
    )
    out_channels = kw.pop("out_channels")
    if kind == "classifier":
        # EncoderUNetModel takes num_heads_upsample and ignores it (it has no upsampling half)
        cfg: UNetConfig | ClassifierConfig = ClassifierConfig(
            **common, image_size=kw.pop("image_size"), out_channels=out_channels, pool=kw.pop("pool", "adaptive"))
    elif text is not None:
        cfg = TextUNetConfig(
            **common, num_heads_upsample=heads_up, out_channels=out_channels, inpaint="inpaint" in kind,
            low_res_channels=common["in_channels"] if "superres" in kind else 0, text=text)
    else:
        cfg = UNetConfig(
            **common, num_heads_upsample=heads_up, out_channels=out_channels, num_classes=kw.pop("num_classes", None),
            low_res_channels=common["in_channels"] if kind == "superres" else 0, image_size=kw.pop("image_size", None))
    if kw:
        raise ValueError(f"unsupported argument(s) of {class_name}: {sorted(kw)}")
    cfg.validate()
    return cfg


# Karlo (kakaobrain/karlo): the YAML config of each released checkpoint (configs/prior_1B_vit_l.yaml,
# decoder_900M_vit_l.yaml, improved_sr_64_256_1.4B.yaml) as released.json lists it. The network comes from
# model.hparams (config_from_karlo_flags); the diffusion / sampling sections are kept for the pipelines.
_KARLO_COSINE = dict(steps=1000, noise_schedule="squaredcos_cap_v2", use_kl=False)
KARLO_FLAGS: dict[str, dict[str, Any]] = {
    "karlo/prior": dict(
        model=dict(type="prior", diffusion_sampler="uniform", hparams=dict(
            text_ctx=77, xf_width=2048, xf_layers=20, xf_heads=32, xf_final_ln=True, text_drop=0.2, clip_dim=768)),
        diffusion=dict(_KARLO_COSINE, learn_sigma=False, sigma_small=True, predict_xstart=True,
                       rescale_learned_sigmas=False, timestep_respacing="")),
    "karlo/decoder": dict(
        model=dict(type="t2i-decoder", diffusion_sampler="uniform", hparams=dict(
            image_size=64, num_channels=320, num_res_blocks=3, channel_mult="", attention_resolutions="32,16,8",
            num_heads=-1, num_head_channels=64, num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.1,
            clip_dim=768, clip_emb_mult=4, text_ctx=77, xf_width=1536, xf_layers=0, xf_heads=0, xf_final_ln=False,
            resblock_updown=True, learn_sigma=True, text_drop=0.3, clip_emb_type="image", clip_emb_drop=0.1,
            use_plm=True)),
        diffusion=dict(_KARLO_COSINE, learn_sigma=True, sigma_small=False, predict_xstart=False,
                       rescale_learned_sigmas=True, timestep_respacing="")),
    "karlo/sr-64-256": dict(
        model=dict(type="improved_sr_64_256", diffusion_sampler="uniform", hparams=dict(
            channels=320, depth=3, channels_multiple=[1, 2, 3, 4], dropout=0.0)),
        diffusion=dict(_KARLO_COSINE, learn_sigma=False, sigma_small=True, predict_xstart=False,
                       rescale_learned_sigmas=True, timestep_respacing="7"),
        sampling=dict(timestep_respacing="7", clip_denoise=True)),
}
# model.hparams keys of each Karlo model type; the ones that do not change the network at inference are read and
# ignored: text_drop (caption dropout in training), and the decoder's xf_layers / xf_heads / xf_final_ln / use_plm
# (no text transformer: CLIP's features replace it) and clip_emb_type (only "image" exists)
_KARLO_HPARAMS = {
    "prior": {"text_ctx", "xf_width", "xf_layers", "xf_heads", "xf_final_ln", "text_drop", "clip_dim"},
    "t2i-decoder": {"image_size", "num_channels", "num_res_blocks", "channel_mult", "attention_resolutions",
                    "num_heads", "num_head_channels", "num_heads_upsample", "use_scale_shift_norm", "dropout",
                    "clip_dim", "clip_emb_mult", "text_ctx", "xf_width", "xf_layers", "xf_heads", "xf_final_ln",
                    "resblock_updown", "learn_sigma", "text_drop", "clip_emb_type", "clip_emb_drop", "use_plm"},
    "improved_sr_64_256": {"channels", "depth", "channels_multiple", "dropout"},
}


def config_from_karlo_flags(flags: dict[str, Any]) -> PriorConfig | DecoderUNetConfig | ProgressiveSRConfig:
    """The difflab config of a Karlo YAML config (``{"model": {"type", "hparams"}, ...}``), by Karlo's rules.

    - ``prior``: ``PriorDiffusionModel``'s ``PriorTransformer`` (:class:`PriorConfig`).
    - ``t2i-decoder``: ``Text2ImProgressiveModel.create_plm_dec_model`` (:class:`DecoderUNetConfig`): ``channel_mult``
      "" is (1, 2, 3, 4) at 64px (GLIDE's table), attention resolutions in pixels become downsample rates
      image_size // res, 6 output channels with ``learn_sigma``.
    - ``improved_sr_64_256``: ``ImprovedSupRes64to256ProgressiveModel``'s two ``SuperResUNetModel``s
      (:class:`ProgressiveSRConfig`): no attention, residual up/down blocks, 3 output channels, 256px.
    """
    model = flags.get("model") if isinstance(flags, dict) else None
    if not isinstance(model, dict) or model.get("type") not in _KARLO_HPARAMS:
        got = model.get("type") if isinstance(model, dict) else model
        raise ValueError(f"model.type={got!r} is invalid; valid: {', '.join(_KARLO_HPARAMS)}")
    kind, hp = model["type"], dict(model.get("hparams") or {})
    unknown = sorted(set(hp) - _KARLO_HPARAMS[kind])
    if unknown:
        raise ValueError(f"unknown {kind} hparam(s) {unknown}; valid: {', '.join(sorted(_KARLO_HPARAMS[kind]))}")
    if kind == "prior":
        cfg: PriorConfig | DecoderUNetConfig | ProgressiveSRConfig = PriorConfig(
            text_ctx=hp["text_ctx"], xf_width=hp["xf_width"], xf_layers=hp["xf_layers"], xf_heads=hp["xf_heads"],
            xf_final_ln=hp["xf_final_ln"], clip_dim=hp["clip_dim"])
    elif kind == "t2i-decoder":
        if hp.get("clip_emb_type", "image") != "image":
            raise ValueError(f"clip_emb_type={hp['clip_emb_type']!r} is invalid; valid: 'image'")
        size = hp["image_size"]
        mult = _glide_mult(hp["channel_mult"], size)
        nhc = hp["num_head_channels"]
        heads = 1 if nhc != -1 and hp["num_heads"] == -1 else hp["num_heads"]  # unused when nhc is set
        cfg = DecoderUNetConfig(
            in_channels=3, model_channels=hp["num_channels"], channel_mult=mult, num_res_blocks=hp["num_res_blocks"],
            attention_resolutions=_ds(hp["attention_resolutions"], size), num_heads=heads, num_head_channels=nhc,
            num_heads_upsample=_heads_upsample(hp["num_heads_upsample"], hp["num_heads"], nhc),
            dropout=float(hp["dropout"]), use_scale_shift_norm=hp["use_scale_shift_norm"],
            resblock_updown=hp["resblock_updown"], learn_sigma=bool(hp["learn_sigma"]), image_size=size,
            clip_dim=hp["clip_dim"], xf_width=hp["xf_width"], text_ctx=hp["text_ctx"],
            clip_emb_mult=hp["clip_emb_mult"], clip_emb_drop=float(hp["clip_emb_drop"]))
    else:
        cfg = ProgressiveSRConfig(unet=UNetConfig(
            in_channels=3, model_channels=hp["channels"], channel_mult=tuple(hp["channels_multiple"]),
            num_res_blocks=hp["depth"], attention_resolutions=(), dropout=float(hp["dropout"]),
            use_scale_shift_norm=False, resblock_updown=True, use_middle_attention=False, out_channels=3,
            low_res_channels=3, image_size=256))
    cfg.validate()
    return cfg


def family_of(name: str) -> str:
    """The official family of a released preset name (see ``config_from_official_flags``)."""
    repo, _, what = name.partition("/")
    if repo == "glide" and what.startswith("clip"):
        return "glide-clip"
    if repo == "guided-diffusion":
        if "classifier" in what:
            return "guided-diffusion-classifier"
        if "upsampler" in what:
            return "guided-diffusion-sr"
    return repo


PRESETS: dict[str, UNetConfig | ClassifierConfig] = {
    name: config_from_official_flags(flags, family_of(name)) for name, flags in RELEASED_FLAGS.items()
}
PRESETS.update({
    # DDPM CIFAR-10 (Ho et al. 2020, App. B) in the official improved-diffusion architecture: 128 ch,
    # mult 1,2,2,2, 2 res blocks, attention at 16x16, 1 head, dropout 0.1, additive time embedding,
    # fixed variance (3 outputs). 35,746,307 parameters (the paper reports 35.7M).
    "ddpm-cifar10": UNetConfig(
        in_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
        attention_resolutions=(2,), num_heads=1, dropout=0.1, use_scale_shift_norm=False, image_size=32),
    # Tiny: fast in tests at 8x8 .. 32x32, 1 channel (MNIST); attention at ds 2.
    "mnist-tiny": UNetConfig(
        in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
        num_heads=2, num_groups=8, image_size=32),
    # Small: ~1.9M parameters, ADM-style (AdaGN, BigGAN up/down), trains in ~10 minutes on a CPU at 32x32.
    "mnist-small": UNetConfig(
        in_channels=1, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(4,),
        num_head_channels=32, dropout=0.1, use_scale_shift_norm=True, resblock_updown=True, image_size=32),
    # GLIDE's noised CLIP with both towers: what `difflab convert IMAGE_ENC.pt TEXT_ENC.pt --preset glide/clip`
    # writes and CLIP guidance loads
    "glide/clip": config_from_official_flags({}, "glide-clip"),
})
# Karlo's released prior, decoder and 64 -> 256 upsampler (KARLO_FLAGS)
PRESETS.update({name: config_from_karlo_flags(flags) for name, flags in KARLO_FLAGS.items()})


def get_preset(name: str) -> UNetConfig | ClassifierConfig:
    """The config of a preset; ValueError listing the valid names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]


def build_network(config: UNetConfig | ClassifierConfig) -> nn.Module:
    """``UNet``, ``TextUNet``, ``Classifier`` or a noised CLIP (:func:`difflab.nn.clip.build_noised_clip`) for a
    config, or Karlo's ``PriorTransformer``, ``DecoderUNet``, ``ProgressiveSR`` (call under ``torch.device('meta')``
    to allocate nothing)."""
    if isinstance(config, NoisedCLIPConfig):
        return build_noised_clip(config)
    if isinstance(config, PriorConfig):
        return PriorTransformer(config)
    if isinstance(config, ProgressiveSRConfig):
        return ProgressiveSR(config)
    if isinstance(config, DecoderUNetConfig):
        return DecoderUNet(config)
    if isinstance(config, ClassifierConfig):
        return Classifier(config)
    if isinstance(config, TextUNetConfig):
        return TextUNet(config)
    if isinstance(config, UNetConfig):
        return UNet(config)
    raise ValueError("config must be a UNetConfig, ClassifierConfig, NoisedCLIPConfig, PriorConfig or "
                     f"ProgressiveSRConfig, got {type(config).__name__}")
