"""unCLIP's diffusion prior: a causal transformer that predicts the clean CLIP image embedding x_0.

The network of Karlo's ``PriorTransformer`` (kakaobrain/karlo, ``karlo.modules.xf``; unCLIP Sec. 2.1, PAPERS.md
Sec. 7 and 9), output for output (tests/nn/test_karlo.py). unCLIP's prior is "a decoder-only Transformer with a
causal attention mask on a sequence consisting of, in order: the encoded text, the CLIP text embedding, an
embedding for the diffusion timestep, the noised CLIP image embedding, and a final embedding whose output from the
Transformer is used to predict the unnoised CLIP image embedding".

Notation map (code -> paper / official code):
    x_t [N, D]            the noised image embedding z_i^(t), in the prior's normalised space
                          ((z_i - clip_mean) / clip_std; D = clip_dim, 768 for ViT-L/14)
    t [N]                 timestep index of the original process (0..T-1)
    text_emb [N, D]       CLIP's pooled text embedding z_t (official ``text_emb``, Karlo's ``txt_feat``)
    text_enc [N, L, D]    CLIP's text token sequence (ln_final output, L = text_ctx = 77; ``txt_feat_seq``)
    mask [N, L]           True on caption tokens (SOT .. EOT), False on padding
    W, H                  xf_width, xf_heads
    sequence [N, L+4, W]  [text_enc_proj(text_enc) (L tokens), text_emb_proj(text_emb), time_embed(t),
                          clip_img_proj(x_t), prd_emb] + positional_embedding
    output [N, D]         out_proj of the last position (prd_emb's) after final_ln: the predicted x_0

The blocks are GLIDE's (:class:`difflab.nn.text.Transformer`: pre-LN, head-major q|k|v split of ``c_qkv``, scale
C^-1/4 on q and on k, exact GELU, LayerNorm eps 1e-5 in float32) with a mask: causal, and padded caption tokens
are never attended to (the official additive 0 / -inf mask; the 4 trailing positions are always real).

State-dict keys are the official ones (``time_embed.{0,2}``, ``text_enc_proj``, ``text_emb_proj``,
``clip_img_proj``, ``out_proj``, ``transformer.resblocks.{i}.{ln_1, attn.c_qkv, attn.c_proj, ln_2, mlp.c_fc,
mlp.c_proj}``, ``final_ln``, ``positional_embedding`` [1, L+4, W], ``prd_emb`` [1, 1, W]); a released Karlo
``prior`` checkpoint holds them under ``model.`` (``difflab.convert``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difflab.nn.layers import timestep_embedding
from difflab.nn.text import LayerNorm32, Transformer, validate_transformer_fields
from difflab.nn.unet import _bad

__all__ = ["PriorConfig", "PriorTransformer", "PRIOR_EXTRA_TOKENS"]

# the positions after the caption: text_emb, the timestep, the noised image embedding, the prediction query
PRIOR_EXTRA_TOKENS = 4


@dataclass(frozen=True)
class PriorConfig:
    """Karlo's diffusion prior (``model.hparams`` of configs/prior_1B_vit_l.yaml; defaults = the released one)."""

    # Caption length L of text_enc and mask (CLIP's context, 77); the sequence has L + 4 positions.
    text_ctx: int = 77
    # Transformer width W (released: 2048).
    xf_width: int = 2048
    # Residual attention blocks (released: 20).
    xf_layers: int = 20
    # Attention heads; must divide xf_width (released: 32, i.e. 64 channels per head).
    xf_heads: int = 32
    # A LayerNorm after the last block, before out_proj (released: True).
    xf_final_ln: bool = True
    # Width D of CLIP's embeddings and of its token sequence (ViT-L/14: 768).
    clip_dim: int = 768

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its valid values."""
        validate_transformer_fields(self, ("text_ctx", "xf_width", "xf_layers", "xf_heads", "clip_dim"))
        if not isinstance(self.xf_final_ln, bool):
            raise _bad("xf_final_ln", self.xf_final_ln, "True or False")

    @property
    def n_ctx(self) -> int:
        """Length of the transformer's sequence: the caption plus the 4 extra positions."""
        return self.text_ctx + PRIOR_EXTRA_TOKENS


