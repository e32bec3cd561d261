"""The scene evaluator's feature network (:class:`~difflab.eval.scenes.SceneFeatureNet`) on the one loop.

The network learns to read each captioned MNIST scene's layout and the digit and colour of both of
its objects (five heads: :func:`scene_targets`), from the scenes of ``cfg.data`` (train-split scenes
for the shipped weights: the evaluator's reference scenes are test scenes). The per-example loss is
the sum of the five heads' cross-entropies. Per step, for the global batch, from the task's
``augment`` generator (in this order):

* ``low_res`` [B] bool, Bernoulli(``p_low_res``): the example is its 16x16 render, upsampled to 32x32
  as the network does itself (:meth:`SceneFeatureNet.prepare`), instead of its 32x32 render (64x64
  inputs are average-pooled to 32x32 by the network and need no training of their own);
* ``sigma`` [B], U(0, ``max_noise_sigma``) where a Bernoulli(``p_noise``) coin says so, else 0, and
  ``noise`` [B, 3, 32, 32] ~ N(0, I): the input is ``clamp(x + sigma * noise, -1, 1)``, so that the
  features stay defined on imperfect samples.

At the end of each ``difflab train`` call (rank 0) the run folder gets, beside the loop's own files
(config.yaml, metrics.jsonl with the loss and each head's accuracy, ckpt_XXXXXXX/):

    scene_features.safetensors   the trained float32 weights (what eval.scenes.load_scene_features reads)
    scene_features.json          accuracy of every head, and of all five at once, on the first
                                 min(eval_scenes, num_scenes) training scenes at 32 and 16, and on
                                 ``eval_scenes`` test scenes at 64, 32 and 16 (the 1,000 reference
                                 scenes first, then test scenes of seed 1), with the recipe

``benchmarks/train_scene_features.py`` trains ``configs/scene-features.yaml`` and ships these two files
as ``src/difflab/eval/weights/scene_features.*``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from difflab.data import uint8_to_float
from difflab.data.scenes import (
    COLOURS,
    DEFAULT_NUM_SCENES,
    REFERENCE_SEED,
    REFERENCE_SIZE,
    SceneDescription,
    render_scenes,
)
from difflab.data.sources import BatchSource, IndexedBatches, build_dataset
from difflab.eval.scenes import SCENE_INFO, SCENE_WEIGHTS, SceneFeatureNet, layout_class
from difflab.fileio import atomic_write_text, atomic_write_with
from difflab.train.tasks.base import Task

if TYPE_CHECKING:
    from difflab.config import DataConfig, SceneFeaturesRunConfig
    from difflab.train.trainer import Trainer

Tensor = torch.Tensor
HEADS: tuple[str, ...] = tuple(SceneFeatureNet.heads)
WEIGHTS_NAME, INFO_NAME = SCENE_WEIGHTS.name, SCENE_INFO.name  # in the run folder, as shipped
NO_DIGIT, NO_COLOUR = 10, len(COLOURS)  # the "none" class of the second object's heads


def scene_targets(descriptions: Sequence[SceneDescription]) -> Tensor:
    """int64 [N, 5], one column per head of :class:`SceneFeatureNet` (in ``heads`` order): layout class
    (:func:`~difflab.eval.scenes.layout_class`), first object's digit and colour index, second object's
    digit and colour index (10 and 6 = none, for single-digit scenes)."""
    rows = []
    for d in descriptions:
        a = d.objects[0]
        b = d.objects[1] if len(d.objects) > 1 else None
        rows.append([layout_class(d.layout, d.objects), a.digit, COLOURS.index(a.colour),
                     b.digit if b else NO_DIGIT, COLOURS.index(b.colour) if b else NO_COLOUR])
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, len(HEADS))


class TrainingScenes:
    """The scenes of ``data`` (32x32) with their 16x16 renders and their targets: ``get_items(indices,
    epoch)`` gives ``{"x0": [B, 3, 32, 32], "x16": [B, 3, 16, 16]`` (float in [-1, 1], the spec's renders)
    ``, "targets": int64 [B, 5]}`` (:func:`scene_targets`)."""

    def __init__(self, data: DataConfig) -> None:
        self.x32 = build_dataset(data)
        self.x16 = build_dataset(dataclasses.replace(data, image_size=16))

    def __len__(self) -> int:
        return len(self.x32)

    def get_items(self, indices, epoch: int | None = None) -> dict[str, Any]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return {"x0": self.x32.get_batch(idx)[0], "x16": self.x16.get_batch(idx)[0],
                "targets": scene_targets([self.x32.attributes(i) for i in idx])}


@torch.no_grad()
def head_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> dict[str, float]:
    """Share of right argmax per head, and ``all`` (every head right), of ``model`` (eval mode) on
    images ``x`` [N, 3, R, R] with targets ``y`` [N, 5] (:func:`scene_targets`); rounded to 4 places."""
    device = next(model.parameters()).device
    right = []
    for i in range(0, len(x), batch_size):
        _, logits = model(x[i:i + batch_size].to(device))
        right.append(torch.stack([logits[h].argmax(1).cpu() == y[i:i + batch_size, j] for j, h in enumerate(HEADS)]))
    ok = torch.cat(right, dim=1)  # [5, N]
    acc = {h: ok[j].float().mean().item() for j, h in enumerate(HEADS)}
    acc["all"] = ok.all(0).float().mean().item()
    return {k: round(v, 4) for k, v in acc.items()}


class SceneFeaturesTask(Task):
    """SceneFeatureNet on captioned MNIST scenes (see the module docstring)."""

    generator_names = ("augment",)
    log_terms = ("loss", *(f"acc_{h}" for h in HEADS), "grad_norm")
    has_finish = True
    cfg: SceneFeaturesRunConfig

    def build_model(self) -> nn.Module:
        return SceneFeatureNet()

    def build_source(self, *, rank: int, world: int, local_batch: int) -> BatchSource:
        return IndexedBatches(TrainingScenes(self.cfg.data), seed=self.cfg.train.seed, rank=rank, world=world,
                              local_batch=local_batch)

    def draws(self, batch_size: int, batch: dict[str, Any], generators: dict[str, torch.Generator]
              ) -> dict[str, Tensor]:
        c, g = self.cfg, generators["augment"]
        low = torch.rand(batch_size, generator=g) < c.p_low_res
        noisy = torch.rand(batch_size, generator=g) < c.p_noise
        sigma = torch.rand(batch_size, generator=g) * c.max_noise_sigma
        noise = torch.randn((batch_size, *batch["x0"].shape[1:]), generator=g)
        return {"low_res": low, "sigma": torch.where(noisy, sigma, torch.zeros_like(sigma)), "noise": noise}

    @staticmethod
    def inputs(batch: dict[str, Any], draws: dict[str, Tensor]) -> Tensor:
        """The augmented network inputs [n, 3, 32, 32] of a (micro-)batch (see the module docstring)."""
        x = torch.where(draws["low_res"][:, None, None, None], SceneFeatureNet.prepare(batch["x16"]), batch["x0"])
        return (x + draws["sigma"][:, None, None, None] * draws["noise"]).clamp(-1, 1)

    def losses(self, model: nn.Module, batch: dict[str, Any], draws: dict[str, Tensor]) -> dict[str, Tensor]:
        _, logits = model(self.inputs(batch, draws))
        y = batch["targets"]
        ce = [F.cross_entropy(logits[h].float(), y[:, j], reduction="none") for j, h in enumerate(HEADS)]
        terms = {"loss": torch.stack(ce).sum(0)}
        terms.update({f"acc_{h}": (logits[h].argmax(1) == y[:, j]).float() for j, h in enumerate(HEADS)})
        return terms

    # ----------------------------------------------------------------------------------- final outputs
    def finish(self, trainer: Trainer, net: nn.Module) -> None:
        """Write scene_features.safetensors and scene_features.json (see the module docstring)."""
        from safetensors.torch import save_file

        sd = {k: v.detach().cpu().float().contiguous() for k, v in net.state_dict().items()
              if not k.endswith("num_batches_tracked")}
        atomic_write_with(trainer.run_dir / WEIGHTS_NAME, lambda tmp: save_file(sd, str(tmp)))
        text = json.dumps(self.report(net, trainer), indent=2) + "\n"
        atomic_write_text(trainer.run_dir / INFO_NAME, text)

    def report(self, net: nn.Module, trainer: Trainer) -> dict[str, Any]:
        """The accuracies (see the module docstring) and the recipe."""
        c, d, tc = self.cfg, self.cfg.data, self.cfg.train
        split = d.split or "train"
        n_data = d.num_scenes or DEFAULT_NUM_SCENES[split]
        n_train = min(c.eval_scenes, n_data)
        n_ref = min(c.eval_scenes, REFERENCE_SIZE)
        parts = [("test", REFERENCE_SEED, n_ref), ("test", REFERENCE_SEED + 1, c.eval_scenes - n_ref)]
        parts = [p for p in parts if p[2]]
        x_train, y_train = _rendered([(split, d.scene_seed, n_train)], (32, 16))
        x_test, y_test = _rendered(parts, (64, 32, 16))
        accuracy = {**{f"train_{s}": head_accuracy(net, x_train[s], y_train) for s in (32, 16)},
                    **{f"test_{s}": head_accuracy(net, x_test[s], y_test) for s in (64, 32, 16)}}
        test_text = " + ".join(f"render_scenes('{sp}', {seed}, 0..{n - 1})" for sp, seed, n in parts)
        return {
            "model": "difflab.eval.scenes.SceneFeatureNet",
            "data": f"train: render_scenes('{split}', {d.scene_seed}, 0..{n_data - 1}) at 32 and 16; "
                    f"scored: train_*: the first {n_train} of them; test_*: {test_text}",
            "heads": dict(SceneFeatureNet.heads),
            "accuracy": accuracy,
            "parameters": sum(p.numel() for p in net.parameters()),
            "scenes": n_data,
            "steps": trainer.step,
            "epochs": round(trainer.step * tc.batch_size / n_data, 3),
            "batch_size": tc.batch_size,
            "lr": tc.lr,
            "lr_schedule": tc.lr_schedule,
            "warmup_steps": tc.warmup_steps,
            "weight_decay": tc.weight_decay,
            "augment": {"p_low_res": c.p_low_res, "p_noise": c.p_noise, "max_noise_sigma": c.max_noise_sigma},
            "seed": tc.seed,
            "train_seconds": round(trainer.seconds, 1),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {trainer.device.type.upper()}",
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
        }


def _rendered(parts: Sequence[tuple[str, int, int]], sizes: Sequence[int]) -> tuple[dict[int, Tensor], Tensor]:
    """Scenes ``(split, seed, 0..n-1)`` of each part, one after the other: ``({size: float [N, 3, s, s]},
    targets [N, 5])``."""
    batches = [render_scenes(split, seed, np.arange(n), sizes=sizes) for split, seed, n in parts]
    x = {s: torch.cat([uint8_to_float(b.images[s]) for b in batches]) for s in sizes}
    return x, scene_targets([desc for b in batches for desc in b.descriptions])
