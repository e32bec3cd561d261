"""GLIDE's text encoder: token + position embeddings, a pre-LN transformer, an optional final LayerNorm.

The network of glide_text2im's ``Text2ImUNet.get_text_emb`` and ``xf.Transformer`` (GLIDE Sec. 3,
PAPERS.md Sec. 9), output for output. A caption of ``text_ctx`` BPE ids (padded, with a boolean mask)
becomes a context sequence for the U-Net's attention layers and a pooled vector for its time embedding.

Notation map (code -> paper / official code):
    tokens [N, L]       BPE ids, L = text_ctx (GPT-2 BPE, padded with n_vocab - 1; difflab.text)
    mask [N, L]         True on caption tokens, False on padding
    W, H, C             xf_width, xf_heads, C = W / H channels per head
    context [N, L, W]   the last layer's token sequence after final_ln (official ``xf_out``, NLC)
    pooled [N, W]       context[:, -1], the LAST position (padding for short captions), the input of
                        ``transformer_proj`` (difflab: ``UNet.cond_proj``)

Module names are the official ones (``token_embedding``, ``positional_embedding``, ``padding_embedding``,
``transformer.resblocks.{i}.{ln_1, attn.c_qkv, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``final_ln``),
held at the top level of the module as in ``Text2ImUNet``, so official GLIDE keys load unchanged into
:class:`TextTransformer` and into :class:`difflab.nn.text_unet.TextUNet`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from difflab.nn.unet import _bad

__all__ = [
    "GPT2_N_VOCAB",
    "TextEncoderConfig",
    "validate_transformer_fields",
    "LayerNorm32",
    "MultiheadAttention",
    "MLP",
    "ResidualAttentionBlock",
    "Transformer",
    "TextEncoderMixin",
    "TextTransformer",
]

GPT2_N_VOCAB = 50257  # GLIDE's tokenizer (glide_text2im/tokenizer/bpe.py): the padding id is 50256


@dataclass(frozen=True)
class TextEncoderConfig:
    """GLIDE's text transformer (official ``Text2ImUNet`` arguments; defaults = the released base model)."""

    # Caption length in tokens: the tokens are padded / cut to exactly this many (released: 128).
    text_ctx: int = 128
    # Transformer width W (released: 512 for the base model and the upsampler).
    xf_width: int = 512
    # Residual attention blocks (released: 16).
    xf_layers: int = 16
    # Attention heads; must divide xf_width (released: 8, i.e. 64 channels per head).
    xf_heads: int = 8
    # A LayerNorm after the last block, before the pooled vector is read (released: True).
    xf_final_ln: bool = True
    # A learned per-position padding_embedding replaces the input where mask is False (released: True).
    xf_padding: bool = True
    # Vocabulary size of the token embedding (GLIDE's GPT-2 BPE: 50257).
    n_vocab: int = GPT2_N_VOCAB

    def validate(self, prefix: str = "") -> None:
        """Raise ValueError naming the first bad field (as ``prefix + name``) and its valid values."""
        validate_transformer_fields(self, ("text_ctx", "xf_width", "xf_layers", "xf_heads", "n_vocab"), prefix)
        for name in ("xf_final_ln", "xf_padding"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(prefix + name, getattr(self, name), "True or False")


def validate_transformer_fields(cfg, int_fields: tuple[str, ...], prefix: str = "") -> None:
    """The checks every transformer config shares: each of ``int_fields`` an integer >= 1, and ``xf_heads`` a
    divisor of ``xf_width`` (ValueError naming ``prefix + field`` and the valid values)."""
    for name in int_fields:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise _bad(prefix + name, v, "an integer >= 1")
    if cfg.xf_width % cfg.xf_heads:
        divisors = [d for d in range(1, cfg.xf_width + 1) if cfg.xf_width % d == 0]
        shown = ", ".join(map(str, divisors[:12])) + (", ..." if len(divisors) > 12 else "")
        raise _bad(prefix + "xf_heads", cfg.xf_heads, f"a divisor of xf_width={cfg.xf_width} ({shown})")


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input dtype (official ``xf.LayerNorm``), with its gain
    and bias in float32 too (they stay float32 in the official fp16 model; here they may have been cast).

    [..., W] -> [..., W]; eps 1e-5.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class MultiheadAttention(nn.Module):
    """Multi-head self-attention (official ``xf.MultiheadAttention``; GLIDE's is non-causal and unmasked).

    ``c_qkv`` is read per head, [h0: q k v | h1: q k v | ...] (the legacy head-major layout of
    ``QKVMultiheadAttention``), not [Q | K | V]. Scores q.k / sqrt(C) (the official code puts
    C^-1/4 on q and on k: the same up to rounding), softmax over keys.

    Shapes: x [N, L, W] -> [N, L, W]; ``mask`` (optional) [N, L, L] bool, True = query i may attend key j
    (Karlo's prior: causal and padded keys off; the official additive 0 / -inf mask).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_qkv = nn.Linear(width, width * 3)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        n, length, width = x.shape
        qkv = self.c_qkv(x).view(n, length, self.heads, 3 * (width // self.heads))
        q, k, v = (p.transpose(1, 2) for p in qkv.chunk(3, dim=-1))  # [N, H, L, C] each
        attn_mask = None if mask is None else mask[:, None]  # [N, 1, L, L]: the same for every head
        out = F.scaled_dot_product_attention(q, k, v, attn_mask)  # [N, H, L, C]
        return self.c_proj(out.transpose(1, 2).reshape(n, length, width))


class MLP(nn.Module):
    """Linear W -> 4W, exact (erf) GELU, Linear 4W -> W (official ``xf.MLP``). [N, L, W] -> [N, L, W]."""

    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, width * 4)
        self.c_proj = nn.Linear(width * 4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x), mask), then x + mlp(ln_2(x)). [N, L, W] -> [N, L, W]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm32(width)
        self.mlp = MLP(width)
        self.ln_2 = LayerNorm32(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """``layers`` residual attention blocks in ``resblocks`` (official ``xf.Transformer``). [N, L, W] -> same;
    ``mask`` [N, L, L] bool (True = attend) reaches every block (see :class:`MultiheadAttention`)."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        for block in self.resblocks:
            x = block(x, mask)
        return x


class TextEncoderMixin:
    """The modules and the forward pass of GLIDE's text encoder, for an ``nn.Module`` that holds them at its
    top level under the official names: :class:`TextTransformer` alone, or the text U-Net beside its U-Net
    modules (official ``Text2ImUNet`` keeps them there too, so official keys need no prefix).

    Call ``self._init_text_encoder(config)`` after ``nn.Module.__init__``.
    """

    def _init_text_encoder(self, config: TextEncoderConfig) -> None:
        self.text_config = config
        w = config.xf_width
        self.transformer = Transformer(w, config.xf_layers, config.xf_heads)
        self.final_ln = LayerNorm32(w) if config.xf_final_ln else None
        self.token_embedding = nn.Embedding(config.n_vocab, w)
        # the official code leaves both position tables uninitialised (th.empty: they are always loaded);
        # difflab draws them as CLIP initialises its positions, for training from scratch
        self.positional_embedding = nn.Parameter(torch.empty(config.text_ctx, w))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if config.xf_padding:
            self.padding_embedding = nn.Parameter(torch.empty(config.text_ctx, w))
            nn.init.normal_(self.padding_embedding, std=0.01)

    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of padded captions (official ``get_text_emb`` without its projection).

        Args:
            tokens: [N, text_ctx] integer BPE ids (``Tokenizer.padded_tokens_and_mask``).
            mask: [N, text_ctx] bool, True on caption tokens; required with ``xf_padding`` (where it is
                False the input is ``padding_embedding`` instead of token + position), ignored otherwise.
        Returns:
            (pooled [N, xf_width], context [N, text_ctx, xf_width]): the sequence after the last block and
            ``final_ln``, and its LAST position (official ``xf_out[:, -1]``, read whatever the mask).
        """
        cfg = self.text_config
        if tokens is None:
            raise ValueError("this is a text-conditional model: pass tokens [N, text_ctx] (and mask), "
                             "e.g. from Tokenizer.padded_tokens_and_mask; the unconditional caption is ''")
        if tokens.dim() != 2 or tokens.shape[1] != cfg.text_ctx:
            raise ValueError(f"tokens must have shape [N, text_ctx={cfg.text_ctx}]; got {list(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be integer ids (torch.long); got {tokens.dtype}")
        x = self.token_embedding(tokens.long()) + self.positional_embedding[None]
        if cfg.xf_padding:
            if mask is None:
                raise ValueError("this text encoder has xf_padding=True: pass mask [N, text_ctx] bool "
                                 "(True on caption tokens, False on padding)")
            if tuple(mask.shape) != tuple(tokens.shape):
                raise ValueError(f"mask must have the shape of tokens {list(tokens.shape)}; got {list(mask.shape)}")
            x = torch.where(mask.to(torch.bool)[..., None], x, self.padding_embedding[None].to(x.dtype))
        x = self.transformer(x)
        if self.final_ln is not None:
            x = self.final_ln(x)
        return x[:, -1], x


class TextTransformer(TextEncoderMixin, nn.Module):
    """GLIDE's text encoder as a module of its own (see :class:`TextEncoderMixin`).

    Call: ``enc(tokens [N, text_ctx], mask [N, text_ctx] bool) -> (pooled [N, W], context [N, text_ctx, W])``.
    Its state dict holds the official GLIDE text keys unchanged (``token_embedding.weight``,
    ``positional_embedding``, ``padding_embedding``, ``transformer.resblocks.*``, ``final_ln.*``).
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        config.validate()
        self._init_text_encoder(config)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`TextEncoderMixin.encode_text`."""
        return self.encode_text(tokens, mask)

