"""The noisy-image classifier of ADM (guided-diffusion ``EncoderUNetModel``), for classifier guidance.

The U-Net's downsampling half and middle block (built by the same code as ``difflab.nn.unet.UNet``),
conditioned on t, followed by a pool to ``out_channels`` logits (ADM Sec. 4: "attention pool at 8x8").

Shapes: x_t [N, C, H, W], t [N] -> logits [N, out_channels].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from difflab.nn.layers import AttentionPool2d, PointwiseConv2d, normalization, timestep_embedding, zero_module
from difflab.nn.unet import BackboneConfig, _bad, build_encoder_half

__all__ = ["Pool", "ClassifierConfig", "Classifier"]

Pool = Literal["attention", "adaptive", "spatial", "spatial_v2"]


@dataclass(frozen=True)
class ClassifierConfig(BackboneConfig):
    """The classifier: the backbone switches of ``BackboneConfig`` plus the head."""

    # Input image size (the attention pool's positional embedding covers (image_size / ds)^2 + 1).
    image_size: int = 64
    # Number of logits (ImageNet: 1000).
    out_channels: int = 1000
    # "attention": AttentionPool2d (ADM); "adaptive": GN, SiLU, global avg-pool, zero 1x1 conv;
    # "spatial" / "spatial_v2": MLP on the spatial means of every block's output.
    pool: Pool = "attention"

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its valid values."""
        super().validate()
        self._check_choice("pool", Pool)
        if not isinstance(self.out_channels, int) or self.out_channels < 1:
            raise _bad("out_channels", self.out_channels, "an integer >= 1")
        f = 2 ** (len(self.channel_mult) - 1)
        if not isinstance(self.image_size, int) or self.image_size % f:
            raise _bad("image_size", self.image_size, f"a multiple of {f}")
        if self.pool == "attention" and self.num_head_channels == -1:
            raise _bad("num_head_channels", self.num_head_channels, "an integer >= 1 with pool='attention'")


class Classifier(nn.Module):
    """guided-diffusion ``EncoderUNetModel`` (same submodule names and state-dict keys).

    Call: ``clf(x_t, t) -> [N, out_channels]`` logits.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        half = build_encoder_half(cfg, cfg.in_channels)
        self.time_embed = half["time_embed"]
        self.input_blocks = half["input_blocks"]
        self.middle_block = half["middle_block"]
        ch, ds = half["ch"], half["ds"]
        if cfg.pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch, cfg.num_groups), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(PointwiseConv2d(ch, cfg.out_channels)), nn.Flatten(),
            )
        elif cfg.pool == "attention":
            self.out = nn.Sequential(
                normalization(ch, cfg.num_groups), nn.SiLU(),
                AttentionPool2d(cfg.image_size // ds, ch, cfg.num_head_channels, cfg.out_channels),
            )
        elif cfg.pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(half["feature_size"], 2048), nn.ReLU(), nn.Linear(2048, cfg.out_channels)
            )
        else:  # spatial_v2
            self.out = nn.Sequential(
                nn.Linear(half["feature_size"], 2048), normalization(2048, cfg.num_groups), nn.SiLU(),
                nn.Linear(2048, cfg.out_channels),
            )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t [N, C, H, W], t [N] -> logits [N, out_channels]."""
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(self.time_embed[0].weight.dtype))
        spatial = self.config.pool.startswith("spatial")
        means = []
        h = x_t
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                means.append(h.mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        return self.out(h)
