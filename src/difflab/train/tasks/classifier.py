"""The noisy-classifier task (ADM Sec. 4; guided-diffusion ``classifier_train.py``) on the one loop.

A classifier p_phi(y | x_t, t) learns the cross-entropy on x_t ~ q(x_t | x_0) at t ~ U{0..T-1} of the
*same* process as the diffusion model it will guide (:func:`difflab.train.classifier.classifier_losses`).
Per step, for the global batch: t uniform and eps ~ N(0, I) from the task's generators.

At the end of each ``difflab train`` call (rank 0) the run folder gets, beside the loop's own files
(config.yaml, metrics.jsonl with loss and accuracy, ckpt_XXXXXXX/ with model, EMAs, optimiser):
    classifier.safetensors       weights (the trained ones, or the EMA ``export_ema``) + network config +
                                 ClassifierInfo (what ``load_classifier`` reads), written atomically
    accuracy_by_noise.json       top-1 accuracy and loss in 10 bands of t on the held-out split
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from difflab.build import build_process
from difflab.data.sources import BatchSource, build_dataset
from difflab.fileio import atomic_write_with
from difflab.guidance import ClassifierInfo
from difflab.train.classifier import CLASSIFIER_FILE, accuracy_by_noise_level, classifier_losses, save_classifier
from difflab.train.tasks.base import Task

if TYPE_CHECKING:
    from difflab.config import ClassifierRunConfig, DataConfig
    from difflab.train.trainer import Trainer

Tensor = torch.Tensor
ACCURACY_NAME = "accuracy_by_noise.json"
BINS = 10


class ClassifierTask(Task):
    """A noisy classifier on ``cfg.diffusion``'s process (see the module docstring)."""

    generator_names = ("timesteps", "noise")
    device_generators = ("noise",)
    log_terms = ("loss", "accuracy", "grad_norm")

    def __init__(self, cfg: ClassifierRunConfig) -> None:
        super().__init__(cfg)
        self.process = build_process(cfg.diffusion)

    def build_model(self) -> nn.Module:
        from difflab.nn.classifier import Classifier

        return Classifier(self.cfg.classifier)

    def build_source(self, *, rank: int, world: int, local_batch: int) -> BatchSource:
        source = super().build_source(rank=rank, world=world, local_batch=local_batch)
        # a map-style dataset behind IndexedBatches, or a streamed source (webdataset shards) itself
        classes = getattr(getattr(source, "dataset", source), "num_classes", None)
        if classes is None:
            raise ValueError(f"the classifier needs labelled data; the {self.cfg.data.source} data has no labels")
        if classes != self.cfg.classifier.out_channels:
            raise ValueError(f"the data has {classes} classes but classifier.out_channels is "
                             f"{self.cfg.classifier.out_channels}")
        return source

    def draws(self, batch_size: int, batch: dict[str, Any], generators: dict[str, torch.Generator]
              ) -> dict[str, Tensor]:
        t = torch.randint(0, self.process.num_timesteps, (batch_size,), generator=generators["timesteps"])
        g = generators["noise"]
        return {"t": t, "noise": torch.randn((batch_size, *batch["x0"].shape[1:]), generator=g, device=g.device)}

    def losses(self, model: nn.Module, batch: dict[str, Any], draws: dict[str, Tensor]) -> dict[str, Tensor]:
        terms = classifier_losses(model, self.process, batch["x0"], batch["y"], t=draws["t"], noise=draws["noise"])
        return {"loss": terms["loss"], "accuracy": terms["correct"].float()}

    def info(self) -> ClassifierInfo:
        """The schedule and image size the classifier is trained on (checked by ClassifierGuidance)."""
        c = self.cfg.classifier
        return ClassifierInfo.from_process(self.process, c.image_size, c.out_channels, self.cfg.schedule_name)

    has_finish = True

    def finish_ema_rate(self) -> float | None:
        return self.cfg.export_ema

    @torch.no_grad()
    def finish(self, trainer: Trainer, net: nn.Module) -> None:
        """Write classifier.safetensors and accuracy_by_noise.json (see the module docstring)."""
        save_classifier(trainer.run_dir / CLASSIFIER_FILE, net, self.info())
        report = self.held_out_report(net, trainer)
        text = json.dumps(report, indent=1) + "\n"
        atomic_write_with(trainer.run_dir / ACCURACY_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        trainer.report = report

    def held_out_report(self, net: nn.Module, trainer: Trainer) -> dict[str, Any]:
        """Accuracy and loss in :data:`BINS` bands of t on the held-out split (a fixed seed: the
        training randomness is untouched)."""
        held = held_out(self.cfg.data)
        test = build_dataset(held, seed=self.cfg.train.seed)
        x, y = test.get_batch(range(len(test)))
        g = torch.Generator().manual_seed(self.cfg.train.seed + 2)
        acc = accuracy_by_noise_level(net, self.process, x.to(trainer.device), y.to(trainer.device), BINS,
                                      generator=g)
        return {"split": held.split or "train", "n": len(y), "chance": 1.0 / self.cfg.classifier.out_channels,
                "steps": trainer.step, "train_seconds": round(trainer.seconds, 1),
                "schedule": self.cfg.schedule_name, **acc}


def held_out(data: DataConfig) -> DataConfig:
    """The split accuracy is scored on: test for mnist5k / digits, else the training set itself."""
    if data.source in ("mnist5k", "digits"):
        return dataclasses.replace(data, split="test", random_flip=False)
    return dataclasses.replace(data, random_flip=False)


def format_accuracy(report: Mapping[str, Any]) -> str:
    """The accuracy-by-noise report as a small text table (a clean CLIP's retrieval report: one line)."""
    if "t_start" not in report:
        return (f"zero-shot retrieval among {report['n']} {report['split']} pairs (chance {report['chance']:.3f}): "
                f"image -> caption {report['image_to_text']:.3f}, caption -> image {report['text_to_image']:.3f}, "
                f"loss {report['loss']:.3f}")
    lines = [f"accuracy per noise level on {report['n']} {report['split']} images (chance {report['chance']:.2f}):",
             "   t range     accuracy   loss"]
    for lo, hi, a, loss in zip(report["t_start"], report["t_end"], report["accuracy"], report["loss"], strict=True):
        lines.append(f"  {lo:4d}-{hi:<4d}    {a:7.3f}   {loss:6.3f}")
    return "\n".join(lines)
