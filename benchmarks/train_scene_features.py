"""Train difflab's scene feature network (the feature space of scene FD / precision / recall / diversity).

A thin wrapper around the one training loop: ``difflab train configs/scene-features.yaml --out RUN``
(:class:`difflab.train.trainer.Trainer` with
:class:`~difflab.train.tasks.scene_features.SceneFeaturesTask`: :class:`difflab.eval.scenes.SceneFeatureNet`
on 20,000 train-split captioned MNIST scenes, seed 0; the recipe is in the config and the task's
docstring), then ships the run's exported files, each copied atomically, with the command added to the JSON:

* ``RUN/scene_features.safetensors`` -> ``src/difflab/eval/weights/scene_features.safetensors`` (float32 weights)
* ``RUN/scene_features.json`` -> ``src/difflab/eval/weights/scene_features.json`` (accuracy of every head on
  train scenes at 32 / 16 and on 5,000 test scenes at 64 / 32 / 16, the recipe, versions)

Deterministic for a given seed, torch version and thread count. A few minutes on one CPU thread:

    OMP_NUM_THREADS=1 python benchmarks/train_scene_features.py
    OMP_NUM_THREADS=1 python benchmarks/train_scene_features.py --run /tmp/sf-run --weights /tmp/sf \\
        --set data.num_scenes=2000 --set train.max_steps=15 --set train.warmup_steps=5   # a try
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from difflab.eval.scenes import SCENE_INFO, SCENE_WEIGHTS
from difflab.fileio import atomic_write_bytes, atomic_write_text
from difflab.train.tasks.scene_features import INFO_NAME, WEIGHTS_NAME
from difflab.train.trainer import Trainer, resolve_train_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "scene-features.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=CONFIG, help="a task: scene_features config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, as difflab train --set (repeatable)")
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "scene-features",
                   help="the run folder (must hold no checkpoints yet)")
    p.add_argument("--weights", type=Path, default=SCENE_WEIGHTS.parent,
                   help="where the weights and JSON are shipped (default: src/difflab/eval/weights)")
    args = p.parse_args(argv)

    t0 = time.time()
    cfg, run = resolve_train_config(args.config, args.overrides, out=args.run)
    result = Trainer(cfg, run, quiet=True).train()
    print(f"trained {result.step} steps in {result.seconds:.0f}s; run folder {run}", flush=True)

    info = json.loads((run / INFO_NAME).read_text(encoding="utf-8"))
    try:
        config = args.config.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        config = str(args.config)
    info["config"] = config
    info["seconds"] = round(time.time() - t0, 1)
    info["command"] = "OMP_NUM_THREADS=1 python " + " ".join(
        [Path(sys.argv[0]).as_posix()] + (sys.argv[1:] if argv is None else argv))
    args.weights.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.weights / SCENE_WEIGHTS.name, (run / WEIGHTS_NAME).read_bytes())
    atomic_write_text(args.weights / SCENE_INFO.name, json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
