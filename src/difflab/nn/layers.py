"""Building blocks of the U-Net and of the noisy-image classifier.

Every block keeps the official OpenAI submodule names (improved-diffusion, guided-diffusion,
glide-text2im: ``in_layers``, ``emb_layers``, ``out_layers``, ``skip_connection``, ``norm``,
``qkv``, ``proj_out``, ``encoder_kv``, ``op``, ``conv``, ``qkv_proj``, ``c_proj``, ...) and the same
``nn.Sequential`` indices, so an official state dict loads key for key (see ``difflab.convert``).

Notation map (code -> paper):
    emb     the timestep embedding, plus class / conditioning embeddings (ADM Sec. 3: "y")
    AdaGN   ``use_scale_shift_norm``: GN(h) * (1 + y_s) + y_b   (ADM Sec. 3, Tab. 3)
    C, H    channels, attention heads; T = flattened spatial length, S = context length
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "timestep_embedding",
    "pointwise_conv",
    "PointwiseConv1d",
    "PointwiseConv2d",
    "GroupNorm32",
    "normalization",
    "zero_module",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "Upsample",
    "Downsample",
    "ResBlock",
    "qkv_attention",
    "AttentionBlock",
    "AttentionPool2d",
]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep embedding, exactly as the official ``timestep_embedding``.

    emb = [cos(t * f_i), sin(t * f_i)], f_i = max_period^(-i / (dim // 2)), i = 0..dim//2-1,
    zero-padded by one column when ``dim`` is odd (DDPM Sec. 4 / Transformer positional code).

    Args:
        t: [N] timesteps (integer index of the original process, or floats).
        dim: embedding width D.
    Returns:
        [N, D] float32 embedding.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution as one batched matmul: y[n] = W x[n] + b over the flattened positions.

    Shapes: x [N, C, *spatial] contiguous, weight [O, C, 1, ...], bias [O] or None -> [N, O, *spatial].
    The same sums as the convolution in another order (they agree to float rounding,
    tests/test_speed_paths.py). On a 2-core AVX2 CPU the U-Net's 1x1 layers run 1.16x faster this way than
    through oneDNN, forward + backward (0.95-2.4x per shape, benchmarks/kernels.py): about 2% of a step.
    """
    n, c = x.shape[:2]
    w = weight.reshape(weight.shape[0], c).expand(n, -1, -1)  # [N, O, C], no copy
    flat = x.reshape(n, c, -1)
    y = torch.bmm(w, flat) if bias is None else torch.baddbmm(bias[None, :, None], w, flat)
    return y.reshape(n, -1, *x.shape[2:])


