"""GLIDE's text-conditional U-Net: the U-Net of ``difflab.nn.unet`` with GLIDE's text encoder inside.

One class for the four official ones (glide_text2im/text2im_model.py), chosen by the U-Net's switches:

    official class                 difflab TextUNetConfig          first conv input
    Text2ImUNet                    (defaults)                      [x_t]                                 3
    InpaintText2ImUNet             inpaint=True                    [x_t, image * mask, mask]             7
    SuperResText2ImUNet            low_res_channels=3              [x_t, up(low_res)]                    6
    SuperResInpaintText2ImUnet     inpaint=True, low_res_ch.=3     [x_t, image * mask, mask, up(low_res)] 10

up() is bilinear resizing to x_t's size with align_corners=False (the U-Net's ``low_res`` path).

Notation map (code -> paper / official code):
    tokens, mask [N, text_ctx]   the caption (difflab.text tokenizers); mask False on padding
    pooled [N, W]                last position of the text encoder output -> cond_proj (official
                                 ``transformer_proj``) -> added to the timestep embedding
    context [N, text_ctx, W]     the text sequence, keys/values of every attention layer (``encoder_kv``),
                                 placed before the image's own keys; all text positions are attended to
                                 (the official code passes no mask to the image side)

State-dict keys are the official ones except ``transformer_proj.*``, which is ``cond_proj.*`` here
(``difflab.convert.KEY_RENAMES``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from difflab.nn.text import TextEncoderConfig, TextEncoderMixin
from difflab.nn.unet import UNet, UNetConfig, _bad

__all__ = ["TextUNetConfig", "TextUNet"]


@dataclass(frozen=True)
class TextUNetConfig(UNetConfig):
    """The U-Net's switches (``UNetConfig``) plus GLIDE's text encoder (``text``).

    ``cond_dim`` and ``encoder_channels`` carry the text width: None (the default) takes
    ``text.xf_width``, any other value must equal it.
    """

    # GLIDE's text transformer (text_ctx, xf_width, xf_layers, xf_heads, xf_final_ln, xf_padding, n_vocab).
    text: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)

    def __post_init__(self) -> None:
        width = getattr(self.text, "xf_width", None)
        for name in ("cond_dim", "encoder_channels"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, width)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (``text.*`` for the encoder's) and its valid values."""
        if not isinstance(self.text, TextEncoderConfig):
            raise _bad("text", self.text, "a TextEncoderConfig")
        self.text.validate(prefix="text.")
        super().validate()
        for name in ("cond_dim", "encoder_channels"):
            if getattr(self, name) != self.text.xf_width:
                raise _bad(name, getattr(self, name), f"None or text.xf_width={self.text.xf_width}")
        if self.num_classes is not None:
            raise _bad("num_classes", self.num_classes, "None (GLIDE's text U-Nets have no class labels)")


class TextUNet(TextEncoderMixin, UNet):
    """GLIDE's ``Text2ImUNet`` (and its inpainting / super-resolution variants), built from a ``TextUNetConfig``.

    A ``UNet`` whose conditioning vector (``cond_proj``) is the pooled text and whose attention layers attend
    to the text sequence; the text encoder's modules sit beside the U-Net's (:class:`TextEncoderMixin`).

    Call: ``net(x_t, t, tokens, mask, low_res=None, inpaint_image=None, inpaint_mask=None)`` ->
    [N, out_channels, H, W] raw output (GLIDE: eps and the learned-range variance value, 6 channels).
    ``net.encode_text(tokens, mask)`` gives (pooled, context) alone.
    """

    def __init__(self, config: TextUNetConfig):
        if not isinstance(config, TextUNetConfig):
            raise ValueError(f"TextUNet needs a TextUNetConfig; got {type(config).__name__}")
        super().__init__(config)  # UNet: validates the whole config
        self._init_text_encoder(config.text)

    def forward(  # noqa: D417
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        tokens: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        **cond: Any,
    ) -> torch.Tensor:
        """Apply the network (official ``Text2ImUNet.forward`` and its subclasses' forwards).

        Args:
            x_t: [N, C, H, W] noisy images.
            t: [N] timestep index of the original process.
            tokens: [N, text_ctx] caption ids; mask: [N, text_ctx] bool (True on caption tokens).
            **cond: the U-Net's image conditioning: ``low_res`` [N, C, h, w] (super-resolution),
                ``inpaint_image`` [N, C, H, W] and ``inpaint_mask`` [N, 1, H, W] (zeros when None); and
                ``cond`` [N, xf_width], a vector added to the pooled text before ``cond_proj`` (difflab: a text
                super-resolution stage's noise-augmentation level embedding, CDM; never in GLIDE's models).
        Returns:
            [N, out_channels, H, W] raw output.
        """
        taken = sorted(k for k in ("context", "context_mask") if cond.get(k) is not None)
        if taken:
            raise ValueError(f"{', '.join(taken)} come from the text encoder here: pass tokens and mask")
        extra = cond.pop("cond", None)
        cond = {k: v for k, v in cond.items() if k not in ("context", "context_mask")}
        pooled, context = self.encode_text(tokens, mask)
        if extra is not None:
            pooled = pooled + extra.to(pooled.dtype)
        return super().forward(x_t, t, cond=pooled, context=context, context_mask=None, **cond)
