"""``difflab train`` for a noisy classifier (ADM Sec. 4): a classifier config in, a run folder out.

A classifier config is a YAML file whose top level says ``task: classifier``::

    task: classifier
    classifier: difflab.nn.classifier.ClassifierConfig   (or {preset: NAME, ...overrides})
    diffusion:  DiffusionConfig   the schedule of the diffusion model it will guide (steps, schedule)
    data:       DataConfig        labelled images (mnist5k / digits / class folders / npz with labels)
    train:      TrainConfig       lr, weight_decay, batch_size, max_steps, log_every, seed

Only ``diffusion.steps`` / ``diffusion.schedule`` matter to the classifier (it sees x_t ~ q(x_t | x_0)
of that process); the section is the diffusion model's, so both can share it. Of ``train``, the
fields above are used; the EMA / checkpoint / sampling fields do not apply (training is one
short session: a run is not resumable, and ``--max-minutes`` stops it early and still saves).

The run folder:
    config.yaml                  the resolved classifier config
    metrics.jsonl                {"step", "loss", "accuracy", "lr"} every ``train.log_every`` steps
    classifier.safetensors       weights + network config + ClassifierInfo (``load_classifier`` reads it)
    accuracy_by_noise.json       top-1 accuracy and loss in 10 bands of t on the held-out split
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from difflab.config import (
    ConfigError,
    DataConfig,
    DiffusionConfig,
    TrainConfig,
    _normalise,
    load_config,
    save_config,
)
from difflab.nn.classifier import ClassifierConfig

__all__ = ["ClassifierRunConfig", "is_classifier_config", "classifier_config_of", "run_classifier_command",
           "load_classifier_run_config", "train_classifier_run", "format_accuracy", "ACCURACY_NAME", "BINS"]

ACCURACY_NAME = "accuracy_by_noise.json"
BINS = 10


@dataclass(frozen=True)
class ClassifierRunConfig:
    """A noisy-classifier run: the network, the diffusion schedule it is trained on, data and optimiser."""

    # the network (difflab.nn.classifier.ClassifierConfig); YAML may say {preset: NAME, ...overrides}
    classifier: ClassifierConfig
    # marks the file as a classifier config (a diffusion config has no 'task')
    task: Literal["classifier"] = "classifier"
    # the noise process of the diffusion model to guide (steps and schedule are used)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    # labelled training data; the held-out split (mnist5k / digits) scores accuracy per noise level
    data: DataConfig = field(default_factory=DataConfig)
    # lr, weight_decay (AdamW), batch_size, max_steps, log_every, seed
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _normalise(self)
        c, d = self.classifier, self.data
        if c.image_size != d.image_size:
            raise ConfigError(("data", "image_size"), f"is {d.image_size} but classifier.image_size is {c.image_size}")
        if d.channels is not None and d.channels != c.in_channels:
            raise ConfigError(("data", "channels"), f"is {d.channels} but classifier.in_channels is {c.in_channels}")

    @property
    def schedule_name(self) -> str:
        """``"cosine/1000"``: the schedule's name in the classifier's info and in messages."""
        return f"{self.diffusion.schedule}/{self.diffusion.steps}"


def is_classifier_config(path: str | Path) -> bool:
    """True when the YAML file's top level says ``task: classifier`` (a ConfigError for another task)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False  # load_config reports unreadable files
    task = data.get("task") if isinstance(data, Mapping) else None
    if task is not None and task != "classifier":
        raise ConfigError(("task",), f"must be 'classifier' (or absent for a diffusion model); got {task!r} "
                                     f"(in {path})")
    return task == "classifier"


def classifier_config_of(config: str | Path | None, resume: str | Path | None) -> bool:
    """Whether ``difflab train CONFIG`` / ``--resume RUN`` is about a classifier (``task: classifier``)."""
    if config is not None:
        return Path(config).is_file() and is_classifier_config(config)
    if resume is not None:
        path = Path(resume) / "config.yaml"
        return path.is_file() and is_classifier_config(path)
    return False


def load_classifier_run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ClassifierRunConfig:
    """Read and validate a classifier config (``task: classifier``), with dotted ``overrides``."""
    cfg = load_config(path, overrides)
    if not isinstance(cfg, ClassifierRunConfig):
        raise ConfigError(("task",), f"missing: {path} is a diffusion config, not a classifier config")
    return cfg


