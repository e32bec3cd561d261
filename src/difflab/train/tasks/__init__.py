"""Tasks of the one training loop: what each kind of model trains on and how it is scored.

- :class:`~difflab.train.tasks.diffusion.DiffusionTask`: a denoiser (DDPM / iDDPM / ADM / CFG), from a
  :class:`~difflab.config.Config`;
- :class:`~difflab.train.tasks.classifier.ClassifierTask`: a noisy classifier for classifier guidance
  (ADM Sec. 4), from a :class:`~difflab.config.ClassifierRunConfig` (``task: classifier``);
- :class:`~difflab.train.tasks.scene_features.SceneFeaturesTask`: the scene evaluator's feature network
  (:class:`~difflab.eval.scenes.SceneFeatureNet`), from a :class:`~difflab.config.SceneFeaturesRunConfig`
  (``task: scene_features``);
- :class:`~difflab.train.tasks.noised_clip.NoisedCLIPTask`: GLIDE's noised CLIP for CLIP guidance, from a
  :class:`~difflab.config.NoisedCLIPRunConfig` (``task: noised_clip``);
- :class:`~difflab.train.tasks.clip.CLIPTask`: the CLIP unCLIP reads (OpenAI's layout, clean images), from a
  :class:`~difflab.config.CLIPRunConfig` (``task: clip``).

:mod:`difflab.train.tasks.base` says what a task supplies and what the loop does with it.
"""

from __future__ import annotations

from typing import Any

from difflab.train.tasks.base import Task

__all__ = ["Task", "make_task"]


def make_task(cfg: Any) -> Task:
    """The task a run config describes (by its type)."""
    from difflab.config import ClassifierRunConfig, Config, SceneFeaturesRunConfig

    if isinstance(cfg, ClassifierRunConfig):
        from difflab.train.tasks.classifier import ClassifierTask

        return ClassifierTask(cfg)
    if isinstance(cfg, SceneFeaturesRunConfig):
        from difflab.train.tasks.scene_features import SceneFeaturesTask

        return SceneFeaturesTask(cfg)
    from difflab.config import CLIPRunConfig, NoisedCLIPRunConfig

    if isinstance(cfg, CLIPRunConfig):
        from difflab.train.tasks.clip import CLIPTask

        return CLIPTask(cfg)

    if isinstance(cfg, NoisedCLIPRunConfig):
        from difflab.train.tasks.noised_clip import NoisedCLIPTask

        return NoisedCLIPTask(cfg)
    if isinstance(cfg, Config):
        from difflab.train.tasks.diffusion import DiffusionTask

        return DiffusionTask(cfg)
    raise ValueError(f"no training task for a {type(cfg).__name__}; valid: Config (diffusion), "
                     "ClassifierRunConfig (task: classifier), SceneFeaturesRunConfig (task: scene_features), "
                     "NoisedCLIPRunConfig (task: noised_clip), CLIPRunConfig (task: clip)")