class _Pointwise:
    """Mixin of the 1x1 convolutions: :func:`pointwise_conv` for contiguous CPU inputs, the convolution
    otherwise (CUDA keeps cuDNN; channels_last keeps its layout). Parameters and state-dict keys are the
    convolution's, so official checkpoints load unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.device.type == "cpu" and x.is_contiguous():
            return pointwise_conv(x, self.weight, self.bias)
        return super().forward(x)


class PointwiseConv1d(_Pointwise, nn.Conv1d):
    """``nn.Conv1d(in_channels, out_channels, 1)`` (the official ``conv_nd(1, ..., 1)``). [N, C, L] -> [N, O, L]"""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)


class PointwiseConv2d(_Pointwise, nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)``. [N, C, H, W] -> [N, O, H, W]"""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (the official ``GroupNorm32``).

    On the CPU, bf16 / fp16 inputs go to the kernel as they are: it takes float32 weight and bias with
    half-type data, computes in float32 and rounds once, so the two casts are saved (+5% per bf16 training
    step, benchmarks/fast_paths.py) at a difference of at most one rounding (tests/test_speed_paths.py).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int, groups: int = 32) -> GroupNorm32:
    """The official ``normalization``: GroupNorm with 32 groups (``groups`` for tiny models)."""
    return GroupNorm32(groups, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (official ``zero_module``) and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class TimestepBlock(nn.Module):
    """Marker: ``forward(x, emb)`` takes the timestep embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """``nn.Sequential`` that hands ``emb`` to timestep blocks and the context to attention blocks.

    forward(x [N, C, H, W], emb [N, E], context [N, D, S] or None, context_mask [N, S] or None)
    """

    def forward(self, x, emb, context=None, context_mask=None):  # noqa: D102
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv if ``use_conv`` (``conv_resample``).

    [N, C, H, W] -> [N, C_out, 2H, 2W]
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 conv if ``use_conv`` (``conv_resample``), else 2x2 avg-pool.

    [N, C, H, W] -> [N, C_out, H/2, W/2]
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without a conv cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (DDPM / iDDPM / ADM).

    h = conv(SiLU(GN(x)));  h = h + Linear(SiLU(emb))            (plain)
                            h = GN(h) * (1 + y_s) + y_b           (AdaGN, ``use_scale_shift_norm``)
    out = skip(x) + conv0(Dropout(SiLU(GN(h))))                   (conv0 zero-initialised)

    With ``up``/``down`` (``resblock_updown``, BigGAN-style) both branches are resampled without a
    conv: h after the first GN+SiLU, x before the skip.

    Args:
        channels: input channels C.
        emb_channels: timestep embedding width E.
        dropout: dropout rate in ``out_layers``.
        out_channels: output channels (default C); a 1x1 conv skip when it differs.
        use_scale_shift_norm: AdaGN instead of adding the embedding.
        up, down: resample 2x inside the block.
        use_checkpoint: gradient checkpointing of this block.
        groups: GroupNorm groups (32 in every official model).
    Shapes: x [N, C, H, W], emb [N, E] -> [N, C_out, H', W'].
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
        use_checkpoint: bool = False,
        groups: int = 32,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels, groups), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels, groups),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = PointwiseConv2d(channels, self.out_channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


#: Self-attention on the CPU over at least this many positions (16x16 maps and up) runs in SDPA's fused
#: (flash) kernel, which never writes the [L, L] scores; below it, two matmuls are faster. Measured on the
#: 2-core CPU of docs/results/attention.md (``benchmarks/attention.py``): at L = 1024 SDPA trains 2.1-3.0x and
#: samples 3.0-4.6x faster, at L = 256 0.98-1.21x for training and 1.05-1.35x for sampling, at L <= 128 slower.
CPU_SDPA_MIN_LENGTH = 256


def _split_heads(t: torch.Tensor, n_heads: int, parts: int, legacy_order: bool) -> tuple[torch.Tensor, ...]:
    """Views of a fused [N, parts * H * C, L] tensor: ``parts`` tensors [N, H, C, L].

    The channel layouts of the official code: legacy (heads, then parts: head h owns channels
    h*parts*C .. (h+1)*parts*C) or new (parts, then heads).
    """
    n, width, length = t.shape
    ch = width // (parts * n_heads)
    if legacy_order:
        return t.reshape(n, n_heads, parts, ch, length).unbind(2)
    return t.reshape(n, parts, n_heads, ch, length).unbind(1)


def _heads_last(t: torch.Tensor, n_heads: int, parts: int, legacy_order: bool) -> tuple[torch.Tensor, ...]:
    """:func:`_split_heads` as [N, H, L, C] tensors with unit stride along C.

    One copy (channels last in memory); the unit channel stride is what SDPA's flash and memory-efficient
    kernels require (otherwise it falls back to its float32 math kernel).
    """
    channels_last = t.transpose(1, 2).contiguous().transpose(1, 2)  # same values, stride 1 along channels
    return tuple(p.transpose(-1, -2) for p in _split_heads(channels_last, n_heads, parts, legacy_order))


def qkv_attention(
    qkv: torch.Tensor,
    n_heads: int,
    legacy_order: bool,
    encoder_kv: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head softmax attention on a fused qkv tensor, with optional extra (context) keys/values.

    The two channel layouts of the official code:
      * legacy (``QKVAttentionLegacy``, improved-diffusion, GLIDE): heads first, then q/k/v:
        qkv = [N, H * (3 * C), T]  (head h owns channels h*3C .. h*3C+3C, split into q, k, v);
      * new (``QKVAttention``, ``use_new_attention_order``): q/k/v first, then heads:
        qkv = [N, 3 * (H * C), T].
    ``encoder_kv`` [N, H * 2 * C, S] (legacy) or [N, 2 * (H * C), S] (new) gives S extra keys/values,
    placed before the T image keys (GLIDE). ``key_mask`` [N, S] (True = attend) masks context keys;
    image keys are always attended. Scores are q.k / sqrt(C), softmax over keys, computed with
    ``scaled_dot_product_attention`` (on CPUs, for self-attention over fewer than
    :data:`CPU_SDPA_MIN_LENGTH` positions: two matmuls, see below).

    Returns:
        [N, H * C, T], heads concatenated along channels (same layout for both orders).
    """
    n, width, length = qkv.shape
    ch = width // (3 * n_heads)
    if encoder_kv is None and not qkv.is_cuda and length < CPU_SDPA_MIN_LENGTH:
        # CPU, short sequences: two matmuls straight on the channel-first [N, H, C, L] views (BLAS takes the
        # transposes as flags) beat SDPA's fused kernel, which needs stride-1 channels (a copy in and out).
        q, k, v = _split_heads(qkv, n_heads, 3, legacy_order)  # [N, H, C, L] each
        # 1 / sqrt(C) applied to q ([N, H, C, L]) rather than to the [N, H, L, L] scores: L / C times fewer
        # multiplies, forward and backward (benchmarks/attention.py).
        scores = torch.matmul((q * (1.0 / math.sqrt(ch))).transpose(-1, -2), k)  # [N, H, L_q, L_k]
        # The official code takes the softmax of scores.float() and casts back. The CPU softmax kernel already
        # accumulates bf16 / fp16 in float32 and rounds once, so without the two casts its output is
        # bit-identical for key lengths that are multiples of 8 and within one unit in the last place otherwise
        # (the vector tail; tests/test_speed_paths.py; +4% per bf16 training step, benchmarks/fast_paths.py).
        weight = torch.softmax(scores, dim=-1)
        # weight @ v^T, not v @ weight^T: the backward then yields the [L_q, L_k] gradient in the layout the
        # softmax backward reads instead of copying it (one copy fewer; its time is within the noise of
        # benchmarks/fast_paths.py).
        out = torch.matmul(weight, v.transpose(-1, -2))  # [N, H, L_q, C]
        return out.transpose(-1, -2).reshape(n, n_heads * ch, length)
    q, k, v = _heads_last(qkv, n_heads, 3, legacy_order)  # [N, H, L, C] each
    mask = None
    if encoder_kv is not None:
        ek, ev = _heads_last(encoder_kv, n_heads, 2, legacy_order)  # [N, H, S, C]
        k = torch.cat([ek, k], dim=2)
        v = torch.cat([ev, v], dim=2)
        if key_mask is not None:
            ones = torch.ones(n, length, dtype=torch.bool, device=qkv.device)
            mask = torch.cat([key_mask.to(torch.bool), ones], dim=-1)[:, None, None, :]  # [N,1,1,S+T]
    out = F.scaled_dot_product_attention(q, k, v, mask)  # [N, H, L, C]
    return out.permute(0, 1, 3, 2).reshape(n, n_heads * ch, length)


class AttentionBlock(nn.Module):
    """Self-attention over spatial positions, optionally also attending to context tokens (GLIDE).

    x + proj_out(attention(qkv(GN(x)), encoder_kv(context)))  with ``proj_out`` zero-initialised.

    Args:
        channels: C.
        num_heads: heads when ``num_head_channels == -1``.
        num_head_channels: channels per head (overrides ``num_heads``), -1 = unused.
        use_new_attention_order: ``QKVAttention`` layout (True) or ``QKVAttentionLegacy`` (False).
        encoder_channels: context width D; adds a 1x1 ``encoder_kv`` Conv1d D -> 2C.
    Shapes: x [N, C, H, W], context [N, D, S], context_mask [N, S] bool -> [N, C, H, W].
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
        encoder_channels: int | None = None,
        use_checkpoint: bool = False,
        groups: int = 32,
    ):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {self.num_heads}")
        self.legacy_order = not use_new_attention_order
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels, groups)
        self.qkv = PointwiseConv1d(channels, channels * 3)
        if encoder_channels is not None:
            self.encoder_kv = PointwiseConv1d(encoder_channels, channels * 2)
        self.proj_out = zero_module(PointwiseConv1d(channels, channels))

    def forward(self, x, context=None, context_mask=None):  # noqa: D102
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, context_mask, use_reentrant=False)
        return self._forward(x, context, context_mask)

    def _forward(self, x, context=None, context_mask=None):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        encoder_kv = None
        if context is not None and hasattr(self, "encoder_kv"):
            encoder_kv = self.encoder_kv(context)
        h = qkv_attention(qkv, self.num_heads, self.legacy_order, encoder_kv, context_mask)
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling of the classifier (guided-diffusion ``AttentionPool2d``).

    The mean token is prepended, a learned positional embedding added, and the mean token's
    attention output (new q/k/v order) projected to ``output_dim``.

    Shapes: x [N, C, R, R] -> [N, output_dim], R = ``spacial_dim``.
    """

    def __init__(self, spacial_dim: int, embed_dim: int, num_head_channels: int, output_dim: int | None = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = PointwiseConv1d(embed_dim, 3 * embed_dim)
        self.c_proj = PointwiseConv1d(embed_dim, output_dim or embed_dim)
        self.num_heads = embed_dim // num_head_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = qkv_attention(self.qkv_proj(x), self.num_heads, legacy_order=False)
        return self.c_proj(x)[:, :, 0]