class PriorTransformer(nn.Module):
    """unCLIP's diffusion prior network (Karlo's ``PriorTransformer``), built from a :class:`PriorConfig`.

    Call: ``net(x_t, t, text_emb, text_enc, mask) -> [N, clip_dim]``, the predicted x_0 of the (normalised) image
    embedding; a denoiser with ``mean_type`` x0 and a fixed variance (Karlo: fixed small) in ``difflab.prediction``.
    The causal mask is built here (the official wrapper passes it as ``causal_mask``).
    """

    def __init__(self, config: PriorConfig):
        super().__init__()
        if not isinstance(config, PriorConfig):
            raise ValueError(f"PriorTransformer needs a PriorConfig; got {type(config).__name__}")
        config.validate()
        self.config = cfg = config
        w = cfg.xf_width
        self.time_embed = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.text_enc_proj = nn.Linear(cfg.clip_dim, w)
        self.text_emb_proj = nn.Linear(cfg.clip_dim, w)
        self.clip_img_proj = nn.Linear(cfg.clip_dim, w)
        self.out_proj = nn.Linear(w, cfg.clip_dim)
        self.transformer = Transformer(w, cfg.xf_layers, cfg.xf_heads)
        self.final_ln = LayerNorm32(w) if cfg.xf_final_ln else None
        # the official initialisation (std 0.01 for both); a released checkpoint overwrites them
        self.positional_embedding = nn.Parameter(torch.empty(1, cfg.n_ctx, w))
        self.prd_emb = nn.Parameter(torch.empty(1, 1, w))
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.prd_emb, std=0.01)
        causal = torch.ones(cfg.n_ctx, cfg.n_ctx, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", causal, persistent=False)  # [L+4, L+4], True = may attend

    def attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """[N, L] caption mask -> [N, L+4, L+4] bool: causal, and no query attends a padded caption token."""
        keys = torch.cat([mask.to(torch.bool), mask.new_ones(mask.shape[0], PRIOR_EXTRA_TOKENS, dtype=torch.bool)], 1)
        return self.causal_mask[None] & keys[:, None, :]

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text_emb: torch.Tensor | None = None,
        text_enc: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the clean image embedding (official ``PriorTransformer.forward``).

        Args:
            x_t: [N, clip_dim] noised image embedding (normalised space).
            t: [N] timestep index of the original process.
            text_emb: [N, clip_dim] CLIP's pooled text embedding of the caption.
            text_enc: [N, text_ctx, clip_dim] CLIP's text token sequence.
            mask: [N, text_ctx] bool, True on caption tokens (Karlo's tokenizer: SOT .. EOT; the unconditional
                caption is "", i.e. [SOT, EOT]).
        Returns:
            [N, clip_dim] the predicted x_0 (normalised space).
        """
        cfg = self.config
        n = x_t.shape[0]
        if text_emb is None or text_enc is None or mask is None:
            raise ValueError("the prior is text-conditional: pass text_emb [N, clip_dim], text_enc "
                             "[N, text_ctx, clip_dim] and mask [N, text_ctx] (CLIP features of the caption)")
        if x_t.dim() != 2 or x_t.shape[1] != cfg.clip_dim:
            raise ValueError(f"x_t must have shape [N, clip_dim={cfg.clip_dim}]; got {list(x_t.shape)}")
        if tuple(text_enc.shape) != (n, cfg.text_ctx, cfg.clip_dim):
            raise ValueError(f"text_enc must have shape [N={n}, text_ctx={cfg.text_ctx}, clip_dim={cfg.clip_dim}]; "
                             f"got {list(text_enc.shape)}")
        if tuple(mask.shape) != (n, cfg.text_ctx):
            raise ValueError(f"mask must have shape [N={n}, text_ctx={cfg.text_ctx}]; got {list(mask.shape)}")
        dtype = self.time_embed[0].weight.dtype
        t_emb = self.time_embed(timestep_embedding(t, cfg.xf_width).to(dtype))
        seq = torch.cat([
            self.text_enc_proj(text_enc),
            self.text_emb_proj(text_emb)[:, None],
            t_emb[:, None],
            self.clip_img_proj(x_t)[:, None],
            self.prd_emb.to(t_emb.dtype).expand(n, -1, -1),
        ], dim=1)
        seq = seq + self.positional_embedding.to(seq.dtype)
        out = self.transformer(seq, self.attention_mask(mask))
        if self.final_ln is not None:
            out = self.final_ln(out)
        return self.out_proj(out[:, -1])
