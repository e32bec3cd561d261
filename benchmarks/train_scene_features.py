"""Train difflab's scene feature network (the feature space of scene FD / precision / recall / diversity).

Trains :class:`difflab.eval.scenes.SceneFeatureNet` on train-split captioned MNIST scenes only
(``render_scenes("train", 0, 0..N-1)``, digits from the MNIST-5k train split) to read each scene's
layout and the digit and colour of both objects, from its 32x32 and 16x16 renders (each example one
of the two, by a seeded coin; 64x64 inputs are average-pooled to 32x32 by the network and need no
training of their own). Light Gaussian pixel noise on half the examples keeps the features defined
on imperfect samples. Measures every head on the train scenes and on test-split scenes (the 1,000
reference scenes plus 4,000 more test scenes of seed 1) at 64, 32 and 16, and writes

* ``src/difflab/eval/weights/scene_features.safetensors`` (float32 weights)
* ``src/difflab/eval/weights/scene_features.json`` (accuracies, command, seed, versions)

Deterministic for a given seed, torch version and thread count (``torch.use_deterministic_algorithms``,
one seeded generator). A few minutes on one CPU thread:

    OMP_NUM_THREADS=1 python benchmarks/train_scene_features.py
    OMP_NUM_THREADS=1 python benchmarks/train_scene_features.py --scenes 2000 --epochs 1 --out /tmp/sf   # a try
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from difflab.data import uint8_to_float
from difflab.data.scenes import render_scenes
from difflab.eval.scenes import SceneFeatureNet, layout_class

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "difflab" / "eval" / "weights"
HEADS = list(SceneFeatureNet.heads)


def targets(descriptions) -> torch.Tensor:
    """(N, 5) int64: layout class, digit1, colour1, digit2 (10 = none), colour2 (6 = none)."""
    from difflab.data.scenes import COLOURS

    rows = []
    for d in descriptions:
        a = d.objects[0]
        b = d.objects[1] if len(d.objects) > 1 else None
        rows.append([layout_class(d.layout, d.objects), a.digit, COLOURS.index(a.colour),
                     b.digit if b else 10, COLOURS.index(b.colour) if b else 6])
    return torch.tensor(rows, dtype=torch.int64)


def scenes(split: str, seed: int, n: int, sizes) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    batch = render_scenes(split, seed, np.arange(n), sizes=sizes)
    return {s: uint8_to_float(batch.images[s]) for s in sizes}, targets(batch.descriptions)


@torch.no_grad()
def accuracy(model: SceneFeatureNet, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model.eval()
    preds = {h: [] for h in HEADS}
    for i in range(0, len(x), 500):
        _, logits = model(x[i:i + 500])
        for h in HEADS:
            preds[h].append(logits[h].argmax(1))
    acc = {h: (torch.cat(preds[h]) == y[:, j]).float().mean().item() for j, h in enumerate(HEADS)}
    acc["all"] = torch.stack([torch.cat(preds[h]) == y[:, j] for j, h in enumerate(HEADS)]).all(0).float().mean().item()
    return {k: round(v, 4) for k, v in acc.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=20_000, help="train scenes (seed 0, indices 0..N-1)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    x_train, y_train = scenes("train", 0, args.scenes, (32, 16))
    x_up16 = F.interpolate(x_train[16], scale_factor=2, mode="bilinear", align_corners=False)  # what prepare does
    print(f"rendered {args.scenes} train scenes in {time.time() - t0:.0f}s; threads {torch.get_num_threads()}",
          flush=True)

    model = SceneFeatureNet()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    steps_per_epoch = len(y_train) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    t1 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=g)
        total = 0.0
        for s in range(steps_per_epoch):
            b = perm[s * args.batch_size:(s + 1) * args.batch_size]
            low = torch.rand(len(b), generator=g) < 0.5  # the 16x16 render (upsampled) for these
            xb = torch.where(low[:, None, None, None], x_up16[b], x_train[32][b])
            noisy = (torch.rand(len(b), generator=g) < 0.5).float()[:, None, None, None]
            sigma = torch.rand(len(b), generator=g)[:, None, None, None] * 0.1
            xb = (xb + noisy * sigma * torch.randn(xb.shape, generator=g)).clamp(-1, 1)
            _, logits = model(xb)
            loss = sum(F.cross_entropy(logits[h], y_train[b, j]) for j, h in enumerate(HEADS))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        print(f"epoch {epoch + 1}  loss {total / (steps_per_epoch * args.batch_size):.4f}  "
              f"{time.time() - t1:.0f}s", flush=True)

    model.eval()
    sizes = (64, 32, 16)
    x_ref, y_ref = scenes("test", 0, 1000, sizes)
    x_more, y_more = scenes("test", 1, 4000, sizes)
    test = {f"test_{s}": accuracy(model, torch.cat([x_ref[s], x_more[s]]), torch.cat([y_ref, y_more])) for s in sizes}
    n_check = min(5000, args.scenes)
    train = {f"train_{s}": accuracy(model, x_train[s][:n_check], y_train[:n_check]) for s in (32, 16)}
    args.out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(sd, str(args.out / "scene_features.safetensors"))
    info = {
        "model": "difflab.eval.scenes.SceneFeatureNet",
        "data": f"train: render_scenes('train', 0, 0..{args.scenes - 1}) at 32 and 16 (MNIST-5k train digits); "
                "test: render_scenes('test', 0, 0..999) + render_scenes('test', 1, 0..3999) (test digits)",
        "heads": {h: n for h, n in SceneFeatureNet.heads.items()},
        "accuracy": {**train, **test},
        "parameters": sum(p.numel() for p in model.parameters()),
        "scenes": args.scenes,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "seconds": round(time.time() - t0, 1),
        "command": "OMP_NUM_THREADS=1 python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    (args.out / "scene_features.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
