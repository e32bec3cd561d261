"""GLIDE's noised CLIP on the one loop: contrastive training on noised images (GLIDE Sec. 2.3, "we train CLIP
models ... on noised images"; CLIP's symmetric InfoNCE, Radford et al. 2021 Fig. 3).

Per example i of a (micro-)batch of n image-caption pairs, with x_t = q_sample(x_0, t, eps) of the CLIP's own
diffusion (``clip.beta_schedule`` / ``clip.n_timesteps``, that of the model it will guide) and
logits[i, j] = exp(logit_scale) z_i(x_t[i], t[i]) . z_t(caption[j]) (:meth:`difflab.nn.clip.NoisedCLIP.forward`):

    loss_i = ( CE(logits[i, :], i) + CE(logits[:, i], i) ) / 2      (image -> caption and caption -> image)

so the batch mean is CLIP's symmetric loss; the logit scale is learned (clamped at 100). The negatives are the
other pairs of the same (micro-)batch on the same rank (CLIP gathers them across ranks; this does not).
Per step, for the global batch: t ~ U{0..T-1} and eps ~ N(0, I) from the task's generators.

At the end of each ``difflab train`` call (rank 0) the run folder gets, beside the loop's own files:
    noised_clip.safetensors     weights (trained, or the EMA ``export_ema``) + config + tokenizer (what
                                ``difflab sample --clip RUN`` loads: :func:`difflab.clip_guidance.load_noised_clip`)
    clip_accuracy.json          image -> caption retrieval top-1 among ``eval_examples`` held-out pairs (a match to
                                an identical caption counts) and the loss, in 10 bands of t
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from difflab.clip_guidance import CLIP_FILE, clip_tokens, save_noised_clip
from difflab.data.sources import BatchSource, build_dataset
from difflab.fileio import atomic_write_text
from difflab.process import Process, q_sample
from difflab.train.tasks.base import Task

if TYPE_CHECKING:
    from difflab.config import DataConfig, NoisedCLIPRunConfig
    from difflab.train.trainer import Trainer

Tensor = torch.Tensor
ACCURACY_NAME = "clip_accuracy.json"
BINS = 10


def contrastive_terms(logits: Tensor) -> dict[str, Tensor]:
    """Per-example symmetric InfoNCE of ``logits`` [n, n] (pair i on the diagonal): ``loss`` [n] and
    ``accuracy`` [n] (image i's best caption is its own)."""
    target = torch.arange(logits.shape[0], device=logits.device)
    logits = logits.float()
    loss = (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.t(), target, reduction="none"))
    return {"loss": loss / 2, "accuracy": (logits.argmax(1) == target).float()}