def _batches(dataset, batch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches (a fresh permutation per epoch from ``seed``; the last partial batch dropped)."""
    if batch > len(dataset):
        raise ValueError(f"train.batch_size={batch} is larger than the {len(dataset)} training images")
    g = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        order = torch.randperm(len(dataset), generator=g).numpy()
        for i in range(0, len(order) - batch + 1, batch):
            yield dataset.get_batch(order[i:i + batch], epoch)
        epoch += 1


def _held_out(data: DataConfig) -> DataConfig:
    """The split accuracy is scored on: test for mnist5k / digits, else the training set itself."""
    if data.source in ("mnist5k", "digits"):
        return dataclasses.replace(data, split="test", random_flip=False)
    return dataclasses.replace(data, random_flip=False)


def train_classifier_run(
    cfg: ClassifierRunConfig,
    run_dir: str | Path,
    *,
    max_minutes: float | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train the classifier of ``cfg`` into ``run_dir``; returns the accuracy-by-noise report (also written).

    Raises ValueError when ``run_dir`` already holds a classifier, the data has no labels, or the
    data's classes differ from ``classifier.out_channels``.
    """
    from difflab.build import CONFIG_NAME, build_process
    from difflab.data import build_dataset
    from difflab.nn.classifier import Classifier
    from difflab.train.classifier import CLASSIFIER_FILE, accuracy_by_noise_level, save_classifier, train_classifier
    from difflab.train.metrics import METRICS_NAME

    run = Path(run_dir)
    if (run / CLASSIFIER_FILE).exists():
        raise ValueError(f"{run} already holds a trained classifier; choose another --out")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"max_minutes must be > 0, got {max_minutes}")
    tc = cfg.train
    dataset = build_dataset(cfg.data, seed=tc.seed)
    classes = getattr(dataset, "num_classes", None)
    if classes is None:
        raise ValueError(f"the classifier needs labelled data; the {cfg.data.source} data has no labels")
    if classes != cfg.classifier.out_channels:
        raise ValueError(f"the data has {classes} classes but classifier.out_channels is {cfg.classifier.out_channels}")
    process = build_process(cfg.diffusion)
    torch.manual_seed(tc.seed)
    clf = Classifier(cfg.classifier)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / CONFIG_NAME)
    log = open(run / METRICS_NAME, "w", encoding="utf-8")  # noqa: SIM115 - closed in finally
    start = time.perf_counter()

    def record(rec: dict[str, Any]) -> None:
        rec = {**rec, "seconds": round(time.perf_counter() - start, 2)}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if not quiet:
            print(f"step {rec['step']}: loss {rec['loss']:.4f}, accuracy {rec['accuracy']:.3f}", flush=True)

    try:
        records = train_classifier(
            clf, process, _batches(dataset, tc.batch_size, tc.seed), tc.max_steps, lr=tc.lr,
            weight_decay=tc.weight_decay, generator=torch.Generator().manual_seed(tc.seed + 1),
            schedule=cfg.schedule_name, log_every=tc.log_every, callback=record,
            max_seconds=None if max_minutes is None else 60.0 * max_minutes,
        )
    finally:
        log.close()
    seconds = time.perf_counter() - start
    save_classifier(run / CLASSIFIER_FILE, clf)
    held = _held_out(cfg.data)
    test = build_dataset(held, seed=tc.seed)
    x, y = test.get_batch(range(len(test)))
    acc = accuracy_by_noise_level(clf, process, x, y, BINS, generator=torch.Generator().manual_seed(tc.seed + 2))
    report = {"split": held.split or "train", "n": len(y), "chance": 1.0 / classes,
              "steps": records[-1]["step"] if records else 0, "train_seconds": round(seconds, 1),
              "schedule": cfg.schedule_name, **acc}
    (run / ACCURACY_NAME).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


def format_accuracy(report: Mapping[str, Any]) -> str:
    """The accuracy-by-noise report as a small text table."""
    lines = [f"accuracy per noise level on {report['n']} {report['split']} images (chance {report['chance']:.2f}):",
             "   t range     accuracy   loss"]
    for lo, hi, a, loss in zip(report["t_start"], report["t_end"], report["accuracy"], report["loss"], strict=True):
        lines.append(f"  {lo:4d}-{hi:<4d}    {a:7.3f}   {loss:6.3f}")
    return "\n".join(lines)


def run_classifier_command(config: str, overrides: list[str], *, out: str | None, resume: str | None,
                           max_steps: int | None, max_minutes: float | None, quiet: bool) -> int:
    """``difflab train CLASSIFIER_CONFIG``: train, print the accuracy table, return the exit status."""
    if resume is not None:
        raise ValueError("a classifier run cannot be resumed (it trains in one session); train it again with --out")
    if config is None:
        raise ValueError("give a classifier CONFIG file to train")
    extra = [*overrides, *([f"train.max_steps={max_steps}"] if max_steps is not None else [])]
    cfg = load_classifier_run_config(config, extra)
    run_dir = Path(out) if out is not None else Path("runs") / Path(config).stem
    report = train_classifier_run(cfg, run_dir, max_minutes=max_minutes, quiet=quiet)
    print(format_accuracy(report))
    print(f"step {report['steps']} ({report['train_seconds'] / 60:.1f} min); run folder: {run_dir}")
    return 0
