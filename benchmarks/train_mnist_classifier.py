"""Train difflab's MNIST classifier (the feature space of MNIST FD / precision / recall).

Trains :class:`difflab.eval.features.MNISTClassifier` on the MNIST-5k train split only (4,000
images: the first 400 of each class), measures it on the 1,000-image test split, and writes

* ``src/difflab/eval/weights/mnist_classifier.safetensors`` (float32 weights, ~0.6 MB)
* ``src/difflab/eval/weights/mnist_classifier.json`` (test accuracy, command, seed, versions)

Deterministic for a given seed, torch version and thread count (``torch.use_deterministic_algorithms``,
one seeded generator for shuffling, augmentation and dropout). A few minutes on 2 CPU cores.

    python benchmarks/train_mnist_classifier.py            # the shipped weights
    python benchmarks/train_mnist_classifier.py --epochs 2 --out /tmp/clf   # a quick try
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from difflab.data import load_mnist5k
from difflab.eval.features import MNISTClassifier

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "difflab" / "eval" / "weights"


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-5k split as (images (N, 1, 28, 28) float in [-1, 1], labels (N,) int64)."""
    images, labels = load_mnist5k(split)  # uint8 (N, 28, 28)
    x = torch.from_numpy(images).float().reshape(-1, 1, 28, 28) / 127.5 - 1.0
    return x, torch.from_numpy(labels).long()


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random affine (rotation +-10 deg, scale 0.9..1.1, shift +-2 px), background kept at -1."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=g) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(n, generator=g) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 / 14)  # 2 px in [-1, 1] grid units
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample pads with 0, so sample x + 1 (background 0) and shift back
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


@torch.no_grad()
def accuracy(model: MNISTClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + 500])[1].argmax(1) for i in range(0, len(x), 500)])
    return (pred == y).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    g = torch.Generator().manual_seed(args.seed)
    x_train, y_train = load_split("train")
    x_test, y_test = load_split("test")
    print(f"train {tuple(x_train.shape)}  test {tuple(x_test.shape)}  threads {torch.get_num_threads()}")

    model = MNISTClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        total = 0.0
        for i in range(0, len(perm), args.batch_size):
            b = perm[i:i + args.batch_size]
            xb = augment(x_train[b], g).clamp(-1, 1)
            loss = F.cross_entropy(model(xb)[1], y_train[b], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        acc = accuracy(model, x_test, y_test)
        print(f"epoch {epoch + 1:3d}  loss {total / len(x_train):.4f}  test acc {acc:.4f}  "
              f"{time.time() - t0:.0f}s", flush=True)

    model.eval()
    train_acc, test_acc = accuracy(model, x_train, y_train), accuracy(model, x_test, y_test)
    args.out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(sd, str(args.out / "mnist_classifier.safetensors"))
    info = {
        "model": "difflab.eval.features.MNISTClassifier",
        "data": "MNIST-5k (difflab.data.load_mnist5k): train = first 400 of each class, test = last 100",
        "test_accuracy": round(test_acc, 4),
        "test_n": len(y_test),
        "train_accuracy": round(train_acc, 4),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "seconds": round(time.time() - t0, 1),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    (args.out / "mnist_classifier.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
