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

from difflab.build import (
    build_denoiser,
    build_model,
    build_timestep_sampler,
    build_tokenizer,
    default_ema_rate,
    training_loss_type,
)
from difflab.losses import training_losses
from difflab.process import Process
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
        self._tokenizer = None
        self._token_cache: dict[str, tuple[Tensor, Tensor]] = {}
        self.augment = cfg.augment
        if self.augment.kind != "none":  # a super-resolution stage's conditioning augmentation
            self.generator_names = (*self.generator_names, "augment")
            self.device_generators = (*self.device_generators, "augment")
            self.augment_process = Process.named(self.augment.schedule, self.augment.steps)
        self.unclip = cfg.unclip_kind  # unCLIP's prior / decoder: they read a frozen CLIP (difflab.clip_features)
        self._embedder = None
        if self.unclip == "decoder" and cfg.model.clip_emb_drop > 0:  # unCLIP's 10% image-embedding dropout
            self.generator_names = (*self.generator_names, "clip_drop")
        self.has_grid = self.unclip != "prior"  # a prior draws vectors: nothing to picture
        self.inpaint = bool(getattr(cfg.model, "inpaint", False))
        if self.inpaint:  # GLIDE inpainting: one random mask per example (difflab.inpaint.random_mask)
            self.generator_names = (*self.generator_names, "inpaint")

    def build_model(self) -> nn.Module:
        if self.unclip:  # the CLIP must exist and fit before the run folder is touched
            self.embedder(torch.device("cpu"))
        return build_model(self.cfg)

    def embedder(self, device: torch.device):
        """The frozen CLIP of ``cfg.clip`` (:class:`~difflab.clip_features.CLIPEmbedder`), on ``device``."""
        from difflab.clip_features import CLIPEmbedder, load_clip

        if self._embedder is None:
            clip = load_clip(self.cfg.clip.run)
            self._embedder = CLIPEmbedder(clip, self.cfg.clip.embed_scale)
            self._embedder.check_network(self.cfg.model.clip_dim, self.cfg.model.text_ctx, f"unCLIP {self.unclip}")
            if self.unclip == "decoder" and clip.config.image_resolution != self.cfg.data.image_size:
                raise ValueError(f"the decoder trains on {self.cfg.data.image_size}px images but its CLIP reads "
                                 f"{clip.config.image_resolution}px: set data.image_size or use another CLIP")
        if self._embedder.device != device:
            self._embedder.clip.to(device)
            self._embedder._cache.clear()
        return self._embedder

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
        shape = (self.cfg.model.clip_dim,) if self.unclip == "prior" else batch["x0"].shape[1:]
        noise = torch.randn((batch_size, *shape), generator=g, device=g.device)
        out = {"t": t, "weights": w, "noise": noise}
        if "clip_drop" in generators:  # the decoder's y -> cf_param coins (unCLIP: 10%)
            p = self.cfg.model.clip_emb_drop
            out["clip_drop"] = torch.rand(batch_size, generator=generators["clip_drop"]) < p
        if (self.cfg.data.class_cond or self.cfg.is_text or self.unclip) and self.cfg.diffusion.p_uncond > 0:
            # the same Bernoulli(p_uncond) coins as guidance.drop_labels, drawn for the global batch; a text
            # model's dropped captions become "" (GLIDE: the empty token sequence)
            out["drop"] = torch.rand(batch_size, generator=generators["labels"]) < self.cfg.diffusion.p_uncond
        if self.augment.kind != "none":
            out.update(self._augment_draws(batch_size, batch["low_res"].shape[1:], generators["augment"]))
        if self.inpaint:  # each mask a pure function of its seed; the seeds from a checkpointed generator
            from difflab.inpaint import mask_seeds, random_masks

            out["inpaint_mask"] = random_masks(mask_seeds(batch_size, generators["inpaint"]), batch["x0"].shape[-1])
        return out

    def _augment_draws(self, batch_size: int, shape, g: torch.Generator) -> dict[str, Tensor]:
        """CDM conditioning augmentation for the global batch: noise levels s ~ U{0..max_level} and their
        eps, or blur sigmas (0 for the examples left sharp)."""
        a = self.augment
        if a.kind == "noise":
            s = torch.randint(0, a.levels + 1, (batch_size,), generator=g, device=g.device)
            return {"aug_level": s, "aug_noise": torch.randn((batch_size, *shape), generator=g, device=g.device)}
        lo, hi = a.blur_sigma
        coins = torch.rand(batch_size, generator=g, device=g.device, dtype=torch.float64)
        sigma = lo + (hi - lo) * torch.rand(batch_size, generator=g, device=g.device, dtype=torch.float64)
        return {"aug_sigma": torch.where(coins < a.blur_prob, sigma, torch.zeros_like(sigma))}

    def model_kwargs(self, batch: dict[str, Any], draws: dict[str, Tensor]) -> dict[str, Tensor]:
        """The network's ``**cond``: the label (the null label where dropped) for class-conditional runs;
        the (augmented) low-res image, and its level's embedding, for a super-resolution stage."""
        out = {}
        if self.cfg.data.class_cond:
            y = batch["y"]
            if "drop" in draws:  # classifier-free training: the null label num_classes (CFG Alg. 1)
                y = torch.where(draws["drop"], torch.full_like(y, self.cfg.model.num_classes), y)
            out["y"] = y
        if self.cfg.is_text or self.unclip:
            captions = list(batch["caption"])
            if "drop" in draws:
                captions = ["" if d else c for c, d in zip(captions, draws["drop"].tolist(), strict=True)]
        if self.cfg.is_text:
            out["tokens"], out["mask"] = self.tokens(captions, batch["x0"].device)
        if self.unclip == "prior":
            out.update(self.embedder(batch["x0"].device).prior_cond(captions))
        if self.unclip == "decoder":
            embedder = self.embedder(batch["x0"].device)
            out.update(embedder.decoder_cond(captions, embedder.image(batch["x0"])))
            if "clip_drop" in draws:
                out["y_drop"] = draws["clip_drop"].to(batch["x0"].device)
        if getattr(self.cfg.model, "low_res_channels", 0):
            out.update(self.low_res_kwargs(batch["low_res"], draws))
        if self.inpaint:  # GLIDE: the known pixels and the mask (1 = known); the loss stays over the whole image
            mask = draws["inpaint_mask"].to(batch["x0"].dtype)
            out["inpaint_image"], out["inpaint_mask"] = batch["x0"] * mask, mask
        return out

    def tokens(self, captions: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """``tokens`` / ``mask`` [N, text_ctx] of the run's tokenizer, each distinct caption tokenised once."""
        from difflab.text import tokenize_batch

        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.cfg)
        ctx = self.cfg.model.text.text_ctx
        missing = [c for c in dict.fromkeys(captions) if c not in self._token_cache]
        if missing:
            tokens, mask = tokenize_batch(self._tokenizer, missing, ctx)
            self._token_cache.update({c: (tokens[i], mask[i]) for i, c in enumerate(missing)})
        pairs = [self._token_cache[c] for c in captions]
        return (torch.stack([p[0] for p in pairs]).to(device), torch.stack([p[1] for p in pairs]).to(device))

    def low_res_kwargs(self, low_res: Tensor, draws: dict[str, Tensor]) -> dict[str, Tensor]:
        """``low_res`` (augmented as the draws say) and, under noise augmentation, ``cond`` = the level's
        sinusoidal embedding [N, cond_dim] (CDM: s is a second timestep embedding)."""
        from difflab.augment import blur_augment, level_embedding, noise_augment

        if self.augment.kind == "noise":
            s = draws["aug_level"]
            z = noise_augment(low_res, s, self.augment_process, draws["aug_noise"].to(low_res.dtype))
            return {"low_res": z, "cond": level_embedding(s, self.cfg.model.cond_dim).to(low_res.device)}
        if self.augment.kind == "blur":
            return {"low_res": blur_augment(low_res, draws["aug_sigma"])}
        return {"low_res": low_res}

    def losses(self, model: nn.Module, batch: dict[str, Any], draws: dict[str, Tensor]) -> dict[str, Tensor]:
        x0 = batch["x0"]
        if self.unclip == "prior":  # unCLIP's prior diffuses the image embedding e_i (L = ||f(e_t, t, y) - e_i||^2)
            x0 = self.embedder(x0.device).image(x0)
        return training_losses(self._denoiser(model), x0, draws["t"], loss_type=self.loss_type,
                               noise=draws["noise"].to(x0), model_kwargs=self.model_kwargs(batch, draws))

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

        n, low_res, prompts, known = GRID_IMAGES, None, None, {}
        if getattr(self.cfg.model, "low_res_channels", 0) or self.cfg.is_text or self.inpaint:
            first = trainer.source.batch(0)  # a super-resolution stage / text model: the first batch's inputs
            low_res = first["low_res"][:GRID_IMAGES] if "low_res" in first else None
            prompts = list(first["caption"][:GRID_IMAGES]) if self.cfg.is_text else None
            n = min(GRID_IMAGES, len(first["x0"]))
            side = self.cfg.data.image_size if low_res is not None else self.cfg.data.sample_size
            if self.inpaint and first["x0"].shape[-1] == side:  # inpaint the first images under masks of seeds 0..n-1
                from difflab.inpaint import random_masks

                known = {"inpaint_image": first["x0"][:n], "inpaint_mask": random_masks(range(n), side)}
        if self.unclip == "decoder":  # reconstructions: the first images' embeddings and captions
            first = trainer.source.batch(0)
            n = min(GRID_IMAGES, len(first["x0"]))
            embedder = self.embedder(trainer.device)
            known["cond"] = embedder.decoder_cond(first["caption"][:n], embedder.image(first["x0"][:n]))
            known["null_cond"] = embedder.decoder_null()
            prompts = None
        x, _ = draw_samples(build_denoiser(self.cfg, net), self.cfg, n=n, low_res=low_res, prompts=prompts,
                            distributed=False, progress=False, **known)
        path = trainer.run_dir / "samples" / f"step_{trainer.step:07d}.png"
        save_grid(to_uint8(x, self.cfg.data), path)
        return path
