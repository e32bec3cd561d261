"""The models ``difflab serve`` serves: the run folders, converted folders, cascade files and noisy classifiers
named on its command line, and nothing else.

Each is checked when the server starts (a bad path is the CLI's one-line error) and loaded on its first job.
A request names a model or a classifier by the name listed here, never by a path: :meth:`Registry.model`
answers an unknown name with the list of served ones. :meth:`ServedRun.describe` tells the page which inputs
the model takes (prompt, class label, guidance, classifier, inpainting, cascade stages) and their bounds.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difflab.generate import sampler_names

__all__ = ["Limits", "ServedRun", "ServedCascade", "ServedClassifier", "Registry", "eta_samplers"]


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask (each a 422 naming the bound when exceeded)."""

    # images per job
    max_n: int = 64
    # sampling steps per chain (and never more than the model's diffusion.steps)
    max_steps: int = 1000
    # n x side x side of a job's output (a 256x256 model: 64 images)
    max_pixels: int = 64 * 256 * 256
    # characters of a prompt
    max_prompt: int = 256
    # bytes of an uploaded image
    max_upload_bytes: int = 4_000_000
    # width x height of an uploaded image (checked before it is decoded)
    max_upload_pixels: int = 1024 * 1024
    # bytes of a JSON request
    max_json_bytes: int = 64_000
    # jobs waiting per model
    max_queue: int = 64
    # guidance scales (classifier-free w, classifier s) and DDIM eta
    max_guidance: float = 100.0
    max_classifier_scale: float = 1000.0
    max_eta: float = 10.0


def eta_samplers() -> list[str]:
    """The samplers that take ``eta`` (DDIM)."""
    from difflab.generate import get_sampler

    return [name for name in sampler_names() if "eta" in inspect.signature(get_sampler(name)).parameters]


def _checkpoint_step(ckpt: Path) -> int | None:
    tail = ckpt.name.rpartition("_")[2]
    return int(tail) if tail.isdigit() else None


def _unique(name: str, taken: set[str]) -> str:
    out, k = name, 1
    while out in taken:
        k += 1
        out = f"{name}-{k}"
    return out


@dataclass
class ServedRun:
    """A run folder of ``difflab train`` or a folder of ``difflab convert``."""

    name: str
    path: Path
    cfg: Any
    kind: str = "run"
    _loaded: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def converted(self) -> bool:
        from difflab.convert import is_converted_folder

        return is_converted_folder(self.path)

    @property
    def output_side(self) -> int:
        """The side of the images ``difflab sample`` writes (the built-in sources' padding cropped off)."""
        import torch

        from difflab.images import to_output_size

        side = self.cfg.data.sample_size
        return to_output_size(torch.zeros(1, 1, side, side), self.cfg.data).shape[-1]

    @property
    def num_classes(self) -> int | None:
        return getattr(self.cfg.model, "num_classes", None)

    @property
    def low_res(self) -> bool:
        return bool(getattr(self.cfg.model, "low_res_channels", 0))

    @property
    def guidance_ok(self) -> bool:
        """Classifier-free guidance: a run trained with condition dropout (the empty caption / the null label)."""
        cfg = self.cfg
        if cfg.diffusion.p_uncond <= 0:
            return False
        return cfg.is_text or (self.num_classes is not None and bool(getattr(cfg.model, "class_null", False)))

    def load(self):
        """``(cfg, denoiser, checkpoint step or None)``, loaded once (the latest complete checkpoint when the
        server first needs it, pinned from then on so that a gallery command names it)."""
        with self._lock:
            if self._loaded is None:
                from difflab.build import find_checkpoint, load_run, resolve_ema

                step = None if self.converted else _checkpoint_step(find_checkpoint(self.path))
                cfg, _, denoiser = load_run(self.path, ema=resolve_ema(self.cfg, None), checkpoint=step)
                self._loaded = (cfg, denoiser, step)
            return self._loaded

    def describe(self, classifiers: list[ServedClassifier]) -> dict:
        cfg, sc = self.cfg, self.cfg.sample
        steps = sc.steps
        can_classify = not cfg.is_text and not self.low_res
        return {
            "name": self.name, "kind": self.kind, "path": str(self.path), "converted": self.converted,
            "side": self.output_side, "channels": cfg.model.in_channels, "T": cfg.diffusion.steps,
            "text": cfg.is_text, "num_classes": self.num_classes, "guidance": self.guidance_ok,
            "classifiers": [c.name for c in classifiers] if can_classify else [],
            "inpaint": None if self.low_res else ("glide" if getattr(cfg.model, "inpaint", False) else "replace"),
            "needs_low_res": self.low_res,
            "defaults": {"sampler": sc.sampler, "steps": steps if steps is not None else cfg.diffusion.steps,
                         "eta": sc.eta, "guidance": sc.guidance_scale if self.guidance_ok else 0.0,
                         "n": min(sc.n, 8), "seed": sc.seed},
        }


