"""The diffusion task: a denoiser trained with ``training_losses`` (DDPM L_simple, iDDPM L_hybrid / L_vlb).

Per step, for the global batch of B images (improved-diffusion's ``TrainLoop.forward_backward``):
t and the importance weights from the timestep sampler, eps ~ N(0, I) and, for classifier-free
training, the label-dropout coins (CFG Alg. 1: y -> the null label ``num_classes`` with p_uncond).
The loss-second-moment sampler learns from the per-example ``loss`` terms of the whole batch (the
official code feeds it the same terms, per rank and micro-batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from difflab.build import build_denoiser, build_model, build_timestep_sampler, default_ema_rate, training_loss_type
from difflab.losses import training_losses
from difflab.timesteps import LossSecondMomentResampler
from difflab.train import distributed as dist_utils
from difflab.train.tasks.base import Task

if TYPE_CHECKING:
    from difflab.config import Config
    from difflab.train.trainer import Trainer

Tensor = torch.Tensor
GRID_IMAGES = 16


class DiffusionTask(Task):
    """A U-Net denoiser ``net(x_t, t, **cond)`` on ``cfg.diffusion``'s process (see the module docstring)."""

    generator_names = ("timesteps", "noise", "labels")
    device_generators = ("noise",)
    log_terms = ("loss", "mse", "vb", "grad_norm")

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.loss_type = training_loss_type(cfg.diffusion)
        self.timestep_sampler = build_timestep_sampler(cfg)
        self._denoisers: dict[int, Any] = {}

    def build_model(self) -> nn.Module:
        return build_model(self.cfg)

    def _denoiser(self, model: nn.Module):
        """The wrapped model as a denoiser (one per model object: DDP / FSDP / compiled wrappers)."""
        key = id(model)
        if key not in self._denoisers:
            self._denoisers[key] = build_denoiser(self.cfg, model)
        return self._denoisers[key]

    def draws(self, batch_size: int, batch: dict[str, Any], generators: dict[str, torch.Generator]
              ) -> dict[str, Tensor]:
        t, w = self.timestep_sampler.sample(batch_size, generator=generators["timesteps"])
        g = generators["noise"]
        noise = torch.randn((batch_size, *batch["x0"].shape[1:]), generator=g, device=g.device)
        out = {"t": t, "weights": w, "noise": noise}
        if self.cfg.data.class_cond and self.cfg.diffusion.p_uncond > 0:
            # the same Bernoulli(p_uncond) coins as guidance.drop_labels, drawn for the global batch
            out["drop"] = torch.rand(batch_size, generator=generators["labels"]) < self.cfg.diffusion.p_uncond
        return out

    def model_kwargs(self, batch: dict[str, Any], draws: dict[str, Tensor]) -> dict[str, Tensor]:
        """The network's ``**cond``: the label (the null label where dropped) for class-conditional runs."""
        if not self.cfg.data.class_cond:
            return {}
        y = batch["y"]
        if "drop" in draws:  # classifier-free training: the null label num_classes (CFG Alg. 1)
            y = torch.where(draws["drop"], torch.full_like(y, self.cfg.model.num_classes), y)
        return {"y": y}

    def losses(self, model: nn.Module, batch: dict[str, Any], draws: dict[str, Tensor]) -> dict[str, Tensor]:
        return training_losses(self._denoiser(model), batch["x0"], draws["t"], loss_type=self.loss_type,
                               noise=draws["noise"], model_kwargs=self.model_kwargs(batch, draws))

    def after_step(self, draws: dict[str, Tensor], terms: dict[str, Tensor]) -> None:
        if not isinstance(self.timestep_sampler, LossSecondMomentResampler):
            return  # the uniform sampler keeps no history: no gather needed
        world = dist_utils.get_world_size()
        losses = dist_utils.all_gather_uneven(terms["loss"])
        # gathered rank by rank; rank r held positions r, r+W, ...: interleave back to batch order
        losses = losses.reshape(world, -1).t().reshape(-1)
        self.timestep_sampler.update(draws["t"], losses.cpu())

    def state_dict(self) -> dict[str, Any]:
        return {"timestep_sampler": self.timestep_sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.timestep_sampler.load_state_dict(state.get("timestep_sampler", {}))

    has_grid = True

    def grid_ema_rate(self) -> float | None:
        return default_ema_rate(self.cfg)

    @torch.no_grad()
    def sample_grid(self, trainer: Trainer, net: nn.Module) -> Path:
        """``samples/step_XXXXXXX.png``: 16 images from ``net`` (the first EMA), drawn with the run's
        sample settings and a fixed seed; training randomness is untouched."""
        from difflab.generate import draw_samples
        from difflab.images import save_grid, to_uint8

        x, _ = draw_samples(build_denoiser(self.cfg, net), self.cfg, n=GRID_IMAGES, distributed=False,
                            progress=False)
        path = trainer.run_dir / "samples" / f"step_{trainer.step:07d}.png"
        save_grid(to_uint8(x, self.cfg.data), path)
        return path
