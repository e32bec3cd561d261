"""Karlo's 64 -> 256 upsampler: two super-resolution U-Nets of one architecture, one for the last step.

Karlo's ``ImprovedSupRes64to256ProgressiveModel`` (kakaobrain/karlo, ``karlo.models.sr_64_256``) holds two
``SuperResUNetModel``s: ``model_first_steps`` (a DDPM super-resolution model, frozen) runs every respaced step
but the last, and ``model_last_step`` (fine-tuned with adversarial and perceptual losses) runs the last one
(Karlo samples 7 respaced steps: 6 + 1). Each is difflab's :class:`~difflab.nn.unet.UNet` with
``low_res_channels=3``, no attention anywhere (``attention_resolutions=()``, ``use_middle_attention=False``),
no scale-shift norm and 3 output channels (eps; fixed small variance), output for output
(tests/nn/test_karlo.py).

The low-resolution image is concatenated on channels after a bilinear resize to x_t's size, as guided-diffusion's
``SuperResModel`` does and as Karlo's does too; Karlo's sampler hands it over already at x_t's size (clamped to
[-1, 1] and resized bicubically with antialiasing), where the bilinear resize is the identity.

State-dict keys: ``model_first_steps.*`` and ``model_last_step.*``, each the U-Net's official keys, exactly as in
a released Karlo ``sr-64-256`` checkpoint's ``state_dict``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from difflab.nn.unet import UNet, UNetConfig, _bad

__all__ = ["ProgressiveSRConfig", "ProgressiveSR"]


@dataclass(frozen=True)
class ProgressiveSRConfig:
    """Two super-resolution U-Nets of the same architecture (Karlo's 64 -> 256 upsampler)."""

    # The architecture of both (released: 320 channels, depth 3, channel_mult (1, 2, 3, 4), low_res_channels 3).
    unet: UNetConfig = dataclasses.field(default_factory=lambda: UNetConfig(low_res_channels=3))

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (``unet.*``) and its valid values."""
        if not isinstance(self.unet, UNetConfig) or type(self.unet) is not UNetConfig:
            raise _bad("unet", self.unet, "a UNetConfig")
        try:
            self.unet.validate()
        except ValueError as e:  # name the field under unet.
            field = getattr(e, "field", None)
            if field is None:
                raise
            raise _bad(f"unet.{field}", getattr(self.unet, field), str(e).split("valid: ", 1)[-1]) from None
        if not self.unet.low_res_channels:
            raise _bad("unet.low_res_channels", self.unet.low_res_channels, "an integer >= 1 (a super-resolution "
                       "U-Net)")


class ProgressiveSR(nn.Module):
    """Karlo's two-network upsampler, built from a :class:`ProgressiveSRConfig`.

    Call: ``net(x_t, t, low_res) -> [N, out_channels, H, W]``: the samples at t = 0 (the last step of every
    respacing, which always keeps step 0) go through ``model_last_step``, the others through
    ``model_first_steps``. Either network can also be used alone as a denoiser.
    """

    def __init__(self, config: ProgressiveSRConfig):
        super().__init__()
        if not isinstance(config, ProgressiveSRConfig):
            raise ValueError(f"ProgressiveSR needs a ProgressiveSRConfig; got {type(config).__name__}")
        config.validate()
        self.config = config
        self.model_first_steps = UNet(config.unet)
        self.model_last_step = UNet(config.unet)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, low_res: torch.Tensor | None = None) -> torch.Tensor:
        """Apply ``model_last_step`` where t == 0 and ``model_first_steps`` elsewhere.

        Args:
            x_t: [N, C, H, W] noisy images at the high resolution.
            t: [N] timestep index of the original process.
            low_res: [N, low_res_channels, h, w] the low-resolution image (Karlo: already resized to H x W).
        Returns:
            [N, out_channels, H, W] raw output (eps).
        """
        last = t == 0
        if bool(last.all()):
            return self.model_last_step(x_t, t, low_res=low_res)
        if not bool(last.any()):
            return self.model_first_steps(x_t, t, low_res=low_res)
        out = self.model_first_steps(x_t[~last], t[~last], low_res=None if low_res is None else low_res[~last])
        full = out.new_empty((x_t.shape[0], *out.shape[1:]))
        full[~last] = out
        full[last] = self.model_last_step(x_t[last], t[last], low_res=None if low_res is None else low_res[last])
        return full
