"""unCLIP's decoder: GLIDE's text U-Net conditioned on a CLIP image embedding and CLIP's text features.

The network of Karlo's ``PLMImUNet`` (kakaobrain/karlo, ``karlo.modules.unet``; unCLIP Sec. 2.1, PAPERS.md Sec. 7
and 9), output for output (tests/nn/test_karlo.py): the U-Net of ``difflab.nn.unet`` whose attention layers attend
to context tokens (GLIDE's ``encoder_kv``, keys before the image's own) and whose time embedding gets the
conditioning vectors added. unCLIP: "projecting and adding CLIP embeddings to the existing timestep embedding, and
by projecting CLIP embeddings into four extra tokens of context that are concatenated to the sequence of outputs
from the GLIDE text encoder". Karlo replaces GLIDE's text transformer by CLIP's own text features (ViT-L/14).

Notation map (code -> paper / official code):
    x_t [N, 3, H, W], t [N]   the noisy image and the timestep index of the original process
    y [N, D]                  the CLIP image embedding z_i (D = clip_dim); None = ``cf_param``, the learned null
    txt_feat [N, D]           CLIP's pooled text embedding
    txt_feat_seq [N, L, D]    CLIP's text token sequence (L = text_ctx = 77)
    mask [N, L]               True on caption tokens (SOT .. EOT)
    W                         xf_width, the width of the context tokens (``encoder_channels``)
    emb                       time_embed(t) + clip_emb(y) + text_feat_proj(txt_feat)
    context [N, 4 + L, W]     [clip_tok_proj(y) as 4 tokens, text_seq_proj(txt_feat_seq)], mask padded with 4 True
                              at the front; the 4 tokens INTERLEAVE: token k, channel c is clip_tok_proj(y)[c*4 + k]
                              (the official ``reshape(N, W, 4)`` in channels-first layout)

State-dict keys are the official ones (the U-Net's, ``clip_emb``, ``text_feat_proj``, ``clip_tok_proj``,
``text_seq_proj.{0,1}`` (Linear + LayerNorm), ``cf_param``); a released Karlo ``decoder`` checkpoint holds them
under ``model.`` (``difflab.convert``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difflab.nn.text import LayerNorm32
from difflab.nn.unet import UNet, UNetConfig, _bad

__all__ = ["DecoderUNetConfig", "DecoderUNet"]


@dataclass(frozen=True)
class DecoderUNetConfig(UNetConfig):
    """The U-Net's switches (``UNetConfig``) plus Karlo's CLIP conditioning (``PLMImUNet`` arguments).

    ``encoder_channels`` carries the context width: None (the default) takes ``xf_width``, any other value must
    equal it. ``cond_dim`` and ``num_classes`` stay None (the conditioning vectors have their own projections).
    """

    # Width D of CLIP's image embedding, pooled text embedding and text token sequence (ViT-L/14: 768).
    clip_dim: int = 768
    # Width W of the context tokens the attention layers attend to (released: 1536).
    xf_width: int = 1536
    # Caption length L of txt_feat_seq and mask (CLIP's context, 77).
    text_ctx: int = 77
    # CLIP image embedding -> this many extra context tokens (clip_tok_proj); None = none (released: 4).
    clip_emb_mult: int | None = 4
    # Rate at which training replaces y by the learned null cf_param (unCLIP: 10%); > 0 creates cf_param, the y
    # of the unconditional half in classifier-free guidance. Karlo's inference never drops y.
    clip_emb_drop: float = 0.1

    def __post_init__(self) -> None:
        if self.encoder_channels is None:
            object.__setattr__(self, "encoder_channels", self.xf_width)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its valid values."""
        for name in ("clip_dim", "xf_width", "text_ctx"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _bad(name, v, "an integer >= 1")
        m = self.clip_emb_mult
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
            raise _bad("clip_emb_mult", m, "None or an integer >= 1")
        if not isinstance(self.clip_emb_drop, int | float) or not 0.0 <= self.clip_emb_drop < 1.0:
            raise _bad("clip_emb_drop", self.clip_emb_drop, "a float in [0, 1)")
        super().validate()
        if self.encoder_channels != self.xf_width:
            raise _bad("encoder_channels", self.encoder_channels, f"None or xf_width={self.xf_width}")
        for name in ("cond_dim", "num_classes"):
            if getattr(self, name) is not None:
                raise _bad(name, getattr(self, name), "None (the decoder projects y and txt_feat itself)")


class DecoderUNet(UNet):
    """unCLIP's decoder (Karlo's ``PLMImUNet``), built from a :class:`DecoderUNetConfig`.

    Call: ``net(x_t, t, y=None, txt_feat=None, txt_feat_seq=None, mask=None)`` -> [N, out_channels, H, W] raw
    output (Karlo: eps and the learned-range variance value, 6 channels). ``y=None`` takes ``cf_param``.
    """

    def __init__(self, config: DecoderUNetConfig):
        if not isinstance(config, DecoderUNetConfig):
            raise ValueError(f"DecoderUNet needs a DecoderUNetConfig; got {type(config).__name__}")
        super().__init__(config)  # UNet: validates the whole config
        cfg = config
        emb_dim = cfg.model_channels * 4
        self.clip_emb = nn.Linear(cfg.clip_dim, emb_dim)
        self.text_seq_proj = nn.Sequential(nn.Linear(cfg.clip_dim, cfg.xf_width), LayerNorm32(cfg.xf_width))
        self.text_feat_proj = nn.Linear(cfg.clip_dim, emb_dim)
        if cfg.clip_emb_mult is not None:
            self.clip_tok_proj = nn.Linear(cfg.clip_dim, cfg.xf_width * cfg.clip_emb_mult)
        if cfg.clip_emb_drop > 0:
            # the official code leaves it th.empty (always loaded); difflab draws it like an embedding
            self.cf_param = nn.Parameter(torch.empty(cfg.clip_dim))
            nn.init.normal_(self.cf_param, std=0.02)

    def clip_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """[N, clip_dim] -> [N, clip_emb_mult, xf_width]: token k, channel c = clip_tok_proj(y)[:, c * mult + k]."""
        cfg = self.config
        return self.clip_tok_proj(y).reshape(y.shape[0], cfg.xf_width, cfg.clip_emb_mult).transpose(1, 2)

    def encode_condition(
        self, y: torch.Tensor, txt_feat: torch.Tensor, txt_feat_seq: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The conditioning as the U-Net takes it: (emb_extra [N, 4 * model_channels], context [N, S, xf_width],
        context_mask [N, S] bool) with S = clip_emb_mult + text_ctx (official ``PLMImUNet.forward``'s prologue)."""
        emb_extra = self.clip_emb(y) + self.text_feat_proj(txt_feat)
        context = self.text_seq_proj(txt_feat_seq)
        context_mask = mask.to(torch.bool)
        if self.config.clip_emb_mult is not None:
            context = torch.cat([self.clip_tokens(y).to(context.dtype), context], dim=1)
            front = context_mask.new_ones(mask.shape[0], self.config.clip_emb_mult)
            context_mask = torch.cat([front, context_mask], dim=1)
        return emb_extra, context, context_mask

    def forward(  # noqa: D417
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        txt_feat: torch.Tensor | None = None,
        txt_feat_seq: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        y_drop: torch.Tensor | None = None,
        **cond,
    ) -> torch.Tensor:
        """Apply the network (official ``PLMImUNet.forward``).

        Args:
            x_t: [N, C, H, W] noisy images.
            t: [N] timestep index of the original process.
            y: [N, clip_dim] CLIP image embedding; None = ``cf_param`` for every sample (the unconditional y).
            txt_feat: [N, clip_dim] CLIP's pooled text embedding.
            txt_feat_seq: [N, text_ctx, clip_dim] CLIP's text token sequence.
            mask: [N, text_ctx] bool, True on caption tokens (the unconditional caption is "": [SOT, EOT]).
            y_drop: [N] (or [1]) bool, True where y is replaced by ``cf_param``: training's 10% embedding dropout
                (unCLIP Sec. 2.1) and the unconditional half of classifier-free guidance.
            **cond: the U-Net's image conditioning (``low_res``, ``inpaint_image``, ``inpaint_mask``) when the
                config has it; Karlo's decoder has none.
        Returns:
            [N, out_channels, H, W] raw output.
        """
        cfg = self.config
        taken = sorted(k for k in ("context", "context_mask", "cond", "emb_extra") if cond.get(k) is not None)
        if taken:
            raise ValueError(f"{', '.join(taken)} come from y, txt_feat, txt_feat_seq and mask here")
        cond = {k: v for k, v in cond.items() if k not in ("context", "context_mask", "cond", "emb_extra")}
        n = x_t.shape[0]
        if txt_feat is None or txt_feat_seq is None or mask is None:
            raise ValueError("the decoder is text-conditional: pass txt_feat [N, clip_dim], txt_feat_seq "
                             "[N, text_ctx, clip_dim] and mask [N, text_ctx] (CLIP features of the caption)")
        if y is None:
            if not hasattr(self, "cf_param"):
                raise ValueError("pass y [N, clip_dim] (this decoder has no cf_param: clip_emb_drop=0)")
            y = self.cf_param[None].expand(n, -1)
        if tuple(y.shape) != (n, cfg.clip_dim):
            raise ValueError(f"y must have shape [N={n}, clip_dim={cfg.clip_dim}]; got {list(y.shape)}")
        if y_drop is not None and bool(y_drop.any()):
            if not hasattr(self, "cf_param"):
                raise ValueError("y_drop needs cf_param (this decoder has clip_emb_drop=0)")
            y = torch.where(y_drop.to(torch.bool).reshape(-1, 1).to(y.device), self.cf_param.to(y.dtype), y)
        if tuple(txt_feat_seq.shape) != (n, cfg.text_ctx, cfg.clip_dim):
            raise ValueError(f"txt_feat_seq must have shape [N={n}, text_ctx={cfg.text_ctx}, clip_dim="
                             f"{cfg.clip_dim}]; got {list(txt_feat_seq.shape)}")
        if tuple(mask.shape) != (n, cfg.text_ctx):
            raise ValueError(f"mask must have shape [N={n}, text_ctx={cfg.text_ctx}]; got {list(mask.shape)}")
        emb_extra, context, context_mask = self.encode_condition(y, txt_feat, txt_feat_seq, mask)
        return super().forward(x_t, t, context=context, context_mask=context_mask, emb_extra=emb_extra, **cond)
