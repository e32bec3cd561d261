"""CLIP (Radford et al. 2021) in OpenAI's layout: a ViT image encoder and a causal text transformer.

The networks of openai/CLIP's ``clip/model.py`` (``VisionTransformer``, ``Transformer``, ``CLIP``; the ViT
variants), with OpenAI's parameter names, so a released OpenAI or OpenCLIP ViT state dict loads key for key
(:mod:`difflab.convert`), and the same module at miniature size is the CLIP that unCLIP's prior and decoder
read on the scenes (``task: clip``, :mod:`difflab.train.tasks.clip`; unCLIP Sec. 2, PAPERS.md Sec. 7).
GLIDE's *noised* CLIP is another network (:mod:`difflab.nn.clip`).

Notation map (code -> paper / official code):
    x [N, 3, S, S]         images in [-1, 1] (S = image_resolution); mapped to [0, 1] and normalised by CLIP's
                           channel mean / std (OpenAI's preprocessing ``Normalize``) before ``conv1``
    tokens [N, L], lens [N]  token ids padded to L = context_length, and the count with SOT and EOT
    f(x) [N, E]            ``encode_image``: ln_post of the class token, @ ``proj`` (E = embed_dim)
    g(c) [N, E]            ``encode_text``: ln_final of the EOT token (position lens - 1), @ ``text_projection``
    seq [N, L, W_t]        the text transformer's ln_final output at every position (what Karlo's prior and
                           decoder take as ``text_enc`` / ``txt_feat_seq``)
    z_i, z_t               f / ||f||, g / ||g|| (F.normalize: CLIP's ``x / x.norm()``, guarded at 1e-12)
    logit_scale            log of the inverse temperature, initialised at log(1 / 0.07), clamped at 100

What OpenAI's code does and this module keeps: pre-LN residual blocks ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``
with ``nn.MultiheadAttention`` (``in_proj_weight`` = [Q | K | V]), a 4x MLP ``c_fc`` / ``c_proj`` with QuickGELU
x * sigmoid(1.702 x) (OpenCLIP's LAION models use exact GELU: ``activation: gelu``), LayerNorm in float32, a causal
text mask and no padding mask, the ViT's heads = width / 64, and OpenAI's initialisation (``initialize_parameters``).
OpenAI pools the text at ``argmax(tokens)`` (EOT is its largest id); difflab pools at ``lens - 1``, the same
position for CLIP's BPE and the one that also fits the miniature vocabulary (EOT = 2). ``lens=None`` pools at
argmax, as OpenAI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from difflab.nn.unet import _bad

__all__ = ["OPENAI_IMAGE_MEAN", "OPENAI_IMAGE_STD", "CLIPConfig", "CLIP"]

# OpenAI's preprocessing statistics (clip.clip._transform Normalize), in [0, 1] units
OPENAI_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
Activation = Literal["quick_gelu", "gelu"]


@dataclass(frozen=True)
class CLIPConfig:
    """A ViT CLIP (openai/CLIP ``build_model``'s arguments; defaults = ViT-L/14, the CLIP Karlo uses)."""

    # Width E of the shared embedding space (ViT-L/14: 768).
    embed_dim: int = 768
    # Side S of the square input images (ViT-L/14: 224); a multiple of vision_patch_size.
    image_resolution: int = 224
    # Image transformer: blocks, width, patch side, heads (None = width / 64, OpenAI's rule).
    vision_layers: int = 24
    vision_width: int = 1024
    vision_patch_size: int = 14
    vision_heads: int | None = None
    # Text transformer: context length L, vocabulary rows, width, heads, blocks.
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 768
    transformer_heads: int = 12
    transformer_layers: int = 12
    # The MLP's activation: OpenAI's QuickGELU, or exact GELU (OpenCLIP's LAION-trained models).
    activation: Activation = "quick_gelu"
    # exp(logit_scale) at initialisation (CLIP: 1 / 0.07); the forward pass clamps it at 100.
    logit_scale: float = 1 / 0.07

    @property
    def heads_image(self) -> int:
        """Heads of the image transformer (``vision_heads``, default vision_width / 64)."""
        return self.vision_heads if self.vision_heads is not None else max(1, self.vision_width // 64)

    @property
    def image_tokens(self) -> int:
        """1 + (S / patch)^2: the class token and the patches."""
        return 1 + (self.image_resolution // self.vision_patch_size) ** 2

    def validate(self, prefix: str = "") -> None:
        """Raise ValueError naming the first bad field (as ``prefix + name``) and its valid values."""
        for name in ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
                     "context_length", "vocab_size", "transformer_width", "transformer_heads", "transformer_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _bad(prefix + name, v, "an integer >= 1")
        if self.image_resolution % self.vision_patch_size:
            raise _bad(prefix + "vision_patch_size", self.vision_patch_size,
                       f"a divisor of image_resolution={self.image_resolution}")
        if self.vision_heads is not None and (not isinstance(self.vision_heads, int) or self.vision_heads < 1):
            raise _bad(prefix + "vision_heads", self.vision_heads, "null (width / 64) or an integer >= 1")
        if self.vision_width % self.heads_image:
            raise _bad(prefix + "vision_heads", self.vision_heads, f"a divisor of vision_width={self.vision_width}")
        if self.transformer_width % self.transformer_heads:
            raise _bad(prefix + "transformer_heads", self.transformer_heads,
                       f"a divisor of transformer_width={self.transformer_width}")
        if self.context_length < 2:
            raise _bad(prefix + "context_length", self.context_length, "an integer >= 2 (SOT and EOT)")
        if self.activation not in get_args(Activation):
            raise _bad(prefix + "activation", self.activation, ", ".join(map(repr, get_args(Activation))))
        scale = self.logit_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
            raise _bad(prefix + "logit_scale", scale, "a finite number > 0 (exp of the initial logit scale)")


class LayerNorm(nn.LayerNorm):
    """OpenAI's ``LayerNorm``: computed in float32, returned in the input's dtype. [..., W] -> [..., W]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x) (OpenAI's CLIP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    """``c_proj(act(c_fc(x)))``, 4x wide (OpenAI's ``mlp`` OrderedDict; keys ``c_fc``, ``c_proj``)."""

    def __init__(self, width: int, activation: Activation):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU() if activation == "quick_gelu" else nn.GELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)). [N, L, W] -> [N, L, W]; ``mask`` [L, L] additive or None."""

    def __init__(self, width: int, heads: int, activation: Activation):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = LayerNorm(width)
        self.mlp = MLP(width, activation)
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """OpenAI's ``Transformer``: ``resblocks.{i}``. [N, L, W] -> [N, L, W]."""

    def __init__(self, width: int, layers: int, heads: int, activation: Activation):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, activation) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        for block in self.resblocks:
            x = block(x, mask)
        return x

    def init_weights(self) -> None:
        """OpenAI's ``initialize_parameters`` for the blocks."""
        proj_std = self.width ** -0.5 * (2 * self.layers) ** -0.5
        attn_std, fc_std = self.width ** -0.5, (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


class VisionTransformer(nn.Module):
    """OpenAI's ``VisionTransformer``. x [N, 3, S, S] (already normalised) -> [N, E]."""

    def __init__(self, c: CLIPConfig):
        super().__init__()
        w, p = c.vision_width, c.vision_patch_size
        scale = w ** -0.5
        self.conv1 = nn.Conv2d(3, w, kernel_size=p, stride=p, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(c.image_tokens, w))
        self.ln_pre = LayerNorm(w)
        self.transformer = Transformer(w, c.vision_layers, c.heads_image, c.activation)
        self.ln_post = LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, c.embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [N, (S/p)^2, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))
        x = self.ln_post(self.transformer(x)[:, 0])
        return x @ self.proj.to(x.dtype)


class CLIP(nn.Module):
    """OpenAI's ``CLIP`` (ViT image encoder ``visual``; text keys at the top level, as released).

    ``encode_image(x [N, 3, S, S] in [-1, 1]) -> f [N, E]`` and ``encode_text(tokens [N, L], lens [N]) ->
    (g [N, E], seq [N, L, W_t])``, unnormalised; ``image_embeddings`` / ``text_embeddings`` are the unit vectors
    z_i, z_t; ``forward`` gives the contrastive logits.
    """

    def __init__(self, config: CLIPConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        self.visual = VisionTransformer(c)
        self.token_embedding = nn.Embedding(c.vocab_size, c.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.transformer_width))
        self.transformer = Transformer(c.transformer_width, c.transformer_layers, c.transformer_heads, c.activation)
        self.ln_final = LayerNorm(c.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(c.transformer_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(c.logit_scale), dtype=torch.float32))
        mask = torch.full((c.context_length, c.context_length), float("-inf")).triu(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.register_buffer("image_mean", torch.tensor(OPENAI_IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(OPENAI_IMAGE_STD).view(1, 3, 1, 1), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """OpenAI's ``initialize_parameters``."""
        c = self.config
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_weights()
        self.visual.transformer.init_weights()
        nn.init.normal_(self.text_projection, std=c.transformer_width ** -0.5)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) [N, E] of images x [N, 3, S, S] in [-1, 1] (normalised here as OpenAI's preprocessing)."""
        c = self.config
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (c.image_resolution, c.image_resolution):
            raise ValueError(f"this CLIP takes images [N, 3, {c.image_resolution}, {c.image_resolution}] in [-1, 1]; "
                             f"got {list(x.shape)}")
        x = ((x + 1) / 2 - self.image_mean.to(x.dtype)) / self.image_std.to(x.dtype)
        return self.visual(x.to(self.visual.conv1.weight.dtype))

    def encode_text(self, tokens: torch.Tensor, lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(g [N, E], seq [N, L, W_t]) of tokens [N, L]: the EOT feature at ``lens - 1`` (argmax(tokens) when
        ``lens`` is None, as OpenAI) projected, and the whole ln_final sequence."""
        c = self.config
        if tokens.dim() != 2 or tokens.shape[1] != c.context_length or tokens.dtype.is_floating_point:
            raise ValueError(f"this CLIP takes integer tokens [N, context_length={c.context_length}]; got "
                             f"{list(tokens.shape)} {tokens.dtype}")
        if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= c.vocab_size):
            worst = int(tokens.min()) if int(tokens.min()) < 0 else int(tokens.max())
            raise ValueError(f"token ids must lie in 0..{c.vocab_size - 1} (vocab_size); got {worst}")
        x = self.token_embedding(tokens.long()) + self.positional_embedding
        seq = self.ln_final(self.transformer(x, self.attn_mask.to(x.dtype)))
        if lens is None:
            index = tokens.argmax(dim=-1)
        else:
            if lens.shape != (tokens.shape[0],) or lens.dtype.is_floating_point:
                raise ValueError(f"lens must be integers [N={tokens.shape[0]}]; got {list(lens.shape)}")
            if len(lens) and (int(lens.min()) < 1 or int(lens.max()) > c.context_length):
                raise ValueError(f"lens must lie in 1..{c.context_length} (SOT ... EOT)")
            index = lens.long().to(tokens.device) - 1
        pooled = seq[torch.arange(seq.shape[0], device=seq.device), index] @ self.text_projection.to(seq.dtype)
        return pooled, seq

    def image_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """z_i = f(x) / ||f(x)|| [N, E]."""
        return F.normalize(self.encode_image(x).float(), dim=-1, eps=1e-12)

    def text_embeddings(self, tokens: torch.Tensor, lens: torch.Tensor | None = None) -> torch.Tensor:
        """z_t = g / ||g|| [N, E]."""
        return F.normalize(self.encode_text(tokens, lens)[0].float(), dim=-1, eps=1e-12)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, lens: torch.Tensor | None = None) -> torch.Tensor:
        """``logits_per_image`` [N, M] = min(exp(logit_scale), 100) z_i z_t^T of N images and M captions."""
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        return scale * self.image_embeddings(x) @ self.text_embeddings(tokens, lens).t()
