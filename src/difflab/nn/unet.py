"""The diffusion U-Net: DDPM, Improved DDPM, ADM, super-resolution, inpainting and text-conditioned.

One network with the switches the papers ablate (iDDPM Sec. 3-4, ADM Sec. 3, GLIDE Sec. 3); with
the right config it is the official ``improved_diffusion.unet.UNetModel``,
``guided_diffusion.unet.UNetModel`` / ``SuperResModel`` or GLIDE's U-Net, key for key and output
for output (tests/nn/test_official_goldens.py).

Notation map (code -> paper):
    x_t [N, C, H, W]   the noisy image;  t [N] the timestep index of the original process (0..T-1)
    emb [N, 4 * model_channels]   time embedding (+ class embedding y, + conditioning vector)
    ds                 downsample rate of a level (1, 2, 4, ...); ``attention_resolutions`` lists ds
    context [N, S, D]  tokens attended to by every attention layer (GLIDE text, unCLIP CLIP tokens)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, get_args

import torch
import torch.nn.functional as F
from torch import nn

from difflab.nn.layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    normalization,
    timestep_embedding,
    zero_module,
)

__all__ = ["BackboneConfig", "UNetConfig", "UNet", "build_encoder_half"]


class FieldError(ValueError):
    """A bad network config field: ``field`` names it, ``problem`` says what is wrong (so a run config
    can report it under its dotted key, ``model.num_heads``)."""

    def __init__(self, field: str, value: Any, valid: str):
        self.field = field
        self.problem = f"{value!r} is invalid; valid: {valid}"
        super().__init__(f"{field}={value!r} is invalid; valid: {valid}")


def _bad(field: str, value: Any, valid: str) -> FieldError:
    return FieldError(field, value, valid)


@dataclass(frozen=True)
class BackboneConfig:
    """Switches shared by the U-Net and the classifier (its downsampling half + middle block)."""

    # Channels of the image x_t (3 for RGB, 1 for MNIST).
    in_channels: int = 3
    # Base channel count; level i has int(channel_mult[i] * model_channels) channels (ADM: 128-256).
    model_channels: int = 128
    # Channel multiplier per resolution level; len(channel_mult) - 1 downsamplings (0.5 allowed: ADM-512).
    channel_mult: tuple[float, ...] = (1, 2, 2, 2)
    # Residual blocks per level in the downsampling half ("depth" in ADM Tab. 1); upsampling has +1.
    num_res_blocks: int = 2
    # Downsample rates ds (not pixel sizes) with attention, e.g. (2, 4) = 16x16 and 8x8 at 32px; a rate no
    # level has is ignored (as officially). The middle block has attention unless use_middle_attention is False.
    attention_resolutions: tuple[int, ...] = (2,)
    # Heads per attention layer when num_head_channels == -1 (it must divide the widths that have attention).
    num_heads: int = 1
    # Channels per head (ADM: 64); overrides num_heads when not -1.
    num_head_channels: int = -1
    # False: QKVAttentionLegacy (heads, then q/k/v); True: QKVAttention (q/k/v, then heads).
    use_new_attention_order: bool = False
    # Dropout rate inside residual blocks (DDPM CIFAR-10: 0.1, iDDPM CIFAR-10: 0.3).
    dropout: float = 0.0
    # AdaGN: GN(h) * (1 + y_s) + y_b instead of h + y (ADM Sec. 3).
    use_scale_shift_norm: bool = False
    # BigGAN residual blocks for up/downsampling (ADM Sec. 3) instead of (conv-)resampling layers.
    resblock_updown: bool = False
    # Learned 3x3 convs in the (non-resblock) up/downsampling layers; False = nearest / avg-pool only.
    conv_resample: bool = True
    # Gradient checkpointing of every residual and attention block (torch.utils.checkpoint).
    use_checkpoint: bool = False
    # GroupNorm groups; 32 in every official model (every width must be divisible by it).
    num_groups: int = 32
    # Attention between the middle block's two residual blocks (every OpenAI model); False = two residual blocks
    # only (Karlo's 64 -> 256 upsampler, whose keys are middle_block.0 and .1).
    use_middle_attention: bool = True

    def widths(self) -> list[int]:
        """Channel width of every level: int(mult * model_channels)."""
        return [int(m * self.model_channels) for m in self.channel_mult]

    def attention_widths(self) -> list[int]:
        """Widths of the levels whose downsample rate 2**level is in ``attention_resolutions`` (the
        blocks with attention on the way down and up; the middle block's is ``widths()[-1]``)."""
        return [w for level, w in enumerate(self.widths()) if 2**level in self.attention_resolutions]

    def _check_heads(self, widths: list[int], heads_field: str, heads: int, where: str) -> None:
        """The official constraint: every attention width ``widths`` splits into whole heads."""
        if self.num_head_channels == -1:
            if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
                raise _bad(heads_field, heads, "an integer >= 1 (or set num_head_channels)")
            if any(w % heads for w in widths):
                raise _bad(heads_field, heads, f"a divisor of every width with attention{where} {sorted(set(widths))}")
        elif any(w % self.num_head_channels for w in widths):
            raise _bad("num_head_channels", self.num_head_channels,
                       f"-1 or a divisor of every width with attention{where} {sorted(set(widths))}")

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its valid values."""
        for name in ("in_channels", "model_channels", "num_res_blocks", "num_groups"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _bad(name, v, "an integer >= 1")
        if not self.channel_mult or any(not isinstance(m, int | float) or isinstance(m, bool) or not math.isfinite(m)
                                        or m <= 0 for m in self.channel_mult):
            raise _bad("channel_mult", self.channel_mult, "a non-empty tuple of finite positive numbers")
        if any(not isinstance(ds, int) or isinstance(ds, bool) for ds in self.attention_resolutions):
            raise _bad("attention_resolutions", self.attention_resolutions, "a tuple of integer downsample rates")
        valid_ds = [2**i for i in range(len(self.channel_mult))]
        unreached = [ds for ds in self.attention_resolutions if ds not in valid_ds]
        if unreached:  # the official constructors test `ds in attention_resolutions` per level: these never match
            warnings.warn(f"attention_resolutions {unreached} are not downsample rates of any level {valid_ds} "
                          "and are ignored, as in the official code (rates, not pixel sizes)", stacklevel=3)
        if not 0.0 <= self.dropout < 1.0:
            raise _bad("dropout", self.dropout, "a float in [0, 1)")
        widths = [int(self.channel_mult[0] * self.model_channels), *self.widths()]
        for w in widths:
            if w < 1 or w % self.num_groups:
                raise _bad("num_groups", self.num_groups,
                           f"a divisor of every level width {sorted(set(widths))}")
        nhc = self.num_head_channels
        if nhc != -1 and (not isinstance(nhc, int) or isinstance(nhc, bool) or nhc < 1):
            raise _bad("num_head_channels", nhc, "-1 (use num_heads) or an integer >= 1")
        # only the widths that have attention are checked (official): the levels in attention_resolutions
        # and the middle block, whose attention is there unless use_middle_attention is False
        middle = [self.widths()[-1]] if self.use_middle_attention else []
        self._check_heads([*self.attention_widths(), *middle], "num_heads", self.num_heads,
                          " (levels in attention_resolutions and the middle block)")
        for name in ("use_new_attention_order", "use_scale_shift_norm", "resblock_updown",
                     "conv_resample", "use_checkpoint", "use_middle_attention"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "True or False")

    def _check_choice(self, name: str, lit: Any) -> None:
        choices = get_args(lit)
        if getattr(self, name) not in choices:
            raise _bad(name, getattr(self, name), ", ".join(repr(c) for c in choices))


@dataclass(frozen=True)
class UNetConfig(BackboneConfig):
    """The denoiser U-Net: every switch of the official networks plus the conditioning inputs."""

    # Heads of the upsampling half's attention when num_head_channels == -1; -1 = num_heads (improved- and
    # guided-diffusion's num_heads_upsample; their scripts always pass -1).
    num_heads_upsample: int = -1
    # Output channels; None = in_channels * (2 if learn_sigma else 1).
    out_channels: int | None = None
    # Output 2C channels: eps and the variance interpolation v (iDDPM Sec. 3.1).
    learn_sigma: bool = False
    # Number of classes for class-conditioning (label_emb), None = unconditional.
    num_classes: int | None = None
    # Add one extra "null" label (index num_classes) for classifier-free guidance; y=None uses it.
    class_null: bool = False
    # Channels of a low-res image, bilinearly upsampled and concatenated to x_t (SuperResModel); 0 = none.
    low_res_channels: int = 0
    # Inpainting: concatenate inpaint_image * inpaint_mask and inpaint_mask (GLIDE, in_channels + 1 more).
    inpaint: bool = False
    # Width of a conditioning vector projected (cond_proj) and added to the time embedding; None = none.
    cond_dim: int | None = None
    # Width D of context tokens that attention layers attend to (GLIDE encoder_kv); None = none.
    encoder_channels: int | None = None
    # Training image size (informative; checked to be divisible by the total downsampling).
    image_size: int | None = None

    @property
    def heads_upsample(self) -> int:
        """Heads of the upsampling half's attention layers (``num_heads_upsample``, -1 = ``num_heads``)."""
        return self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample

    @property
    def resolved_out_channels(self) -> int:
        """Output channels after applying ``learn_sigma``."""
        if self.out_channels is not None:
            return self.out_channels
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def input_channels(self) -> int:
        """Channels of the first conv's input: x_t, [inpaint image, mask], [upsampled low-res]."""
        return self.in_channels + (self.in_channels + 1 if self.inpaint else 0) + self.low_res_channels

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its valid values."""
        super().validate()
        nhu = self.num_heads_upsample
        if not isinstance(nhu, int) or isinstance(nhu, bool) or (nhu != -1 and nhu < 1):
            raise _bad("num_heads_upsample", nhu, "-1 (= num_heads) or an integer >= 1")
        if self.num_head_channels == -1 and nhu != -1:
            self._check_heads(self.attention_widths(), "num_heads_upsample", nhu,
                              " on the way up (levels in attention_resolutions)")
        if self.out_channels is not None and (not isinstance(self.out_channels, int) or self.out_channels < 1):
            raise _bad("out_channels", self.out_channels, "None or an integer >= 1")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise _bad("num_classes", self.num_classes, "None or an integer >= 1")
        if self.class_null and self.num_classes is None:
            raise _bad("class_null", self.class_null, "False when num_classes is None")
        if not isinstance(self.low_res_channels, int) or self.low_res_channels < 0:
            raise _bad("low_res_channels", self.low_res_channels, "an integer >= 0")
        for name in ("cond_dim", "encoder_channels"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise _bad(name, v, "None or an integer >= 1")
        if self.image_size is not None:
            f = 2 ** (len(self.channel_mult) - 1)
            if not isinstance(self.image_size, int) or self.image_size % f:
                raise _bad("image_size", self.image_size, f"None or a multiple of {f}")


def _attention(cfg: BackboneConfig, ch: int, encoder_channels: int | None = None,
               num_heads: int | None = None) -> AttentionBlock:
    return AttentionBlock(
        ch,
        num_heads=cfg.num_heads if num_heads is None else num_heads,
        num_head_channels=cfg.num_head_channels,
        use_new_attention_order=cfg.use_new_attention_order,
        encoder_channels=encoder_channels,
        use_checkpoint=cfg.use_checkpoint,
        groups=cfg.num_groups,
    )


def _resblock(cfg: BackboneConfig, ch: int, emb_dim: int, out_ch: int | None = None, **kw) -> ResBlock:
    return ResBlock(
        ch, emb_dim, cfg.dropout, out_channels=out_ch,
        use_scale_shift_norm=cfg.use_scale_shift_norm, use_checkpoint=cfg.use_checkpoint,
        groups=cfg.num_groups, **kw,
    )


def build_encoder_half(cfg: BackboneConfig, in_ch: int, encoder_channels: int | None = None):
    """Build the time embedding MLP, the downsampling half and the middle block (official layout).

    Returns a dict: ``time_embed`` (Sequential), ``input_blocks`` (ModuleList), ``middle_block``,
    ``input_block_chans`` (width of every skip tensor), ``ch`` (middle width), ``ds`` (final
    downsample rate), ``feature_size`` (sum of widths, for the classifier's spatial pools).
    """
    emb_dim = cfg.model_channels * 4
    time_embed = nn.Sequential(
        nn.Linear(cfg.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
    )
    ch = int(cfg.channel_mult[0] * cfg.model_channels)
    input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_ch, ch, 3, padding=1))])
    chans, ds, feature_size = [ch], 1, ch
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            out_ch = int(mult * cfg.model_channels)
            layers: list[nn.Module] = [_resblock(cfg, ch, emb_dim, out_ch)]
            ch = out_ch
            if ds in cfg.attention_resolutions:
                layers.append(_attention(cfg, ch, encoder_channels))
            input_blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
            feature_size += ch
        if level != len(cfg.channel_mult) - 1:
            down = (_resblock(cfg, ch, emb_dim, ch, down=True) if cfg.resblock_updown
                    else Downsample(ch, cfg.conv_resample, ch))
            input_blocks.append(TimestepEmbedSequential(down))
            chans.append(ch)
            ds *= 2
            feature_size += ch
    middle_block = TimestepEmbedSequential(
        _resblock(cfg, ch, emb_dim),
        *([_attention(cfg, ch, encoder_channels)] if cfg.use_middle_attention else []),
        _resblock(cfg, ch, emb_dim),
    )
    feature_size += ch
    return dict(time_embed=time_embed, input_blocks=input_blocks, middle_block=middle_block,
                input_block_chans=chans, ch=ch, ds=ds, feature_size=feature_size)


class UNet(nn.Module):
    """The diffusion U-Net (DDPM Sec. 4 / iDDPM / ADM Sec. 3 / GLIDE), built from a ``UNetConfig``.

    Submodule names equal the official ones (``time_embed``, ``label_emb``, ``input_blocks``,
    ``middle_block``, ``output_blocks``, ``out``), so official state dicts load unchanged; the only
    difflab-specific keys are ``cond_proj`` (conditioning vector) and, with ``class_null``, one
    extra row of ``label_emb``.

    Call: ``net(x_t, t, y=None, low_res=None, cond=None, context=None, context_mask=None,
    inpaint_image=None, inpaint_mask=None) -> [N, out_channels, H, W]`` raw output (eps, or
    [eps, v] with ``learn_sigma``; ``difflab.prediction`` interprets it).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        emb_dim = cfg.model_channels * 4
        half = build_encoder_half(cfg, cfg.input_channels, cfg.encoder_channels)
        self.time_embed = half["time_embed"]
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes + int(cfg.class_null), emb_dim)
        if cfg.cond_dim is not None:
            self.cond_proj = nn.Linear(cfg.cond_dim, emb_dim)
        self.input_blocks = half["input_blocks"]
        self.middle_block = half["middle_block"]
        chans, ch, ds = list(half["input_block_chans"]), half["ch"], half["ds"]
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                out_ch = int(cfg.model_channels * mult)
                layers: list[nn.Module] = [_resblock(cfg, ch + chans.pop(), emb_dim, out_ch)]
                ch = out_ch
                if ds in cfg.attention_resolutions:
                    layers.append(_attention(cfg, ch, cfg.encoder_channels, cfg.heads_upsample))
                if level and i == cfg.num_res_blocks:
                    layers.append(_resblock(cfg, ch, emb_dim, ch, up=True) if cfg.resblock_updown
                                  else Upsample(ch, cfg.conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            normalization(ch, cfg.num_groups),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, cfg.resolved_out_channels, 3, padding=1)),
        )

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        inpaint_image: torch.Tensor | None = None,
        inpaint_mask: torch.Tensor | None = None,
        *,
        emb_extra: torch.Tensor | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        """Apply the network.

        Args:
            x_t: [N, C, H, W] noisy images.
            t: [N] timestep index of the original process (LongTensor; floats also accepted).
            y: [N] class labels (LongTensor); None on a ``class_null`` model = the null label.
            low_res: [N, low_res_channels, h, w] low-res image (super-resolution), bilinearly upsampled.
            cond: [N, cond_dim] conditioning vector added (after ``cond_proj``) to the time embedding.
            context: [N, S, encoder_channels] context tokens for every attention layer.
            context_mask: [N, S] bool, True = attend (None = attend to all tokens).
            inpaint_image, inpaint_mask: [N, C, H, W] and [N, 1, H, W] (zeros when None, as GLIDE).
            emb_extra: [N, 4 * model_channels] added to the time embedding as it is: the sum of a subclass's own
                projections of its conditioning (unCLIP's decoder, ``difflab.nn.clip_unet``).
        Returns:
            [N, out_channels, H, W] raw output.
        """
        cfg = self.config
        extra = {k: v for k, v in extra.items() if v is not None}
        if extra:
            raise ValueError(
                f"unexpected conditioning {sorted(extra)}; valid: y, low_res, cond, context, "
                "context_mask, inpaint_image, inpaint_mask"
            )
        emb = self.time_embed(timestep_embedding(t, cfg.model_channels).to(self.time_embed[0].weight.dtype))
        if cfg.num_classes is not None:
            if y is None:
                if not cfg.class_null:
                    raise ValueError("this model is class-conditional: pass y (labels of shape [N])")
                y = torch.full((x_t.shape[0],), cfg.num_classes, dtype=torch.long, device=x_t.device)
            emb = emb + self.label_emb(y)
        elif y is not None:
            raise ValueError("y was given but the model is unconditional (num_classes=None)")
        if cfg.cond_dim is not None:
            if cond is not None:
                emb = emb + self.cond_proj(cond)
        elif cond is not None:
            raise ValueError("cond was given but the model has cond_dim=None")
        if emb_extra is not None:
            emb = emb + emb_extra.to(emb.dtype)
        if context is not None:
            if cfg.encoder_channels is None:
                raise ValueError("context was given but the model has encoder_channels=None")
            context = context.transpose(1, 2)  # [N, S, D] -> [N, D, S] for the 1x1 Conv1d encoder_kv
        h = x_t
        if cfg.inpaint:
            if inpaint_image is None:
                inpaint_image = torch.zeros_like(x_t)
            if inpaint_mask is None:
                inpaint_mask = torch.zeros_like(x_t[:, :1])
            h = torch.cat([h, inpaint_image * inpaint_mask, inpaint_mask], dim=1)
        if cfg.low_res_channels:
            if low_res is None:
                raise ValueError("this is a super-resolution model: pass low_res")
            h = torch.cat([h, F.interpolate(low_res, x_t.shape[-2:], mode="bilinear")], dim=1)
        elif low_res is not None:
            raise ValueError("low_res was given but the model has low_res_channels=0")
        hs = []
        for module in self.input_blocks:
            h = module(h, emb, context, context_mask)
            hs.append(h)
        h = self.middle_block(h, emb, context, context_mask)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context, context_mask)
        return self.out(h)
