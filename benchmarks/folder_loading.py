"""Batches per second from an image folder (no cache) with 0, 1, 2, ... decoding threads (``data.num_workers``).

The folder holds real photos: scikit-image's sample images (astronaut, coffee, chelsea, rocket, camera,
...), each saved as a JPEG at its native size (mostly 512 px) and as a half-size PNG. A batch of 32 random
files is decoded, resized to ``--image-size`` and centre-cropped, as training does with ``data.cache:
false``. Timed in interleaved rounds (median).

    python benchmarks/folder_loading.py --workers 0,1,2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from difflab.data import ImageFolderDataset

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "coins", "moon", "page", "text")


def write_photos(root: Path) -> int:
    """Write the sample photos (JPEG full size, PNG half size) into ``root``; returns the file count."""
    from skimage import data

    n = 0
    for name in PHOTOS:
        img = getattr(data, name)()
        Image.fromarray(img).save(root / f"{name}.jpg", quality=90)
        Image.fromarray(img[::2, ::2]).save(root / f"{name}-half.png")
        n += 2
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="0,1,2", help="comma-separated thread counts")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", type=int, default=4, help="batches per thread count per round")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        n_files = write_photos(Path(tmp))
        sets = {w: ImageFolderDataset(tmp, args.image_size, channels=3, num_workers=w) for w in workers}
        rng = np.random.default_rng(0)
        rates: dict[int, list[float]] = {w: [] for w in workers}
        for r in range(args.rounds):
            for w in (workers if r % 2 == 0 else workers[::-1]):
                t0 = time.perf_counter()
                for _ in range(args.batches):
                    sets[w].get_batch(rng.integers(0, n_files, size=args.batch))
                rates[w].append(args.batches / (time.perf_counter() - t0))
    base = statistics.median(rates[workers[0]])
    print(f"{n_files} files, batch {args.batch}, resized to {args.image_size}px, median of {args.rounds} rounds")
    print(f"| num_workers | batches/s | vs num_workers={workers[0]} |\n|---|---|---|")
    for w in workers:
        med = statistics.median(rates[w])
        print(f"| {w} | {med:.2f} | {med / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