@dataclass
class ServedCascade:
    """A cascade file (:mod:`difflab.pipelines.cascade`): its stages loaded together on its first job."""

    name: str
    path: Path
    cascade: Any
    stage_cfgs: list
    kind: str = "cascade"
    _stages: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def text(self) -> bool:
        return any(c.is_text for c in self.stage_cfgs)

    @property
    def num_classes(self) -> int | None:
        return getattr(self.stage_cfgs[0].model, "num_classes", None)

    @property
    def output_side(self) -> int:
        import torch

        from difflab.images import to_output_size

        d = self.stage_cfgs[-1].data
        return to_output_size(torch.zeros(1, 1, d.sample_size, d.sample_size), d).shape[-1]

    def load(self):
        with self._lock:
            if self._stages is None:
                from difflab.pipelines.cascade import build_cascade

                self._stages = build_cascade(self.cascade)
            return self._stages

    def describe(self, classifiers: list[ServedClassifier]) -> dict:
        stages = []
        for spec, cfg in zip(self.cascade.stages, self.stage_cfgs, strict=True):
            sc = cfg.sample
            steps = spec.steps if spec.steps is not None else sc.steps
            stages.append({
                "run": spec.run, "side": cfg.data.sample_size, "T": cfg.diffusion.steps,
                "low_res": bool(getattr(cfg.model, "low_res_channels", 0)),
                "noise_aug": cfg.augment.kind == "noise", "aug_steps": cfg.augment.steps,
                "truncated": spec.truncated,
                "defaults": {"sampler": spec.sampler or sc.sampler,
                             "steps": steps if steps is not None else cfg.diffusion.steps,
                             "eta": spec.eta if spec.eta is not None else sc.eta,
                             "guidance": spec.guidance if spec.guidance is not None else sc.guidance_scale,
                             "aug_level": spec.aug_level if spec.aug_level is not None else sc.aug_level}})
        base = self.stage_cfgs[0]
        return {
            "name": self.name, "kind": self.kind, "path": str(self.path), "converted": False,
            "side": self.output_side, "channels": self.stage_cfgs[-1].model.in_channels,
            "T": base.diffusion.steps, "text": self.text, "num_classes": self.num_classes,
            "guidance": False, "classifiers": [], "inpaint": None, "needs_low_res": False, "stages": stages,
            "defaults": {"n": min(self.cascade.n, 8), "seed": self.cascade.seed},
        }


@dataclass
class ServedClassifier:
    """A noisy classifier (a ``task: classifier`` run folder, or a converted released classifier)."""

    name: str
    path: Path
    _loaded: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def load(self):
        with self._lock:
            if self._loaded is None:
                from difflab.train.classifier import load_classifier

                self._loaded = load_classifier(self.path)
            return self._loaded


class Registry:
    """The served models and classifiers by name (see the module docstring)."""

    def __init__(self, paths: list[str | Path]) -> None:
        if not paths:
            raise ValueError("difflab serve needs at least one run folder, converted folder or cascade file")
        self.models: dict[str, ServedRun | ServedCascade] = {}
        self.classifiers: dict[str, ServedClassifier] = {}
        for raw in paths:
            self._add(Path(raw))
        if not self.models:
            raise ValueError("difflab serve: only classifiers were named; name a diffusion run, converted folder or "
                             "cascade file to sample from")

    def _add(self, path: Path) -> None:
        from difflab.build import load_run_config
        from difflab.pipelines.cascade import is_cascade_file, load_cascade

        taken = set(self.models) | set(self.classifiers)
        if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
            if not is_cascade_file(path):
                raise ValueError(f"{path}: a YAML file to serve must be a cascade file (a top-level 'stages' list)")
            cascade = load_cascade(path.resolve())  # stage runs absolute: the gallery's cascade files name them
            cfgs = [load_run_config(s.run) for s in cascade.stages]
            name = _unique(path.name.split(".")[0], taken)
            self.models[name] = ServedCascade(name, path.resolve(), cascade, cfgs)
            return
        if path.is_file():
            raise ValueError(f"{path}: serve run folders, converted folders or cascade files (.yaml)")
        if self._converted_classifier(path) or getattr(load_run_config(path, any_task=True), "task", None) == \
                "classifier":
            name = _unique(path.name, taken)
            self.classifiers[name] = ServedClassifier(name, path.resolve())
            return
        cfg = load_run_config(path)  # a run of another task: its own error says what it is and what to do with it
        name = _unique(path.name, taken)
        self.models[name] = ServedRun(name, path.resolve(), cfg)

    @staticmethod
    def _converted_classifier(path: Path) -> bool:
        from difflab.convert import converted_network_config, is_converted_folder
        from difflab.nn.classifier import ClassifierConfig

        return is_converted_folder(path) and isinstance(converted_network_config(path), ClassifierConfig)

    def model(self, name: str) -> ServedRun | ServedCascade:
        if name not in self.models:
            raise KeyError(f"unknown model {name!r}; served models: {', '.join(self.models)}")
        return self.models[name]

    def classifier(self, name: str) -> ServedClassifier:
        if name not in self.classifiers:
            served = ", ".join(self.classifiers) or "none"
            raise KeyError(f"unknown classifier {name!r}; served classifiers: {served}")
        return self.classifiers[name]

    def describe(self) -> list[dict]:
        clfs = list(self.classifiers.values())
        return [m.describe(clfs) for m in self.models.values()]