class NoisedCLIPTask(Task):
    """A :class:`~difflab.nn.clip.NoisedCLIP` on noised captioned images (see the module docstring)."""

    generator_names = ("timesteps", "noise")
    device_generators = ("noise",)
    log_terms = ("loss", "accuracy", "logit_scale", "grad_norm")
    has_finish = True
    cfg: NoisedCLIPRunConfig

    def __init__(self, cfg: NoisedCLIPRunConfig) -> None:
        super().__init__(cfg)
        self.process = Process.named(cfg.clip.beta_schedule, cfg.clip.n_timesteps)
        self._tokenizer = None
        self._token_cache: dict[str, tuple[Tensor, Tensor]] = {}

    def build_model(self) -> nn.Module:
        from difflab.nn.clip import NoisedCLIP

        self.tokenizer()  # a bad vocabulary is an error before the run folder is touched
        return NoisedCLIP(self.cfg.clip)

    def build_source(self, *, rank: int, world: int, local_batch: int) -> BatchSource:
        if local_batch < 2:
            raise ValueError(f"contrastive training needs >= 2 pairs per rank and micro-batch; got {local_batch} "
                             "(raise train.batch_size / train.microbatch)")
        return super().build_source(rank=rank, world=world, local_batch=local_batch)

    def tokenizer(self):
        if self._tokenizer is None:
            from difflab.build import build_text_tokenizer

            self._tokenizer = build_text_tokenizer(self.cfg.text, *self.vocab_size())
        return self._tokenizer

    def vocab_size(self) -> tuple[int, str]:
        """The text tower's vocabulary rows and the config field that sets them."""
        return self.cfg.clip.n_vocab, "clip.n_vocab"

    def text_len(self) -> int:
        """The text tower's context length."""
        return self.cfg.clip.max_text_len

    def tokens(self, captions: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """``tokens`` [N, max_text_len] and ``lens`` [N] (:func:`~difflab.clip_guidance.clip_tokens`), each distinct
        caption tokenised once."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._token_cache]
        if missing:
            tokens, lens = clip_tokens(self.tokenizer(), missing, self.text_len())
            self._token_cache.update({c: (tokens[i], lens[i]) for i, c in enumerate(missing)})
        pairs = [self._token_cache[c] for c in captions]
        return torch.stack([p[0] for p in pairs]).to(device), torch.stack([p[1] for p in pairs]).to(device)

    def draws(self, batch_size: int, batch: dict[str, Any], generators: dict[str, torch.Generator]
              ) -> dict[str, Tensor]:
        t = torch.randint(0, self.process.num_timesteps, (batch_size,), generator=generators["timesteps"])
        g = generators["noise"]
        return {"t": t, "noise": torch.randn((batch_size, *batch["x0"].shape[1:]), generator=g, device=g.device)}

    def logits(self, model: nn.Module, x0: Tensor, captions: list[str], t: Tensor, noise: Tensor) -> Tensor:
        """logits [n, n] of the noised images x_t = q_sample(x0, t, noise) against their captions."""
        t = t.to(x0.device)
        x_t = q_sample(self.process, x0, t, noise.to(x0))
        tokens, lens = self.tokens(list(captions), x0.device)
        return model(x_t, t, tokens, lens)

    def losses(self, model: nn.Module, batch: dict[str, Any], draws: dict[str, Tensor]) -> dict[str, Tensor]:
        if "caption" not in batch:
            raise ValueError("the noised CLIP needs captioned data (data.captions: true)")
        logits = self.logits(model, batch["x0"], batch["caption"], draws["t"], draws["noise"])
        terms = contrastive_terms(logits)
        raw = getattr(model, "module", model).logit_scale  # DDP keeps the network in .module
        terms["logit_scale"] = raw.detach().clamp(max=math.log(100.0)).exp().expand(len(logits)).float()
        return terms

    # ----------------------------------------------------------------------------------- final outputs
    def finish_ema_rate(self) -> float | None:
        return self.cfg.export_ema

    @torch.no_grad()
    def finish(self, trainer: Trainer, net: nn.Module) -> None:
        """Write noised_clip.safetensors and clip_accuracy.json (see the module docstring)."""
        save_noised_clip(trainer.run_dir / CLIP_FILE, net, self.cfg.text)
        if self.cfg.data.source == "webdataset":  # streamed shards: no held-out pairs to index
            return
        report = self.held_out_report(net, trainer)
        atomic_write_text(trainer.run_dir / ACCURACY_NAME, json.dumps(report, indent=1) + "\n")
        trainer.report = report  # the CLI prints it as the noisy classifier's table

    def held_out_pairs(self, trainer: Trainer) -> tuple[Tensor, list[str], Tensor, dict[str, Any]]:
        """The first ``eval_examples`` held-out pairs: x0 [n, 3, H, W], their n captions, same [n, n] (True where
        two captions are identical: a retrieval of either counts as a match) and the report's head (split, n,
        chance, steps)."""
        held = held_out(self.cfg.data)
        data = build_dataset(held, seed=self.cfg.train.seed)
        n = min(self.cfg.eval_examples, len(data))
        items = data.get_items(list(range(n)), 0)
        x0, captions = items["x0"].to(trainer.device), list(items["caption"])
        same = torch.tensor([[a == b for b in captions] for a in captions], device=trainer.device)
        return x0, captions, same, {"split": held.split or "train", "n": n, "chance": 1.0 / n, "steps": trainer.step}

    def held_out_report(self, net: nn.Module, trainer: Trainer) -> dict[str, Any]:
        """Retrieval accuracy and contrastive loss among the first ``eval_examples`` held-out pairs, at a t drawn
        uniformly inside each of :data:`BINS` bands (a fixed seed: the training randomness is untouched)."""
        x0, captions, same, head = self.held_out_pairs(trainer)
        n = len(captions)
        g = torch.Generator().manual_seed(self.cfg.train.seed + 2)
        T = self.process.num_timesteps
        edges = [round(i * T / BINS) for i in range(BINS + 1)]
        out: dict[str, Any] = {**head, "t_start": [], "t_end": [], "accuracy": [], "loss": []}
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            t = torch.randint(lo, hi, (n,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            logits = self.logits(net, x0, captions, t, noise)
            best = logits.argmax(1)
            out["t_start"].append(lo)
            out["t_end"].append(hi - 1)
            out["accuracy"].append(round(same[torch.arange(n), best].float().mean().item(), 4))
            out["loss"].append(round(contrastive_terms(logits)["loss"].mean().item(), 4))
        return out


def held_out(data: DataConfig) -> DataConfig:
    """The pairs retrieval is scored on: the test split of scenes (whole renders), else the training data."""
    if data.source == "scenes":
        return dataclasses.replace(data, split="test", num_scenes=None, random_crop=False, render_size=None)
    return data
