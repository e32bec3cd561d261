"""CLIP on the one loop: contrastive training on clean captioned images (CLIP, Radford et al. 2021 Fig. 3), the CLIP
unCLIP's prior and decoder read (unCLIP Sec. 2; :mod:`difflab.clip_features`).

Per example i of a (micro-)batch of n image-caption pairs, with logits[i, j] = min(exp(logit_scale), 100)
z_i(x[i]) . z_t(caption[j]) (:meth:`difflab.nn.openai_clip.CLIP.forward`):

    loss_i = ( CE(logits[i, :], i) + CE(logits[:, i], i) ) / 2

the symmetric InfoNCE of :mod:`difflab.train.tasks.noised_clip` (whose task this one is, without the noise); the
temperature is learned. The negatives are the other pairs of the same (micro-)batch on the same rank.

The log: every ``train.sample_every`` steps (rank 0) a line of ``retrieval.jsonl`` with the zero-shot retrieval
among the first ``eval_examples`` held-out pairs (image -> caption and caption -> image top-1; a match to an
identical caption counts); at the end of each ``difflab train`` call ``clip.safetensors`` (weights, config and
tokenizer: :func:`difflab.clip_features.load_clip`) and ``clip_accuracy.json`` (the same retrieval numbers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from difflab.clip_features import CLIP_WEIGHTS, save_clip
from difflab.fileio import atomic_write_text
from difflab.train.tasks.noised_clip import ACCURACY_NAME, NoisedCLIPTask, contrastive_terms

if TYPE_CHECKING:
    from difflab.config import CLIPRunConfig
    from difflab.train.trainer import Trainer

Tensor = torch.Tensor
RETRIEVAL_LOG = "retrieval.jsonl"


class CLIPTask(NoisedCLIPTask):
    """A :class:`~difflab.nn.openai_clip.CLIP` on clean captioned images (see the module docstring)."""

    generator_names = ()
    device_generators = ()
    has_grid = True
    cfg: CLIPRunConfig

    def __init__(self, cfg: CLIPRunConfig) -> None:
        self.cfg = cfg
        self._tokenizer = None
        self._token_cache: dict[str, tuple[Tensor, Tensor]] = {}

    def build_model(self) -> nn.Module:
        from difflab.nn.openai_clip import CLIP

        self.tokenizer()
        return CLIP(self.cfg.clip)

    def vocab_size(self) -> tuple[int, str]:
        return self.cfg.clip.vocab_size, "clip.vocab_size"

    def text_len(self) -> int:
        return self.cfg.clip.context_length

    def draws(self, batch_size: int, batch: dict[str, Any], generators: dict[str, torch.Generator]
              ) -> dict[str, Tensor]:
        return {}

    def clean_logits(self, model: nn.Module, x0: Tensor, captions: list[str]) -> Tensor:
        """logits [n, n] of the images ``x0`` against their captions."""
        tokens, lens = self.tokens(list(captions), x0.device)
        return model(x0, tokens, lens)

    def losses(self, model: nn.Module, batch: dict[str, Any], draws: dict[str, Tensor]) -> dict[str, Tensor]:
        if "caption" not in batch:
            raise ValueError("CLIP needs captioned data (data.captions: true)")
        terms = contrastive_terms(self.clean_logits(model, batch["x0"], batch["caption"]))
        raw = getattr(model, "module", model).logit_scale  # DDP keeps the network in .module
        terms["logit_scale"] = raw.detach().clamp(max=torch.log(torch.tensor(100.0))).exp().expand(
            len(terms["loss"])).float()
        return terms

    # ----------------------------------------------------------------------------------- the log and final outputs
    @torch.no_grad()
    def sample_grid(self, trainer: Trainer, net: nn.Module) -> Path | None:
        """Append the held-out zero-shot retrieval to ``retrieval.jsonl`` (the CLIP's picture of itself)."""
        path = trainer.run_dir / RETRIEVAL_LOG
        # a resumed run writes again the lines a killed one wrote after its last checkpoint: keep the earlier ones
        rows = [ln for ln in path.read_text().splitlines() if json.loads(ln)["steps"] < trainer.step] \
            if path.is_file() else []
        rows.append(json.dumps(self.held_out_report(net, trainer)))
        atomic_write_text(path, "".join(r + "\n" for r in rows))
        return path

    @torch.no_grad()
    def finish(self, trainer: Trainer, net: nn.Module) -> None:
        """Write clip.safetensors and clip_accuracy.json (see the module docstring)."""
        save_clip(trainer.run_dir / CLIP_WEIGHTS, net, self.cfg.text)
        if self.cfg.data.source == "webdataset":
            return
        report = self.held_out_report(net, trainer)
        atomic_write_text(trainer.run_dir / ACCURACY_NAME, json.dumps(report, indent=1) + "\n")
        trainer.report = report

    def held_out_report(self, net: nn.Module, trainer: Trainer) -> dict[str, Any]:
        """Zero-shot retrieval among the first ``eval_examples`` held-out pairs: image -> caption and caption ->
        image top-1 (an identical caption counts as a match), with the contrastive loss."""
        x0, captions, same, head = self.held_out_pairs(trainer)
        logits = self.clean_logits(net, x0, captions)
        rows = torch.arange(len(captions), device=trainer.device)
        return {**head, "image_to_text": round(same[rows, logits.argmax(1)].float().mean().item(), 4),
                "text_to_image": round(same[logits.argmax(0), rows].float().mean().item(), 4),
                "loss": round(contrastive_terms(logits)["loss"].mean().item(), 4)}
