"""GLIDE's noised CLIP: a ViT image encoder that also takes the diffusion step t, and a causal text transformer.

The networks of glide_text2im's ``clip/encoders.py`` (``ImageEncoder``, ``TextEncoder``) and
``clip/model_creation.py`` (``CLIPModel``), output for output (GLIDE Sec. 2.3 and 3.1; PAPERS.md Sec. 6, 9).
Trained contrastively on noised images x_t, the pair gives CLIP guidance its gradient
grad_{x_t} (f(x_t, t) . g(c)) (:mod:`difflab.clip_guidance`).

Notation map (code -> paper / official code):
    x_t [N, 3, S, S]       the noised image in [-1, 1] (S = image_size; the official encoder takes
                           (x_t + 1) * 127.5 and normalises by CLIP's channel mean / std in 0..255 units)
    t [N]                  the ORIGINAL diffusion step 0..n_timesteps-1; row w_t[t] replaces CLIP's class token
    tokens [N, L], lens [N]  CLIP BPE ids padded with 0 to L = max_text_len, and the count with SOT and EOT
    W_i, W_t               widths n_head_image * n_head_state_image, n_head_text * n_head_state_text
    f(x_t, t), g(c)        image / text features [N, n_embd]: token 0 (image) or token lens-1, the EOT (text),
                           then LayerNorm and a bias-free projection
    z_i, z_t               the features divided by (L2 norm + 1e-12)
    logit_scale            log of the temperature's inverse; the released value is fixed at ln 100

What the official code does and this module reproduces (fixtures/openai/README.md): pre-LN blocks with separate
``f_q`` (bias), ``f_k`` (no bias), ``f_v`` (bias), ``f_c``; a 4x MLP with exact GELU; every LayerNorm eps 1e-5
(computed in float32); softmax scale 1/sqrt(head_dim) (official: head_dim^-1/4 on q and on k). The official
code pads the context to a multiple of 32 with -1e10 on the padded keys, which is exactly attention over the real
tokens, so nothing is padded here. The text attention is causal and has no padding mask (the pad id 0 is also
"!"). The image input has a LayerNorm after the position embedding, the text input none.

Module and parameter names are the official ones (``blocks.input.w_t``, ``blocks.block_0.f_attn.ln.g``,
``blocks.output.f.w``, ...; weights (out, in)), so the released ``clip/image-enc`` and ``clip/text-enc`` state
dicts load into :class:`ImageEncoder` and :class:`TextEncoder` unchanged, and into :class:`NoisedCLIP` under
``image_encoder.`` / ``text_encoder.``. The official affine weights are ``torch.empty`` (the model only works
loaded); difflab draws them with the official initialisers, for training from scratch (difflab.train.tasks.
noised_clip). The official ``ZeroKeyBiasGrad`` (the middle third of the q and v bias gradients zeroed in
backward, a leftover of a fused qkv) changes neither the output nor d/dx and is not reproduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from difflab.nn.unet import _bad

__all__ = [
    "CLIP_IMAGE_MEAN",
    "CLIP_IMAGE_STD",
    "NoisedCLIPConfig",
    "LayerNorm",
    "Affine",
    "ImageEncoder",
    "TextEncoder",
    "NoisedCLIP",
    "build_noised_clip",
]

# CLIP's per-channel image statistics in 0..255 units (glide_text2im.clip.encoders image_channel_means / stds)
CLIP_IMAGE_MEAN = (122.77093945, 116.74601272, 104.09373519)
CLIP_IMAGE_STD = (68.50053285, 66.63215831, 70.32316309)
Encoders = Literal["both", "image", "text"]
BLOCK_SIZE = 32  # the official context padding (a multiple of 32): exact attention, so only documented


@dataclass(frozen=True)
class NoisedCLIPConfig:
    """GLIDE's noised CLIP (the official ``clip/config.yaml`` keys; defaults = the released model).

    The width of each encoder is ``n_head_* * n_head_state_*``; ``n_embd`` is only the width of the final
    projection (the shared embedding space).
    """

    # Side of the square input images (released: 64).
    image_size: int = 64
    # ViT patch side; image_size must be a multiple of it (released: 4, i.e. 1 + 16 * 16 = 257 tokens).
    patch_size: int = 4
    # Steps of the diffusion the CLIP was trained on: the rows of w_t (released: 1000).
    n_timesteps: int = 1000
    # That diffusion's beta schedule (released: squaredcos_cap_v2, difflab's cosine); checked before guiding.
    beta_schedule: Literal["linear", "cosine"] = "cosine"
    # Width of the image and text features (the embedding space; released: 512).
    n_embd: int = 512
    # Image transformer: heads, channels per head, blocks (released: 12 x 64 = 768 wide, 12 blocks).
    n_head_image: int = 12
    n_head_state_image: int = 64
    n_xf_blocks_image: int = 12
    # Text transformer: vocabulary rows, context, heads, channels per head, blocks (released: 65,536 rows of
    # which CLIP's BPE uses 49,408; 77 tokens; 8 x 64 = 512 wide, 12 blocks).
    n_vocab: int = 65536
    max_text_len: int = 77
    n_head_text: int = 8
    n_head_state_text: int = 64
    n_xf_blocks_text: int = 12
    # exp(logit_scale) at initialisation (the parameter holds its log; released: fixed at 100; CLIP trains from
    # 1 / 0.07 and clamps at 100).
    logit_scale: float = 100.0
    # Which encoders the network holds: both (a NoisedCLIP, what guidance needs), or one alone (the released
    # checkpoints are one file each: clip/image-enc and clip/text-enc).
    encoders: Encoders = "both"

    @property
    def image_width(self) -> int:
        """W_i = n_head_image * n_head_state_image."""
        return self.n_head_image * self.n_head_state_image

    @property
    def text_width(self) -> int:
        """W_t = n_head_text * n_head_state_text."""
        return self.n_head_text * self.n_head_state_text

    @property
    def image_tokens(self) -> int:
        """1 + (image_size / patch_size)^2: the w_t token and the patches."""
        return 1 + (self.image_size // self.patch_size) ** 2

    def validate(self, prefix: str = "") -> None:
        """Raise ValueError naming the first bad field (as ``prefix + name``) and its valid values."""
        for name in ("image_size", "patch_size", "n_timesteps", "n_embd", "n_head_image", "n_head_state_image",
                     "n_xf_blocks_image", "n_vocab", "max_text_len", "n_head_text", "n_head_state_text",
                     "n_xf_blocks_text"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _bad(prefix + name, v, "an integer >= 1")
        if self.image_size % self.patch_size:
            divisors = [d for d in range(1, self.image_size + 1) if self.image_size % d == 0]
            raise _bad(prefix + "patch_size", self.patch_size, f"a divisor of image_size={self.image_size} "
                                                                f"({', '.join(map(str, divisors))})")
        if self.max_text_len < 2:
            raise _bad(prefix + "max_text_len", self.max_text_len, "an integer >= 2 (SOT and EOT)")
        if self.beta_schedule not in ("linear", "cosine"):
            raise _bad(prefix + "beta_schedule", self.beta_schedule, "'linear' or 'cosine'")
        scale = self.logit_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
            raise _bad(prefix + "logit_scale", scale, "a finite number > 0 (exp of the initial logit scale)")
        if self.encoders not in get_args(Encoders):
            raise _bad(prefix + "encoders", self.encoders, ", ".join(map(repr, get_args(Encoders))))


# ---------------------------------------------------------------------------------------- layers


class LayerNorm(nn.Module):
    """Official ``clip.utils.LayerNorm``: gain ``g`` and bias ``b``, computed in float32 (eps 1e-5, the value
    every official call passes). [..., W] -> [..., W] float32."""

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(width))
        self.b = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.layer_norm(x.float(), self.g.shape, self.g.float(), self.b.float(), self.eps)


class Affine(nn.Module):
    """Official ``clip.utils.Affine``: ``x @ w.T + b`` with ``w`` [out, in] ~ N(0, std^2) (default std
    sqrt(2 / (in + out))) and ``b`` zero, or no bias. [..., in] -> [..., out]."""

    def __init__(self, n_in: int, n_out: int, *, bias: bool = True, std: float | None = None):
        super().__init__()
        self.w = nn.Parameter(torch.empty(n_out, n_in))
        nn.init.normal_(self.w, std=math.sqrt(2 / (n_in + n_out)) if std is None else std)
        self.b = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.linear(x, self.w.to(x.dtype), None if self.b is None else self.b.to(x.dtype))


class AttentionResblock(nn.Module):
    """x + f_c(attention(ln(x))) with q = f_q, k = f_k (no bias), v = f_v; causal for the text encoder.

    Shapes: x [N, L, W] -> [N, L, W]; W = heads * head_dim. ``n_resblocks`` (2 per transformer block) sets the
    official init of f_c.
    """

    def __init__(self, width: int, heads: int, n_resblocks: int, *, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        std = 1 / math.sqrt(width)
        self.ln = LayerNorm(width)
        self.f_q = Affine(width, width, std=std)
        self.f_k = Affine(width, width, bias=False, std=std)
        self.f_v = Affine(width, width, std=std)
        self.f_c = Affine(width, width, std=1 / math.sqrt(width * n_resblocks ** 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        n, length, width = x.shape
        r = self.ln(x)
        q, k, v = (f(r).view(n, length, self.heads, width // self.heads).transpose(1, 2)
                   for f in (self.f_q, self.f_k, self.f_v))  # [N, H, L, C]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return x + self.f_c(out.transpose(1, 2).reshape(n, length, width))


class FullyConnectedResblock(nn.Module):
    """x + f_2(GELU(f_1(ln(x)))), 4x wide, exact (erf) GELU. [N, L, W] -> [N, L, W]."""

    def __init__(self, width: int, n_resblocks: int):
        super().__init__()
        self.ln = LayerNorm(width)
        self.f_1 = Affine(width, 4 * width, std=math.sqrt(2 / (4 * width)))
        self.f_2 = Affine(4 * width, width, std=1 / math.sqrt(width * n_resblocks ** 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x + self.f_2(F.gelu(self.f_1(self.ln(x))))


class TransformerBlock(nn.Module):
    """``f_mlp(f_attn(x))``. [N, L, W] -> [N, L, W]."""

    def __init__(self, width: int, heads: int, n_blocks: int, *, causal: bool):
        super().__init__()
        self.f_attn = AttentionResblock(width, heads, 2 * n_blocks, causal=causal)
        self.f_mlp = FullyConnectedResblock(width, 2 * n_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.f_mlp(self.f_attn(x))


class ImageEmbedding(nn.Module):
    """Patches + the w_t token + positions, then LayerNorm (official ``ImageEmbedding`` with n_timestep > 0).

    ``image`` [N, 3, S, S] in 0..255 units, ``t`` [N] int -> [N, 1 + (S / p)^2, W_i].
    """

    def __init__(self, config: NoisedCLIPConfig):
        super().__init__()
        c, w = config, config.image_width
        self.image_size, self.patch_size = c.image_size, c.patch_size
        self.w_t = nn.Parameter(torch.randn(c.n_timesteps, w) / math.sqrt(w))
        self.patch_proj = nn.Parameter(torch.randn(w, 3, c.patch_size, c.patch_size)
                                       * math.sqrt(2 / (w * c.patch_size ** 2)))
        self.w_pos = nn.Parameter(torch.randn(c.image_tokens, w) / math.sqrt(w))
        self.ln = LayerNorm(w)
        self.register_buffer("channel_means", torch.tensor(CLIP_IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("channel_stds", torch.tensor(CLIP_IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = (image - self.channel_means.to(image.dtype)) / self.channel_stds.to(image.dtype)
        x = F.conv2d(x, self.patch_proj.to(x.dtype), stride=self.patch_size)  # [N, W, S/p, S/p]
        x = x.flatten(2).transpose(1, 2)  # [N, (S/p)^2, W]
        sot = F.embedding(t.long(), self.w_t)[:, None].to(x.dtype)  # the step's row in place of the class token
        return self.ln(torch.cat([sot, x], dim=1) + self.w_pos[None].to(x.dtype))


class TextEmbedding(nn.Module):
    """Token + position embeddings (official ``TextEmbedding``). tokens [N, L] -> [N, L, W_t]."""

    def __init__(self, config: NoisedCLIPConfig):
        super().__init__()
        w = config.text_width
        self.w_voc = nn.Parameter(torch.randn(config.n_vocab, w) * 0.02)
        self.w_pos = nn.Parameter(torch.randn(config.max_text_len, w) * 0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.embedding(tokens.long(), self.w_voc) + self.w_pos[None]


class FeatureExtractor(nn.Module):
    """LayerNorm then a bias-free projection W -> n_embd of one token per sequence (official
    ``ImageFeatureExtractor`` / ``TextFeatureExtractor``). x [N, L, W], index [N] -> [N, n_embd]."""

    def __init__(self, width: int, n_embd: int):
        super().__init__()
        self.ln = LayerNorm(width)
        self.f = Affine(width, n_embd, bias=False)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        token = x[:, 0] if index is None else x[torch.arange(x.shape[0], device=x.device), index]
        return self.f(self.ln(token))


def _blocks(inputs: nn.Module, n: int, width: int, heads: int, n_embd: int, *, causal: bool) -> nn.ModuleDict:
    blocks = {"input": inputs}
    blocks.update({f"block_{i}": TransformerBlock(width, heads, n, causal=causal) for i in range(n)})
    blocks["output"] = FeatureExtractor(width, n_embd)
    return nn.ModuleDict(blocks)


# ---------------------------------------------------------------------------------------- the encoders


class ImageEncoder(nn.Module):
    """The noised CLIP's image tower (official ``clip.encoders.ImageEncoder`` with ``n_timestep`` rows of w_t).

    Call: ``enc(image [N, 3, S, S] in 0..255 units, timesteps [N] int) -> f [N, n_embd]``, the feature before
    normalisation. :meth:`NoisedCLIP.image_embeddings` takes x_t in [-1, 1] instead.
    """

    def __init__(self, config: NoisedCLIPConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        self.blocks = _blocks(ImageEmbedding(c), c.n_xf_blocks_image, c.image_width, c.n_head_image, c.n_embd,
                              causal=False)

    def forward(self, image: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:  # noqa: D102
        c = self.config
        if image.dim() != 4 or image.shape[1] != 3 or tuple(image.shape[2:]) != (c.image_size, c.image_size):
            raise ValueError(f"the noised CLIP takes images [N, 3, {c.image_size}, {c.image_size}]; got "
                             f"{list(image.shape)}")
        if not isinstance(timesteps, torch.Tensor) or timesteps.shape != (image.shape[0],) \
                or timesteps.dtype.is_floating_point or timesteps.dtype == torch.bool:
            got = list(timesteps.shape) if isinstance(timesteps, torch.Tensor) else type(timesteps).__name__
            raise ValueError(f"the noised CLIP takes integer timesteps [N={image.shape[0]}] (original steps "
                             f"0..{c.n_timesteps - 1}); got {got}")
        if len(timesteps) and (int(timesteps.min()) < 0 or int(timesteps.max()) >= c.n_timesteps):
            raise ValueError(f"timesteps must lie in 0..{c.n_timesteps - 1} (the CLIP's n_timesteps); got "
                             f"{int(timesteps.min())}..{int(timesteps.max())}")
        h = self.blocks["input"](image, timesteps)
        for i in range(c.n_xf_blocks_image):
            h = self.blocks[f"block_{i}"](h)
        return self.blocks["output"](h)


class TextEncoder(nn.Module):
    """The noised CLIP's causal text tower (official ``clip.encoders.TextEncoder``).

    Call: ``enc(tokens [N, max_text_len] int, text_len [N] int) -> g [N, n_embd]``, read at position
    ``text_len - 1`` (the EOT), before normalisation.
    """

    def __init__(self, config: NoisedCLIPConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        self.max_text_len = c.max_text_len
        self.blocks = _blocks(TextEmbedding(c), c.n_xf_blocks_text, c.text_width, c.n_head_text, c.n_embd,
                              causal=True)

    def forward(self, tokens: torch.Tensor, text_len: torch.Tensor) -> torch.Tensor:  # noqa: D102
        c = self.config
        if tokens.dim() != 2 or tokens.shape[1] != c.max_text_len or tokens.dtype.is_floating_point:
            raise ValueError(f"the noised CLIP takes integer tokens [N, max_text_len={c.max_text_len}]; got "
                             f"{list(tokens.shape)} {tokens.dtype}")
        if text_len.shape != (tokens.shape[0],) or text_len.dtype.is_floating_point:
            raise ValueError(f"text_len must be integers [N={tokens.shape[0]}]; got {list(text_len.shape)}")
        if len(text_len) and (int(text_len.min()) < 1 or int(text_len.max()) > c.max_text_len):
            raise ValueError(f"text_len must lie in 1..{c.max_text_len} (SOT ... EOT); got "
                             f"{int(text_len.min())}..{int(text_len.max())}")
        if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= c.n_vocab):
            raise ValueError(f"token ids must lie in 0..{c.n_vocab - 1} (n_vocab); got {int(tokens.max())}")
        h = self.blocks["input"](tokens)
        for i in range(c.n_xf_blocks_text):
            h = self.blocks[f"block_{i}"](h)
        return self.blocks["output"](h, text_len.long().to(h.device) - 1)


def _normalised(z: torch.Tensor) -> torch.Tensor:
    """z / (||z|| + 1e-12), as the official CLIPModel (not F.normalize's max(||z||, eps))."""
    return z / (torch.linalg.norm(z, dim=-1, keepdim=True) + 1e-12)


class NoisedCLIP(nn.Module):
    """Both towers and the logit scale (official ``CLIPModel``; keys ``image_encoder.*``, ``text_encoder.*``,
    ``logit_scale``).

    ``image_embeddings(x_t [N, 3, S, S] in [-1, 1], t [N]) -> z_i [N, n_embd]`` and
    ``text_embeddings(tokens [N, L], lens [N]) -> z_t [N, n_embd]``, both divided by (L2 norm + 1e-12);
    ``logit_scale`` is a scalar parameter holding log(config.logit_scale) at initialisation.
    """

    def __init__(self, config: NoisedCLIPConfig):
        super().__init__()
        config.validate()
        if config.encoders != "both":
            raise _bad("encoders", config.encoders, "'both' for a NoisedCLIP (one tower alone: ImageEncoder / "
                                                    "TextEncoder)")
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = TextEncoder(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale), dtype=torch.float32))

    def image_embeddings(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_i = f((x_t + 1) * 127.5, t) / (||.|| + 1e-12). x_t [N, 3, S, S] in [-1, 1], t [N] original steps."""
        return _normalised(self.image_encoder((x_t + 1) * 127.5, t))

    def text_embeddings(self, tokens: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """z_t = g(tokens, lens) / (||.|| + 1e-12). tokens [N, max_text_len], lens [N] (with SOT and EOT)."""
        return _normalised(self.text_encoder(tokens, lens))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """CLIP's ``logits_per_image`` [N, M] = exp(logit_scale) z_i z_t^T of N noised images and M captions (the
        contrastive training's logits). As CLIP, the scale is clamped at 100 (here in the forward pass, so the
        parameter stops growing there); guidance uses exp(logit_scale) as the official ``cond_fn``."""
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        return scale * self.image_embeddings(x_t, t) @ self.text_embeddings(tokens, lens).t()


def build_noised_clip(config: NoisedCLIPConfig) -> nn.Module:
    """:class:`NoisedCLIP`, or one tower alone (``config.encoders``: a released checkpoint file's network)."""
    config.validate()
    if config.encoders == "image":
        return ImageEncoder(config)
    if config.encoders == "text":
        return TextEncoder(config)
    return NoisedCLIP(config)
